"""The router's report: every REPORT_EVERY its traffic totals by service and version, at
`{control_prefix}/routers/{NODE}`, bound to a lease of its own (TTL --ttl) kept alive by a
`Heartbeat`: a router that dies takes its report with it, so a canary judges by the routers
that are alive. One thread; etcd failures are retried at the next report.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from registrar.core.store import EtcdError, LeaseNotFound, Store
from registrar.health import LoopHealth
from registrar.heartbeat import Heartbeat
from registrar.metrics import Metrics
from registrar.shutdown import start_thread

log = logging.getLogger(__name__)

REPORT_EVERY = 2.0

Totals = dict[str, dict[str, dict[str, int]]]


def report_value(services: Totals, at: datetime) -> str:
    return json.dumps({"at": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "services": services},
                      sort_keys=True, separators=(",", ":"))


class Reporter:
    def __init__(self, store: Store, key: str, ttl: int, metrics: Metrics,
                 totals: Callable[[], Totals]) -> None:
        self._store = store
        self.key = key
        self._ttl = ttl
        self._totals = totals
        self._lease: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = Heartbeat(store, ttl / 3, metrics, self._lost)
        self.health = LoopHealth("reporter", self.alive,
                                 lambda loop: metrics.internal_errors.labels(loop=loop).inc())
        self.reports = 0  # written so far

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        start_thread(self._thread)
        self.heartbeat.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _lost(self, lease: int, why: str) -> None:
        log.warning("report lease %x lost (%s)", lease, why, extra={"event": "lease_lost"})
        if self._lease == lease:
            self._lease = None

    def _run(self) -> None:
        while not self._stop.wait(0 if not self.reports else REPORT_EVERY):
            self.health.progressed()
            try:
                self._write()
                self.health.succeeded()
            except EtcdError as exc:
                log.debug("report not written: %s", exc)
            except Exception:  # a bug: it must show, and must not stop the reports
                log.exception("writing the report failed")
                self.health.internal_error()

    def _write(self) -> None:
        if self._lease is None:
            self._lease = self._store.grant(self._ttl)
            self.heartbeat.follow(self._lease)
        value = report_value(self._totals(), datetime.now(UTC))
        try:
            self._store.put(self.key, value, self._lease)
        except LeaseNotFound:
            self._lease = None
            raise EtcdError("report lease expired: granting a new one") from None
        self.reports += 1

    def stop(self, deadline: float) -> None:
        """Stops reporting and revokes the lease: the report goes with it."""
        self._stop.set()
        self.heartbeat.request_stop()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self.heartbeat.join(deadline - time.monotonic())
        if self._lease is not None:
            try:
                self._store.revoke(self._lease, timeout=max(0.1, deadline - time.monotonic()))
            except EtcdError as exc:
                log.warning("could not revoke the report's lease: %s; it expires within %ds",
                            exc, self._ttl)
