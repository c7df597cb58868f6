"""`registrar promote`, followed by real agents and sidecars, on real Docker and etcd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Scope, metrics_flag, resynced, scrape
from tests.support.docker_env import Container, ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import wait_until

if TYPE_CHECKING:
    from tests.conftest import Forwarders, RegistrarFactory

TTL = 3


@pytest.fixture
def scope(etcd: EtcdServer, unique: str) -> Scope:
    return Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)


def control(scope: Scope) -> str:
    return scope.prefix + "-ctl"


def cli(scope: Scope, *args: str, etcd_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `registrar ARGS` against the test's etcd and prefixes, like an operator."""
    return subprocess.run(
        [sys.executable, "-m", "registrar", *args, "--etcd", etcd_url or scope.etcd_url,
         "--prefix", scope.prefix, "--control-prefix", control(scope)],
        capture_output=True, text=True, timeout=60,
    )


def versions_in(reader: EtcdReader, base: str, names: Iterable[str]) -> dict[str, str]:
    """{container name: version} of the instances under `base` for these containers."""
    found: dict[str, str] = {}
    for raw in reader.get_prefix(base + "/").values():
        value = json.loads(raw)
        if value.get("container_name") in names:
            found[value["container_name"]] = value["version"]
    return found


def start_version(containers: ContainerFactory, version: str, service: str) -> Container:
    return containers(labels={"registrar.service": service, "registrar.version": version})


@pytest.fixture
def svc(unique: str) -> str:
    """A service name of this test's own: other sessions on a shared engine use "web" too."""
    return f"web-{unique}"


def test_promote_standby_resync_rollback_and_clear(
    scope: Scope, svc: str, registrar: RegistrarFactory, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    flag, port = metrics_flag()
    agent = registrar([*scope.args("watch", ttl=TTL), "--control-prefix", control(scope),
                       *flag, "--resync", "1", "--explicit"])
    agent.wait_for_log("docker connected", timeout=15)
    v1 = [start_version(containers, "v1", svc) for _ in range(2)]
    v2 = [start_version(containers, "v2", svc) for _ in range(2)]
    names = {c.name for c in [*v1, *v2]}
    rotation = f"{scope.prefix}/{svc}"
    standby = f"{control(scope)}/standby/{svc}"

    def state() -> tuple[dict[str, str], dict[str, str]]:
        return (versions_in(etcd_reader, rotation, names),
                versions_in(etcd_reader, standby, names))

    wait_until(lambda: len(state()[0]) == 4, timeout=10)

    # Promote v2: the v1 instances leave rotation and wait on standby, same value, same lease.
    lease = etcd_reader.lease_id(scope.key(svc, v1[0].name))
    result = cli(scope, "promote", svc, "v2")
    assert result.returncode == 0, result.stderr
    assert "left rotation" in result.stdout and v1[0].name in result.stdout
    active, waiting = state()
    assert set(active.values()) == {"v2"} and len(active) == 2
    assert set(waiting.values()) == {"v1"} and len(waiting) == 2
    assert etcd_reader.lease_id(f"{standby}/{scope.node}:{v1[0].name}:8080") == lease
    samples = scrape(port)

    def node_keys(base: str) -> int:
        return sum(1 for k in etcd_reader.get_prefix(base + "/") if f"/{scope.node}:" in k)

    # (On a shared dev engine the agent registers other sessions' labelled containers too.)
    assert samples["registrar_standby_services"] == node_keys(f"{control(scope)}/standby") == 2
    assert samples["registrar_registered_services"] == node_keys(scope.prefix) >= 2

    # Resyncs do not bring v1 back; a new v1 goes straight to standby, a new v2 comes in.
    late_v1 = start_version(containers, "v1", svc)
    late_v2 = start_version(containers, "v2", svc)
    names |= {late_v1.name, late_v2.name}
    wait_until(lambda: len(state()[0]) == 3 and len(state()[1]) == 3, timeout=10,
               message=lambda: str(state()))
    resynced(port)
    active, waiting = state()
    assert set(active.values()) == {"v2"} and set(waiting.values()) == {"v1"}
    assert late_v1.name in waiting and late_v2.name in active

    # A version with no instance is refused and nothing changes.
    result = cli(scope, "promote", svc, "v9")
    assert result.returncode == 1
    assert "v9" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert state() == (active, waiting)

    # Instant rollback: promote v1 again.
    started = time.monotonic()
    result = cli(scope, "promote", svc, "v1")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5
    active, waiting = state()
    assert set(active.values()) == {"v1"} and len(active) == 3
    assert set(waiting.values()) == {"v2"} and len(waiting) == 3

    listing = cli(scope, "ls")
    assert "PROMOTED" in listing.stdout and "v1" in listing.stdout
    for line in cli(scope, "ls", "--json").stdout.splitlines():
        entry = json.loads(line)
        if entry.get("container_name") in names:
            assert entry["promoted"] == "v1"

    # --clear: every running version back in rotation.
    result = cli(scope, "promote", svc, "--clear")
    assert result.returncode == 0, result.stderr
    active, waiting = state()
    assert len(active) == 6 and not waiting

    # The agent's SIGTERM removes its standby keys too.
    assert cli(scope, "promote", svc, "v2").returncode == 0
    assert state()[1]
    agent.terminate()
    assert agent.wait(10) == 0
    assert state() == ({}, {})


def test_quick_successive_promotions_end_in_the_last_state(
    scope: Scope, svc: str, registrar: RegistrarFactory, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    agent = registrar([*scope.args("watch", ttl=TTL), "--control-prefix", control(scope),
                       "--metrics-addr", "127.0.0.1:0", "--explicit"])
    agent.wait_for_log("docker connected", timeout=15)
    cs = [start_version(containers, v, svc) for v in ("v1", "v2", "v3")]
    names = {c.name for c in cs}
    sentinel = f"{svc}-b"
    start_version(containers, "v1", sentinel)
    wait_until(lambda: len(versions_in(etcd_reader, f"{scope.prefix}/{svc}", names)) == 3
               and etcd_reader.get_prefix(f"{scope.prefix}/{sentinel}/"), timeout=10)
    key = f"{control(scope)}/promoted/{svc}"
    for version in ("v1", "v2", "v3", "v2"):
        etcd_reader.put(key, json.dumps({"version": version, "at": "2026-01-01T00:00:00Z"}))
    # A promotion of another service of the agent's, written last, tells when it has read the
    # last promotion of ours: that one makes it read the whole control state again. (One of a
    # service it has no instance of would not: it reads again only for what concerns it, and
    # not when a read of its own already reached the change.)
    etcd_reader.put(f"{control(scope)}/promoted/{sentinel}", '{"version": "x"}')
    agent.wait_for_log(rf"control: .*{sentinel} promoted x", timeout=10)
    wait_until(lambda: versions_in(etcd_reader, f"{scope.prefix}/{svc}", names)
               == {cs[1].name: "v2"}, timeout=5)
    assert agent.alive


def test_an_agent_cut_off_during_a_promotion_applies_it_first_when_back(
    scope: Scope, svc: str, etcd: EtcdServer, registrar: RegistrarFactory,
    containers: ContainerFactory, etcd_reader: EtcdReader, forwarders: Forwarders,
) -> None:
    fwd = forwarders.etcd(etcd)
    agent = registrar([*Scope(scope.prefix, scope.node, fwd.url).args("watch", ttl=TTL),
                       "--control-prefix", control(scope), "--metrics-addr", "127.0.0.1:0",
                       "--explicit"])
    agent.wait_for_log("docker connected", timeout=15)
    old = start_version(containers, "v1", svc)
    new = start_version(containers, "v2", svc)
    names = {old.name, new.name}
    rotation = f"{scope.prefix}/{svc}"
    wait_until(lambda: len(versions_in(etcd_reader, rotation, names)) == 2, timeout=10)

    fwd.cut()
    # The lease expires while cut off; the promotion happens meanwhile.
    wait_until(lambda: not versions_in(etcd_reader, rotation, names), timeout=TTL + 3)
    etcd_reader.put(f"{control(scope)}/promoted/{svc}",
                    json.dumps({"version": "v2", "at": "2026-01-01T00:00:00Z"}))
    late_old = start_version(containers, "v1", svc)
    names.add(late_old.name)

    # Watch every change of the rotation from the moment it is back: v1 must never re-enter.
    seen: list[dict[str, str]] = []
    fwd.restore()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = versions_in(etcd_reader, rotation, names)
        seen.append(current)
        if current == {new.name: "v2"} and len(
            versions_in(etcd_reader, f"{control(scope)}/standby/{svc}", names)
        ) == 2:
            break
        time.sleep(0.01)
    assert seen[-1] == {new.name: "v2"}, agent.logs()
    assert all("v1" not in s.values() for s in seen), seen


def test_the_sidecar_follows_promotions(
    scope: Scope, svc: str, registrar: RegistrarFactory, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    old = start_version(containers, "v1", svc)
    new = start_version(containers, "v2", svc)
    sidecars = [
        registrar([*scope.args("register", c.name, ttl=TTL), "--control-prefix", control(scope)])
        for c in (old, new)
    ]
    rotation = f"{scope.prefix}/{svc}"
    standby = f"{control(scope)}/standby/{svc}"
    names = {old.name, new.name}
    wait_until(lambda: len(versions_in(etcd_reader, rotation, names)) == 2, timeout=10)
    result = cli(scope, "promote", svc, "v2")
    assert result.returncode == 0, result.stderr
    assert versions_in(etcd_reader, rotation, names) == {new.name: "v2"}
    assert versions_in(etcd_reader, standby, names) == {old.name: "v1"}
    assert cli(scope, "promote", svc, "v1").returncode == 0
    assert versions_in(etcd_reader, rotation, names) == {old.name: "v1"}
    # The demoted container stopping removes its standby key; its sidecar exits 0.
    new.stop(timeout=0)
    assert sidecars[1].wait(10) == 0
    assert versions_in(etcd_reader, standby, names) == {}
    assert sidecars[0].stop() == 0
    assert versions_in(etcd_reader, rotation, names) == {}
