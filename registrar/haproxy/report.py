"""The router's report: every REPORT_EVERY its traffic totals by service and version, what
it has applied and what is still open on instances that left rotation (written when any of
it changed, and at least every REFRESH_EVERY; never only to move its "at"), at
`{control_prefix}/routers/{NODE}`, bound to a lease of its own (TTL --ttl) kept alive by a
`Heartbeat`: a router that dies takes its report with it, so a canary judges by the routers
that are alive. `wake()` writes it at once (a drain waits on it). One thread; etcd failures
are retried at the next report. A write etcd refuses (a permission missing on
`{control_prefix}/routers/`) is not a passing outage: every canary would then roll back for
"too little traffic", so it is logged once with its cause, counted, and `/healthz` answers
503 until a report is written again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from registrar.core import timestamps
from registrar.core.store import EtcdError, EtcdRefused, LeaseNotFound, Store
from registrar.heartbeat import Heartbeat
from registrar.metrics import Metrics
from registrar.worker import Worker

log = logging.getLogger(__name__)

REPORT_EVERY = 2.0
# A report that did not change is not written again before this (only its "at" would move): each
# write is a revision etcd keeps until it compacts, and a router of a thousand services writes
# hundreds of KB (docs/scale.md).
REFRESH_EVERY = 60.0

Totals = dict[str, dict[str, dict[str, int]]]


def report_value(services: Totals, at: datetime, more: Mapping[str, Any] | None = None
                 ) -> str:
    """The report's JSON: `at`, `services`, and `more` (`applied`, `in_flight`, `latency`)."""
    return json.dumps({"at": timestamps.rfc3339(at), "services": services,
                       **(more or {})}, sort_keys=True, separators=(",", ":"))


class Reporter(Worker):
    def __init__(self, store: Store, key: str, ttl: int, metrics: Metrics,
                 totals: Callable[[], Totals],
                 more: Callable[[], Mapping[str, Any]] = dict) -> None:
        super().__init__("reporter", lambda loop: metrics.internal_errors.labels(loop=loop).inc())
        self._store = store
        self.key = key
        self._ttl = ttl
        self._totals = totals
        self._more = more
        self._wake = threading.Event()
        self._lease: int | None = None
        self._metrics = metrics
        self.refused: str | None = None  # why etcd refuses the report, while it does
        self.heartbeat = Heartbeat(store, ttl / 3, metrics, self._lost)
        self.reports = 0  # written so far
        self.unchanged = 0  # not written: nothing but "at" would have changed
        self._written: tuple[str, float] | None = None  # the last content written, and when

    def start(self) -> None:
        super().start()
        self.heartbeat.start()

    def _lost(self, lease: int, why: str) -> None:
        log.warning("report lease %x lost (%s)", lease, why, extra={"event": "lease_lost"})
        if self._lease == lease:
            self._lease = None

    def wake(self) -> None:
        """Write the report now, not at the next REPORT_EVERY (from any thread)."""
        self._wake.set()

    def run(self) -> None:
        while not self.stopping:
            if self.reports:
                self._wake.wait(REPORT_EVERY)
            self._wake.clear()
            if self.stopping:
                break
            self.health.progressed()
            try:
                self._write()
                self.health.succeeded()
            except EtcdRefused as exc:
                self._refused(exc)
            except EtcdError as exc:
                log.debug("report not written: %s", exc)
            except Exception:  # a bug: it must show, and must not stop the reports
                log.exception("writing the report failed")
                self.health.internal_error()

    def _write(self) -> None:
        if self._lease is None:
            self._lease = self._store.grant(self._ttl)
            self.heartbeat.follow(self._lease)
            self._written = None
        totals, more, now = self._totals(), self._more(), time.monotonic()
        content = json.dumps({"services": totals, **more}, sort_keys=True)
        if (self._written is not None and self._written[0] == content
                and now - self._written[1] < REFRESH_EVERY):
            self.unchanged += 1
            return
        value = report_value(totals, datetime.now(UTC), more)
        try:
            self._store.put(self.key, value, self._lease)
        except LeaseNotFound:
            self._lease = None
            raise EtcdError("report lease expired: granting a new one") from None
        self._written = (content, now)
        self.reports += 1
        if self.refused is not None:
            log.info("the router's report is written again", extra={"event": "report_written"})
            self.refused = None
            self._metrics.writes_refused.set(0)

    def _refused(self, exc: EtcdRefused) -> None:
        self._metrics.write_refusals.labels(code=exc.code).inc()
        self._metrics.writes_refused.set(1)
        if self.refused != str(exc):
            log.warning("etcd refuses the router's report at %s: %s; canaries cannot see this "
                        "router's traffic until it is written (retrying every %gs)", self.key,
                        exc, REPORT_EVERY, extra={"event": "report_refused"})
        self.refused = str(exc)

    def problem(self) -> str | None:
        """For /healthz: why the report cannot be written (None: it can, or etcd is down)."""
        refused = self.refused
        return f"the report {self.key} is refused by etcd: {refused}" if refused else None

    def stop(self, deadline: float) -> None:
        """Stops reporting and revokes the lease: the report goes with it."""
        self.request_stop()
        self.heartbeat.request_stop()
        self.join(deadline)
        self.heartbeat.join(deadline)
        if self._lease is not None:
            try:
                self._store.revoke(self._lease, timeout=max(0.1, deadline - time.monotonic()))
            except EtcdError as exc:
                log.warning("could not revoke the report's lease: %s; it expires within %ds",
                            exc, self._ttl)
