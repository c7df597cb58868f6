"""A read-only filter in front of the Docker socket: a unix-socket HTTP proxy that passes GET
requests (the streaming ``/events`` included) and answers ``403 Forbidden`` to everything else.

    proxy = ReadOnlyDockerProxy()                     # in front of /var/run/docker.sock
    registrar("watch", "--docker", proxy.url, ...)
    ...
    assert not proxy.refused and proxy.passed         # [(method, path), ...]
    proxy.close()

It parses each request's head (request line and headers); a GET is forwarded byte for byte and
the response is pumped back unchanged, so chunked and long-lived responses pass. Anything that
is not a plain GET is refused and the connection closed: another method, and also a GET that
asks to upgrade the connection (``/containers/{id}/attach/ws`` would let a client write to a
container's stdin), or one with a body. This is the filter an operator would put in front of
the socket (like docker-socket-proxy's default); here it proves that registrar needs no more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading

DOCKER_SOCKET = "/var/run/docker.sock"
_MAX_HEAD = 64 * 1024
_BUF = 65536

_FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


def _forbidden(method: str) -> bytes:
    body = json.dumps({"message": f"read-only Docker socket: {method[:16]} refused"}).encode()
    return _FORBIDDEN % (len(body), body)


class ReadOnlyDockerProxy:
    def __init__(self, target: str = DOCKER_SOCKET, path: str | None = None) -> None:
        self.target = target
        self._dir = None
        if path is None:
            self._dir = tempfile.mkdtemp(prefix="rgt-ro-docker-")
            path = os.path.join(self._dir, "docker.sock")
        self.path = path
        self.passed: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._thread = threading.Thread(target=self._accept, daemon=True, name="ro-docker")
        self._thread.start()

    @property
    def url(self) -> str:
        """For ``--docker`` / ``DOCKER_HOST``."""
        return f"unix://{self.path}"

    # -- plumbing ----------------------------------------------------------------------------
    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.update(socks)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                client.close()
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        buffer = b""
        try:
            while True:
                head, buffer = self._read_head(client, buffer)
                if head is None:
                    return
                method, target, headers = _parse_head(head)
                body_given = (
                    int(headers.get("content-length", "0") or 0) > 0
                    or "transfer-encoding" in headers
                )
                upgrade = "upgrade" in headers or "upgrade" in headers.get("connection", "")
                if method != "GET" or upgrade or body_given:
                    with self._lock:
                        self.refused.append((method, target))
                    client.sendall(_forbidden(method))
                    self._linger(client)
                    return
                with self._lock:
                    self.passed.append((method, target))
                if upstream is None:
                    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    upstream.connect(self.target)
                    self._track(upstream)
                    threading.Thread(
                        target=self._pump, args=(upstream, client), daemon=True
                    ).start()
                upstream.sendall(head)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        s.close()
                    with self._lock:
                        self._socks.discard(s)

    @staticmethod
    def _linger(client: socket.socket) -> None:
        """After a refusal: reads and drops what the client still sends (the body of a POST)
        until it closes, 2 s at most. Closing at once would make its write of the body fail
        (a broken pipe, or a reset before it reads the 403) instead of showing the refusal."""
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)
            client.settimeout(2.0)
            while client.recv(_BUF):
                pass

    @staticmethod
    def _read_head(client: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        """One request head (up to and including the blank line), and what follows it."""
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > _MAX_HEAD:
                return None, b""
            chunk = client.recv(_BUF)
            if not chunk:
                return None, b""
            buffer += chunk
        end = buffer.index(b"\r\n\r\n") + 4
        return buffer[:end], buffer[end:]

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Upstream's responses back to the client, unchanged, until either side closes."""
        try:
            while True:
                data = src.recv(_BUF)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ReadOnlyDockerProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rsplit(" ", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    return method.upper(), target, headers
