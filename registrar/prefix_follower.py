"""PrefixFollower: every change under `{prefix}/` in etcd, on its own thread.

A full read, then a watch from the next revision. When the watch dies with its connection it is
resumed from the last revision seen (retried with the one backoff policy); when that revision
was compacted, everything is read again. Used by the agents (promotions) and by `haproxy`
(registrations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from registrar.core.store import EtcdError, KeyEvent, Store, StoredKey, Watch, WatchCompacted
from registrar.retry import retry_forever
from registrar.worker import Worker

log = logging.getLogger(__name__)

POLL = 0.5  # the wait for events: the thread's progress beat


class PrefixFollower(Worker):
    def __init__(
        self,
        store: Store,
        prefix: str | tuple[str, ...],
        *,
        name: str,
        on_snapshot: Callable[[dict[str, StoredKey]], None],
        on_events: Callable[[list[KeyEvent]], None],
        on_failure: Callable[[BaseException], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        revision: int = 0,
        on_internal_error: Callable[[str], None] | None = None,
        watch_ranges: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """`prefix`: one, or several followed as one (one read at one revision, one watch, one
        thread); `revision`: the last one already read (0: read everything first);
        `watch_ranges`: what the watch takes instead, when fewer ranges cover the prefixes
        (`Layout.rules_ranges`); the events are then theirs to sort."""
        super().__init__(name, on_internal_error)
        self._store = store
        self._prefixes = (prefix,) if isinstance(prefix, str) else prefix
        self._prefix = " and ".join(self._prefixes)
        self._on_snapshot = on_snapshot
        self._on_events = on_events
        self._on_failure = on_failure
        self._on_connected = on_connected or (lambda: None)
        self._revision = revision
        self._watch_ranges = watch_ranges
        self._watch: Watch | None = None

    def wake(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.wake()

    @property
    def revision(self) -> int:
        """The last revision read or seen (0 before the first read): a watch from the next
        one misses nothing that happened under the prefix since."""
        return self._revision

    def _failed(self, error: BaseException) -> None:
        self.health.progressed()  # retrying is progress
        if self._on_failure is not None:
            self._on_failure(error)

    def run(self) -> None:
        while not self.stopping:
            try:
                retry_forever(self._follow, what=f"watching {self._prefix}/",
                              errors=(EtcdError,), stop=self._stopping, log=log,
                              on_failure=self._failed)
            except EtcdError:
                return  # stopping
            except Exception:  # a bug (in a callback): it must show; start over from a read
                log.exception("following %s/ failed", self._prefix)
                self.health.internal_error()
                self._revision = 0
                self.wait(1.0)

    def _follow(self) -> None:
        if not self._revision:
            stored, self._revision = self._read()
            self._on_snapshot(stored)
            self._on_connected()
            log.info("read %d keys under %s/ (revision %d)", len(stored), self._prefix,
                     self._revision, extra={"event": "read", "revision": self._revision})
        try:
            watch = (self._store.watch_ranges(self._watch_ranges, self._revision + 1)
                     if self._watch_ranges else
                     self._store.watch_prefixes(self._prefixes, self._revision + 1))
        except WatchCompacted as exc:
            self._compacted(exc)
            return
        self._on_connected()
        self._watch = watch
        try:
            while not self.stopping:
                self.health.progressed()
                try:
                    events = watch.get(POLL)
                except WatchCompacted as exc:
                    self._compacted(exc)
                    return
                if events:
                    self._revision = max(self._revision, *(e.revision for e in events))
                    self._on_events(events)
        finally:
            self._watch = None
            watch.cancel()

    def _read(self) -> tuple[dict[str, StoredKey], int]:
        if len(self._prefixes) == 1:
            return self._store.list_prefix(self._prefixes[0])
        return self._store.list_starting([prefix + "/" for prefix in self._prefixes])

    def _compacted(self, exc: WatchCompacted) -> None:
        log.warning("%s/: revision %d is compacted (%s): reading everything again",
                    self._prefix, self._revision + 1, exc, extra={"event": "compacted"})
        self._revision = 0
