"""The Prometheus metrics of the SPEC, on a registry owned by one agent (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from registrar import __version__

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.registrations = Counter(
            "registrar_registrations_total", "Keys written for new registrations.", registry=r
        )
        self.deregistrations = Counter(
            "registrar_deregistrations_total", "Keys deleted or revoked for deregistrations.",
            registry=r,
        )
        self.registered = Gauge(
            "registrar_registered_services", "Keys in rotation this process owns right now.",
            registry=r,
        )
        self.standby = Gauge(
            "registrar_standby_services", "Keys this process holds on standby.", registry=r
        )
        self.etcd_up = Gauge("registrar_etcd_up", "Whether etcd answers (0/1).", registry=r)
        self.docker_up = Gauge("registrar_docker_up", "Whether Docker answers (0/1).", registry=r)
        self.keepalive_failures = Counter(
            "registrar_lease_keepalive_failures_total", "Lease keepalives that failed.", registry=r
        )
        self.lease_regrants = Counter(
            "registrar_lease_regrants_total", "Leases lost and granted anew.", registry=r
        )
        self.docker_events = Counter(
            "registrar_docker_events_total", "Docker container events received.", ["action"],
            registry=r,
        )
        self.registration_latency = Histogram(
            "registrar_registration_latency_seconds",
            "From Docker's event time to etcd acknowledging the write.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.etcd_request_duration = Histogram(
            "registrar_etcd_request_duration_seconds", "Duration of etcd requests.", ["op"],
            buckets=_ETCD_BUCKETS, registry=r,
        )
        self.rejected = Counter(
            "registrar_rejected_containers_total", "Containers not registered for bad labels.",
            ["reason"], registry=r,
        )
        self._add_failures(r)
        self.build_info = Gauge(
            "registrar_build_info", "Build information.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self._add_checks(r)

    def _add_failures(self, r: CollectorRegistry) -> None:
        self.writes_refused = Gauge(
            "registrar_etcd_writes_refused",
            "1 while etcd answers but refuses this process's writes (quota full: the NOSPACE "
            "alarm, a permission missing); heartbeats go on meanwhile.", registry=r,
        )
        self.write_refusals = Counter(
            "registrar_etcd_write_refusals_total", "Writes etcd refused, by gRPC status.",
            ["code"], registry=r,
        )
        self.internal_errors = Counter(
            "registrar_internal_errors_total",
            "Unexpected errors (bugs) caught in a loop, which goes on; /healthz turns 503 when "
            "one keeps failing.", ["loop"], registry=r,
        )

    def _add_checks(self, r: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "registrar_reconciles_total",
            "Full reconciles against Docker: at start, after Docker came back, every --resync.",
            registry=r,
        )
        self.check_results = Counter(
            "registrar_check_results_total", "Results of registrar's own health checks.",
            ["result"], registry=r,
        )
        self.failing_checks = Gauge(
            "registrar_failing_checks",
            "Checked ports held out of rotation by their check right now.", registry=r,
        )
        for result in ("pass", "fail"):  # both series exist from the start, at 0
            self.check_results.labels(result=result)
