"""`registrar maint` with real agents, containers and etcd: each kind of entry, an agent
restarted on a node in maintenance, an agent cut off while maintenance is enabled, names that
break the path-segment rule."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Protocol

import pytest

from tests.helpers import Scope
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.observe import KeyLog
from tests.support.proc import RegistrarProcess, wait_until

if TYPE_CHECKING:
    from tests.conftest import Forwarders, RegistrarFactory


class Agent(Protocol):
    def __call__(self, url: str | None = ...) -> RegistrarProcess: ...


Ctx = tuple[Scope, str, Agent]


def maint(scope: Scope, ctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "registrar", "maint", "--timeout", "10",
                           *args, "--etcd", scope.etcd_url, "--prefix", scope.prefix,
                           "--control-prefix", ctl], capture_output=True, text=True, timeout=60)


def ls_json(scope: Scope, ctl: str) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, "-m", "registrar", "ls", "--json", "--etcd",
                           scope.etcd_url, "--prefix", scope.prefix, "--control-prefix", ctl],
                          capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def ctx(registrar: RegistrarFactory, etcd: EtcdServer, unique: str) -> Ctx:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    ctl = f"/rgtc-{unique}"

    def agent(url: str | None = None) -> RegistrarProcess:
        s = Scope(scope.prefix, scope.node, url or etcd.url)
        proc = registrar([*s.args("watch"), "--control-prefix", ctl, "--explicit",
                          "--metrics-addr", "127.0.0.1:0"])
        proc.wait_for_log("docker connected", timeout=15)
        return proc

    return scope, ctl, agent


@pytest.mark.parametrize("kind", ["service", "instance", "node"])
def test_each_kind_takes_instances_out_and_back(
    ctx: Ctx, containers: ContainerFactory, etcd_reader: EtcdReader, kind: str
) -> None:
    scope, ctl, agent = ctx
    proc = agent()
    held = containers(labels={"registrar.service": "mweb"})
    other = containers(labels={"registrar.service": "mapi"})
    key, other_key = scope.key("mweb", held.name), scope.key("mapi", other.name)
    wait_until(lambda: etcd_reader.get(key) and etcd_reader.get(other_key), timeout=10)
    lease = etcd_reader.lease_id(key)
    target = {"service": ["mweb"], "instance": ["mweb", "--instance",
                                                  f"{scope.node}:{held.name}:8080"],
              "node": ["--node", scope.node]}[kind]
    enabled = maint(scope, ctl, "enable", *target, "--reason", "kernel update")
    assert enabled.returncode == 0, enabled.stderr
    assert "left rotation: mweb" in enabled.stdout, enabled.stdout
    standby = f"{ctl}/standby/mweb/{scope.node}:{held.name}:8080"
    assert etcd_reader.get(key) is None and etcd_reader.lease_id(standby) == lease
    assert (etcd_reader.get(other_key) is None) == (kind == "node")
    listed = maint(scope, ctl)
    row = next(line for line in listed.stdout.splitlines() if "kernel update" in line)
    assert row.split()[-1] == ("2" if kind == "node" else "1"), listed.stdout  # HOLDS
    marked = [o for o in ls_json(scope, ctl) if o.get("maintenance")]
    assert standby in [o["key"] for o in marked]
    disabled = maint(scope, ctl, "disable", *target)
    assert disabled.returncode == 0, disabled.stderr
    assert "back in rotation: mweb" in disabled.stdout
    assert etcd_reader.get(key) is not None and etcd_reader.get(standby) is None
    assert proc.alive


def test_an_agent_starting_on_a_node_in_maintenance_puts_nothing_in_rotation(
    ctx: Ctx, containers: ContainerFactory, etcd: EtcdServer
) -> None:
    scope, ctl, agent = ctx
    c = containers(labels={"registrar.service": "mboot"})
    assert "holds nothing yet" in maint(scope, ctl, "enable", "--node", scope.node).stdout
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        agent()
        standby = f"{ctl}/standby/mboot/{scope.node}:{c.name}:8080"
        from tests.support.etcd_reader import EtcdReader

        with EtcdReader(etcd.url) as reader:
            wait_until(lambda: reader.get(standby), timeout=10)
        assert keys.events == [], "a PUT under the prefix for a node in maintenance"
    finally:
        keys.close()
    assert maint(scope, ctl, "disable", "--node", scope.node).returncode == 0


def test_an_agent_cut_off_applies_maintenance_first_when_back(
    ctx: Ctx, containers: ContainerFactory, etcd: EtcdServer, etcd_reader: EtcdReader,
    forwarders: Forwarders,
) -> None:
    scope, ctl, agent = ctx
    fwd = forwarders.etcd(etcd)
    agent(fwd.url)
    c = containers(labels={"registrar.service": "mcut"})
    key = scope.key("mcut", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10)
    fwd.cut()
    enabled = maint(scope, ctl, "enable", "mcut", "--timeout", "1")
    assert enabled.returncode == 1 and "timed out" in enabled.stderr  # the agent is cut off
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        fwd.restore()
        standby = f"{ctl}/standby/mcut/{scope.node}:{c.name}:8080"
        wait_until(lambda: etcd_reader.get(standby), timeout=15)
        assert [e.kind for e in keys.events] in ([], ["delete"])  # no PUT in rotation first
    finally:
        keys.close()


@pytest.mark.parametrize("args", [
    ["enable", "a/b"], ["enable", ".."], ["enable", "web", "--instance", "n:c"],
    ["enable", "web", "--instance", "n:c:99999"], ["enable", "--node", "bad node"],
    ["enable"], ["enable", "web", "--node", "n1"], ["disable", "--instance", "n:c:1"],
])
def test_bad_names_exit_2_and_write_nothing(
    ctx: Ctx, etcd_reader: EtcdReader, args: list[str]
) -> None:
    scope, ctl, _agent = ctx
    done = maint(scope, ctl, *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert etcd_reader.get_prefix(f"{ctl}/maintenance/") == {}
