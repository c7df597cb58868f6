"""Heartbeat: keeps one lease alive on its own thread and clock, every TTL/3, whatever the
writes do (a write etcd keeps refusing, or retrying with a long backoff, never delays it).

When etcd answers a keepalive with TTL 0 (or "lease not found") the lease is gone: the keeper
is told, grants a new one and puts every key again. A failed keepalive is counted and tried
again soon (within the interval): one lost heartbeat must not cost a lease of TTL 3. Each
try after one that failed waits longer for etcd's answer (retry.patience: 2, 4, 8 s), as long
as the lease may still be alive, and the next keepalive after a slow answer waits at least
twice that long: an etcd that answers every keepalive in 3 s (a leader short of CPU) is slow,
not gone, and a heartbeat that gave up on each after 2 s would lose the lease (and put every
key again: more load on the etcd that was too slow) though etcd answered every one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from registrar.core.store import EtcdError, LeaseNotFound, Store
from registrar.metrics import Metrics
from registrar.retry import patience
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
        self._slow = 0  # doublings of the usual wait: one per keepalive that got no answer
        self._expires = 0.0  # when the lease ends unless renewed (as far as we know; monotonic)

    def follow(self, lease: int | None) -> None:
        """Keep `lease` alive from now on (None: none to keep)."""
        with self._cond:
            self._lease = lease
            self._slow = 0
            self._expires = time.monotonic() + 3 * self.interval  # granted just now: a TTL
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

    def _patience(self) -> float:
        """How long this keepalive waits for its answer: the usual request timeout, longer
        after failures, but not past the lease's end (an answer after it is no use)."""
        usual = self._store.request_timeout
        longest = max(usual, self._expires - time.monotonic())
        return min(patience(usual, self._slow), longest)

    def _answered_in(self, took: float) -> None:
        """The next keepalive waits at least twice as long as this one's answer took."""
        usual = self._store.request_timeout
        self._slow = max(0, math.ceil(math.log2(2 * took / usual))) if took > 0 else 0

    def _beat(self, lease: int) -> float:
        """One keepalive; how long until the next."""
        sent = time.monotonic()
        try:
            ttl = self._store.keepalive(lease, self._patience())
        except LeaseNotFound as exc:
            ttl, why = 0, str(exc)
        except EtcdError:
            self._metrics.keepalive_failures.inc()
            self._slow += 1
            return min(self.interval, RETRY_AFTER_FAILURE)
        else:
            why = "keepalive answered TTL 0"
        self._answered_in(time.monotonic() - sent)
        if ttl > 0:
            self._expires = sent + ttl
            return self.interval
        self._metrics.keepalive_failures.inc()
        with self._cond:
            if self._lease == lease:
                self._lease = None
        self._on_lost(lease, why)
        return self.interval
