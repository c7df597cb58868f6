"""The Docker adapter: Docker's Engine API over its socket, on `registrar.adapters.http1`.

Why no Docker SDK: the sidecar makes five kinds of GET request (version, list, inspect, image
inspect, events), and the SDK brought `requests`, `urllib3` and their threads with it: tens of
megabytes and milliseconds at every start of a per-container process. Podman's
Docker-compatible service answers the same paths, so `--docker` may point at either.

- Addresses as the docker SDK took them from `--docker` / `$DOCKER_HOST`: `unix:///PATH` (also
  `unix://PATH`, `http+unix://PATH`, empty: the default socket), `tcp://HOST:PORT`,
  `http://HOST:PORT`, `HOST:PORT`, and `https://HOST:PORT`. TLS as Docker's CLI does it: on for
  `tcp://` when `$DOCKER_TLS_VERIFY` is set (non-empty), with `ca.pem`, `cert.pem` and `key.pem`
  from `$DOCKER_CERT_PATH` (default `~/.docker`); `ssl` is imported only then.
- The API version is negotiated once per source: the server's, capped at `API_VERSION` (the
  newest whose answers we parse as we know them), never below the server's `MinAPIVersion`;
  every later path is `/v{X}/...`. `GET /_ping` says the server's version in a header; only a
  server newer than `API_VERSION` (whose minimum then matters) is asked `GET /version` too.
- One kept-alive connection for the requests (a timeout on each), one connection of its own for
  the events stream (chunked JSON objects, one a line; no read timeout: it ends when the daemon
  drops the connection, or when `close_events` closes it from another thread).
- Every transport or HTTP error becomes `DockerUnavailable` with a one-line message; a missing
  container is `None`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping

from registrar.adapters import http1
from registrar.core.containers import ContainerInfo, exposed_ports, parse_inspect
from registrar.core.source import DockerUnavailable
from registrar.typing_shim import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import ssl

__all__ = ["API_VERSION", "DockerEndpoint", "DockerSource", "DockerUnavailable", "endpoint"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
DEFAULT_SOCKET = "/var/run/docker.sock"
DEFAULT_TCP_HOST = "127.0.0.1"  # `tcp://:2375`, as the docker SDK read it
API_VERSION = (1, 41)  # Docker 20.10 and Podman 4.3's compatible service, checked here
# A TCP daemon that stops answering mid-stream (host gone, link cut) ends the events stream
# after ~30 s; a unix socket ends with its daemon.
EVENTS_KEEPALIVE = http1.KeepAlive(idle=15, interval=5, probes=3)
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class DockerEndpoint(NamedTuple):
    """Where Docker listens, and the TLS files when it is reached over TLS."""

    address: http1.Address
    ca: str | None = None  # None with TLS: the system's CAs (an https:// URL)
    cert: str | None = None
    key: str | None = None


def endpoint(url: str, env: Mapping[str, str]) -> DockerEndpoint:
    """The endpoint of a `--docker` / `$DOCKER_HOST` URL (ValueError when it is not one)."""
    url = url.strip()
    if not url or url in ("unix://", "http+unix://"):
        return DockerEndpoint(http1.Address(path=DEFAULT_SOCKET))
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "tcp", url  # `HOST:PORT`: tcp, as the docker SDK took it
    scheme = scheme.lower()
    if scheme in ("unix", "http+unix"):
        # `unix://PATH` without the third slash was the SDK's legacy spelling of `unix:///PATH`
        return DockerEndpoint(http1.Address(path=rest if rest.startswith("/") else "/" + rest))
    if scheme not in ("tcp", "http", "https"):
        raise ValueError(f"unsupported Docker address {url!r}: use unix://PATH or tcp://HOST:PORT")
    hostport = rest.rstrip("/")
    if "/" in hostport or "?" in hostport or "#" in hostport or "@" in hostport:
        raise ValueError(f"invalid Docker address {url!r}: expected {scheme}://HOST:PORT")
    host, _, port_text = hostport.rpartition(":")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid Docker address {url!r}: a port is required")
    host = host.strip("[]") or DEFAULT_TCP_HOST
    verify = bool(env.get("DOCKER_TLS_VERIFY"))
    tls = scheme == "https" or (scheme == "tcp" and verify)
    address = http1.Address(host=host, port=int(port_text), tls=tls)
    if not verify:
        return DockerEndpoint(address)
    certs = env.get("DOCKER_CERT_PATH") or os.path.join(os.path.expanduser("~"), ".docker")
    return DockerEndpoint(address, ca=os.path.join(certs, "ca.pem"),
                          cert=os.path.join(certs, "cert.pem"), key=os.path.join(certs, "key.pem"))


def ssl_context(where: DockerEndpoint) -> ssl.SSLContext:
    """The client context of a TLS endpoint: the server verified (its CA, its name), our
    certificate presented when there is one. Imports `ssl` (4 MiB): only TLS endpoints pay."""
    import ssl

    context = ssl.create_default_context(cafile=where.ca)
    if where.cert and where.key:
        context.load_cert_chain(where.cert, where.key)
    return context


def quote(text: str) -> str:
    """Percent-encodes everything but RFC 3986's unreserved characters (a path segment or a
    query value); `urllib.parse` is not worth its import for this."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode())


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def _http_error(what: str, response: http1.Response) -> DockerUnavailable:
    message = response.body.decode("utf-8", "replace")
    try:
        data = http1.json_body(response)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        message = str(data["message"])
    message = " ".join(message.split())[:300]
    return DockerUnavailable(f"{what}: HTTP {response.status}: {message}")


def parse_version(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    return int(major), int(minor)


class DockerSource:
    """`ContainerSource` on Docker's (or Podman's) Engine API."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT,
                 env: Mapping[str, str] | None = None) -> None:
        self._url = url
        self._timeout = timeout
        self._env = os.environ if env is None else env
        self._lock = threading.Lock()  # guards what follows
        self._endpoint: DockerEndpoint | None = None
        self._ssl: ssl.SSLContext | None = None
        self._connection: http1.Connection | None = None
        self._prefix: str | None = None  # "/v1.41", once negotiated
        self._stream: http1.Stream | None = None
        self._opening = 0  # events streams being opened now
        self._cancel_opening = False  # close_events came while one was being opened

    # --- plumbing -------------------------------------------------------------------------
    def _connect_parts(self) -> tuple[DockerEndpoint, ssl.SSLContext | None]:
        with self._lock:
            if self._endpoint is None:
                try:
                    where = endpoint(self._url, self._env)
                    context = ssl_context(where) if where.address.tls else None
                except (ValueError, OSError) as exc:  # a bad URL, unreadable TLS files
                    raise DockerUnavailable(f"{self._url}: {_one_line(exc)}") from None
                self._endpoint, self._ssl = where, context
            return self._endpoint, self._ssl

    def _conn(self) -> http1.Connection:
        where, context = self._connect_parts()
        with self._lock:
            if self._connection is None:
                self._connection = http1.Connection(where.address, self._timeout, context)
            return self._connection

    def _get(self, what: str, path: str) -> http1.Response:
        """GET `path` as it is (unversioned); transport errors -> DockerUnavailable."""
        connection = self._conn()
        try:
            return connection.request("GET", path, headers={"User-Agent": "registrar"})
        except OSError as exc:
            raise DockerUnavailable(
                f"{what}: {connection.address}: {_one_line(exc)}"
            ) from None

    def _version_doc(self) -> dict[str, Any]:
        response = self._get("version", "/version")  # the same path at every API version
        if response.status != 200:
            raise _http_error("version", response)
        try:
            data = http1.json_body(response)
        except ValueError as exc:
            raise DockerUnavailable(f"version: not JSON ({_one_line(exc)})") from None
        if not isinstance(data, dict):
            raise DockerUnavailable("version: not an Engine API answer")
        return data

    def _pinged_version(self) -> tuple[int, int] | None:
        """The server's API version from `GET /_ping`'s `Api-Version` header (None: not
        there, or not a version). `/_ping` answers in well under a millisecond; `/version`
        asks containerd and runc for theirs (measured here: 7-8 ms, on a sidecar's way to its
        first put), so it is read only when the header cannot settle the version."""
        response = self._get("ping", "/_ping")
        if response.status != 200:
            raise _http_error("ping", response)
        try:
            return parse_version(response.headers.get("api-version", ""))
        except ValueError:
            return None

    def _api_prefix(self) -> str:
        """`/v{X}`, negotiated at the first call (and again only until one succeeds)."""
        with self._lock:
            if self._prefix is not None:
                return self._prefix
        server = self._pinged_version()
        if server is not None and server <= API_VERSION:
            major, minor = server  # the server's own: never below its minimum
        else:
            data = self._version_doc()
            try:
                server = parse_version(str(data.get("ApiVersion") or ""))
                lowest = parse_version(str(data.get("MinAPIVersion") or "1.0"))
            except ValueError as exc:
                raise DockerUnavailable(f"version: not an Engine API answer ({exc})") from None
            major, minor = max(lowest, min(server, API_VERSION))
        prefix = f"/v{major}.{minor}"
        with self._lock:
            self._prefix = prefix
        log.debug("docker API %s (server %d.%d)", prefix, *server)
        return prefix

    def _get_json(self, what: str, path: str, missing_ok: bool = False) -> Any:
        """GET `/v{X}{path}` as JSON; None for a 404 when `missing_ok`."""
        response = self._get(what, self._api_prefix() + path)
        if response.status == 404 and missing_ok:
            return None
        if response.status != 200:
            raise _http_error(what, response)
        try:
            return http1.json_body(response)
        except ValueError as exc:
            raise DockerUnavailable(f"{what}: not JSON ({_one_line(exc)})") from None

    # --- calls ----------------------------------------------------------------------------
    def ping(self) -> None:
        """Raises DockerUnavailable unless the daemon answers `GET /_ping`."""
        response = self._get("ping", "/_ping")
        if response.status != 200:
            raise _http_error("ping", response)

    def version(self) -> dict[str, Any]:
        """The daemon's `GET /version` document (Version, ApiVersion, Os, ...)."""
        return self._version_doc()

    def inspect(self, container: str) -> ContainerInfo | None:
        what = f"inspect {container[:64]}"
        data = self._get_json(what, f"/containers/{quote(container)}/json", missing_ok=True)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise DockerUnavailable(f"{what}: not an inspect document")
        info = parse_inspect(data)
        if info.host_network and not info.exposed:
            info = info._replace(exposed=self._image_exposed(str(data.get("Image") or "")))
        return info

    def _image_exposed(self, image: str) -> tuple[tuple[int, str], ...]:
        """Podman leaves a host-network container's ExposedPorts empty: its image has them."""
        if not image:
            return ()
        data = self._get_json(f"inspect image {image[:80]}", f"/images/{quote(image)}/json",
                              missing_ok=True)
        if not isinstance(data, dict):
            return ()
        return exposed_ports((data.get("Config") or {}).get("ExposedPorts"))

    def running(self) -> list[ContainerInfo]:
        """Every running container, inspected (those gone meanwhile are left out)."""
        filters = quote('{"status":["running"]}')
        summaries = self._get_json("list containers", f"/containers/json?filters={filters}")
        if not isinstance(summaries, list):
            raise DockerUnavailable("list containers: not a list")
        found = []
        for summary in summaries:
            cid = str(summary.get("Id") or "") if isinstance(summary, dict) else ""
            info = self.inspect(cid) if cid else None
            if info is not None:
                found.append(info)
        return found

    def open_events(
        self, since: str | None, filters: Mapping[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subscribes now to container (and network) events from `since` on; iterate to read
        them.

        Returns once Docker answered the request's head (subscribed). The iterator ends when
        the connection drops or `close_events` is called."""
        import json

        # Network events (a container connected to or disconnected from a network) come too,
        # unless the stream follows one container: Docker's `container` filter would drop them.
        types = ["container"] if filters and "container" in filters else ["container", "network"]
        wanted = {"type": types, **{k: [v] for k, v in (filters or {}).items()}}
        query = "filters=" + quote(json.dumps(wanted, separators=(",", ":")))
        if since is not None:
            query = f"since={quote(since)}&{query}"
        where, context = self._connect_parts()
        path = f"{self._api_prefix()}/events?{query}"
        with self._lock:
            self._opening += 1
        try:
            stream = http1.open_stream(
                where.address, "GET", path, timeout=self._timeout,
                headers={"User-Agent": "registrar"}, ssl_context=context,
                keepalive=EVENTS_KEEPALIVE, read_timeout=None,
            )
        except OSError as exc:
            raise DockerUnavailable(f"events: {where.address}: {_one_line(exc)}") from None
        finally:
            with self._lock:
                self._opening -= 1
                cancelled, self._cancel_opening = self._cancel_opening, False
        if stream.status != 200:
            try:
                body = stream.read_all()
            except OSError:
                body = b""
            stream.close()
            raise _http_error("events", http1.Response(stream.status, stream.headers, body))
        with self._lock:
            self._stream = stream
        if cancelled:
            stream.close()  # close_events came while we connected: it meant this one too
        return self._iterate(stream)

    def _iterate(self, stream: http1.Stream) -> Iterator[dict[str, Any]]:
        import json

        try:
            for line in stream.lines():
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise DockerUnavailable(f"events stream: not JSON ({exc})") from None
                if isinstance(event, dict):
                    yield event
        except OSError as exc:
            # The daemon dropped the connection (restart, socket cut): the end of this stream.
            log.debug("docker events stream ended: %s", _one_line(exc))
        finally:
            with self._lock:
                if self._stream is stream:
                    self._stream = None
            stream.close()

    def close_events(self) -> None:
        """Ends a running events iteration (or the one being opened) from another thread."""
        with self._lock:
            stream = self._stream
            if stream is None and self._opening:
                self._cancel_opening = True
        if stream is not None:
            stream.close()

    def close(self) -> None:
        self.close_events()
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
