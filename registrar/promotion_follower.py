"""PromotionFollower: watches `{control_prefix}/promoted/` and pokes the LeaseKeeper.

The keeper itself reads the promotions (with this node's keys) before it writes, so it is the
one place where promotions are applied; this thread only makes it re-read as soon as one
changes. The watch is resumed after outages (from the last revision seen, or from a fresh
read when that revision was compacted).
"""

from __future__ import annotations

import logging
import threading
import time

from registrar.etcd_store import EtcdStore, EtcdUnavailable, WatchCompacted
from registrar.lease_keeper import LeaseKeeper
from registrar.planner import promoted_prefix
from registrar.retry import retrying

log = logging.getLogger(__name__)

POLL = 0.5


class PromotionFollower:
    def __init__(self, store: EtcdStore, keeper: LeaseKeeper, control_prefix: str) -> None:
        self._store = store
        self._keeper = keeper
        self._prefix = promoted_prefix(control_prefix)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._revision = 0
        self.last_progress = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="promotions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        policy = retrying("watching promotions", (EtcdUnavailable,), self._stop, log)
        while not self._stop.is_set():
            try:
                policy(self._follow)
            except EtcdUnavailable:
                return  # stopping

    def _follow(self) -> None:
        if not self._revision:
            _stored, self._revision = self._store.list_prefix(self._prefix)
            self._keeper.request_reread()
        try:
            watch = self._store.watch_prefix(self._prefix, self._revision + 1)
        except WatchCompacted:
            self._revision = 0
            return
        try:
            while not self._stop.is_set():
                self.last_progress = time.monotonic()
                try:
                    events = watch.get(POLL)
                except WatchCompacted:
                    self._revision = 0
                    return
                if events:
                    self._revision = max(event.revision for event in events)
                    log.debug("promotion changed: %s", [event.key for event in events])
                    self._keeper.request_reread()
        finally:
            watch.cancel()
