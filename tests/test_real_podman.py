"""`registrar watch` against a real Podman 4.3 service (its Docker-compatible API): register,
stop, start, healthy, unhealthy, SIGTERM. Podman differs from Docker in its events (a bare
`health_status` at every check, no `kill` at stop, `remove` for `destroy`); registrar must do
what the SPEC says all the same."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Scope, actions_since_start, metrics_flag, scrape
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.observe import KeyLog
from tests.support.podman import PodmanService, require_podman
from tests.support.proc import wait_until
from tests.support.routers import FakeRouter

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

pytestmark = pytest.mark.real
TTL = 3


def live(key: str) -> Callable[[KeyLog], bool]:
    return lambda keys: key in keys.live


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanService]:
    require_podman()  # fails (never skips) with the install hint when podman is missing
    service = PodmanService(tmp_path_factory.mktemp("podman"))
    try:
        service.start()
        yield service
    finally:
        service.destroy()


def test_podman_register_stop_start_health_and_sigterm(
    podman: PodmanService, etcd: EtcdServer, unique: str, registrar: RegistrarFactory,
    tmp_path: Path,
) -> None:
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        flag, port = metrics_flag()
        agent = registrar([*scope.args("watch", ttl=TTL), *flag, "--docker", podman.url,
                           "--resync", "30"])
        agent.wait_for_log("docker connected", timeout=20)

        latencies: list[float] = []
        for _ in range(3):
            begun = time.time()
            web = podman.run(labels={"registrar.service": "pm"})
            key = scope.key("pm", web.name)
            assert keys.wait(live(key), timeout=10), agent.logs()
            latencies.append(keys.first_put[key] - begun)
        value = keys.live_matching(web.name)
        assert value, "registered"

        # stop: Podman sends no `kill` when it begins; out of rotation at `die` (stop -t 1)
        stopped_at = time.time()
        podman.stop(web.name, timeout=1)
        assert keys.wait(lambda k: key not in k.live, timeout=10)
        stop_latency = keys.deleted[key] - stopped_at
        podman.start_container(web.name)
        assert keys.wait(lambda k: key in k.live, timeout=10), "back after start"

        # a HEALTHCHECK: registered only once healthy, out when unhealthy, back when healthy
        checked = podman.run(labels={"registrar.service": "pmhc"},
                             healthcheck={"cmd": "test -f /tmp/ok", "retries": 1})
        hkey = scope.key("pmhc", checked.name)
        podman.healthcheck_run(checked.name)  # fails: not yet
        podman.podman("exec", checked.name, "touch", "/tmp/ok")
        healthy_at = time.time()
        podman.healthcheck_run(checked.name)
        assert keys.wait(lambda k: hkey in k.live, timeout=10), agent.logs()
        healthy_latency = keys.first_put[hkey] - healthy_at
        podman.podman("exec", checked.name, "rm", "/tmp/ok")
        unhealthy_at = time.time()
        podman.healthcheck_run(checked.name)
        assert keys.wait(lambda k: hkey not in k.live, timeout=10), agent.logs()
        unhealthy_latency = keys.deleted[hkey] - unhealthy_at
        podman.podman("exec", checked.name, "touch", "/tmp/ok")
        podman.healthcheck_run(checked.name)
        assert keys.wait(lambda k: hkey in k.live, timeout=10)

        metrics = scrape(port)
        assert metrics["registrar_docker_up"] == 1
        print(f"podman: start -> key p50 {statistics.median(latencies) * 1000:.0f} ms; "
              f"stop -t 1 -> key gone {stop_latency * 1000:.0f} ms; healthy -> key "
              f"{healthy_latency * 1000:.0f} ms; unhealthy -> gone "
              f"{unhealthy_latency * 1000:.0f} ms")

        # SIGTERM: every key of this node goes, exit 0
        assert agent.stop(15) == 0
        wait_until(lambda: not keys.live, timeout=5)
        assert "Traceback" not in agent.logs()
    finally:
        keys.close()


def test_podman_sidecar_registers_and_leaves_at_the_stop(
    podman: PodmanService, etcd: EtcdServer, unique: str, registrar: RegistrarFactory,
    etcd_reader: EtcdReader,
) -> None:
    """`register` against Podman: its first events stream is opened from the container's
    start (Podman's own State.StartedAt), after the key is written."""
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    web = podman.run(labels={"registrar.service": "pms"})
    sidecar = registrar([*scope.args("register", web.name, ttl=TTL), "--docker", podman.url])
    key = scope.key("pms", web.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())
    sidecar.wait_for_log("docker connected", timeout=10)
    podman.stop(web.name, timeout=1)
    assert sidecar.wait(15) == 0, sidecar.logs()
    assert etcd_reader.get(key) is None
    assert "Traceback" not in sidecar.logs()
    # and the stream from the start replays the stop, which came after the inspect
    actions = actions_since_start(podman.url, web.name)
    assert actions[0] == "start" and "die" in actions, actions


def test_podman_drain_takes_the_instance_out_before_the_stop(
    podman: PodmanService, etcd: EtcdServer, unique: str, registrar: RegistrarFactory,
) -> None:
    """What a Quadlet unit's `ExecStop=registrar drain` gives on Podman, which sends no `kill`
    when a stop begins: the instance is out of rotation, confirmed by the routers, before the
    app's stop; the stop then ends the hold (the agent deletes the entry)."""
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    ctl = f"/rgtc-{unique}"
    agent = registrar([*scope.args("watch", ttl=TTL), "--control-prefix", ctl,
                       "--metrics-addr", "127.0.0.1:0", "--docker", podman.url])
    agent.wait_for_log("docker connected", timeout=20)
    web = podman.run(labels={"registrar.service": "pmd"})
    key = scope.key("pmd", web.name)
    entry = f"{ctl}/draining/{scope.node}/{web.name}"
    with EtcdReader(etcd.url) as reader:
        wait_until(lambda: reader.get(key), timeout=10, message=agent.logs)
        router = FakeRouter(etcd.url, ctl, "r1")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "registrar", "drain", web.name, "--node", scope.node,
                 "--etcd", etcd.url, "--prefix", scope.prefix, "--control-prefix", ctl],
                capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and "drained in" in done.stdout, done.stderr
            assert reader.get(key) is None and reader.get(entry) is not None
            podman.stop(web.name, timeout=1)
            wait_until(lambda: reader.get(entry) is None, timeout=10, message=agent.logs)
            assert reader.get(key) is None
            podman.start_container(web.name)  # a new run: back in rotation
            wait_until(lambda: reader.get(key), timeout=10, message=agent.logs)
        finally:
            router.close()
    assert agent.stop(15) == 0
