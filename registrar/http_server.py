"""Serves /metrics (Prometheus text format) and /healthz on --metrics-addr.

Imported only by a process that serves metrics: `http.server` and prometheus_client weigh
about 12 MiB, which a sidecar without --metrics-addr does not pay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from registrar.shutdown import start_thread

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


class MetricsServer:
    def __init__(
        self, addr: tuple[str, int], registry: CollectorRegistry, healthy: Callable[[], str | None]
    ) -> None:
        """`healthy` returns None when healthy, else why not."""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    problem = healthy()
                    body = ("ok\n" if problem is None else f"unhealthy: {problem}\n").encode()
                    self._send(200 if problem is None else 503, body, "text/plain")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the log

        host = addr[0]
        server_class = ThreadingHTTPServer
        if ":" in host:
            import socket

            class V6Server(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_class = V6Server
        self._server = server_class(addr, Handler)
        self._server.daemon_threads = True
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
    addr: tuple[str, int] | None, registry: CollectorRegistry, healthy: Callable[[], str | None]
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
