"""The lease keeper's next step, as a pure function of what it knows (no threads, no clock).

The keeper's thread reads a `KeeperView` under its lock, asks `next_step(view, now)` and does
what it answers: wait (until a time, or until told), forget a lease the heartbeat lost, grant
a lease, read this node's keys and the control state, or write. Each answer is one request to
etcd at most, so a failure is retried from where it stopped (`registrar.retry.RetryClock`).
"""

from __future__ import annotations

from registrar.typing_shim import NamedTuple


class KeeperView(NamedTuple):
    lease: int | None  # the lease the keys are bound to (None: none granted yet, or lost)
    lost_lease: int | None  # a lease the heartbeat says is gone, not yet forgotten
    ready: bool  # the first full picture of what runs arrived: writing may begin
    dirty: bool  # something changed since the last write
    reread: bool  # read this node's keys and the control state before the next write
    retry_at: float | None  # after a failure: not before then (None: at once)
    etcd_back: bool = False  # etcd answered again since: no need to wait for retry_at
    stopping: bool = False


class _Step:
    """One answer of `next_step`: equal to another of the same kind with the same fields.
    Plain classes: a sidecar imports no dataclasses (README, "Why no gRPC and no Docker SDK"),
    and NamedTuples of two kinds with equal fields would be equal (`Wait(None) == Forget(None)`)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._fields() == self._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self._fields()))})"


class Stop(_Step):
    __slots__ = ()


class Wait(_Step):
    __slots__ = ("until",)

    def __init__(self, until: float | None) -> None:
        self.until = until  # None: until told (a change, a lost lease, a stop)


class Forget(_Step):
    """The heartbeat lost `lease`: when it is the one in use, its keys went with it."""

    __slots__ = ("lease",)

    def __init__(self, lease: int) -> None:
        self.lease = lease


class Idle(_Step):
    """Before the first full picture of what runs, with the lease and the read it needs in hand:
    nothing may be written yet (a restarted agent must not delete its node's keys before it
    knows what runs)."""

    __slots__ = ()


class Grant(_Step):
    __slots__ = ()


class Read(_Step):
    __slots__ = ()


class Write(_Step):
    __slots__ = ()


Step = Stop | Wait | Forget | Idle | Grant | Read | Write


def next_step(view: KeeperView, now: float) -> Step:
    if view.stopping:
        return Stop()
    if view.lost_lease is not None:
        return Forget(view.lost_lease)
    due = view.retry_at is None or now >= view.retry_at or view.etcd_back
    if not (view.dirty and due):
        return Wait(view.retry_at if view.dirty else None)
    if not view.ready:
        # What the first write needs is had while Docker is asked what runs: the lease, and
        # etcd's side (a sidecar's start to its key is one grant and one read shorter).
        if view.lease is None:
            return Grant()
        return Read() if view.reread else Idle()
    if view.lease is None:
        return Grant()
    if view.reread:
        return Read()
    return Write()
