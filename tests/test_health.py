"""/healthz: 200 while both loops move, 503 when one has stopped or is stuck."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any

from registrar.agent.command import health_problem
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.http_server import MetricsServer
from registrar.metrics import Metrics


class Loop:
    def __init__(self, alive: bool = True, last_progress: float | None = None) -> None:
        self._alive = alive
        self.last_progress = time.monotonic() if last_progress is None else last_progress

    def alive(self) -> bool:
        return self._alive


class StuckStore:
    """An etcd store whose first call never returns (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def grant(self, ttl: int) -> int:
        self.entered.set()
        self.release.wait()
        return 1

    # Once released, a quiet etcd: the keeper's thread goes on until it is shut down.
    def keepalive(self, lease: int) -> int:
        return 3

    def revoke(self, lease: int) -> None:
        pass

    def list_prefix(self, prefix: str) -> tuple[dict[str, Any], int]:
        return {}, 1

    def apply(self, *args: Any) -> None:
        pass


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_health_problem_names_the_loop() -> None:
    now = time.monotonic()
    assert health_problem(Loop(), Loop(), now, 15) is None
    assert health_problem(Loop(alive=False), Loop(), now, 15) == "lease keeper stopped"
    assert health_problem(Loop(), Loop(alive=False), now, 15) == "event loop stopped"
    stalled = health_problem(Loop(), Loop(last_progress=now - 20), now, 15)
    assert stalled is not None and stalled.startswith("event loop stalled")


def test_a_stuck_lease_keeper_turns_healthz_503() -> None:
    metrics = Metrics()
    store = StuckStore()
    keeper = LeaseKeeper(store, ttl=3, prefix="/p", owns=lambda _i: True,  # type: ignore[arg-type]
                         metrics=metrics)
    consumer = Loop()
    server = MetricsServer(("127.0.0.1", 0), metrics.registry,
                           lambda: health_problem(keeper, consumer, time.monotonic(), 0.3))
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        keeper.start()
        assert store.entered.wait(5)
        consumer.last_progress = time.monotonic()
        status, body = get(url + "/healthz")
        assert status == 200, body
        time.sleep(0.6)  # the keeper's thread is alive but has not moved since
        consumer.last_progress = time.monotonic()
        status, body = get(url + "/healthz")
        assert status == 503
        assert "lease keeper stalled" in body
        status, body = get(url + "/metrics")
        assert status == 200 and "registrar_build_info" in body
    finally:
        store.release.set()
        keeper.shutdown(2)
        server.stop()
