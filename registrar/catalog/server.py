"""The catalog's HTTP side: `/v1/catalog` (with blocking queries), `/v1/sd/prometheus`, the page
at `/`, `/metrics` and `/healthz`, on a threaded stdlib server.

Every path but `/healthz` asks for basic auth when a user is set (compared in constant time, so
the time of a 401 tells nothing of the password). HTTPS wraps the listening socket with the
given certificate; `ssl` is imported only then (it costs a few MiB). A blocking query holds one
thread of the server while it waits, at most `MAX_WAIT` seconds.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from registrar.catalog.metrics import CatalogMetrics
from registrar.catalog.state import CatalogState
from registrar.exposition import CONTENT_TYPE

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0
DEFAULT_WAIT = 60.0
MAX_WAIT = 600.0
PATHS = ("/", "/v1/catalog", "/v1/sd/prometheus", "/metrics", "/healthz")


SHUTDOWN_POLL = 0.1  # seconds: how late a shutdown of the server can be


def check_tls_files(cert: str, key: str) -> None:
    """`--catalog-cert` and `--catalog-key` at start (SettingsError naming the flag): PEM files
    that make a server's certificate chain."""
    import ssl

    from registrar.adapters.files import pem
    from registrar.flags import SettingsError

    pem("--catalog-cert", cert, "cert")
    pem("--catalog-key", key, "key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SettingsError(f"--catalog-cert/--catalog-key: {exc}") from None


@dataclass(frozen=True)
class Auth:
    user: str
    password: str = ""

    def allows(self, header: str | None) -> bool:
        expected = b"Basic " + base64.b64encode(f"{self.user}:{self.password}".encode())
        return hmac.compare_digest((header or "").encode("utf-8", "replace"), expected)


def page() -> bytes:
    return (resources.files("registrar") / "templates" / "catalog.html").read_bytes()


class BadRequest(Exception):
    pass


def _seconds(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name}: not a number") from None
    if not 0 <= value <= MAX_WAIT:
        raise BadRequest(f"{name}: 0..{MAX_WAIT:g} seconds")
    return value


@dataclass(frozen=True)
class _Site:
    """What the catalog's HTTP side answers from."""

    state: CatalogState
    metrics: CatalogMetrics
    healthy: Callable[[], str | None]  # None when healthy, else why not
    auth: Auth | None
    tls: bool
    html: bytes


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests; `site` (set on the subclass each server makes) holds what
    it answers from."""

    site: _Site
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT  # a silent client gives its thread back
    label = "other"  # the path as counted in the metrics
    timed = True
    started = 0.0

    def setup(self) -> None:
        super().setup()
        if self.site.tls:
            # Here, in the connection's own thread, not in the accepting one: a client
            # that connects and says nothing must not hold up everyone else.
            self.request.do_handshake()

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        self.label = split.path if split.path in PATHS else "other"
        self.timed = self.label != "/v1/catalog" or "index" not in split.query
        self.started = time.perf_counter()
        self._route(split.path, parse_qs(split.query))

    def _route(self, path: str, query: dict[str, list[str]]) -> int:
        if path == "/healthz":
            problem = self.site.healthy()
            text = "ok\n" if problem is None else f"unhealthy: {problem}\n"
            return self._send(200 if problem is None else 503, text.encode(),
                              "text/plain; charset=utf-8")
        auth = self.site.auth
        if auth is not None and not auth.allows(self.headers.get("Authorization")):
            self.close_connection = True
            return self._send(401, b"unauthorized\n", "text/plain; charset=utf-8",
                              {"WWW-Authenticate": 'Basic realm="registrar catalog"'})
        try:
            return self._answer(path, query)
        except BadRequest as exc:
            return self._send(400, f"bad request: {exc}\n".encode(),
                              "text/plain; charset=utf-8")

    def _answer(self, path: str, query: dict[str, list[str]]) -> int:
        one = {name: values[-1] for name, values in query.items()}
        if path == "/v1/catalog":
            if "index" in one:
                index = one["index"]
                if not (index.isascii() and index.isdigit()):
                    raise BadRequest("index: a revision number")
                wait = _seconds(one.get("wait", str(DEFAULT_WAIT)), "wait")
                self.site.state.wait_past(int(index), wait)
            view = self.site.state.view()
            return self._send(200, view.json, "application/json",
                              {"X-Registrar-Index": str(view.catalog.revision)})
        if path == "/v1/sd/prometheus":
            metrics_only = one.get("metrics", "").lower() in ("true", "1", "yes")
            body = self.site.state.targets(one.get("service"), metrics_only)
            return self._send(200, body, "application/json")
        if path == "/":
            return self._send(200, self.site.html, "text/html; charset=utf-8",
                              {"Content-Security-Policy": CSP})
        if path == "/metrics":
            self.site.metrics.observe(self.site.state)
            return self._send(200, self.site.metrics.registry.render(),
                              CONTENT_TYPE)
        return self._send(404, b"not found: try / or /v1/catalog\n",
                          "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> int:
        # counted before the answer leaves: a client reading /metrics right after its
        # answer finds it counted
        self.site.metrics.requests.labels(path=self.label, code=str(status)).inc()
        if self.timed:
            self.site.metrics.duration.labels(path=self.label).observe(
                time.perf_counter() - self.started)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, text in (headers or {}).items():
            self.send_header(name, text)
        self.end_headers()
        self.wfile.write(body)
        return status

    def log_message(self, format: str, *args: object) -> None:
        pass  # every poll and scrape would drown the log


class CatalogServer:
    def __init__(self, addr: tuple[str, int], state: CatalogState, metrics: CatalogMetrics,
                 healthy: Callable[[], str | None], auth: Auth | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        """`healthy` returns None when healthy, else why not; `tls`: (cert, key) files."""
        site = _Site(state, metrics, healthy, auth, tls is not None, page())
        server_class = _Server
        if ":" in addr[0]:
            import socket

            class V6Server(_Server):
                address_family = socket.AF_INET6

            server_class = V6Server
        self._server = server_class(addr, type("Handler", (_Handler,), {"site": site}))
        if tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        # shutdown() waits for the serving loop's next look: 0.1 s, not the default 0.5
        self._thread = threading.Thread(target=self._server.serve_forever, args=(SHUTDOWN_POLL,),
                                        name="catalog-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up, timed out or failed the TLS handshake: its own problem, one
        debug line (socketserver would print a traceback on stderr)."""
        log.debug("connection from %s failed", client_address, exc_info=True)


# The page loads nothing from elsewhere and runs only its own script: what etcd holds can never
# become markup or script there (the script also writes every value as text, never as HTML).
CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")
