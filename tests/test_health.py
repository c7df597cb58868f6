"""/healthz: 200 while every loop moves, 503 when one has stopped, is stuck or keeps failing."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core.layout import Layout
from registrar.core.ownership import Ownership
from registrar.health import FAILING_AFTER, LoopHealth, health_problem
from registrar.http_server import MetricsServer
from registrar.metrics import Metrics
from tests.fakes import FakeEtcd
from tests.support.proc import wait_until


class Loop:
    def __init__(self, name: str, alive: bool = True, last_progress: float | None = None,
                 failures: int = 0) -> None:
        self.name = name
        self._alive = alive
        self.last_progress = time.monotonic() if last_progress is None else last_progress
        self.failures_in_row = failures

    def alive(self) -> bool:
        return self._alive


class StuckStore(FakeEtcd):
    """An etcd store whose first grant never returns (until released)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def grant(self, ttl: int) -> int:
        self.entered.set()
        self.release.wait()
        # Once released, a quiet etcd: the keeper's thread goes on until it is shut down.
        return super().grant(ttl)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_health_problem_names_the_loop() -> None:
    now = time.monotonic()
    keeper, events = Loop("lease keeper"), Loop("event loop")
    assert health_problem((keeper, events), now, 15) is None
    assert health_problem((Loop("lease keeper", alive=False), events), now,
                          15) == "lease keeper stopped"
    assert health_problem((keeper, Loop("event loop", alive=False)), now,
                          15) == "event loop stopped"
    stalled = health_problem((keeper, Loop("event loop", last_progress=now - 20)), now, 15)
    assert stalled is not None and stalled.startswith("event loop stalled")
    failing = health_problem((Loop("router", failures=FAILING_AFTER),), now, 15)
    assert failing is not None and failing.startswith("router failed 3 times in a row")


def test_a_loop_that_keeps_failing_is_counted_and_unhealthy_until_it_succeeds() -> None:
    metrics = Metrics()
    loop = LoopHealth("event loop", lambda: True,
                      lambda name: metrics.internal_errors.labels(loop=name).inc())
    for _ in range(FAILING_AFTER - 1):
        loop.internal_error()
    assert health_problem((loop,), time.monotonic()) is None  # a bug once is not unhealthy...
    loop.internal_error()
    assert health_problem((loop,), time.monotonic()) is not None  # ... one that keeps failing
    assert metrics.registry.get_sample_value(
        "registrar_internal_errors_total", {"loop": "event loop"}) == FAILING_AFTER
    loop.succeeded()
    assert health_problem((loop,), time.monotonic()) is None


def test_a_stuck_lease_keeper_turns_healthz_503() -> None:
    metrics = Metrics()
    store = StuckStore()
    keeper = LeaseKeeper(store, ttl=3, layout=Layout("/p", "/c"),
                         ownership=Ownership("n1"), metrics=metrics)
    consumer = Loop("event loop")
    server = MetricsServer(
        ("127.0.0.1", 0), metrics.registry,
        lambda: health_problem((keeper.health, consumer), time.monotonic(), 0.3))
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        keeper.replace_all({})  # what runs is known: the keeper grants its lease (and hangs)
        keeper.start()
        assert store.entered.wait(5)
        consumer.last_progress = time.monotonic()
        status, body = get(url + "/healthz")
        assert status == 200, body

        def stalled() -> tuple[int, str] | None:
            consumer.last_progress = time.monotonic()  # the other loop keeps moving
            answer = get(url + "/healthz")
            return answer if answer[0] == 503 else None

        # The keeper's thread is alive but does not move: 503 once that lasts over the limit.
        status, body = wait_until(stalled, timeout=5)
        assert "lease keeper stalled" in body
        status, body = get(url + "/metrics")
        assert status == 200 and "registrar_build_info" in body
    finally:
        store.release.set()
        keeper.shutdown(time.monotonic() + 2)
        server.stop()


def test_a_worker_starts_stops_by_its_deadline_and_says_whether_it_runs() -> None:
    from registrar.worker import Worker

    woken = threading.Event()

    class Sleeper(Worker):
        def run(self) -> None:
            while not self.wait(10):  # a stop ends the wait at once
                pass

        def wake(self) -> None:
            woken.set()

    worker = Sleeper("sleeper")
    assert not worker.alive()
    worker.start()
    assert worker.alive() and worker.health.alive()
    asked = time.monotonic()
    worker.stop(asked + 2)
    assert not worker.alive() and woken.is_set() and time.monotonic() - asked < 0.5
