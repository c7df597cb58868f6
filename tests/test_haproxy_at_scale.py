"""What the router does per change and per reading, with a thousand backends in mind.

- How often it reads HAProxy's counters, and of which backends: every backend now and then
  (less often where a reading is dear), and meanwhile only the backends with something in
  flight on an instance that left rotation (a drain waits on those), of each worker that has
  it. Against a fake master CLI that records what it was asked.
- A runtime change goes through the backends it changed only, and leaves the router knowing
  what a pass over every backend would have found (slot owners, instances in rotation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from registrar.exposition import Registry
from registrar.haproxy.config import Routed, build_backends, parse_registration
from registrar.haproxy.process import HAProxyMaster
from registrar.haproxy.router import (
    POLL_EVERY,
    POLL_IN_FLIGHT,
    POLL_MAX,
    Router,
    RoutingMetrics,
    poll_period,
)
from registrar.haproxy.runtime import ProcInfo, fresh_layout, plan_runtime
from registrar.settings import Bind, HAProxySettings

HEADER = "# pxname,svname,scur,stot,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,econ\n"
SERVICES = [f"s{i}" for i in range(30)]  # more backends than are asked about one by one


class FakeMaster:
    """The master CLI as the router's poll uses it: workers, and each worker's `show stat`
    from `open` ((pid, backend, slot) -> sessions open now)."""

    def __init__(self) -> None:
        self.workers: tuple[int, ...] = (100,)
        self.old: tuple[int, ...] = ()
        self.open: dict[tuple[int, str, str], int] = {}
        self.asked: list[tuple[int | None, str | None]] = []

    def running(self) -> bool:
        return True

    def show_proc(self) -> ProcInfo:
        return ProcInfo(reloads=0, failed=0, workers=self.workers, old_workers=self.old)

    def stat(self, worker: int | None = None, backend: str | None = None) -> str:
        self.asked.append((worker, backend))
        pid = worker if worker is not None else self.workers[0]
        if pid not in self.workers and pid not in self.old:
            return ""
        rows = [f"{be},{slot},{n},1,0,0,0,0,0,0,0\n" for (p, be, slot), n in self.open.items()
                if p == pid and backend in (None, be)]
        return HEADER + "".join(rows)

    def info(self, worker: int) -> str:
        return ""


def routed(service: str, instance: str = "", version: str = "v1") -> Routed:
    instance = instance or f"n:{service}:80"
    parsed = parse_registration("/services", f"/services/{service}/{instance}",
                                json.dumps({"host": "10.0.0.5", "port": 80, "version": version}))
    assert isinstance(parsed, Routed)
    return parsed


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Router, FakeMaster, list[int]]:
    """A router serving one instance of each of SERVICES (the state an apply leaves)."""
    binds = tuple(Bind(s, "127.0.0.1", 9000 + i) for i, s in enumerate(SERVICES))
    hp = HAProxySettings(binds=binds, config=str(tmp_path / "haproxy.cfg"))
    fake = FakeMaster()
    router = Router(hp, "/services", RoutingMetrics(Registry()), cast(HAProxyMaster, fake),
                    None)
    backends = build_backends(binds, [routed(s) for s in SERVICES])
    router.backends = backends
    router.live = fresh_layout(backends)
    router.holders = router._holders_of(router.live)
    router.serving = {s: frozenset({f"n:{s}:80"}) for s in SERVICES}
    reports: list[int] = []
    router.report_now = lambda: reports.append(1)
    return router, fake, reports


def slot_of(router: Router, service: str) -> str:
    assert router.live is not None
    return next(name for name, server in router.live[service].slots.items() if server)


def test_every_backend_is_read_every_second_or_less_often_where_reading_is_dear() -> None:
    assert poll_period(0.01) == POLL_EVERY  # a few backends: every second
    assert poll_period(0.08) == pytest.approx(1.6)  # ~14,000 servers: 5 % of the time
    assert poll_period(30.0) == POLL_MAX  # never longer than this without a reading


def test_meanwhile_only_the_backends_with_something_in_flight_are_read(
        rig: tuple[Router, FakeMaster, list[int]]) -> None:
    router, fake, reports = rig
    assert router.poll(0.0) is False
    assert fake.asked == [(100, None)]  # the first reading: every backend
    fake.asked.clear()
    router.poll(0.5)  # not due, and nothing in flight: nothing asked
    assert fake.asked == []

    # s3 left rotation with 2 sessions open on it
    router.serving = {**router.serving, "s3": frozenset()}
    fake.open[(100, "be_s3", slot_of(router, "s3"))] = 2
    router.poll(1.0)
    assert router.in_flight == {"s3": {"n:s3:80": 2}}
    fake.asked.clear()

    router.poll(1.0 + POLL_IN_FLIGHT)
    assert fake.asked == [(100, "be_s3")]  # that backend only, not the 30
    fake.open[(100, "be_s3", slot_of(router, "s3"))] = 0
    fake.asked.clear()
    router.poll(1.0 + 2 * POLL_IN_FLIGHT)
    assert fake.asked == [(100, "be_s3")]
    assert router.in_flight == {} and reports == [1]  # fell to 0: reported at once
    fake.asked.clear()
    router.poll(1.0 + 3 * POLL_IN_FLIGHT)  # nothing in flight any more
    assert fake.asked == []


def test_an_old_worker_is_asked_only_about_its_backends_with_something_in_flight(
        rig: tuple[Router, FakeMaster, list[int]]) -> None:
    router, fake, _reports = rig
    router.poll(0.0)
    router._retire_worker()  # a reload: worker 100 finishes what it has open, 101 serves
    fake.workers, fake.old = (101,), (100,)
    router._workers = (101,)
    router.serving = {**router.serving, "s7": frozenset()}
    fake.open[(100, "be_s7", slot_of(router, "s7"))] = 1
    router.poll(1.0)
    assert (100, None) in fake.asked  # a reading of everything asks the old worker in full
    assert router.in_flight == {"s7": {"n:s7:80": 1}}
    fake.asked.clear()

    router.poll(1.0 + POLL_IN_FLIGHT)
    assert fake.asked == [(100, "be_s7")]  # the current worker had nothing in flight
    fake.old = ()  # it has gone
    fake.asked.clear()
    router.poll(1.0 + 2 * POLL_IN_FLIGHT)
    assert router.in_flight == {} and router.old_holders == {}


def test_a_runtime_change_goes_through_its_backends_only_and_ends_as_a_full_pass_would(
        rig: tuple[Router, FakeMaster, list[int]]) -> None:
    router, _fake, _reports = rig
    binds = router.hp.binds
    router._routed(router.backends)  # the state of a full pass (a reload)
    assert router.serving["s2"] == {"n:s2:80"} and router._removed == set()
    s2_slot = slot_of(router, "s2")
    # s1 gets a second instance (v2), s2 loses its only one
    regs = [routed(s) for s in SERVICES if s != "s2"] + [routed("s1", "n:s1b:80", "v2")]
    backends = build_backends(binds, regs)
    assert router.live is not None
    plan = plan_runtime(router.live, backends, {"s1", "s2"})
    assert plan is not None
    router.live = plan.live
    router.holders.update(router._holders_of(plan.live, {"s1", "s2"}))
    router._routed(backends, {"s1", "s2"})

    assert router.serving["s1"] == {"n:s1:80", "n:s1b:80"} and router.serving["s2"] == set()
    assert router._removed == {"be_s2"}  # what was open on it is read at once
    assert router._published == router._owners()  # as if every slot had been gone through
    assert ("be_s1", slot_of(router, "s1")) in router._published
    assert set(router._published.values()) >= {("s1", "v1"), ("s1", "v2")}
    assert router.holders == {**router._holders_of(router.live),
                              ("be_s2", s2_slot): ("s2", "n:s2:80")}  # s2's slot keeps it
