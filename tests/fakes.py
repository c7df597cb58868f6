"""In-memory fakes of the two adapters, typed against their interfaces, for the fast tier.

`FakeEtcd` is a `registrar.core.store.Store` over a dict (with what the real store does besides:
`registrar_etcd_up` and listeners told when etcd goes and comes back); `FakeDocker` is a
`ContainerSource` (registrar.core.source), with containers as inspect documents and events
from a queue.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from registrar.core.containers import ContainerInfo, parse_inspect
from registrar.core.source import ContainerSource, DockerUnavailable
from registrar.core.store import (
    EtcdRefused,
    EtcdUnavailable,
    KeyEvent,
    LeaseNotFound,
    Store,
    StoredKey,
)
from registrar.metrics import Metrics

NOSPACE = "etcdserver: mvcc: database space exceeded"


class FakeWatch:
    """A watch on a FakeEtcd: every write under its prefixes, as one batch."""

    def __init__(self, *prefixes: str, ranges: Sequence[tuple[str, str]] = ()) -> None:
        self.prefixes = prefixes
        self.ranges = (*((p + "/", p + "0") for p in prefixes), *ranges)
        self.events: queue.Queue[list[KeyEvent]] = queue.Queue()
        self.cancelled = False

    def get(self, timeout: float) -> list[KeyEvent]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return []

    def wake(self) -> None:
        self.events.put([])

    def cancel(self) -> None:
        self.cancelled = True


class FakeEtcd:
    """`down` makes every call raise EtcdUnavailable; `refuse_puts` makes writes that put
    anything raise EtcdRefused (as etcd does with its NOSPACE alarm raised) while keepalives,
    reads and deletes still work."""

    def __init__(self, contents: Mapping[str, StoredKey] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.lock = threading.Lock()
        self.kv: dict[str, StoredKey] = dict(contents or {})
        self.leases: dict[int, int] = {
            item.lease: 3 for item in self.kv.values() if item.lease
        }  # id -> ttl
        self.ids = itertools.count(0x1000)
        self.down = False
        self.refuse_puts: str | None = None
        self.keepalive_expired = "ttl0"  # or "raise": how an expired lease answers a keepalive
        self.ops: list[tuple[str, str]] = []  # ("put" | "delete", key), every write
        self.refused = 0
        self.granted: list[int] = []
        self.revoked: list[int] = []
        self.keepalives = 0
        self.patience: list[float | None] = []  # each keepalive's, in turn
        self.reads = 0
        self.serializable_reads = 0  # of `reads`: those that asked for a serializable read
        self.revision = 1
        self.request_timeout = 2.0  # Store's (a one-shot command's attempts change it)
        self.metrics = metrics
        self.up: bool | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self.watches: list[FakeWatch] = []

    def _check(self) -> None:
        """Called with the lock held, at the start of every request."""
        if self.down:
            self.refused += 1
            self._answered(False)
            raise EtcdUnavailable("fake etcd is down")
        self._answered(True)

    def _answered(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.etcd_up.set(1 if up else 0)
        if self.up is not up:
            self.up = up
            for listener in self._listeners:
                listener(up)

    # --- what tests use -----------------------------------------------------------------
    def stored(self, prefix: str = "/services") -> dict[str, str]:
        with self.lock:
            return {k: v.value for k, v in self.kv.items() if k.startswith(prefix + "/")}

    def puts_of(self, key: str) -> int:
        with self.lock:
            return self.ops.count(("put", key))

    def writes(self) -> int:
        with self.lock:
            return len(self.ops)

    @property
    def puts(self) -> list[str]:
        with self.lock:
            return [key for op, key in self.ops if op == "put"]

    @property
    def deletes(self) -> list[str]:
        with self.lock:
            return [key for op, key in self.ops if op == "delete"]

    def expire(self, lease: int) -> None:
        """The lease runs out (as during a partition): it and its keys are gone."""
        with self.lock:
            self.leases.pop(lease, None)
            self.kv = {k: v for k, v in self.kv.items() if v.lease != lease}

    # --- the Store protocol ----------------------------------------------------------------
    def add_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def grant(self, ttl: int) -> int:
        with self.lock:
            self._check()
            if self.refuse_puts:
                raise EtcdRefused(self.refuse_puts, "RESOURCE_EXHAUSTED")
            lease = next(self.ids)
            self.leases[lease] = ttl
            self.granted.append(lease)
            return lease

    def keepalive(self, lease: int, patience: float | None = None) -> int:
        with self.lock:
            self.patience.append(patience)
            self._check()
            self.keepalives += 1
            if lease not in self.leases:
                if self.keepalive_expired == "raise":
                    raise LeaseNotFound("requested lease not found")
                return 0
            return self.leases[lease]

    def revoke(self, lease: int, timeout: float | None = None) -> None:
        with self.lock:
            self._check()
            self.revoked.append(lease)
            self.leases.pop(lease, None)
            self.kv = {k: v for k, v in self.kv.items() if v.lease != lease}

    def list_prefix(self, prefix: str) -> tuple[dict[str, StoredKey], int]:
        with self.lock:
            self._check()
            self.reads += 1
            return {k: v for k, v in self.kv.items() if k.startswith(prefix + "/")}, self.revision

    def list_prefixes(self, prefixes: Sequence[str], *, serializable: bool = False
                      ) -> tuple[list[dict[str, StoredKey]], int]:
        with self.lock:
            self._check()
            self.reads += 1
            if serializable:
                self.serializable_reads += 1
            return ([{k: v for k, v in self.kv.items() if k.startswith(prefix + "/")}
                     for prefix in prefixes], self.revision)

    def list_starting(self, starts: Sequence[str]) -> tuple[dict[str, StoredKey], int]:
        with self.lock:
            self._check()
            self.reads += 1
            return ({k: v for k, v in self.kv.items() if k.startswith(tuple(starts))},
                    self.revision)

    def put_if_absent(self, key: str, value: str) -> bool:
        with self.lock:
            if key in self.kv:
                self._check()
                return False
        self.put(key, value)
        return True

    def watch_prefix(self, prefix: str, start_revision: int) -> FakeWatch:
        return self.watch_prefixes((prefix,), start_revision)

    def watch_ranges(self, ranges: Sequence[tuple[str, str]], start_revision: int
                     ) -> FakeWatch:
        with self.lock:
            self._check()
            watch = FakeWatch(ranges=ranges)
            self.watches.append(watch)
            return watch

    def watch_prefixes(self, prefixes: Sequence[str], start_revision: int) -> FakeWatch:
        with self.lock:
            self._check()
            watch = FakeWatch(*prefixes)
            self.watches.append(watch)
            return watch

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str], lease: int) -> None:
        with self.lock:
            self._check()
            if puts and self.refuse_puts:
                raise EtcdRefused(self.refuse_puts, "RESOURCE_EXHAUSTED")
            if puts and lease not in self.leases:
                raise LeaseNotFound("requested lease not found")
            self.revision += 1
            events = []
            for key in deletes:
                self.kv.pop(key, None)
                self.ops.append(("delete", key))
                events.append(KeyEvent(key, None, self.revision))
            for key, value in puts.items():
                self.kv[key] = StoredKey(value, lease)
                self.ops.append(("put", key))
                events.append(KeyEvent(key, value, self.revision))
            for watch in self.watches:
                mine = [e for e in events
                        if any(start <= e.key < end for start, end in watch.ranges)]
                if mine and not watch.cancelled:
                    watch.events.put(mine)

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self.apply({key: value}, (), lease)

    def delete(self, key: str) -> None:
        self.apply({}, (key,), 0)

    def close(self) -> None:
        pass


def _typed(etcd: FakeEtcd) -> Store:
    """Holds FakeEtcd to the Store protocol (mypy checks this assignment)."""
    return etcd


_END = object()


class FakeDocker(ContainerSource):
    """A ContainerSource: containers are inspect documents, events come from a queue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.docs: dict[str, dict[str, Any]] = {}
        self.down = False
        self.events: queue.Queue[Any] = queue.Queue()
        self.running_calls = 0
        self.inspects = 0
        self.opened: list[str | None] = []  # `since` of every subscription
        self.clock = time.time_ns()

    def _check(self) -> None:
        if self.down:
            raise DockerUnavailable("fake docker is down")

    # --- what tests use -----------------------------------------------------------------
    def add(self, doc: dict[str, Any]) -> str:
        with self.lock:
            self.docs[doc["Id"]] = doc
        return str(doc["Id"])

    def state(self, cid: str, **state: Any) -> None:
        with self.lock:
            self.docs[cid]["State"].update(state)

    def health(self, cid: str, status: str) -> None:
        with self.lock:
            self.docs[cid]["State"]["Health"] = {"Status": status, "FailingStreak": 0, "Log": []}

    def remove(self, cid: str) -> None:
        with self.lock:
            self.docs.pop(cid, None)

    def emit(self, action: str, cid: str, **attributes: str) -> dict[str, Any]:
        with self.lock:
            self.clock += 1_000_000
            doc = self.docs.get(cid, {})
            name = str(doc.get("Name", "/gone")).lstrip("/")
            image = str(doc.get("Config", {}).get("Image", ""))
            event = {
                "status": action, "id": cid, "from": image, "Type": "container",
                "Action": action, "scope": "local", "time": self.clock // 1_000_000_000,
                "timeNano": self.clock,
                "Actor": {"ID": cid, "Attributes": {"name": name, "image": image, **attributes}},
            }
        self.events.put(event)
        return event

    def replay(self, event: dict[str, Any]) -> None:
        """Delivers an event again, as a resumed stream does."""
        self.events.put(copy.deepcopy(event))

    def cut(self) -> None:
        """Docker goes away: the stream breaks and every call fails until `down` is False."""
        self.down = True
        self.events.put(DockerUnavailable("events stream: connection reset"))

    # --- ContainerSource ------------------------------------------------------------------
    def inspect(self, container: str) -> ContainerInfo | None:
        with self.lock:
            self._check()
            self.inspects += 1
            for doc in self.docs.values():
                if container in (doc["Id"], doc["Name"].lstrip("/")):
                    return parse_inspect(copy.deepcopy(doc))
            return None

    def running(self) -> list[ContainerInfo]:
        with self.lock:
            self._check()
            self.running_calls += 1
            return [parse_inspect(copy.deepcopy(doc)) for doc in self.docs.values()
                    if doc["State"]["Running"]]

    def open_events(self, since: str | None, filters: Mapping[str, str] | None = None
                    ) -> Iterator[dict[str, Any]]:
        with self.lock:
            self._check()
            self.opened.append(since)

        def iterate() -> Iterator[dict[str, Any]]:
            while True:
                item = self.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        return iterate()

    def close_events(self) -> None:
        self.events.put(_END)

    def close(self) -> None:
        pass

