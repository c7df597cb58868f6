"""Serves /metrics (Prometheus text format) and /healthz on --metrics-addr.

Two GET paths answered once each per connection (`Connection: close`), over `socketserver`:
`http.server` would add 9 MiB of RSS (it imports `email`, `html`, `mimetypes` and
`http.client`) to a host agent whose whole budget is 25 (README, "Why no gRPC and no Docker
SDK"). Scrapers and probes send one request per connection or reconnect when it closes.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable

from registrar.exposition import CONTENT_TYPE, Registry
from registrar.shutdown import start_thread

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0  # seconds a client has to send its request
MAX_HEAD = 16384  # bytes of request line and headers read at most
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}


def request_target(head: bytes) -> tuple[str, str] | None:
    """(method, path without its query) of an HTTP/1.x request head; None if it is not one."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    return parts[0], parts[1].split("?", 1)[0]


def response(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, '')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    def __init__(
        self, addr: tuple[str, int], registry: Registry, healthy: Callable[[], str | None]
    ) -> None:
        """`healthy` returns None when healthy, else why not."""

        def answer(method: str, path: str) -> bytes:
            head_only = method == "HEAD"
            if method not in ("GET", "HEAD"):
                return response(405, b"only GET\n", "text/plain")
            if path == "/metrics":
                return response(200, registry.render(), CONTENT_TYPE, head_only)
            if path == "/healthz":
                problem = healthy()
                body = ("ok\n" if problem is None else f"unhealthy: {problem}\n").encode()
                return response(200 if problem is None else 503, body, "text/plain", head_only)
            return response(404, b"not found: try /metrics or /healthz\n", "text/plain",
                            head_only)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(READ_TIMEOUT)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and b"\n\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            return
                        head += chunk
                        if len(head) > MAX_HEAD:
                            break
                    target = request_target(head)
                    if target is None:
                        sock.sendall(response(400, b"bad request\n", "text/plain"))
                    else:
                        sock.sendall(answer(*target))
                except OSError:
                    return  # the client went away or never sent its request

        server_class = _Server
        if ":" in addr[0]:
            class V6Server(_Server):
                address_family = socket.AF_INET6

            server_class = V6Server
        self._server = server_class(addr, Handler)
        # shutdown() waits for the serving loop's next look: 0.1 s (the default 0.5 s would
        # come out of the shutdown's one deadline)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        start_thread(self._thread)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    addr: tuple[str, int] | None, registry: Registry, healthy: Callable[[], str | None]
) -> MetricsServer | None:
    """Starts the server on `addr` (None: --metrics-addr port 0, no server)."""
    from registrar.errors import FatalError

    if addr is None:
        return None
    try:
        server = MetricsServer(addr, registry, healthy)
    except OSError as exc:
        raise FatalError(
            f"--metrics-addr: cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}"
        ) from None
    server.start()
    log.info("metrics on http://%s:%d/metrics", addr[0], server.port)
    return server
