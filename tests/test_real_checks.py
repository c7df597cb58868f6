"""registrar's own health checks (`registrar.check` labels) against real containers: an HTTP
check passing, failing and passing again, a TCP check, a frozen process, the sidecar gating on
its check, and one hanging check among thirty that holds up nobody."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tests.helpers import Scope, metrics_flag, scrape
from tests.support.docker_env import Container, ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.observe import DockerEvents, KeyLog
from tests.support.proc import RegistrarProcess, wait_until

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

TTL = 3
# httpd serves /www; /www/ok.html is what the HTTP check asks for
SERVE = "hostname > /www/index.html && echo ok > /www/ok.html && exec httpd -f -p 8080 -h /www"


def checked(service: str, kind: str = "http:/ok.html", **numbers: str) -> dict[str, str]:
    labels = {"registrar.service": service, "registrar.check": kind,
              "registrar.check.interval": "0.5", "registrar.check.fall": "2"}
    labels.update({f"registrar.check.{k}": v for k, v in numbers.items()})
    return labels


def agent(registrar: RegistrarFactory, scope: Scope,
          *extra: str) -> tuple[RegistrarProcess, int]:
    flag, port = metrics_flag()
    proc = registrar([*scope.args("watch", ttl=TTL), "--host-ip", "127.0.0.1", *flag, *extra])
    proc.wait_for_log("docker connected", timeout=15)
    return proc, port


def test_an_http_check_takes_a_port_out_and_back(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        proc, port = agent(registrar, scope)
        web = containers(labels=checked("chk"), command=["sh", "-c", SERVE])
        key = scope.key("chk", web.name)
        assert keys.wait(lambda k: key in k.live, timeout=10), proc.logs()
        took: list[float] = []
        for _ in range(3):
            failed_at = time.time()
            web_exec(web, "rm /www/ok.html")  # 404 from now on
            assert keys.wait(lambda k: key not in k.live, timeout=10), proc.logs()
            took.append(keys.deleted[key] - failed_at)
            assert scrape(port)["registrar_failing_checks"] == 1
            web_exec(web, "echo ok > /www/ok.html")
            assert keys.wait(lambda k: key in k.live, timeout=10)
        print(f"http check (interval 0.5 s, fall 2): failing -> key gone p50 "
              f"{statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms")
        assert max(took) < 2.5
        metrics = scrape(port)
        assert metrics['registrar_check_results_total{result="fail"}'] >= 6
        assert metrics['registrar_check_results_total{result="pass"}'] >= 3
        assert metrics["registrar_failing_checks"] == 0
        # the key never changed while in rotation: one PUT per entry into rotation
        assert [e.kind for e in keys.events if e.key == key].count("put") == 4
    finally:
        keys.close()


def web_exec(container: Container, command: str) -> None:
    from tests.support.docker_env import docker

    docker("exec", container.id, "sh", "-c", command)


def test_a_tcp_check_waits_for_the_port_and_a_frozen_process_leaves(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        proc, port = agent(registrar, scope)
        late = containers(labels=checked("tcpchk", "tcp"),
                          command=["sh", "-c", f"sleep 2 && {SERVE}"])
        key = scope.key("tcpchk", late.name)
        wait_until(lambda: scrape(port)["registrar_failing_checks"] == 1, timeout=5)
        assert key not in keys.live  # nothing listens yet: held out by its check
        assert keys.wait(lambda k: key in k.live, timeout=10), proc.logs()

        web = containers(labels=checked("frozen"), command=["sh", "-c", SERVE])
        fkey = scope.key("frozen", web.name)
        assert keys.wait(lambda k: fkey in k.live, timeout=10)
        pid = int(web.state()["Pid"])
        froze = time.time()
        os.kill(pid, signal.SIGSTOP)  # accepts (the kernel does), never answers
        try:
            assert keys.wait(lambda k: fkey not in k.live, timeout=10), proc.logs()
            out_after = keys.deleted[fkey] - froze
        finally:
            os.kill(pid, signal.SIGCONT)
        assert keys.wait(lambda k: fkey in k.live, timeout=10), "back when thawed"
        print(f"frozen process: key gone {out_after:.2f} s after SIGSTOP")
        assert out_after < 3.0
    finally:
        keys.close()


def test_the_sidecar_gates_on_its_check(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        web = containers(labels=checked("side"), command=["sh", "-c", f"sleep 2 && {SERVE}"])
        flag, port = metrics_flag()
        sidecar = registrar([*scope.args("register", web.name, ttl=TTL), "--host-ip",
                             "127.0.0.1", *flag])
        key = scope.key("side", web.name)
        wait_until(lambda: scrape(port)["registrar_failing_checks"] == 1, timeout=10,
                   message=sidecar.logs, ignore=(OSError,))
        assert key not in keys.live
        assert keys.wait(lambda k: key in k.live, timeout=10), sidecar.logs()
        web.stop(timeout=1)
        assert sidecar.wait(15) == 0
        assert key not in keys.live
    finally:
        keys.close()


def live(key: str) -> Callable[[KeyLog], bool]:
    """A `KeyLog.wait` predicate: `key` is live."""

    def check(k: KeyLog) -> bool:
        return key in k.live

    return check


def not_live(key: str) -> Callable[[KeyLog], bool]:
    """A `KeyLog.wait` predicate: `key` is not live."""

    def check(k: KeyLog) -> bool:
        return key not in k.live

    return check


def test_a_hanging_check_holds_up_nobody(
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory, containers: ContainerFactory
) -> None:
    """30 checked containers, one of which accepts and never answers: a new container is still
    registered within its usual latency plus one check, and a stop still deregisters at once."""
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    events = DockerEvents()
    try:
        proc, port = agent(registrar, scope)
        hanging = containers(labels=checked("hang", timeout="1", interval="2"),
                             command=["sh", "-c", "exec nc -ll -p 8080 -e sleep 3600"])
        with ThreadPoolExecutor(6) as pool:
            many = list(pool.map(lambda _: containers(
                labels=checked("many"), command=["sh", "-c", SERVE]), range(29)))
        wanted = {scope.key("many", c.name) for c in many}
        assert keys.wait(lambda k: wanted <= k.live, timeout=30), proc.logs()[-3000:]
        assert scope.key("hang", hanging.name) not in keys.live
        latencies: list[float] = []
        gone: list[float] = []
        for _ in range(3):
            new = containers(labels=checked("many"), command=["sh", "-c", SERVE])
            nkey = scope.key("many", new.name)
            assert keys.wait(live(nkey), timeout=10)
            started = events.time_of(new.name, "start")
            assert started is not None
            latencies.append(keys.first_put[nkey] - started)
            victim = many.pop()
            vkey = scope.key("many", victim.name)
            victim.stop(timeout=2)
            killed = events.time_of(victim.name, "kill")
            assert killed is not None and keys.wait(not_live(vkey), 5)
            gone.append(keys.deleted[vkey] - killed)
        print(f"with a hanging check among 30: start -> key max {max(latencies) * 1000:.0f} ms "
              f"(first check included); kill -> key gone max {max(gone) * 1000:.0f} ms")
        assert max(latencies) < 1.0  # the usual few ms, plus one check (the first one, at once)
        assert max(gone) < 0.3
        assert scrape(port)["registrar_failing_checks"] >= 1  # the hanging one
    finally:
        keys.close()
        events.close()
