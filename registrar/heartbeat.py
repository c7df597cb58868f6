"""Heartbeat: keeps one lease alive on its own thread and clock, every TTL/3, whatever the
writes do (a write etcd keeps refusing, or retrying with a long backoff, never delays it).

When etcd answers a keepalive with TTL 0 (or "lease not found") the lease is gone: the keeper
is told, grants a new one and puts every key again. A failed keepalive is counted and tried
again soon (within the interval): one lost heartbeat must not cost a lease of TTL 3.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from registrar.core.store import EtcdError, LeaseNotFound, Store
from registrar.metrics import Metrics
from registrar.worker import Worker

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE = 0.5  # at most this long after a failed keepalive (and at most interval)


class Heartbeat(Worker):
    def __init__(
        self,
        store: Store,
        interval: float,
        metrics: Metrics,
        on_lost: Callable[[int, str], None],
    ) -> None:
        """`on_lost(lease, why)`: the lease expired or was revoked."""
        super().__init__("heartbeat",
                         lambda loop: metrics.internal_errors.labels(loop=loop).inc())
        self._store = store
        self.interval = interval
        self._metrics = metrics
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._lease: int | None = None

    def follow(self, lease: int | None) -> None:
        """Keep `lease` alive from now on (None: none to keep)."""
        with self._cond:
            self._lease = lease
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        wait = self.interval
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.stopping, timeout=wait)
                while self._lease is None and not self.stopping:
                    self.health.progressed()
                    self._cond.wait(self.interval)
                lease = self._lease
                if self.stopping or lease is None:
                    return
            self.health.progressed()
            try:
                wait = self._beat(lease)
                self.health.succeeded()
            except Exception:  # a bug must not stop the heartbeats: count it, go on
                log.exception("heartbeat failed unexpectedly")
                self.health.internal_error()
                wait = self.interval

    def _beat(self, lease: int) -> float:
        """One keepalive; how long until the next."""
        try:
            ttl = self._store.keepalive(lease)
        except LeaseNotFound as exc:
            ttl, why = 0, str(exc)
        except EtcdError:
            self._metrics.keepalive_failures.inc()
            return min(self.interval, RETRY_AFTER_FAILURE)
        else:
            why = "keepalive answered TTL 0"
        if ttl > 0:
            return self.interval
        self._metrics.keepalive_failures.inc()
        with self._cond:
            if self._lease == lease:
                self._lease = None
        self._on_lost(lease, why)
        return self.interval
