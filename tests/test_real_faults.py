"""Faults found from outside, each reproduced against real parts: a busy engine's events out of
timestamp order, etcd refusing writes (NOSPACE), a slow link to etcd, a restarted engine."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from registrar.adapters.etcd_store import GatewayError
from tests.helpers import Scope, metrics_flag, scrape
from tests.support.docker_env import HTTPD_COMMAND, ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.observe import DockerEvents, KeyLog
from tests.support.private_engine import PrivateEngine
from tests.support.proc import wait_until

if TYPE_CHECKING:
    from tests.conftest import Forwarders, RegistrarFactory

TTL = 3


def all_live(wanted: set[str]) -> Callable[[KeyLog], bool]:
    return lambda keys: wanted <= keys.live


def none_live(wanted: set[str]) -> Callable[[KeyLog], bool]:
    return lambda keys: not (wanted & keys.live)


def _events_counted(port: int) -> float:
    return sum(v for k, v in scrape(port).items() if k.startswith("registrar_docker_events_total"))


def test_a_burst_of_starts_and_stops_loses_no_event(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
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
                assert keys.wait(all_live(wanted), timeout=15), (
                    f"round {rnd}: {len(wanted - keys.live)} of 40 never registered\n"
                    + agent.logs()[-3000:])
                for n in names:
                    started = events.time_of(n, "start")
                    assert started is not None
                    start_lat.append(keys.first_put[scope.key("burst", n)] - started)
                # httpd is PID 1 and ignores SIGTERM: each stop takes its full 3 s timeout, so a
                # lost `kill` would leave the key ~3 s, until `die`
                list(pool.map(lambda n: containers.docker_stop(n, 3), names))
                assert keys.wait(none_live(wanted), timeout=15)
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


# --- etcd refusing writes: its NOSPACE alarm ------------------------------------------------
def _etcdctl(url: str, *args: str) -> str:
    proc = subprocess.run(["etcdctl", "--endpoints", url, *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fill_until_nospace(reader: EtcdReader, url: str) -> int:
    """Puts 1 MiB values until etcd raises its NOSPACE alarm; how many went in."""
    blob = "x" * (1 << 20)
    for n in range(200):
        try:
            reader.put(f"/rgt-fill/{n}", blob)
        except GatewayError as exc:  # etcd's own answer: RESOURCE_EXHAUSTED
            assert "space exceeded" in str(exc) or "RESOURCE_EXHAUSTED" in repr(exc), exc
            break
    assert "NOSPACE" in _etcdctl(url, "alarm", "list")
    return n


def _disarm(url: str) -> None:
    """What an operator does: free the space, compact, defragment, disarm the alarm."""
    _etcdctl(url, "del", "--prefix", "/rgt-fill/")
    status = json.loads(_etcdctl(url, "endpoint", "status", "-w", "json"))
    _etcdctl(url, "compact", str(status[0]["Status"]["header"]["revision"]))
    _etcdctl(url, "defrag")
    _etcdctl(url, "alarm", "disarm")


def test_a_full_etcd_refuses_writes_and_no_key_is_lost(
    tmp_path: Path, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
    """NOSPACE: puts are refused, leases are still renewed. The keys must stay (heartbeats on
    their own clock), deletes still go, and what waited goes in once the alarm is disarmed."""
    server = EtcdServer(tmp_path / "etcd", name="rgt-nospace",
                        extra_args=["--quota-backend-bytes", str(24 << 20)])
    server.start(timeout=30)
    reader = EtcdReader(server.url)
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=server.url)
    keys = KeyLog(server.url, scope.prefix + "/")
    try:
        flag, port = metrics_flag()
        agent = registrar([*scope.args("watch", ttl=TTL), *flag])
        agent.wait_for_log("docker connected", timeout=15)
        kept = [containers(labels={"registrar.service": "full"}) for _ in range(2)]
        doomed = containers(labels={"registrar.service": "full"})
        wanted = {scope.key("full", c.name) for c in [*kept, doomed]}
        assert keys.wait(lambda k: wanted <= k.live, timeout=15), agent.logs()
        lease = reader.lease_id(scope.key("full", kept[0].name))

        _fill_until_nospace(reader, server.url)
        alarm_at = time.monotonic()
        late = containers(labels={"registrar.service": "full"})  # refused while the alarm lasts
        doomed.stop(timeout=0)  # a deregistration still goes
        assert keys.wait(lambda k: scope.key("full", doomed.name) not in k.live, timeout=5)
        wait_until(lambda: scrape(port)["registrar_etcd_writes_refused"] == 1, timeout=10)
        assert agent.wait_for_log("etcd refuses writes: .*space exceeded", timeout=10)
        while time.monotonic() - alarm_at < 30:  # 30 s of alarm, keys watched throughout
            time.sleep(1)
            metrics = scrape(port)
            assert metrics["registrar_etcd_up"] == 1, "etcd answers: it is not down"
        for c in kept:
            assert reader.lease_id(scope.key("full", c.name)) == lease
        assert not [e for e in keys.events if e.kind == "delete" and
                    e.key != scope.key("full", doomed.name)], "a key was lost in the alarm"
        assert scrape(port)["registrar_lease_regrants_total"] == 0
        assert scrape(port)['registrar_etcd_write_refusals_total{code="RESOURCE_EXHAUSTED"}'] >= 1

        _disarm(server.url)
        disarmed = time.monotonic()
        assert keys.wait(lambda k: scope.key("full", late.name) in k.live, timeout=10)
        took = time.monotonic() - disarmed
        print(f"NOSPACE: keys kept through {disarmed - alarm_at:.0f} s of alarm; the container "
              f"started meanwhile registered {took:.1f} s after the disarm")
        assert took < 5.0
        wait_until(lambda: scrape(port)["registrar_etcd_writes_refused"] == 0, timeout=5)
        assert agent.stop(15) == 0
    finally:
        keys.close()
        reader.close()
        server.destroy()


# --- a slow link to etcd ----------------------------------------------------------------
def test_a_slow_link_to_etcd_connects_and_keeps_every_key(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory,
    forwarders: Forwarders,
) -> None:
    """150 ms each way (300 ms round trip): the agent connects in about a second and keeps
    every key, without a flap, a second PUT or a new lease."""
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    fwd = forwarders.etcd(etcd)
    fwd.delay = 0.15
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        first = containers(labels={"registrar.service": "slow"})
        flag, port = metrics_flag()
        agent = registrar([*Scope(scope.prefix, scope.node, fwd.url).args("watch", ttl=TTL),
                           *flag])
        agent.wait_for_log("registrar watch: node", timeout=15)
        started = time.time()
        key = scope.key("slow", first.name)
        assert keys.wait(lambda k: key in k.live, timeout=15), agent.logs()
        connect = keys.first_put[key] - started
        steady_from = time.monotonic()
        time.sleep(8)
        second = containers(labels={"registrar.service": "slow"})
        begun = time.time()
        assert keys.wait(lambda k: scope.key("slow", second.name) in k.live, timeout=5)
        second_took = keys.first_put[scope.key("slow", second.name)] - begun
        while time.monotonic() - steady_from < 20:
            time.sleep(1)
        print(f"slow link (300 ms round trip): first key {connect:.2f} s after start; a new "
              f"container registered in {second_took:.2f} s")
        assert [e.kind for e in keys.events if e.key == key] == ["put"], "flapped or re-put"
        assert scrape(port)["registrar_lease_regrants_total"] == 0
        assert connect < 4.0, agent.logs()
        assert second_took < 2.0
        assert "SETTINGS frame" not in agent.logs()
    finally:
        keys.close()


def test_an_etcd_that_answers_late_keeps_every_lease(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory,
    forwarders: Forwarders,
) -> None:
    """etcd taking 2.5 s to take each request, past the usual 2 s request timeout (a leader
    short of CPU answers late, not never), and dropping those whose client gave up first, for
    more than two TTLs: the heartbeat waits longer after a keepalive got no answer and after a slow
    one, so the lease holds and no key is put again or lost (each keepalive given up on at 2 s
    and sent again: the lease lost at its TTL, every key put again)."""
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    fwd = forwarders.etcd(etcd)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        c = containers(labels={"registrar.service": "late"})
        flag, port = metrics_flag()
        agent = registrar([*Scope(scope.prefix, scope.node, fwd.url).args("watch", ttl=9),
                           *flag])
        key = scope.key("late", c.name)
        assert keys.wait(lambda k: key in k.live, timeout=15), agent.logs()
        fwd.slow_server = 2.5
        time.sleep(22)
        fwd.slow_server = 0.0
        time.sleep(2)
        samples = scrape(port)
        failed = samples["registrar_lease_keepalive_failures_total"]
        print(f"etcd answering in 2.5 s for 22 s: {failed:g} keepalives got no answer in "
              f"time, {samples['registrar_lease_regrants_total']:g} leases granted anew")
        assert [e.kind for e in keys.events if e.key == key] == ["put"], agent.logs()
        assert samples["registrar_lease_regrants_total"] == 0
        assert failed >= 1  # it was slow indeed
    finally:
        keys.close()


# --- a Docker engine restarted ---------------------------------------------------------------
@pytest.mark.parametrize("live_restore", [False, True], ids=["plain", "live-restore"])
def test_a_restarted_engine_is_survived(
    tmp_path: Path, etcd: EtcdServer, unique: str, registrar: RegistrarFactory,
    busybox_image: str, live_restore: bool,
) -> None:
    engine = PrivateEngine(tmp_path, live_restore=live_restore)
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        engine.start()
        engine.load_image(busybox_image)
        name = f"{engine.name}-web"
        engine.docker("run", "-d", "--name", name, "--restart", "always", "-p",
                      "127.0.0.1::8080", "--label", "registrar.service=engine", busybox_image,
                      *HTTPD_COMMAND)
        flag, port = metrics_flag()
        agent = registrar([*scope.args("watch", ttl=TTL), *flag, "--docker", engine.url])
        key = scope.key("engine", name)
        assert keys.wait(lambda k: key in k.live, timeout=15), agent.logs()

        engine.stop()
        wait_until(lambda: scrape(port)["registrar_docker_up"] == 0, timeout=5)
        if live_restore:
            time.sleep(TTL)  # the container runs on: its key must stay all along
            assert key in keys.live
        engine.start()
        wait_until(lambda: scrape(port)["registrar_docker_up"] == 1, timeout=15,
                   message=agent.logs)
        assert keys.wait(lambda k: key in k.live, timeout=15), agent.logs()
        published = engine.docker("port", name, "8080/tcp").rsplit(":", 1)[-1]
        with EtcdReader(etcd.url) as reader:
            wait_until(lambda: json.loads(reader.get(key) or "{}").get("port") == int(published),
                       timeout=10, message="the key does not carry the port published now")
        if live_restore:
            assert [e.kind for e in keys.events if e.key == key] == ["put"]
        assert agent.alive and agent.stop(15) == 0
        assert key not in keys.live or keys.wait(lambda k: key not in k.live, timeout=5)
    finally:
        keys.close()
        engine.destroy()


# --- shutdown with etcd and Docker both unreachable -------------------------------------
def test_sigterm_with_etcd_and_docker_unreachable_exits_0_within_6_s(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory,
    forwarders: Forwarders,
) -> None:
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    to_etcd = forwarders.etcd(etcd)
    to_docker = forwarders.unix()
    c = containers(labels={"registrar.service": "bye"})
    flag, _port = metrics_flag()  # not the default 0.0.0.0:9477, which another run may hold
    agent = registrar([*Scope(scope.prefix, scope.node, to_etcd.url).args("watch", ttl=TTL),
                       *flag, "--docker", to_docker.url])
    agent.wait_for_log("registered bye", timeout=15)
    to_etcd.blackhole()  # a partition: requests hang until their timeout
    to_docker.blackhole()
    c.stop(timeout=0)  # its events do not reach the agent
    # What is in flight is held: the engine's events of the stop, and a heartbeat to etcd.
    wait_until(lambda: to_docker.held and to_etcd.held, timeout=5,
               message=lambda: f"held: docker {to_docker.held}, etcd {to_etcd.held}")
    began = time.monotonic()
    code = agent.stop(timeout=15)
    took = time.monotonic() - began
    print(f"SIGTERM -> exit with etcd and Docker unreachable: {took:.1f} s")
    assert code == 0, agent.logs()
    assert took <= 6.0
