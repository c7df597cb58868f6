"""A small HTTP/1.1 client over a socket, for etcd's JSON gateway and Docker's Engine API.

Why not `http.client`: its import pulls in the `email` package (tens of milliseconds and
megabytes the sidecar pays at every start), and a stream read through its `makefile()` reader
cannot be ended from another thread cleanly (closing the socket alone left etcd's watcher
alive until the process exited). Both peers here speak a narrow, well-behaved HTTP/1.1: a
request with a Content-Length body, an answer with a Content-Length, chunked, or
close-delimited body. That is all this module does, with:
- a timeout on the connect and on every read (no call can block forever);
- one kept-alive connection per `Connection`, re-opened when the peer closed it while idle
  (a request that got no byte back on a reused connection is sent once more: the peer never
  read it);
- streams (`open_stream`) read line by line from their own buffer (never "one message a
  chunk"), ended from any thread by `close()`, and with TCP keepalive so that a dead peer is
  noticed;
- `ssl` imported only for an https:// address.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping

from registrar.core.names import host_port
from registrar.typing_shim import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import ssl

MAX_LINE = 64 * 1024  # a status or header line longer than this is not a peer of ours
MAX_HEADERS = 100
READ_SIZE = 64 * 1024


class ProtocolError(OSError):
    """The peer's answer is not HTTP/1.1 as we know it (or it closed mid-answer)."""


class Address(NamedTuple):
    """Where to connect: a unix socket (`path`) or host and port, TLS when `tls`."""

    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket
    tls: bool = False

    @property
    def host_header(self) -> str:
        if self.path:
            return "localhost"
        return host_port(self.host, self.port)

    def __str__(self) -> str:
        if self.path:
            return f"unix://{self.path}"
        return f"{'https' if self.tls else 'http'}://{self.host_header}"


class Response(NamedTuple):
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


class KeepAlive(NamedTuple):
    """TCP keepalive for long-lived streams: a peer silent for `idle` seconds is probed every
    `interval` and given up after `probes` unanswered probes."""

    idle: int
    interval: int
    probes: int


def connect(address: Address, timeout: float, ssl_context: ssl.SSLContext | None = None,
            keepalive: KeepAlive | None = None) -> socket.socket:
    """A connected socket (TLS-wrapped for https), every operation bounded by `timeout`."""
    if address.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = _dial(address.host, address.port, timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.probes)
        if address.tls:
            if ssl_context is None:
                raise ValueError(f"{address}: TLS without an SSL context")
            return ssl_context.wrap_socket(sock, server_hostname=address.host)
    except BaseException:
        sock.close()
        raise
    return sock


def _dial(host: str, port: int, timeout: float) -> socket.socket:
    """What `socket.create_connection` does (each address found in turn, the last error
    raised), with the host given to getaddrinfo() as bytes. Given a str, getaddrinfo() encodes
    it with the idna codec, whose first use imports `encodings.idna` and `stringprep`
    (measured: 7 ms at a sidecar's first connection to etcd, on its way to its first put); an
    ASCII name is what that codec gives back unchanged, so only another name goes through it."""
    name = host.encode("ascii") if host.isascii() else host.encode("idna")
    error: OSError | None = None
    for family, kind, proto, _canonical, where in socket.getaddrinfo(
        name, port, 0, socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error if error is not None else OSError(f"no address found for {host}")


def encode_request(method: str, path: str, address: Address, body: bytes | None,
                   headers: Mapping[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address.host_header}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


class Reader:
    """Buffered reads from a socket: lines, exact lengths, chunked bodies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self.received = 0  # bytes read from the socket so far

    def _fill(self) -> bool:
        data = self.sock.recv(READ_SIZE)
        if not data:
            return False
        self.received += len(data)
        self._buffer += data
        return True

    def line(self) -> bytes | None:
        """The next line without its line ending; None when the peer closed first."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.rstrip(b"\r")
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("line too long")
            if not self._fill():
                return None

    def some(self, most: int) -> bytes:
        """What is buffered (at most `most` bytes), else what one read brings; b"" when the
        peer closed."""
        if not self._buffer and not self._fill():
            return b""
        data = bytes(self._buffer[:most])
        del self._buffer[:most]
        return data

    def exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise ProtocolError("connection closed in the middle of a body")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def rest(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        """Status and headers (1xx answers skipped)."""
        while True:
            status_line = self.line()
            if status_line is None:
                raise ProtocolError("connection closed before an answer")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                line = self.line()
                if line is None:
                    raise ProtocolError("connection closed in the headers")
                if not line:
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise ProtocolError("too many headers")
            status = int(parts[1])
            if status >= 200:
                return status, headers

    def chunk_size(self) -> int:
        """The size line of the next chunk (0: the last one). A timeout consumes nothing."""
        size_line = self.line()
        if size_line is None:
            raise ProtocolError("connection closed in a chunked body")
        try:
            return int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from None

    def chunks(self) -> Iterator[bytes]:
        """The chunks of a chunked body, until the last (empty) one."""
        while True:
            size = self.chunk_size()
            if size == 0:
                while self.line():  # trailers, up to the empty line
                    pass
                return
            data = self.exact(size)
            self.exact(2)  # CRLF after the chunk
            yield data

    def body(self, headers: Mapping[str, str], method: str, status: int) -> tuple[bytes, bool]:
        """The whole body, and whether the connection may be used again."""
        if method == "HEAD" or status in (204, 304):
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return b"".join(self.chunks()), True
        if "content-length" in headers:
            return self.exact(int(headers["content-length"])), True
        return self.rest(), False


class Connection:
    """One kept-alive connection to `address`, re-opened as needed; one request at a time."""

    def __init__(self, address: Address, timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> Response:
        """Sends one request and reads its whole answer (OSError on any transport failure)."""
        data = encode_request(method, path, self.address, body, headers)
        with self._lock:
            for attempt in (0, 1):
                reused = self._sock is not None
                sock = self._sock or connect(
                    self.address, self.timeout if timeout is None else timeout,
                    self._ssl_context)
                self._sock = None
                sock.settimeout(self.timeout if timeout is None else timeout)
                reader = Reader(sock)
                try:
                    sock.sendall(data)
                    status, response_headers = reader.head()
                    payload, reusable = reader.body(response_headers, method, status)
                except OSError as exc:
                    sock.close()
                    if (reused and attempt == 0 and reader.received == 0
                            and not isinstance(exc, TimeoutError)):
                        continue  # the peer had closed the idle connection: it never read this
                    raise
                if reusable and response_headers.get("connection", "").lower() != "close":
                    self._sock = sock
                else:
                    sock.close()
                return Response(status, response_headers, payload)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class Stream:
    """A long answer read line by line (a watch, Docker's events); `close()` from any thread
    ends it: the reader then sees the end of the stream.

    The body is decoded by a small state machine kept here (not a generator), so a read that
    times out leaves everything where it was: `read_line(timeout)` can be called again and
    again on the reading thread itself, which then needs no helper thread to wait for data."""

    def __init__(self, sock: socket.socket, reader: Reader, status: int,
                 headers: Mapping[str, str]) -> None:
        self._sock = sock
        self._reader = reader
        self.status = status
        self.headers = headers
        self._closed = False
        self._lock = threading.Lock()
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left = int(length) if length is not None and not self._chunked else -1
        self._chunk_left = 0  # bytes of the current chunk still to read
        self._after_chunk = False  # a chunk's data was read: its CRLF comes next
        self._ended = False
        self._pending = b""  # the start of a line whose end has not arrived yet

    def _piece(self) -> bytes | None:
        """The next piece of the body; None at its end. Every read either completes or raises
        (TimeoutError, OSError) without consuming anything."""
        reader = self._reader
        if self._chunked:
            while self._chunk_left == 0:
                if self._after_chunk:
                    reader.exact(2)
                    self._after_chunk = False
                size = reader.chunk_size()
                if size == 0:
                    return None  # the last chunk (trailers, if any, are not read)
                self._chunk_left = size
            data = reader.some(self._chunk_left)
            if not data:
                raise ProtocolError("connection closed in a chunk")
            self._chunk_left -= len(data)
            self._after_chunk = self._chunk_left == 0
            return data
        if self._left == 0:
            return None
        data = reader.some(self._left if self._left > 0 else READ_SIZE)
        if not data:
            if self._left > 0:
                raise ProtocolError("connection closed in the middle of a body")
            return None
        if self._left > 0:
            self._left -= len(data)
        return data

    def read_line(self, timeout: float | None = -1.0) -> bytes | None:
        """The next non-empty line of the body; None at its end (or once closed by us). With
        `timeout` (seconds; None: wait for ever; negative: as set before), `TimeoutError`
        when no whole line came in time: what did come is kept for the next call."""
        if timeout is None or timeout >= 0:
            # never 0: that would make the socket non-blocking (BlockingIOError, not a timeout)
            self._sock.settimeout(None if timeout is None else max(timeout, 0.001))
        try:
            while True:
                end = self._pending.find(b"\n")
                if end >= 0:
                    line, self._pending = self._pending[:end], self._pending[end + 1:]
                    if line.strip():
                        return line
                    continue
                if self._ended:
                    line, self._pending = self._pending, b""
                    return line if line.strip() else None
                piece = self._piece()
                if piece is None:
                    self._ended = True
                else:
                    self._pending += piece
        except TimeoutError:
            raise
        except OSError:
            if self._closed:
                return None  # closed by us: the end, not a failure
            raise

    def lines(self) -> Iterator[bytes]:
        """Every non-empty line of the body as it arrives, until its end; a second `lines()`
        goes on where the first stopped."""
        while (line := self.read_line()) is not None:
            yield line

    def read_all(self) -> bytes:
        data = [self._pending]
        self._pending = b""
        while (piece := self._piece()) is not None:
            data.append(piece)
        return b"".join(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def interrupt(self) -> None:
        """Makes a read waiting on this stream return now (from any thread), as at its end."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            already = self._closed and self._sock.fileno() < 0
            self._closed = True
        if already:
            return
        with contextlib.suppress(OSError):  # not connected any more: nothing to shut down
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def open_stream(address: Address, method: str, path: str, *, timeout: float,
                body: bytes | None = None, headers: Mapping[str, str] | None = None,
                ssl_context: ssl.SSLContext | None = None,
                keepalive: KeepAlive | None = None,
                read_timeout: float | None = None) -> Stream:
    """Connects, sends the request and reads the answer's head within `timeout`; the body is
    then read with `read_timeout` (None: block until data, the end, or `close()`)."""
    sock = connect(address, timeout, ssl_context, keepalive)
    reader = Reader(sock)
    try:
        sock.sendall(encode_request(method, path, address, body, headers))
        status, response_headers = reader.head()
    except BaseException:
        sock.close()
        raise
    sock.settimeout(read_timeout)
    return Stream(sock, reader, status, response_headers)


def json_body(response: Response | bytes) -> Any:
    """The body parsed as JSON (ValueError when it is not)."""
    import json

    raw = response.body if isinstance(response, Response) else response
    return json.loads(raw) if raw else None
