"""Docker over `tcp://` with TLS, as Docker's CLI reaches it (`DOCKER_TLS_VERIFY`,
`DOCKER_CERT_PATH` with ca.pem, cert.pem, key.pem): the real engine behind a TLS endpoint that
requires a client certificate of our CA, which is what `dockerd --tlsverify` does."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from registrar.adapters.docker_source import DockerSource
from registrar.core.source import DockerUnavailable
from tests.helpers import Scope
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.observe import KeyLog
from tests.support.proc import wait_until
from tests.support.tls import CertificateAuthority

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

pytestmark = pytest.mark.real
DOCKER_SOCKET = "/var/run/docker.sock"


class TlsDockerEndpoint:
    """127.0.0.1:PORT over TLS (client certificate required) in front of Docker's socket."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self.handshakes_refused = 0
        threading.Thread(target=self._accept, daemon=True, name="tls-docker").start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_refused += 1
            raw.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(DOCKER_SOCKET)
        self._open += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def tls_docker(tmp_path: Path) -> Iterator[tuple[TlsDockerEndpoint, dict[str, str]]]:
    """The endpoint and the environment of a client that has its certificates."""
    ca = CertificateAuthority(tmp_path / "pki", "rgt-docker-ca")
    server = ca.issue("dockerd", server=True)
    client = ca.issue("registrar")
    certs = tmp_path / "docker-certs"
    certs.mkdir()
    shutil.copy(ca.cert, certs / "ca.pem")
    shutil.copy(client.cert, certs / "cert.pem")
    shutil.copy(client.key, certs / "key.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert, server.key)
    context.load_verify_locations(cafile=ca.cert)
    context.verify_mode = ssl.CERT_REQUIRED
    endpoint = TlsDockerEndpoint(context)
    yield endpoint, {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
    endpoint.close()


def test_docker_source_over_tls_with_a_client_certificate(
    tls_docker: tuple[TlsDockerEndpoint, dict[str, str]], containers: ContainerFactory,
    tmp_path: Path,
) -> None:
    endpoint, env = tls_docker
    source = DockerSource(endpoint.url, env=env)
    try:
        source.ping()
        events = source.open_events(None)
        seen: list[dict[str, Any]] = []

        def read() -> None:
            for event in events:
                seen.append(event)

        threading.Thread(target=read, daemon=True).start()
        web = containers(labels={"registrar.service": "tls"})
        info = source.inspect(web.name)
        assert info is not None and info.id == web.id and info.running
        wait_until(lambda: any(e.get("Action") == "start" and e["Actor"]["ID"] == web.id
                               for e in list(seen)), timeout=10, message="no start event")
    finally:
        source.close()

    refused = endpoint.handshakes_refused
    without_cert = tmp_path / "only-ca"
    without_cert.mkdir()
    shutil.copy(Path(env["DOCKER_CERT_PATH"]) / "ca.pem", without_cert / "ca.pem")
    for bad_env, why in (({}, "plain HTTP to a TLS port"),
                         ({"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(without_cert)},
                          "no client certificate")):
        with pytest.raises(DockerUnavailable):
            DockerSource(endpoint.url, timeout=3, env=bad_env).ping()
        print(f"refused as it should: {why}")
    # the proxy counts a refused handshake on its own thread, possibly after the client has
    # already seen the refusal: wait for the count rather than race it
    wait_until(lambda: endpoint.handshakes_refused > refused, timeout=5,
               message="the TLS endpoint refused no handshake")


def test_the_agent_registers_through_docker_over_tls(
    tls_docker: tuple[TlsDockerEndpoint, dict[str, str]], containers: ContainerFactory,
    etcd: EtcdServer, unique: str, registrar: RegistrarFactory,
) -> None:
    endpoint, env = tls_docker
    scope = Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)
    keys = KeyLog(etcd.url, scope.prefix + "/")
    try:
        agent = registrar([*scope.args("watch"), "--docker", endpoint.url],
                          env={**env, "DOCKER_HOST": "unix:///nonexistent.sock"})
        agent.wait_for_log("docker connected", timeout=15)
        web = containers(labels={"registrar.service": "tls"})
        key = scope.key("tls", web.name)
        assert keys.wait(lambda k: key in k.live, timeout=10), agent.logs()
        web.stop(timeout=1)
        assert keys.wait(lambda k: key not in k.live, timeout=10), agent.logs()
        assert agent.stop(15) == 0
    finally:
        keys.close()
