"""The Prometheus metrics (README, "Metrics and health"), on a registry owned by one agent
(never a global one).

Every process has them (a sidecar too: they cost it well under a millisecond and a few KiB);
only one given --metrics-addr serves them.
"""

from __future__ import annotations

from collections.abc import Sequence

from registrar import __version__
from registrar.exposition import Counter, Gauge, Histogram, Registry

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Instruments:
    """Makes the instruments on one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)


class Metrics:
    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = _Instruments(self.registry)
        self.registrations = r.counter(
            "registrar_registrations_total", "Keys written for new registrations.")
        self.deregistrations = r.counter(
            "registrar_deregistrations_total", "Keys deleted or revoked for deregistrations.")
        self.registered = r.gauge(
            "registrar_registered_services", "Keys in rotation this process owns right now.")
        self.standby = r.gauge(
            "registrar_standby_services", "Keys this process holds on standby.")
        self.etcd_up = r.gauge("registrar_etcd_up", "Whether etcd answers (0/1).")
        self.docker_up = r.gauge("registrar_docker_up", "Whether Docker answers (0/1).")
        self.keepalive_failures = r.counter(
            "registrar_lease_keepalive_failures_total", "Lease keepalives that failed.")
        self.lease_regrants = r.counter(
            "registrar_lease_regrants_total", "Leases lost and granted anew.")
        self.docker_events = r.counter(
            "registrar_docker_events_total", "Docker container events received.", ["action"])
        self.registration_latency = r.histogram(
            "registrar_registration_latency_seconds",
            "From Docker's event time to etcd acknowledging the write.", _LATENCY_BUCKETS)
        self.etcd_request_duration = r.histogram(
            "registrar_etcd_request_duration_seconds", "Duration of etcd requests.",
            _ETCD_BUCKETS, ["op"])
        self.rejected = r.counter(
            "registrar_rejected_containers_total", "Containers not registered for bad labels.",
            ["reason"])
        self._add_failures(r)
        self.build_info = r.gauge("registrar_build_info", "Build information.", ["version"])
        self.build_info.labels(version=__version__).set(1)
        self._add_checks(r)

    def _add_failures(self, r: _Instruments) -> None:
        self.writes_refused = r.gauge(
            "registrar_etcd_writes_refused",
            "1 while etcd answers but refuses this process's writes (quota full: the NOSPACE "
            "alarm, a permission missing); heartbeats go on meanwhile.")
        self.write_refusals = r.counter(
            "registrar_etcd_write_refusals_total", "Writes etcd refused, by gRPC status.",
            ["code"])
        self.internal_errors = r.counter(
            "registrar_internal_errors_total",
            "Unexpected errors (bugs) caught in a loop, which goes on; /healthz turns 503 when "
            "one keeps failing.", ["loop"])

    def _add_checks(self, r: _Instruments) -> None:
        self.reconciles = r.counter(
            "registrar_reconciles_total",
            "Full reconciles against Docker: at start, after Docker came back, every --resync.")
        self.check_results = r.counter(
            "registrar_check_results_total", "Results of registrar's own health checks.",
            ["result"])
        self.failing_checks = r.gauge(
            "registrar_failing_checks",
            "Checked ports held out of rotation by their check right now.")
        for result in ("pass", "fail"):  # both series exist from the start, at 0
            self.check_results.labels(result=result)
