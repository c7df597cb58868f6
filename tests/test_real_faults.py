"""Faults found from outside, each reproduced against real parts: a busy engine's events out of
timestamp order, etcd refusing writes (NOSPACE), a slow link to etcd, a restarted engine."""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import Scope, metrics_flag, scrape
from tests.support.observe import DockerEvents, KeyLog
from tests.support.proc import wait_until

TTL = 3


def _events_counted(port: int) -> float:
    return sum(v for k, v in scrape(port).items() if k.startswith("registrar_docker_events_total"))


def test_a_burst_of_starts_and_stops_loses_no_event(etcd, unique, registrar, containers):
    """40 containers started at once, then stopped at once, three rounds: Docker delivers some
    events stamped earlier than one it delivered before; none of them may be dropped."""
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    flag, port = metrics_flag()
    events = DockerEvents()
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        # --resync 30 (the default): a lost `start` would show as a key ~30 s late
        agent = registrar([*scope.args("watch", ttl=TTL), *flag, "--resync", "30"])
        agent.wait_for_log("docker connected", timeout=15)
        counted_before, seen_before = _events_counted(port), events.total
        start_lat: list[float] = []
        kill_lat: list[float] = []
        labels = {"registrar.service": "burst"}
        with ThreadPoolExecutor(8) as pool:
            for rnd in range(3):
                names = [containers.full_name(f"b{rnd}-{i}-{unique}") for i in range(40)]
                list(pool.map(lambda n: containers(name=n, labels=labels, detach_wait=False),
                              names))
                wanted = {scope.key("burst", n) for n in names}
                assert keys.wait(lambda k, w=wanted: w <= k.live, timeout=15), (
                    f"round {rnd}: {len(wanted - keys.live)} of 40 never registered\n"
                    + agent.logs()[-3000:])
                for n in names:
                    started = events.time_of(n, "start")
                    assert started is not None
                    start_lat.append(keys.first_put[scope.key("burst", n)] - started)
                # httpd is PID 1 and ignores SIGTERM: each stop takes its full 3 s timeout, so a
                # lost `kill` would leave the key ~3 s, until `die`
                list(pool.map(lambda n: containers.docker_stop(n, 3), names))
                assert keys.wait(lambda k, w=wanted: not (w & k.live), timeout=15)
                for n in names:
                    killed = events.time_of(n, "kill")
                    assert killed is not None
                    kill_lat.append(keys.deleted[scope.key("burst", n)] - killed)
                list(pool.map(containers.docker_rm, names))
        # every event the engine sent reached the agent and was counted
        def counted() -> float:
            return _events_counted(port) - counted_before

        wait_until(lambda: counted() == events.total - seen_before, timeout=10,
                   message=lambda: f"agent counted {counted()}, engine sent "
                   f"{events.total - seen_before}")
        print(f"events out of timestamp order: {events.out_of_order} of {events.total}; "
              f"start->key p50 {statistics.median(start_lat) * 1000:.0f} ms max "
              f"{max(start_lat) * 1000:.0f} ms; kill->gone p50 "
              f"{statistics.median(kill_lat) * 1000:.0f} ms max {max(kill_lat) * 1000:.0f} ms")
        assert max(start_lat) < 2.0, sorted(start_lat)[-5:]
        assert max(kill_lat) < 1.0, sorted(kill_lat)[-5:]  # a lost kill: ~3 s, at `die`
    finally:
        keys.close()
        events.close()
