"""`registrar catalog`'s own metrics, on a registry of its own: `registrar_catalog_*`, and
`registrar_etcd_up` (the agents' other series would only say 0 here)."""

from __future__ import annotations

from registrar import __version__
from registrar.catalog.state import CatalogState
from registrar.exposition import Counter, Gauge, Histogram, Registry

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class CatalogMetrics:
    def __init__(self) -> None:
        self.registry = r = Registry()
        self.etcd_up = Gauge("registrar_etcd_up", "Whether etcd answers (0/1).", registry=r)
        self.requests = Counter(
            "registrar_catalog_requests_total", "HTTP requests answered, by path and status.",
            ["path", "code"], registry=r)
        self.duration = Histogram(
            "registrar_catalog_request_duration_seconds",
            "Time to answer a request (blocking queries not counted: they wait on purpose).",
            ["path"], buckets=_BUCKETS, registry=r)
        self.revision = Gauge("registrar_catalog_revision",
                              "The etcd revision the catalog holds.", registry=r)
        self.services = Gauge("registrar_catalog_services", "Services in the catalog.",
                              registry=r)
        self.instances = Gauge("registrar_catalog_instances",
                               "Instances in the catalog, by state.", ["state"], registry=r)
        self.stale = Gauge("registrar_catalog_stale_seconds",
                           "How long etcd has been unreachable (0 while it answers).",
                           registry=r)
        self.builds = Gauge("registrar_catalog_builds",
                            "Catalogs built so far (at most one per revision).", registry=r)
        self.build_seconds = Histogram(
            "registrar_catalog_build_seconds",
            "Time to build the catalog from the keys held (once per revision, at a request).",
            buckets=_BUCKETS, registry=r)
        self.internal_errors = Counter(
            "registrar_internal_errors_total",
            "Unexpected errors (bugs) caught in a loop, which goes on.", ["loop"], registry=r)
        Gauge("registrar_build_info", "Build information.", ["version"],
              registry=r).labels(version=__version__).set(1)

    def observe(self, state: CatalogState) -> None:
        """Brings the gauges up to date (at each scrape)."""
        view = state.view()
        self.revision.set(view.catalog.revision)
        self.services.set(len(view.catalog.services))
        counts = dict.fromkeys(("draining", "maintenance", "standby", "rotation"), 0)
        for service in view.catalog.services.values():
            for instance in service.instances:
                counts[instance.state] += 1
        for state_name, n in counts.items():
            self.instances.labels(state=state_name).set(n)
        self.stale.set(view.stale_seconds or 0.0)
        self.builds.set(state.builds)
