"""Smoke tests of the real-test infrastructure itself (tests/support, tests/conftest.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from registrar.adapters.docker_source import DockerSource, DockerUnavailable
from registrar.adapters.etcd_store import b64
from tests.support.docker_env import ContainerFactory, wait_for_http
from tests.support.docker_env import docker as docker_cli
from tests.support.etcd import EtcdCluster, EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.forwarders import TcpForwarder, UnixForwarder
from tests.support.proc import wait_until

pytestmark = pytest.mark.real


def test_etcd_stop_start_keeps_data_and_port(
    etcd_restartable: EtcdServer, etcd_reader: EtcdReader, unique: str
) -> None:
    etcd = etcd_restartable
    url = etcd.url
    key = f"/rgt-{unique}/persist"
    etcd_reader.put(key, "v1")
    etcd.stop()
    assert not etcd.running
    with pytest.raises(Exception):  # noqa: B017 - any client error will do
        etcd_reader.get(key)
    etcd.start()
    assert etcd.url == url
    assert etcd_reader.get(key) == "v1"  # the reader reconnects by itself
    etcd_reader.delete_prefix(f"/rgt-{unique}/")


def test_etcd_reader_leases_and_revision(etcd_reader: EtcdReader, unique: str) -> None:
    prefix = f"/rgt-{unique}/"
    lease = etcd_reader.grant_lease(30)
    rev = etcd_reader.put(prefix + "a", {"port": 1}, lease=lease)
    etcd_reader.put(prefix + "b", "plain")
    assert etcd_reader.revision() >= rev
    assert etcd_reader.get_json_prefix(prefix + "a") == {prefix + "a": {"port": 1}}
    assert etcd_reader.get_prefix(prefix) == {prefix + "a": '{"port": 1}', prefix + "b": "plain"}
    granted, remaining = etcd_reader.lease_ttl(prefix + "a") or (0, 0)
    assert granted == 30 and 0 < remaining <= 30
    assert etcd_reader.lease_ttl(prefix + "b") is None
    assert etcd_reader.lease_ids(prefix) == {prefix + "a": lease, prefix + "b": 0}
    etcd_reader.revoke_lease(lease)
    assert etcd_reader.get(prefix + "a") is None
    assert etcd_reader.delete_prefix(prefix) == 1


def test_cluster_reelects_after_leader_kill(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader_index()
    etcd_cluster.kill(leader)
    t0 = time.monotonic()
    new_leader = etcd_cluster.leader_index(timeout=5)
    elapsed = time.monotonic() - t0
    assert new_leader != leader
    assert elapsed < 3, f"re-election took {elapsed:.1f} s"
    survivor = etcd_cluster.members[(leader + 1) % 3]
    with EtcdReader(survivor.url) as reader:
        reader.put("/rgt-cluster/k", "v")
        assert reader.get("/rgt-cluster/k") == "v"
    # the killed member rejoins with its data
    etcd_cluster.start_member(leader)
    with EtcdReader(etcd_cluster.members[leader].url) as reader:
        wait_until(lambda: reader.get("/rgt-cluster/k") == "v", timeout=10, ignore=(Exception,))


def test_tcp_forwarder_cut_and_restore(
    etcd: EtcdServer, etcd_reader: EtcdReader, unique: str
) -> None:
    key = f"/rgt-{unique}/fwd"
    etcd_reader.put(key, "through")
    with TcpForwarder(etcd.host, etcd.port) as fwd, EtcdReader(fwd.url, timeout=1) as reader:
        assert reader.get(key) == "through"
        assert fwd.open_connections >= 1
        fwd.cut()
        assert fwd.open_connections == 0
        with pytest.raises(Exception):  # noqa: B017
            reader.get(key)
        fwd.restore()
        assert reader.get(key) == "through"
        # blackhole: nothing flows, the client times out; restore lets it through again
        fwd.blackhole()
        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017
            reader._call("/v3/kv/range", {"key": b64(key)}, retries=0)
        assert time.monotonic() - t0 >= 0.9
        fwd.restore()
        assert reader.get(key) == "through"
    etcd_reader.delete_prefix(f"/rgt-{unique}/")


def test_unix_forwarder_passes_docker_api_and_events(
    docker_client: DockerSource, containers: ContainerFactory
) -> None:
    with UnixForwarder("/var/run/docker.sock") as fwd:
        # the CLI through the forwarder
        assert docker_cli("-H", fwd.url, "version", "--format", "{{.Server.Version}}")
        client = DockerSource(fwd.url, timeout=10)
        try:
            client.ping()
            seen: list[dict[str, Any]] = []
            ended = threading.Event()
            stream = client.open_events(None)

            def consume() -> None:
                for ev in stream:
                    seen.append(ev)
                ended.set()  # the iterator ends when the connection drops

            t = threading.Thread(target=consume, daemon=True)
            t.start()
            c = containers(name="events")
            wait_until(
                lambda: any(
                    e.get("Action") == "start" and e.get("Actor", {}).get("ID") == c.id
                    for e in seen
                ),
                timeout=10,
                message="no start event through the forwarder",
            )
            fwd.cut()
            assert ended.wait(5), "events stream did not end after cut()"
            with pytest.raises(DockerUnavailable):
                client.ping()
            fwd.restore()
            client.ping()
        finally:
            client.close()


def test_containers_publish_on_loopback(containers: ContainerFactory) -> None:
    c = containers(labels={"registrar.service": "smoke"}, ports=("8080", "9090"))
    assert c.name.startswith(containers.prefix + "-")
    assert set(c.ports) == {"8080/tcp", "9090/tcp"}
    assert wait_for_http(c) == 200
    assert c.http_text().strip() == c.id[:12]  # the default httpd serves its host name
    info = c.inspect()
    assert info["Config"]["Labels"]["registrar.service"] == "smoke"
    bindings = info["NetworkSettings"]["Ports"]["8080/tcp"]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}


def test_containers_healthcheck_and_cleanup(containers: ContainerFactory) -> None:
    c = containers(healthcheck={"cmd": "true", "interval": 0.2})
    wait_until(lambda: c.state().get("Health", {}).get("Status") == "healthy", timeout=10)
    name = c.name
    containers.cleanup()
    assert docker_cli("ps", "-aq", "--filter", f"name=^/{name}$") == ""
