"""Shared fixtures. The real tier (marker ``real``) runs against the real Docker engine and a
private etcd started here; when either cannot be reached those tests FAIL, never skip.

Tests that use any fixture of REAL_FIXTURES are marked ``real`` automatically, so
``pytest -m "not real"`` (``make test-fast``) runs the pure tests only; a test that runs an
outside tool without such a fixture (systemd-analyze, promtool) carries the marker itself.

Property tests run the Hypothesis profile of HYPOTHESIS_PROFILE: "fast" by default, "thorough"
(`make test`) for every test's full count of examples (tests/hypothesis_profiles.py, imported
first here).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from registrar.adapters.docker_source import DockerSource, DockerUnavailable
from registrar.settings import DEFAULT_DOCKER
from tests import hypothesis_profiles  # noqa: F401  (loads the profile before any test module)
from tests.support.docker_env import (
    BUSYBOX_IMAGE,
    ContainerFactory,
    DockerError,
    ensure_busybox_image,
    new_prefix,
    remove_prefixed,
)
from tests.support.etcd import EtcdCluster, EtcdError, EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.forwarders import TcpForwarder, UnixForwarder
from tests.support.proc import RegistrarProcess, tail

REAL_FIXTURES = {
    "docker_client",
    "busybox_image",
    "containers",
    "etcd",
    "etcd_restartable",
    "etcd_reader",
    "etcd_cluster",
    "registrar",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


# --- names --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def session_prefix() -> str:
    """Unique prefix of this session's Docker objects, like ``rgt1a2b3c``."""
    return new_prefix()


@pytest.fixture
def unique() -> str:
    """A short unique id per test (8 hex digits): for key prefixes ``/rgt-{id}``, node names."""
    return secrets.token_hex(4)


# --- Docker -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docker_client(session_prefix: str) -> Iterator[DockerSource]:
    """registrar's own Docker client for the engine of ``DOCKER_HOST`` /
    /var/run/docker.sock (``.ping()``, ``.version()``, ``.inspect(name)``, ...)."""
    client = DockerSource(os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER, timeout=30)
    error = None
    try:
        client.ping()
    except DockerUnavailable as exc:
        error = f"Docker engine unreachable ({exc}); run `make setup` (scripts/setup.sh) first"
    if error:
        pytest.fail(error, pytrace=False)
    yield client
    with contextlib.suppress(DockerError, OSError, subprocess.TimeoutExpired):
        remove_prefixed(session_prefix)
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: DockerSource) -> str:
    """Tag of the ~1 MB busybox image built FROM scratch (built once, then cached)."""
    try:
        return ensure_busybox_image(BUSYBOX_IMAGE)
    except (DockerError, OSError) as exc:
        error = f"cannot build {BUSYBOX_IMAGE}: {exc}"
    pytest.fail(error, pytrace=False)


@pytest.fixture
def containers(session_prefix: str, busybox_image: str) -> Iterator[ContainerFactory]:
    """Factory: ``containers(name=None, ports=("8080",), labels=None, env=None,
    healthcheck=None, network=None, publish=True, extra_args=(), command=None) -> Container``
    (``.id``, ``.name``, ``.port(8080)``, ``.stop()``, ...). All removed at teardown."""
    factory = ContainerFactory(session_prefix, busybox_image)
    yield factory
    factory.cleanup()


# --- etcd ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A private one-member etcd for the session, on free loopback ports (``.url``).

    A test that stops, kills or pauses it must use ``etcd_restartable`` instead."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"), name="rgt-session")
    error = None
    try:
        server.start(timeout=30)
    except (EtcdError, OSError) as exc:
        server.destroy()
        error = f"cannot start etcd: {exc}"
    if error:
        pytest.fail(error, pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def etcd_restartable(etcd: EtcdServer) -> Iterator[EtcdServer]:
    """The session etcd, for tests that stop/kill/pause it: running and healthy again after."""
    yield etcd
    etcd.resume()
    if not etcd.running:
        etcd.start(timeout=30)
    etcd.wait_healthy(30)


@pytest.fixture(scope="session")
def etcd_reader(etcd: EtcdServer) -> Iterator[EtcdReader]:
    """An EtcdReader on the session etcd (reconnects after etcd restarts)."""
    reader = EtcdReader(etcd.url)
    yield reader
    reader.close()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh three-member etcd cluster (``.urls``, ``.members``, ``.leader_index()``)."""
    cluster = EtcdCluster(tmp_path / "cluster", size=3)
    error = None
    try:
        cluster.start()
    except (EtcdError, OSError) as exc:
        cluster.destroy()
        error = f"cannot start an etcd cluster: {exc}"
    if error:
        pytest.fail(error, pytrace=False)
    yield cluster
    cluster.destroy()


# --- forwarders ---------------------------------------------------------------------------
class Forwarders:
    """Factory of TCP / unix forwarders that are all closed at teardown."""

    def __init__(self) -> None:
        self.made: list[TcpForwarder | UnixForwarder] = []

    def tcp(self, host: str, port: int) -> TcpForwarder:
        fwd = TcpForwarder(host, port)
        self.made.append(fwd)
        return fwd

    def etcd(self, server: EtcdServer) -> TcpForwarder:
        return self.tcp(server.host, server.port)

    def unix(self, target_path: str = "/var/run/docker.sock") -> UnixForwarder:
        fwd = UnixForwarder(target_path)
        self.made.append(fwd)
        return fwd

    def close(self) -> None:
        for fwd in self.made:
            with contextlib.suppress(Exception):
                fwd.close()


@pytest.fixture
def forwarders() -> Iterator[Forwarders]:
    """``forwarders.tcp(host, port)``, ``forwarders.etcd(server)``, ``forwarders.unix(path)``."""
    f = Forwarders()
    yield f
    f.close()


# --- the registrar under test -------------------------------------------------------------
RegistrarFactory = Callable[..., RegistrarProcess]


@pytest.fixture
def registrar(tmp_path: Path) -> Iterator[RegistrarFactory]:
    """Factory: ``registrar(*args, env=None) -> RegistrarProcess`` running
    ``python -m registrar ARGS`` (REGISTRAR_* of the outer environment are not inherited).
    Every process still alive at teardown is SIGKILLed; their logs go to the captured output."""
    made: list[RegistrarProcess] = []

    def start(
        *args: str | Sequence[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> RegistrarProcess:
        flat: list[str] = []
        for a in args:
            flat.extend([a] if isinstance(a, str) else list(a))
        proc = RegistrarProcess(flat, env=env, log_dir=tmp_path / "registrar-logs", **kw)
        made.append(proc)
        return proc

    yield start
    for proc in made:
        proc.cleanup()
    for proc in made:
        print(f"--- {proc!r} log (tail) ---\n{tail(proc.logs(), 60)}")
