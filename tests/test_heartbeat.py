"""The heartbeat's patience with a slow etcd (fake etcd, one beat at a time)."""

from __future__ import annotations

import pytest

from registrar.core.store import EtcdUnavailable
from registrar.heartbeat import Heartbeat
from registrar.metrics import Metrics
from tests.fakes import FakeEtcd


def test_a_keepalive_after_failures_waits_longer_but_not_past_the_leases_end() -> None:
    """2 s, then twice as long after each keepalive that got no answer (a leader short of CPU
    answers late, not never), never past the end of the lease (15 s after it was granted or
    last renewed); back to 2 s once one is answered."""
    fake = FakeEtcd()
    lost: list[int] = []
    beat = Heartbeat(fake, 5.0, Metrics(), lambda lease, _why: lost.append(lease))
    lease = fake.grant(15)
    beat.follow(lease)
    fake.down = True
    waits = [beat._beat(lease) for _ in range(4)]
    fake.down = False
    assert beat._beat(lease) == 5.0  # answered: the next in an interval
    beat._beat(lease)
    assert waits == [0.5] * 4  # each failure is tried again soon
    assert fake.patience[:3] == [2.0, 4.0, 8.0]
    assert fake.patience[3] == pytest.approx(15.0, abs=0.5)  # 16, but the lease ends first
    assert fake.patience[4] == pytest.approx(15.0, abs=0.5)
    assert fake.patience[5] == 2.0  # the one before was answered
    assert lost == [] and fake.keepalives == 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_after_a_slow_answer_the_next_keepalive_waits_twice_as_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An etcd that answers every keepalive in 2.5 s: after the first (which got no answer in
    2 s, then one in 4 s), each waits 8 s (at least twice 2.5) from the start, so none is
    given up on; answers back under 1 s bring the usual 2 s back."""
    clock = _Clock()
    monkeypatch.setattr("registrar.heartbeat.time", clock)

    class SlowEtcd(FakeEtcd):
        took = 2.5

        def keepalive(self, lease: int, patience: float | None = None) -> int:
            if patience is not None and patience < self.took:
                clock.now += patience
                self.patience.append(patience)
                raise EtcdUnavailable("timed out")
            clock.now += self.took
            return super().keepalive(lease, patience)

    fake = SlowEtcd()
    beat = Heartbeat(fake, 5.0, Metrics(), lambda lease, _why: None)
    lease = fake.grant(15)
    beat.follow(lease)
    for _ in range(4):
        clock.now += beat._beat(lease)
    fake.took = 0.2
    beat._beat(lease)
    beat._beat(lease)
    assert fake.patience == [2.0, 4.0, 8.0, 8.0, 8.0, 2.0]
    assert fake.keepalives == 5
