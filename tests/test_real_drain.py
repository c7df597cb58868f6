"""`registrar drain` with real agents, sidecars, containers and etcd; the routers are stood in
for by the test: a report under `{control_prefix}/routers/` bound to a lease, with `applied`
and `in_flight` as a router writes them (a `FakeRouter` thread keeps `applied` at the store's
revision, as an idle router that applies every change at once does).

Measured here (printed): the drain time with two idle routers (p50 of several drains), and how
long a sidecar with `--drain 30` takes to exit on SIGTERM while the routers are idle."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import pytest

from tests.helpers import Scope
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, wait_until
from tests.support.routers import FakeRouter

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory


class Agent(Protocol):
    def __call__(self) -> RegistrarProcess: ...


class Ctx:
    def __init__(self, scope: Scope, ctl: str, agent: Agent) -> None:
        self.scope, self.ctl, self.agent = scope, ctl, agent

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "registrar", *args, "--etcd", self.scope.etcd_url,
                "--prefix", self.scope.prefix, "--control-prefix", self.ctl]

    def drain(self, container: str, *args: str, timeout: float = 10
              ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args("drain", container, "--node", self.scope.node,
                                        "--timeout", str(timeout), *args),
                              capture_output=True, text=True, timeout=timeout + 60)

    def drain_in_background(self, container: str, *args: str, timeout: float = 20
                            ) -> subprocess.Popen[str]:
        return subprocess.Popen(self.args("drain", container, "--node", self.scope.node,
                                          "--timeout", str(timeout), *args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def standby(self, service: str, container: str) -> str:
        return f"{self.ctl}/standby/{service}/{self.scope.node}:{container}:8080"

    def entry(self, container: str) -> str:
        return f"{self.ctl}/draining/{self.scope.node}/{container}"

    def instance(self, container: str) -> str:
        return f"{self.scope.node}:{container}:8080"


@pytest.fixture
def ctx(registrar: RegistrarFactory, etcd: EtcdServer, unique: str) -> Ctx:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    ctl = f"/rgtc-{unique}"

    def agent() -> RegistrarProcess:
        proc = registrar([*scope.args("watch", ttl=5), "--control-prefix", ctl, "--explicit",
                          "--metrics-addr", "127.0.0.1:0"])
        proc.wait_for_log("docker connected", timeout=15)
        return proc

    return Ctx(scope, ctl, agent)


@pytest.fixture
def routers(etcd: EtcdServer) -> Iterator[list[FakeRouter]]:
    made: list[FakeRouter] = []
    yield made
    for router in made:
        router.close()


def test_drain_returns_only_once_nothing_is_in_flight_and_undo_brings_it_back(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    routers: list[FakeRouter],
) -> None:
    proc = ctx.agent()
    c = containers(labels={"registrar.service": "dweb"})
    other = containers(labels={"registrar.service": "dweb"})
    key, other_key = ctx.scope.key("dweb", c.name), ctx.scope.key("dweb", other.name)
    wait_until(lambda: etcd_reader.get(key) and etcd_reader.get(other_key), timeout=10)
    busy = FakeRouter(etcd_reader.url, ctx.ctl, "r1")
    routers.append(busy)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r2"))
    busy.in_flight = {"dweb": {ctx.instance(c.name): 2}}
    started = time.monotonic()
    running = ctx.drain_in_background(c.name)
    wait_until(lambda: etcd_reader.get(ctx.standby("dweb", c.name)), timeout=5)
    assert time.monotonic() - started < 3  # out of rotation within a second (+ the spawn)
    assert etcd_reader.get(key) is None and etcd_reader.get(other_key) is not None
    time.sleep(1.0)
    assert running.poll() is None, "drain returned with requests in flight"
    busy.in_flight = {}
    freed = time.monotonic()
    out, err = running.communicate(timeout=10)
    assert running.returncode == 0, err
    assert time.monotonic() - freed < 1.0
    assert "drained in" in out and f"left rotation: dweb {ctx.instance(c.name)}" in out, out

    # ls marks it, and the entry is its owner's now (the agent's lease)
    listed = subprocess.run(ctx.args("ls", "--json"), capture_output=True, text=True,
                            timeout=60, check=True).stdout
    marked = [json.loads(line) for line in listed.splitlines()]
    assert [o["key"] for o in marked if o.get("draining")] == [ctx.standby("dweb", c.name)]
    table = subprocess.run(ctx.args("ls"), capture_output=True, text=True, timeout=60).stdout
    assert "held out (draining): dweb" in table and "DRAINING" in table, table
    assert etcd_reader.lease_id(ctx.entry(c.name)) == etcd_reader.lease_id(other_key)

    undone = ctx.drain(c.name, "--undo")
    assert undone.returncode == 0, undone.stderr
    assert "back in rotation: dweb" in undone.stdout
    assert etcd_reader.get(key) is not None and etcd_reader.get(ctx.entry(c.name)) is None
    again = ctx.drain(c.name, "--undo")
    assert again.returncode == 0 and "nothing to undo" in again.stdout
    assert proc.alive


def test_past_the_timeout_it_exits_1_naming_the_router_and_the_instance_stays_out(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    routers: list[FakeRouter],
) -> None:
    ctx.agent()
    c = containers(labels={"registrar.service": "dslow"})
    key = ctx.scope.key("dslow", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    stuck = FakeRouter(etcd_reader.url, ctx.ctl, "stuck-router")
    stuck.frozen = etcd_reader.revision()  # never applies what follows
    routers.append(stuck)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "old-router", with_applied=False))
    done = ctx.drain(c.name, timeout=2)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stuck-router" in done.stderr and "applied" in done.stderr
    assert "old-router" not in done.stderr and "old-router" in done.stdout  # not waited for
    assert etcd_reader.get(key) is None and etcd_reader.get(ctx.standby("dslow", c.name))


def test_a_container_with_nothing_registered_returns_at_once(
    ctx: Ctx, etcd_reader: EtcdReader, routers: list[FakeRouter]
) -> None:
    stuck = FakeRouter(etcd_reader.url, ctx.ctl, "r1")
    stuck.frozen = 1
    routers.append(stuck)
    started = time.monotonic()
    done = ctx.drain("rgt-no-such-container")
    assert done.returncode == 0 and done.stdout.count("\n") == 1, done.stdout + done.stderr
    assert "nothing to drain" in done.stdout
    assert time.monotonic() - started < 5  # the interpreter's start included
    assert etcd_reader.get_prefix(f"{ctx.ctl}/draining/") == {}


@pytest.mark.parametrize("argv", [["a/b"], [".."], ["web", "--node", "bad node"], []])
def test_bad_names_exit_2_and_write_nothing(
    ctx: Ctx, etcd_reader: EtcdReader, argv: list[str]
) -> None:
    done = subprocess.run(ctx.args("drain", *argv), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert etcd_reader.get_prefix(f"{ctx.ctl}/") == {}


def test_the_hold_survives_an_agent_restart_and_ends_when_the_container_starts_again(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
) -> None:
    agent = ctx.agent()
    c = containers(labels={"registrar.service": "dhold"})
    key = ctx.scope.key("dhold", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    assert ctx.drain(c.name).returncode == 0
    entry = json.loads(etcd_reader.get(ctx.entry(c.name)) or "{}")
    assert entry["container_id"] == c.id and entry["started_at"]
    assert agent.stop() == 0
    # handed over to a lease of its own, beyond the agent's revoke
    kept = etcd_reader.lease_ttl(ctx.entry(c.name))
    assert kept is not None and kept[0] == 60
    again = ctx.agent()
    wait_until(lambda: etcd_reader.get(ctx.standby("dhold", c.name)), timeout=10)
    time.sleep(1.0)
    assert etcd_reader.get(key) is None, "the restarted agent put a drained instance back"
    standby_lease = etcd_reader.lease_id(ctx.standby("dhold", c.name))
    wait_until(lambda: etcd_reader.lease_id(ctx.entry(c.name)) == standby_lease, timeout=5)

    c.restart()
    wait_until(lambda: etcd_reader.get(key), timeout=15)
    assert etcd_reader.get(ctx.entry(c.name)) is None
    assert again.alive


def test_a_sidecar_stopped_while_the_routers_are_idle_exits_at_once(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    registrar: RegistrarFactory, routers: list[FakeRouter],
) -> None:
    c = containers(labels={"registrar.service": "dside", "registrar.sidecar": "true"})
    sidecar = registrar([*ctx.scope.args("register", c.name, ttl=5), "--control-prefix",
                         ctx.ctl, "--drain", "30"])
    key = ctx.scope.key("dside", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=15)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r1"))
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r2"))
    took = []
    signalled = time.monotonic()
    sidecar.terminate()
    assert sidecar.wait(10) == 0
    took.append(time.monotonic() - signalled)
    assert etcd_reader.get(key) is None
    assert "drained in" in sidecar.logs()
    print(f"sidecar --drain 30, routers idle: exit {took[0]:.2f} s after SIGTERM")
    assert took[0] <= 1.0, sidecar.logs()


def test_a_sidecar_owns_the_drain_of_its_container_and_stops_at_once_after_it(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    registrar: RegistrarFactory, routers: list[FakeRouter],
) -> None:
    """The app unit's stop sequence: `registrar drain`, then the sidecar's SIGTERM, then the
    app's; an agent on the same node leaves the sidecar's container alone."""
    ctx.agent()
    c = containers(labels={"registrar.service": "dunit", "registrar.sidecar": "true"})
    sidecar = registrar([*ctx.scope.args("register", c.name, ttl=5), "--control-prefix",
                         ctx.ctl, "--drain", "30"])
    key = ctx.scope.key("dunit", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=15)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r1"))
    done = ctx.drain(c.name)
    assert done.returncode == 0 and "drained in" in done.stdout, done.stdout + done.stderr
    assert etcd_reader.lease_id(ctx.entry(c.name)) == etcd_reader.lease_id(
        ctx.standby("dunit", c.name))  # the sidecar's lease
    signalled = time.monotonic()
    sidecar.terminate()
    assert sidecar.wait(10) == 0
    assert time.monotonic() - signalled <= 1.0, sidecar.logs()
    assert etcd_reader.get(ctx.standby("dunit", c.name)) is None
    assert c.state()["Running"]  # the app is stopped only now, by the unit's next line


def test_a_sidecar_waits_the_whole_drain_with_no_router_reporting(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    registrar: RegistrarFactory,
) -> None:
    c = containers(labels={"registrar.service": "dnone", "registrar.sidecar": "true"})
    sidecar = registrar([*ctx.scope.args("register", c.name, ttl=5), "--control-prefix",
                         ctx.ctl, "--drain", "2"])
    wait_until(lambda: etcd_reader.get(ctx.scope.key("dnone", c.name)), timeout=15)
    signalled = time.monotonic()
    sidecar.terminate()
    assert sidecar.wait(10) == 0
    assert 2.0 <= time.monotonic() - signalled < 4.0


def test_drain_time_with_two_idle_routers(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    routers: list[FakeRouter],
) -> None:
    ctx.agent()
    c = containers(labels={"registrar.service": "dtime"})
    key = ctx.scope.key("dtime", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r1"))
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "r2"))
    times = []
    for _ in range(5):
        done = ctx.drain(c.name)
        assert done.returncode == 0, done.stderr
        times.append(float(done.stdout.split(" in ", 1)[1].split("s:", 1)[0]))
        assert ctx.drain(c.name, "--undo").returncode == 0
        wait_until(lambda: etcd_reader.get(key), timeout=5)
    p50 = statistics.median(times)
    print(f"drain time, two idle routers: p50 {p50:.2f} s ({', '.join(f'{t:.2f}' for t in times)})")
    assert p50 <= 1.0


def test_maint_enable_waits_on_the_routers_too(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    routers: list[FakeRouter],
) -> None:
    ctx.agent()
    c = containers(labels={"registrar.service": "dmaint"})
    key = ctx.scope.key("dmaint", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    busy = FakeRouter(etcd_reader.url, ctx.ctl, "r1")
    busy.in_flight = {"dmaint": {ctx.instance(c.name): 1}}
    routers.append(busy)
    enabling = subprocess.Popen(ctx.args("maint", "enable", "dmaint", "--timeout", "20"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: etcd_reader.get(ctx.standby("dmaint", c.name)), timeout=5)
    time.sleep(1.0)
    assert enabling.poll() is None, "maint enable returned with a request in flight"
    busy.in_flight = {}
    out, err = enabling.communicate(timeout=10)
    assert enabling.returncode == 0, err
    assert "left rotation: dmaint" in out and "routers: 1 idle" in out, out
    disabled = subprocess.run(ctx.args("maint", "disable", "dmaint"), capture_output=True,
                              text=True, timeout=60)
    assert disabled.returncode == 0, disabled.stderr


def test_an_agent_stopped_waits_while_a_router_has_requests_in_flight(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader,
    registrar: RegistrarFactory, routers: list[FakeRouter],
) -> None:
    agent = registrar([*ctx.scope.args("watch", ttl=5), "--control-prefix", ctx.ctl,
                       "--explicit", "--metrics-addr", "127.0.0.1:0", "--drain", "20"])
    agent.wait_for_log("docker connected", timeout=15)
    c = containers(labels={"registrar.service": "dsig"})
    key = ctx.scope.key("dsig", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    busy = FakeRouter(etcd_reader.url, ctx.ctl, "r1")
    busy.in_flight = {"dsig": {ctx.instance(c.name): 4}}
    routers.append(busy)
    routers.append(FakeRouter(etcd_reader.url, ctx.ctl, "old", with_applied=False))
    agent.terminate()
    wait_until(lambda: etcd_reader.get(key) is None, timeout=5)
    time.sleep(1.5)
    assert agent.alive, "the agent exited with requests in flight"
    busy.in_flight = {}
    freed = time.monotonic()
    assert agent.wait(10) == 0
    assert time.monotonic() - freed < 2.0  # of --drain 20: ended by the report, not the time
    logs = agent.logs()
    assert "drained in" in logs and "not waited for): old" in logs, logs
