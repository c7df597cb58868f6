"""DockerSource, registrar's own Engine API client, against a scripted engine on a unix socket
(fast tier: no daemon). The real engine and Podman are in the real tier (test_real_watch.py,
test_real_podman.py, test_support.py)."""

from __future__ import annotations

import contextlib
import json
import queue
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from registrar.adapters import http1
from registrar.adapters.docker_source import (
    DEFAULT_SOCKET,
    DockerEndpoint,
    DockerSource,
    endpoint,
    quote,
)
from registrar.core.source import ContainerSource, DockerUnavailable
from tests.inspect_data import inspect_doc

# What the engine answers: (status, JSON body), or a list of raw chunks for a chunked stream
# (None in the list: wait until the test lets it go on; the end of the list: close the socket).
Answer = tuple[int, Any] | list[bytes | None]


class FakeEngine:
    """A unix-socket HTTP/1.1 server answering `routes[path without query]` (a callable of the
    full path), keeping connections alive; every request's path is recorded. `/_ping` says the
    API version in its `Api-Version` header, as Docker's and Podman's do (`ping_header`)."""

    def __init__(self, path: Path, api: str = "1.41", min_api: str = "1.12") -> None:
        self.path = str(path)
        self.requests: list[str] = []
        self.go_on: queue.Queue[None] = queue.Queue()
        self.routes: dict[str, Callable[[str], Answer]] = {
            "/version": lambda _: (200, {"Version": "20.10", "ApiVersion": api,
                                         "MinAPIVersion": min_api}),
            "/_ping": lambda _: (200, "OK"),
        }
        self.ping_header: str | None = api
        engine = self

        self.connections: list[Any] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                engine.connections.append(self.connection)
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    target = line.split()[1].decode()
                    while self.rfile.readline().strip():
                        pass  # headers
                    engine.requests.append(target)
                    route = engine.routes.get(urlsplit(target).path)
                    answer = route(target) if route else (404, {"message": "page not found"})
                    if isinstance(answer, list):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        for chunk in answer:
                            if chunk is None:
                                engine.go_on.get(timeout=10)
                                continue
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        return  # the daemon drops the stream
                    status, body = answer
                    data = json.dumps(body).encode()
                    extra = b""
                    if urlsplit(target).path == "/_ping" and engine.ping_header is not None:
                        extra = b"Api-Version: %s\r\n" % engine.ping_header.encode()
                    self.wfile.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                                     b"%sContent-Length: %d\r\n\r\n%s"
                                     % (status, extra, len(data), data))

        self.server = socketserver.ThreadingUnixStreamServer(self.path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def close(self) -> None:
        """Stops as a daemon does: the listener and every open connection closed."""
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(2)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[FakeEngine]:
    server = FakeEngine(tmp_path / "docker.sock")
    yield server
    server.close()


def container(cid: str, **kw: Any) -> dict[str, Any]:
    return inspect_doc(f"web-{cid[:4]}", cid=cid, labels={"registrar.service": "web"}, **kw)


# --- addresses ------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "address"), [
    ("", http1.Address(path=DEFAULT_SOCKET)),
    ("unix://", http1.Address(path=DEFAULT_SOCKET)),
    ("unix:///run/podman/podman.sock", http1.Address(path="/run/podman/podman.sock")),
    ("unix://var/run/docker.sock", http1.Address(path="/var/run/docker.sock")),
    ("http+unix:///x.sock", http1.Address(path="/x.sock")),
    ("tcp://d1:2375", http1.Address(host="d1", port=2375)),
    ("tcp://:2375", http1.Address(host="127.0.0.1", port=2375)),
    ("d1:2375", http1.Address(host="d1", port=2375)),
    ("http://127.0.0.1:2375/", http1.Address(host="127.0.0.1", port=2375)),
    ("https://d1:2376", http1.Address(host="d1", port=2376, tls=True)),
    ("tcp://[::1]:2375", http1.Address(host="::1", port=2375)),
])
def test_addresses_the_docker_sdk_took(url: str, address: http1.Address) -> None:
    assert endpoint(url, {}) == DockerEndpoint(address)


def test_tls_as_dockers_cli_from_its_environment() -> None:
    env = {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/certs"}
    assert endpoint("tcp://d1:2376", env) == DockerEndpoint(
        http1.Address(host="d1", port=2376, tls=True),
        ca="/certs/ca.pem", cert="/certs/cert.pem", key="/certs/key.pem")
    assert endpoint("tcp://d1:2375", {"DOCKER_TLS_VERIFY": ""}).address.tls is False
    assert endpoint("unix:///s", env).address == http1.Address(path="/s")  # no TLS on a socket


@pytest.mark.parametrize("url", ["ssh://me@d1", "npipe:////./pipe/docker_engine", "tcp://d1",
                                 "tcp://d1:2375/v1", "tcp://d1:0", "fd://"])
def test_addresses_we_cannot_dial_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="Docker address"):
        endpoint(url, {})


def test_a_bad_address_is_docker_unavailable_at_the_first_call() -> None:
    source = DockerSource("ssh://me@d1", env={})
    with pytest.raises(DockerUnavailable, match="unsupported Docker address"):
        source.inspect("web")


def test_quote() -> None:
    assert quote('{"status":["running"]}') == "%7B%22status%22%3A%5B%22running%22%5D%7D"
    assert quote("web-1_a.b~") == "web-1_a.b~"
    assert quote("é/x") == "%C3%A9%2Fx"


# --- requests -------------------------------------------------------------------------------
def test_version_negotiated_once_and_capped(engine: FakeEngine) -> None:
    engine.routes["/v1.41/containers/abc/json"] = lambda _: (200, container("abc" * 8))
    source: ContainerSource = DockerSource(engine.url, env={})
    for _ in range(3):
        info = source.inspect("abc")
        assert info is not None and info.id == "abc" * 8
    assert engine.requests == ["/_ping"] + ["/v1.41/containers/abc/json"] * 3
    source.close()


def test_version_from_version_when_ping_cannot_settle_it(engine: FakeEngine) -> None:
    """No `Api-Version` header, or a server newer than ours (its minimum then matters): the
    `/version` document decides, once."""
    engine.ping_header = None
    engine.routes["/v1.41/containers/abc/json"] = lambda _: (200, container("abc" * 8))
    source = DockerSource(engine.url, env={})
    for _ in range(2):
        assert source.inspect("abc") is not None
    assert engine.requests == ["/_ping", "/version"] + ["/v1.41/containers/abc/json"] * 2
    source.close()


@pytest.mark.parametrize(("api", "min_api", "used"), [
    ("1.40", "1.12", "/v1.40"), ("1.47", "1.24", "/v1.41"), ("1.51", "1.44", "/v1.44"),
])
def test_version_within_what_the_server_accepts(
    tmp_path: Path, api: str, min_api: str, used: str
) -> None:
    engine = FakeEngine(tmp_path / "d.sock", api=api, min_api=min_api)
    try:
        source = DockerSource(engine.url, env={})
        assert source.inspect("gone") is None
        assert engine.requests[-1] == f"{used}/containers/gone/json"
    finally:
        engine.close()


def test_missing_is_none_errors_are_one_line(engine: FakeEngine) -> None:
    engine.routes["/v1.41/containers/boom/json"] = lambda _: (
        500, {"message": "driver failed\nprogramming external connectivity"})
    source = DockerSource(engine.url, env={})
    assert source.inspect("nope") is None
    with pytest.raises(DockerUnavailable) as raised:
        source.inspect("boom")
    assert str(raised.value) == (
        "inspect boom: HTTP 500: driver failed programming external connectivity")
    source.ping()
    assert source.version()["ApiVersion"] == "1.41"


def test_daemon_down_is_docker_unavailable(tmp_path: Path) -> None:
    source = DockerSource(f"unix://{tmp_path}/none.sock", env={})
    for call in (lambda: source.inspect("x"), source.running, source.ping,
                 lambda: source.open_events(None)):
        with pytest.raises(DockerUnavailable, match="No such file"):
            call()


def test_running_lists_then_inspects(engine: FakeEngine) -> None:
    a, b = "a" * 64, "b" * 64
    engine.routes["/v1.41/containers/json"] = lambda _: (200, [{"Id": a}, {"Id": b}])
    engine.routes[f"/v1.41/containers/{a}/json"] = lambda _: (200, container(a))
    source = DockerSource(engine.url, env={})
    assert [info.id for info in source.running()] == [a]  # b is gone meanwhile
    listed = urlsplit(engine.requests[1])
    assert json.loads(parse_qs(listed.query)["filters"][0]) == {"status": ["running"]}


def test_host_network_ports_from_the_image(engine: FakeEngine) -> None:
    """Podman leaves a host-network container's ExposedPorts empty: they come from its image."""
    cid = "c" * 64
    doc = container(cid, network="host", ports={}, exposed=[])
    doc["Image"] = "sha256:" + "f" * 64
    engine.routes[f"/v1.41/containers/{cid}/json"] = lambda _: (200, doc)
    engine.routes["/v1.41/images/sha256%3A" + "f" * 64 + "/json"] = lambda _: (
        200, {"Config": {"ExposedPorts": {"8080/tcp": {}}}})
    info = DockerSource(engine.url, env={}).inspect(cid)
    assert info is not None and info.exposed == ((8080, "tcp"),)


# --- events ---------------------------------------------------------------------------------
def event(action: str, n: int) -> bytes:
    return json.dumps({"Type": "container", "Action": action, "timeNano": n,
                       "Actor": {"ID": "abc", "Attributes": {"name": "web"}}}).encode() + b"\n"


def test_events_read_by_line_not_by_chunk(engine: FakeEngine) -> None:
    one, two, three = event("create", 1), event("start", 2), event("kill", 3)
    engine.routes["/v1.41/events"] = lambda _: [one + two[:10], two[10:], three]
    source = DockerSource(engine.url, env={})
    events = source.open_events("12.000000005", {"container": "abc"})
    assert [e["Action"] for e in events] == ["create", "start", "kill"]  # then the drop: the end
    query = parse_qs(urlsplit(engine.requests[-1]).query)
    assert query["since"] == ["12.000000005"]
    assert json.loads(query["filters"][0]) == {"type": ["container"], "container": ["abc"]}


def test_close_events_from_another_thread(engine: FakeEngine) -> None:
    engine.routes["/v1.41/events"] = lambda _: [event("start", 1), None]
    source = DockerSource(engine.url, env={})
    events = source.open_events(None)
    seen: list[str] = []
    ended = threading.Event()

    def read() -> None:
        seen.extend(e["Action"] for e in events)
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close_events()
    assert ended.wait(5), "the events iteration did not end"
    assert seen == ["start"]
    engine.go_on.put(None)


def test_close_events_while_it_opens_ends_that_stream(engine: FakeEngine) -> None:
    """close_events before open_events returned (the watcher stopping while it subscribes)."""
    gate = threading.Event()
    opened = threading.Event()

    def slow(_: str) -> Answer:
        opened.set()
        gate.wait(5)
        return [None]

    engine.routes["/v1.41/events"] = slow
    source = DockerSource(engine.url, env={})
    source.ping()
    source.inspect("warm")  # negotiated: open_events goes straight to the stream
    result: list[list[dict[str, Any]]] = []
    opener = threading.Thread(target=lambda: result.append(list(source.open_events(None))))
    opener.start()
    assert opened.wait(5)
    source.close_events()
    gate.set()
    opener.join(5)
    assert not opener.is_alive() and result == [[]]
    engine.go_on.put(None)


def test_an_events_error_answer_is_docker_unavailable(engine: FakeEngine) -> None:
    engine.routes["/v1.41/events"] = lambda _: (400, {"message": "invalid filter 'x'"})
    with pytest.raises(DockerUnavailable, match="events: HTTP 400: invalid filter 'x'"):
        DockerSource(engine.url, env={}).open_events(None, {"x": "y"})


def test_the_events_stream_is_a_socket_of_its_own(engine: FakeEngine) -> None:
    engine.routes["/v1.41/events"] = lambda _: [event("start", 1), None]
    source = DockerSource(engine.url, env={})
    events = source.open_events(None)
    assert next(events)["Action"] == "start"
    assert source.inspect("other") is None  # while the stream is open
    source.close()
    assert list(events) == []
    engine.go_on.put(None)


def test_a_restarted_daemon_is_redialled(tmp_path: Path) -> None:
    """The daemon restarted between two calls: the second goes through on a new connection
    (the kept-alive one is dead); while it is down, calls fail."""
    path = tmp_path / "d.sock"
    engine = FakeEngine(path)
    source = DockerSource(engine.url, env={})
    assert source.inspect("x") is None
    engine.close()
    path.unlink()
    engine = FakeEngine(path)
    assert source.inspect("x") is None
    assert len(engine.requests) == 1  # no new negotiation
    engine.close()
    with pytest.raises(DockerUnavailable, match="inspect x: unix://"):
        source.inspect("x")
