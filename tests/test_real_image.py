"""The project's container image (Dockerfile), built and run as a host agent would run it.

Built on the local debootstrap base (no registry is reachable here; see tests/support/image.py),
then run with the host's network and the Docker socket, unprivileged but given the socket's
group, against the test etcd: it registers containers, and `docker stop` of the registrar
container (SIGTERM to PID 1, no shell in between) deregisters everything and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from registrar import __version__
from tests.helpers import Scope, healthz, value_of
from tests.support.docker_env import ContainerFactory, docker
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.image import TEST_REVISION, BuiltImage, registrar_image
from tests.support.proc import free_port, tail, wait_until

__all__ = ["registrar_image"]  # the fixture, imported to be used here

# The first session builds the debootstrap base (about a minute) and installs the
# dependencies from the package index: well past the default per-test timeout.
pytestmark = pytest.mark.timeout(900)

ENTRYPOINT = ["/opt/registrar/bin/registrar"]


def container_logs(name: str) -> str:
    """stdout and stderr of a container (registrar logs on stderr)."""
    proc = subprocess.run(["docker", "logs", name], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    return proc.stdout


def test_image_metadata_version_and_contents(registrar_image: BuiltImage) -> None:
    tag = registrar_image.tag
    assert docker("run", "--rm", tag, "--version") == f"registrar {__version__}"

    config = registrar_image.inspect()["Config"]
    assert config["Entrypoint"] == ENTRYPOINT  # exec form: registrar itself is PID 1
    user = config["User"]
    assert user and user.split(":")[0] not in ("", "0", "root")
    labels = config["Labels"]
    # the Dockerfile's default VERSION must follow the package's version
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"] == TEST_REVISION
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.title"] == "registrar"

    # What is (not) inside: an unprivileged user, the virtualenv without pip/setuptools, no
    # compilers or build tools, no pip cache, no source tree.
    script = r"""
        echo "uid=$(id -u) gid=$(id -g)"
        for tool in gcc cc c++ g++ make ld as git pip pip3; do
            p=$(command -v "$tool") && echo "tool=$p"
        done
        ls /opt/registrar/bin/pip* /opt/registrar/bin/easy_install* 2>/dev/null | sed 's/^/tool=/'
        /opt/registrar/bin/python -c 'import pip' 2>/dev/null && echo "tool=venv-pip"
        ls -d /root/.cache/pip /src /opt/registrar/src 2>/dev/null | sed 's/^/left=/'
        /opt/registrar/bin/python -c 'import registrar, sys; print("module=" + registrar.__file__)'
        exit 0
    """
    out = docker("run", "--rm", "--entrypoint", "/bin/sh", tag, "-c", script)
    lines = out.splitlines()
    assert "uid=10001 gid=10001" in lines
    assert [ln for ln in lines if ln.startswith(("tool=", "left="))] == []
    assert any(ln.startswith("module=/opt/registrar/lib/") for ln in lines), out
    print(f"image {tag}: {registrar_image.size / 1e6:.0f} MB")


def test_image_as_host_agent_registers_and_docker_stop_deregisters(
    registrar_image: BuiltImage, etcd: EtcdServer, etcd_reader: EtcdReader,
    containers: ContainerFactory, unique: str,
) -> None:
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    before = containers(labels={"registrar.service": "web"})
    name = containers.full_name(f"agent-{unique}")
    gid = os.stat("/var/run/docker.sock").st_gid
    port = free_port()
    try:
        docker(
            "run", "-d", "--name", name, "--net=host",
            "-v", "/var/run/docker.sock:/var/run/docker.sock", "--group-add", str(gid),
            registrar_image.tag,
            "watch", "--etcd", etcd.url, "--prefix", scope.prefix, "--node", scope.node,
            "--ttl", "5", "--metrics-addr", f"127.0.0.1:{port}",
        )

        def logs() -> str:
            return tail(container_logs(name), 40)

        # a container running before the agent started (reconcile at start) ...
        wait_until(lambda: etcd_reader.get(scope.key("web", before.name)), timeout=20,
                   message=logs)
        # ... and one started beside it (Docker's events)
        beside = containers(labels={"registrar.service": "web"})
        beside_key = scope.key("web", beside.name)
        value = value_of(wait_until(lambda: etcd_reader.get(beside_key), timeout=10,
                                    message=logs))
        assert value["port"] == beside.port(8080)
        assert value["node"] == scope.node
        assert healthz(port) == 200  # its metrics server answers on the host's network

        # (it registers every eligible container of this engine, other tests' too: the
        # node's keys are all under this test's prefix)
        prefix = f"{scope.prefix}/"
        keys = etcd_reader.keys(prefix)
        assert {scope.key("web", before.name), beside_key} <= set(keys)
        assert all(f"/{scope.node}:" in k for k in keys)

        started = time.monotonic()
        docker("stop", "-t", "20", name, timeout=60)
        took = time.monotonic() - started
        state = docker("inspect", "--format", "{{.State.ExitCode}} {{.State.OOMKilled}}", name)
        assert state == "0 false", logs()
        # SIGTERM reached registrar and it exited by itself: not killed after the 20 s timeout
        assert took < 10, f"docker stop took {took:.1f} s\n{logs()}"
        assert etcd_reader.get_prefix(prefix) == {}  # every key of the node, at once
        assert "received SIGTERM" in logs()
    finally:
        docker("rm", "-f", "-v", name, check=False)
