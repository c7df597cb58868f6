"""`registrar register CONTAINER`, the sidecar, against the real Docker engine and etcd."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import pytest

from registrar.settings import DEFAULT_DOCKER
from tests.helpers import (
    Scope,
    actions_since_start,
    etcd_requests,
    holds,
    metrics_flag,
    scrape,
    value_of,
)
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import wait_until

if TYPE_CHECKING:
    from tests.conftest import Forwarders, RegistrarFactory

TTL = 3


@pytest.fixture
def scope(etcd: EtcdServer, unique: str) -> Scope:
    return Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)


def test_registers_host_port_and_lease_then_sigterm_removes(
    scope: Scope, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader,
) -> None:
    c = containers(labels={"registrar.service": "web", "registrar.version": "v7"})
    sidecar = registrar(scope.args("register", c.name, ttl=TTL))
    key = scope.key("web", c.name)
    value = value_of(wait_until(lambda: etcd_reader.get(key), timeout=10,
                                message=lambda: sidecar.logs()))
    assert value["host"] == "127.0.0.1"  # the port's own specific HostIp
    assert value["port"] == c.port(8080)
    assert value["service"] == "web"
    assert value["node"] == scope.node
    assert value["container_id"] == c.id
    assert value["container_name"] == c.name
    assert value["private_port"] == 8080
    assert value["protocol"] == "tcp"
    assert value["version"] == "v7"
    assert (etcd_reader.lease_ttl(key) or (0, 0))[0] == TTL

    # Heartbeats keep it well past its TTL, under the same lease all along.
    lease = etcd_reader.lease_id(key)
    holds(lambda: etcd_reader.lease_id(key) == lease, TTL * 2.5, "the key under its lease")

    sidecar.terminate()
    assert sidecar.wait(10) == 0
    assert etcd_reader.get(key) is None  # revoked before exiting, not left to expire


def test_sigkill_lets_the_key_expire_within_ttl(
    scope: Scope, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader,
) -> None:
    c = containers(labels={"registrar.service": "web"})
    sidecar = registrar(scope.args("register", c.name, ttl=TTL))
    key = scope.key("web", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())
    sidecar.kill()
    killed = time.monotonic()
    wait_until(lambda: etcd_reader.get(key) is None, timeout=TTL + 4, interval=0.1)
    assert time.monotonic() - killed <= TTL + 2


def test_docker_stop_deregisters_before_the_container_dies(
    scope: Scope, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader,
) -> None:
    # busybox httpd as PID 1 ignores SIGTERM: `docker stop -t 4` takes the full 4 s.
    c = containers(labels={"registrar.service": "web"})
    sidecar = registrar(scope.args("register", c.name, ttl=TTL))
    key = scope.key("web", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())

    stopper = threading.Thread(target=c.stop, kwargs={"timeout": 4})
    stopper.start()
    try:
        wait_until(lambda: etcd_reader.get(key) is None, timeout=3, interval=0.02,
                   message="key still there while the container stops")
        assert c.state()["Running"], "the key must go while the app still drains"
    finally:
        stopper.join()
    assert sidecar.wait(10) == 0


def test_waits_for_a_container_created_later(
    scope: Scope, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader,
) -> None:
    name = containers.full_name("later")
    sidecar = registrar(scope.args("register", name, "--wait", "30", ttl=TTL))
    sidecar.wait_for_log("waiting up to 30s", timeout=10)
    assert sidecar.alive  # and it registers the container created after it started:
    containers(name=name, labels={"registrar.service": "late"})
    wait_until(lambda: etcd_reader.get(scope.key("late", name)), timeout=10,
               message=lambda: sidecar.logs())
    assert sidecar.stop() == 0


def test_a_stream_opened_from_the_containers_start_replays_its_stop(
    containers: ContainerFactory,
) -> None:
    """A sidecar registers from the inspect that found its container and only then opens
    its events from the container's start (State.StartedAt as Docker gives it): a stop
    between the two must come on that stream."""
    c = containers(labels={"registrar.service": "web"})
    c.stop()
    actions = actions_since_start(os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER, c.name)
    assert actions[0] == "start" and "die" in actions, actions


def test_a_container_that_never_appears_exits_1_naming_it(
    scope: Scope, registrar: RegistrarFactory, etcd_reader: EtcdReader
) -> None:
    sidecar = registrar(scope.args("register", "rgt-no-such-container", "--wait", "1"))
    assert sidecar.wait(15) == 1
    last = sidecar.logs().strip().splitlines()[-1]
    assert "rgt-no-such-container" in last
    assert "Traceback" not in sidecar.logs()
    assert etcd_reader.get_prefix(scope.prefix + "/") == {}


def test_etcd_stopped_and_restarted(
    scope: Scope, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader, etcd_restartable: EtcdServer,
) -> None:
    c = containers(labels={"registrar.service": "web"})
    flag, port = metrics_flag()
    sidecar = registrar(scope.args("register", c.name, *flag, ttl=TTL))
    key = scope.key("web", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())

    etcd_restartable.stop()
    wait_until(lambda: scrape(port)["registrar_etcd_up"] == 0, timeout=3,
               message="registrar_etcd_up did not turn 0")
    holds(lambda: sidecar.alive, TTL + 1, "the sidecar runs on while etcd is down")
    etcd_restartable.start()
    wait_until(lambda: etcd_reader.get(key), timeout=15, message=lambda: sidecar.logs())
    wait_until(lambda: scrape(port)["registrar_etcd_up"] == 1, timeout=5)
    # ... and it is kept alive afterwards, by the same sidecar.
    holds(lambda: etcd_reader.get(key), TTL * 1.5, "the key after etcd's restart")
    assert sidecar.stop() == 0
    assert etcd_reader.get(key) is None


def test_lease_expired_during_a_partition_is_granted_anew(
    scope: Scope, etcd: EtcdServer, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader, forwarders: Forwarders,
) -> None:
    fwd = forwarders.etcd(etcd)
    c = containers(labels={"registrar.service": "web"})
    flag, port = metrics_flag()
    sidecar = registrar(
        Scope(scope.prefix, scope.node, fwd.url).args("register", c.name, *flag, ttl=TTL)
    )
    key = scope.key("web", c.name)
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())
    old_lease = etcd_reader.lease_id(key)

    fwd.cut()
    # etcd itself is up: the lease expires server-side and the key goes with it.
    wait_until(lambda: etcd_reader.get(key) is None, timeout=TTL + 3)
    fwd.restore()
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())
    assert etcd_reader.lease_id(key) != old_lease
    wait_until(lambda: scrape(port)["registrar_lease_regrants_total"] >= 1, timeout=5)
    assert sidecar.stop() == 0


def test_etcd_reachable_only_after_the_sidecar_starts(
    scope: Scope, etcd: EtcdServer, containers: ContainerFactory, registrar: RegistrarFactory,
    etcd_reader: EtcdReader, forwarders: Forwarders,
) -> None:
    fwd = forwarders.etcd(etcd)
    fwd.cut()
    c = containers(labels={"registrar.service": "web"})
    flag, port = metrics_flag()
    sidecar = registrar(
        Scope(scope.prefix, scope.node, fwd.url).args("register", c.name, *flag, ttl=TTL)
    )
    key = scope.key("web", c.name)
    # It tries etcd, fails, and tries again rather than giving up.
    wait_until(lambda: etcd_requests(port, "lease_grant") >= 2, timeout=10, ignore=(OSError,),
               message=lambda: sidecar.logs())
    assert sidecar.alive
    assert scrape(port)["registrar_etcd_up"] == 0
    fwd.restore()
    wait_until(lambda: etcd_reader.get(key), timeout=10, message=lambda: sidecar.logs())
    assert sidecar.stop() == 0
