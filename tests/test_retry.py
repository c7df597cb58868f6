"""The one retry policy: the backoff, the retry loops, the poll, and one-shot commands' etcd."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

import pytest

from registrar.commands import oneshot
from registrar.commands.oneshot import OneShot
from registrar.core.store import EtcdRefused, EtcdUnavailable, Store
from registrar.errors import FatalError
from registrar.retry import Backoff, GaveUp, poll_until, retry_forever, retry_within
from tests.fakes import FakeEtcd

log = logging.getLogger("test")


def test_backoff_is_full_jitter_capped_and_resets() -> None:
    top = Backoff(initial=0.1, maximum=5.0, rng=lambda: 1.0)
    assert [round(top.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    top.reset()
    assert top.next() == 0.1
    bottom = Backoff(initial=0.1, maximum=5.0, rng=lambda: 0.0)
    assert bottom.next() == pytest.approx(0.01)  # never a busy loop


class Flaky:
    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self, *_: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_retry_forever_until_it_works_or_stop() -> None:
    flaky = Flaky(3, EtcdUnavailable("down"))
    seen: list[BaseException] = []
    stop = threading.Event()
    got = retry_forever(flaky, what="x", errors=(EtcdUnavailable,), stop=stop, log=log,
                        on_failure=seen.append, backoff=Backoff(initial=0.001))
    assert got == "ok" and flaky.calls == 4 and len(seen) == 3
    stop.set()
    with pytest.raises(EtcdUnavailable):
        retry_forever(Flaky(10, EtcdUnavailable("down")), what="x", errors=(EtcdUnavailable,),
                      stop=stop, log=log)
    with pytest.raises(ValueError):  # not retried: a bug shows
        retry_forever(Flaky(1, ValueError("bug")), what="x", errors=(EtcdUnavailable,),
                      stop=threading.Event(), log=log)


def test_retry_within_gives_up_at_its_deadline_with_the_last_error() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(GaveUp, match=r"etcd: gave up after \d+ attempt\(s\) over 5.0s: down"):
        retry_within(Flaky(1000, EtcdUnavailable("down")), what="etcd",
                     errors=(EtcdUnavailable,), timeout=5.0, log=log, clock=lambda: now[0],
                     sleep=sleep)
    assert sum(sleeps) == pytest.approx(5.0)
    assert retry_within(Flaky(2, EtcdUnavailable("x")), what="etcd", errors=(EtcdUnavailable,),
                        timeout=5.0, log=log, clock=lambda: now[0], sleep=sleep) == "ok"


def test_poll_until() -> None:
    values = iter([0, 0, 3])
    assert poll_until(lambda: next(values), 5, interval=0.001) == 3
    assert poll_until(lambda: 0, 0.01, interval=0.001) == 0
    stop = threading.Event()
    stop.set()
    assert poll_until(lambda: 0, 60, stop=stop) == 0  # returns at once


def test_one_shot_retries_transient_errors_and_stops_at_a_lasting_one() -> None:
    etcd = OneShot(FakeEtcd(), timeout=30, what="cannot read /services/")
    flaky = Flaky(2, EtcdUnavailable("UNAVAILABLE: connection attempt timed out"))
    assert etcd(flaky) == "ok" and flaky.calls == 3
    lasting = Flaky(100, EtcdUnavailable("TLS: not trusted (check --etcd-ca)", lasting=True))
    with pytest.raises(FatalError, match=r"^cannot read /services/: TLS: not trusted"):
        etcd(lasting)
    assert lasting.calls == 1
    refused = Flaky(100, EtcdRefused("lacks a permission", "PERMISSION_DENIED"))
    with pytest.raises(FatalError, match="lacks a permission"):
        etcd(refused)
    assert refused.calls == 1
    with pytest.raises(FatalError, match="gave up after 1 attempt"):
        OneShot(FakeEtcd(), timeout=0)(Flaky(5, EtcdUnavailable("down")))


def test_one_shot_waits_longer_for_an_answer_at_each_attempt() -> None:
    """A slow etcd is waited for: 2, 4, 8 s (up to oneshot.PATIENCE) for one answer, not 2 s each
    time; the store's own timeout is back afterwards."""
    fake = FakeEtcd()
    seen: list[float] = []

    def answered_in_5_s(store: Store) -> str:
        seen.append(store.request_timeout)
        if store.request_timeout < 5:
            raise EtcdUnavailable("no etcd endpoint available (last error: timed out)")
        return "ok"

    assert OneShot(fake, timeout=30)(answered_in_5_s) == "ok"
    assert seen == [2.0, 4.0, 8.0] and fake.request_timeout == 2.0


def test_one_shot_patience_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oneshot, "PATIENCE", 4.0)  # reached at the second attempt
    fake = FakeEtcd()
    seen: list[float] = []

    def never(store: Store) -> str:
        seen.append(store.request_timeout)
        raise EtcdUnavailable("no etcd endpoint available (last error: timed out)")

    with pytest.raises(FatalError, match="gave up"):
        OneShot(fake, timeout=0.5)(never)  # 3 attempts at least: backoffs of 0.1 and 0.2
    assert seen[:3] == [2.0, 4.0, 4.0] and fake.request_timeout == 2.0



def test_read_until_polls_serializably_and_believes_only_a_linearizable_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command's wait: its first read and one in LINEARIZABLE_EVERY ask the leader, the others
    the member's own copy; a serializable read that looks settled is read again linearizably
    (a member behind may show a past that happened to look settled)."""
    monkeypatch.setattr(oneshot, "poll_until", functools.partial(poll_until, interval=0.0))
    asked: list[bool] = []  # serializable, per read
    answers = iter([0] * 12 + [1, 0, 0, 1, 1])  # 1: looks settled

    def read(serializable: bool) -> int:
        asked.append(serializable)
        return next(answers)

    assert oneshot.read_until(OneShot(FakeEtcd(), timeout=30), read, bool) == 1
    L, S = False, True
    # polls 0 and 10 linearizable; poll 12 looks settled, its confirmation says not yet;
    # poll 14 looks settled and is confirmed
    assert asked == [L, S, S, S, S, S, S, S, S, S, L, S, S, L, S, S, L]


def test_read_until_ends_unsettled_on_a_linearizable_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the deadline the rotation it reports is etcd's, not one member's: a last read that
    was serializable is made again linearizably."""
    monkeypatch.setattr(oneshot, "poll_until",
                        lambda look, _timeout: [look() for _ in range(3)][-1])  # 3 polls
    asked: list[bool] = []
    answers = iter(["old", "old", "old", "what etcd holds"])

    def read(serializable: bool) -> str:
        asked.append(serializable)
        return next(answers)

    got = oneshot.read_until(OneShot(FakeEtcd(), timeout=30), read, lambda _: False)
    assert got == "what etcd holds" and asked == [False, True, True, False]


def test_a_haproxy_that_fails_to_start_is_started_again_after_the_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HAProxyMaster.supervise through its RetryClock: no start before the delay, one after."""
    from registrar.haproxy import process

    master = process.HAProxyMaster("haproxy", "/nonexistent.cfg", "/nonexistent.sock")
    starts: list[float] = []

    def fail() -> None:
        starts.append(time.monotonic())
        raise process.HAProxyError("did not start")

    monkeypatch.setattr(master, "running", lambda: False)
    monkeypatch.setattr(master, "start", fail)
    assert master.supervise(time.monotonic()) is False and len(starts) == 1
    assert master.supervise(time.monotonic()) is False and len(starts) == 1  # backing off
    assert "did not start" in (master.problem() or "")
    assert master.supervise(time.monotonic() + 60) is False and len(starts) == 2
