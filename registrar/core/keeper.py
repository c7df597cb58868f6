"""The lease keeper's next step, as a pure function of what it knows (no threads, no clock).

The keeper's thread reads a `KeeperView` under its lock, asks `next_step(view, now)` and does
what it answers: wait (until a time, or until told), forget a lease the heartbeat lost, grant
a lease, read this node's keys and the control state, or write. Each answer is one request to
etcd at most, so a failure is retried from where it stopped (`registrar.retry.RetryClock`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeeperView:
    lease: int | None  # the lease the keys are bound to (None: none granted yet, or lost)
    lost_lease: int | None  # a lease the heartbeat says is gone, not yet forgotten
    ready: bool  # the first full picture of what runs arrived: writing may begin
    dirty: bool  # something changed since the last write
    reread: bool  # read this node's keys and the control state before the next write
    retry_at: float | None  # after a failure: not before then (None: at once)
    etcd_back: bool = False  # etcd answered again since: no need to wait for retry_at
    stopping: bool = False


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: until told (a change, a lost lease, a stop)


@dataclass(frozen=True)
class Forget:
    """The heartbeat lost `lease`: when it is the one in use, its keys went with it."""

    lease: int


@dataclass(frozen=True)
class Idle:
    """Told something before the first full picture of what runs: nothing may be written yet
    (a restarted agent must not delete its node's keys before it knows what runs)."""


@dataclass(frozen=True)
class Grant:
    pass


@dataclass(frozen=True)
class Read:
    pass


@dataclass(frozen=True)
class Write:
    pass


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
        return Idle()
    if view.lease is None:
        return Grant()
    if view.reread:
        return Read()
    return Write()
