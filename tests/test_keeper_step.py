"""The lease keeper's next step (core.keeper.next_step), without threads or a clock."""

from __future__ import annotations

from typing import Any

import pytest

from registrar.core.keeper import (
    Forget,
    Grant,
    Idle,
    KeeperView,
    Read,
    Step,
    Stop,
    Wait,
    Write,
    next_step,
)
from registrar.retry import Backoff, RetryClock

SETTLED = KeeperView(lease=7, lost_lease=None, ready=True, dirty=False, reread=False,
                     retry_at=None)


def step(now: float = 100.0, **changes: Any) -> Step:
    return next_step(SETTLED._replace(**changes), now)


def test_nothing_changed_waits_until_told() -> None:
    assert step() == Wait(None)


def test_a_change_is_written_under_the_lease_it_has() -> None:
    assert step(dirty=True) == Write()


def test_a_change_before_the_first_full_picture_writes_nothing() -> None:
    """A restarted agent must not delete its node's keys before it knows what runs; what the
    first write needs (the lease, etcd's side) is had meanwhile."""
    assert step(dirty=True, ready=False, lease=None) == Grant()
    assert step(dirty=True, ready=False, reread=True) == Read()
    assert step(dirty=True, ready=False) == Idle()
    for lease in (None, 7):
        for reread in (False, True):
            for retry_at in (None, 50.0, 150.0):
                assert step(dirty=True, ready=False, lease=lease, reread=reread,
                            retry_at=retry_at) != Write()


def test_no_lease_grants_one_then_reads_then_writes() -> None:
    assert step(dirty=True, lease=None) == Grant()
    assert step(dirty=True, reread=True) == Read()
    assert step(dirty=True, reread=False) == Write()


def test_a_lost_lease_is_forgotten_first_even_with_nothing_changed() -> None:
    assert step(lost_lease=7) == Forget(7)
    assert step(lost_lease=7, dirty=True, retry_at=200.0) == Forget(7)


@pytest.mark.parametrize("view", [{}, {"dirty": True}, {"lost_lease": 7}, {"lease": None}])
def test_a_stop_wins_over_everything(view: dict[str, Any]) -> None:
    assert step(stopping=True, **view) == Stop()


def test_after_a_failure_it_waits_for_the_backoff_unless_etcd_is_back() -> None:
    assert step(dirty=True, retry_at=101.5) == Wait(101.5)
    assert step(now=101.5, dirty=True, retry_at=101.5) == Write()
    assert step(dirty=True, retry_at=101.5, etcd_back=True) == Write()
    assert step(retry_at=101.5, etcd_back=True) == Wait(None)  # nothing to write meanwhile


def test_the_keeper_walks_from_nothing_to_written_and_back_after_a_lost_lease() -> None:
    """The steps in order, each applied as the keeper's thread applies it."""
    view = SETTLED._replace(lease=None, dirty=True, reread=True)
    walked = []
    for _ in range(10):
        taken = next_step(view, 0.0)
        walked.append(type(taken).__name__)
        if isinstance(taken, Wait):
            break
        if isinstance(taken, Grant):
            view = view._replace(lease=8, reread=True)
        elif isinstance(taken, Read):
            view = view._replace(reread=False)
        elif isinstance(taken, Write):
            view = view._replace(dirty=False)
    view = view._replace(lost_lease=8)
    taken = next_step(view, 0.0)
    assert isinstance(taken, Forget) and taken.lease == 8
    assert walked == ["Grant", "Read", "Write", "Wait"]


def test_a_refused_request_is_retried_sooner_than_an_unreachable_etcd() -> None:
    times = iter([10.0] * 10)
    retry = RetryClock(Backoff(rng=lambda: 1.0), clock=lambda: next(times))
    delays = [retry.failed() for _ in range(7)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    assert retry.failed(2.0) == 2.0 and retry.at == 12.0
    retry.succeeded()
    assert retry.at is None and retry.failed() == 0.1
