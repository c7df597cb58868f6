"""The small HTTP/1.1 client (`registrar.adapters.http1`) against a local socket server that
answers with bytes written by hand: chunked bodies, a kept-alive connection the peer closed,
lines split across chunks and several lines in one chunk, a stream closed from another thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from registrar.adapters import http1

Handler = Callable[[socket.socket, bytes], None]


def read_request(conn: socket.socket) -> bytes:
    """One request: its head and its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


class Server:
    """Accepts connections; `handler(conn, request)` answers each request, on the connection's
    own thread, until the peer closes or the handler closes it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = http1.Address(host="127.0.0.1", port=self.sock.getsockname()[1])
        self.connections = 0
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = read_request(conn)
                except OSError:
                    return
                if not request:
                    return
                self.requests.append(request)
                try:
                    self.handler(conn, request)
                except OSError:
                    return
                if conn.fileno() < 0:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Server]]:
    servers: list[Server] = []

    def start(handler: Handler) -> Server:
        servers.append(Server(handler))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
            + b"0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n")


def test_a_chunked_body_with_a_trailer_is_read_whole_and_the_connection_kept(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(lambda conn, _: conn.sendall(chunked(b'{"a":', b' 1}')))
    connection = http1.Connection(server.address, timeout=2)
    try:
        first = connection.request("POST", "/v3/kv/range", b"{}")
        second = connection.request("POST", "/v3/kv/range", b"{}")
    finally:
        connection.close()
    assert first.status == 200 and http1.json_body(first) == {"a": 1}
    assert second.body == b'{"a": 1}'
    assert server.connections == 1  # kept alive
    assert server.requests[0].endswith(b"\r\n\r\n{}")
    assert b"Content-Length: 2" in server.requests[0]


def test_a_kept_connection_the_peer_closed_is_opened_again_and_the_request_sent_once_more(
    serve: Callable[[Handler], Server],
) -> None:
    def answer_then_close(conn: socket.socket, _: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    server = serve(answer_then_close)
    connection = http1.Connection(server.address, timeout=2)
    try:
        assert connection.request("GET", "/").body == b"ok"
        time.sleep(0.1)  # the peer's close has arrived
        assert connection.request("GET", "/").body == b"ok"
    finally:
        connection.close()
    assert server.connections == 2
    assert len(server.requests) == 2  # each request reached the server once


def test_a_request_times_out_when_the_peer_does_not_answer(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(lambda conn, _: time.sleep(2))
    connection = http1.Connection(server.address, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        connection.request("GET", "/")
    assert time.monotonic() - started < 1.5


def test_stream_lines_split_across_chunks_and_several_in_one_chunk(
    serve: Callable[[Handler], Server],
) -> None:
    server = serve(lambda conn, _: conn.sendall(
        chunked(b'{"n": 1}\n{"n":', b' 2}\n', b'{"n": 3}\n{"n": 4}\n\n{"n"', b": 5}")))
    stream = http1.open_stream(server.address, "POST", "/v3/watch", timeout=2, body=b"{}",
                               read_timeout=2)
    try:
        first = next(stream.lines())  # read alone, as a watch reads "created"
        rest = list(stream.lines())  # goes on where the first stopped
    finally:
        stream.close()
    assert [first, *rest] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}', b'{"n": 5}']


def test_a_stream_closed_from_another_thread_ends_its_reader_quietly(
    serve: Callable[[Handler], Server],
) -> None:
    def one_line_then_silence(conn: socket.socket, _: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\nline1\n\r\n")
        time.sleep(5)

    server = serve(one_line_then_silence)
    stream = http1.open_stream(server.address, "POST", "/v3/watch", timeout=2,
                               keepalive=http1.KeepAlive(idle=1, interval=1, probes=1))
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(stream.lines()))
    reader.start()
    time.sleep(0.2)
    stream.close()
    reader.join(2)
    assert not reader.is_alive()
    assert seen == [b"line1"]


def test_a_stream_the_peer_ends_mid_chunk_raises() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = http1.Address(host="127.0.0.1", port=listener.getsockname()[1])

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")

    threading.Thread(target=serve_once, daemon=True).start()
    stream = http1.open_stream(address, "POST", "/", timeout=2, read_timeout=2)
    try:
        with pytest.raises(http1.ProtocolError):
            list(stream.lines())
    finally:
        stream.close()
        listener.close()


def test_a_read_that_times_out_mid_chunk_loses_nothing(
    serve: Callable[[Handler], Server],
) -> None:
    """A watch is read on its follower's own thread with a timeout: a timeout in the middle of
    a chunk's size, its data or its CRLF leaves the stream where it was."""
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1", b"6\r\n",
              b'{"one": 1}\n{"tw', b"o", b'": 2}\n', b"\r", b"\n4\r\n", b"x\n", b"y\n\r\n",
              b"0\r\n\r\n"]  # chunks of 0x16 and 4 bytes, cut anywhere

    def trickle(conn: socket.socket, _: bytes) -> None:
        for piece in pieces:
            conn.sendall(piece)
            time.sleep(0.06)

    server = serve(trickle)
    stream = http1.open_stream(server.address, "POST", "/v3/watch", timeout=2, body=b"{}")
    lines: list[bytes] = []
    timeouts = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            line = stream.read_line(0.02)
        except TimeoutError:
            timeouts += 1
            continue
        if line is None:
            break
        lines.append(line)
    assert lines == [b'{"one": 1}', b'{"two": 2}', b"x", b"y"]
    assert timeouts > 5  # it did time out, between and inside the pieces
    with pytest.raises(TimeoutError):  # no time left: a timeout, never a broken stream
        stream2 = http1.open_stream(server.address, "POST", "/", timeout=2, body=b"{}")
        stream2.read_line(0)
