"""Byte-level TCP / unix-socket forwarders to put between a client and a server.

They simulate a lost connection (``cut()``: every open connection closed on both sides and
new ones refused), a network partition (``blackhole()``: connections stay open but nothing
flows; data sent meanwhile is delivered after ``restore()``) or a slow link (``delay``: every
byte is delivered that many seconds after it was sent, each way). Each connection is a pair of
threads pumping bytes both ways, so long-lived streams (Docker's chunked events response,
gRPC's HTTP/2) pass unchanged.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from typing import Self

_BUF = 65536


class _Conn:
    """One forwarded connection: the accepted client socket and the upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._closed = False
        self._pumps_done = 0
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def pump_done(self) -> bool:
        """Counts a pump that ended on a clean EOF; True when it was the second."""
        with self._lock:
            self._pumps_done += 1
            return self._pumps_done >= 2

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.client, self.upstream):
            # shutdown() wakes a thread blocked in recv() on this socket; close() alone does not
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class _Forwarder:
    """Common machinery; subclasses say how to listen and how to reach the target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self.connections_total = 0
        self.held = 0  # chunks that arrived while blackholed (a request or a reply hangs)
        self.delay = 0.0  # seconds each way (a slow link); settable at any time
        # A slow server instead: each request waits this long before it reaches the target,
        # and one whose client hung up meanwhile never does (as a server that cancels a request
        # whose caller is gone). Settable at any time.
        self.slow_server = 0.0
        self._listen()

    # -- subclass hooks ----------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        raise NotImplementedError

    def _connect_target(self) -> socket.socket:
        raise NotImplementedError

    def _unbind(self) -> None:
        """Called after the listener is closed (unix sockets remove their path)."""

    # -- public API --------------------------------------------------------------------------
    @property
    def is_cut(self) -> bool:
        return self._listener is None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def cut(self) -> None:
        """Close every open connection (both sides) and refuse new ones until ``restore()``."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            self._conns.clear()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
            self._unbind()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        for c in conns:
            c.close()
        # pumps parked in blackhole mode must see their sockets closed, not stay parked
        self._flowing.set()

    def blackhole(self) -> None:
        """Partition: connections stay open (new ones too) but no byte moves either way
        (``held`` counts the chunks that arrive meanwhile)."""
        self._flowing.clear()

    def restore(self) -> None:
        """Undo ``cut()`` (listen again on the same address) or ``blackhole()``."""
        if self._closed:
            raise RuntimeError("forwarder is closed")
        self._flowing.set()
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self._closed = True
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _listen(self) -> None:
        listener = self._bind()
        listener.listen(128)
        with self._lock:
            self._listener = listener
        t = threading.Thread(
            target=self._accept_loop, args=(listener,), daemon=True, name=f"{self!r}-accept"
        )
        self._accept_thread = t
        t.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by cut()/close()
            if self._listener is not listener:
                with contextlib.suppress(OSError):
                    client.close()
                return
            try:
                upstream = self._connect_target()
            except OSError:
                # target down: the client sees its connection closed at once
                with contextlib.suppress(OSError):
                    client.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:
                if self._listener is not listener:
                    conn.close()
                    return
                self._conns.add(conn)
                self.connections_total += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(conn, src, dst), daemon=True, name=f"{self!r}-pump"
                ).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        """Reads from `src`; a sender thread writes each chunk to `dst` once it is due (now,
        or `delay` seconds after it was read)."""
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
        sender = threading.Thread(target=self._send, args=(conn, chunks, dst), daemon=True,
                                  name=f"{self!r}-send")
        sender.start()
        request = src is conn.client
        try:
            while True:
                data = src.recv(_BUF)
                if not data and request and self.slow_server:
                    self._drop(conn)  # the client gave up: what it sent is dropped
                    return
                chunks.put((time.monotonic() + self.delay
                            + (self.slow_server if request else 0.0), data))
                if not data:
                    return
        except OSError:
            chunks.put((0.0, b""))
            self._drop(conn)

    def _send(self, conn: _Conn, chunks: queue.Queue[tuple[float, bytes]],
              dst: socket.socket) -> None:
        clean_eof = False
        try:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    # half-close: pass the EOF on, the other direction may still flow
                    dst.shutdown(socket.SHUT_WR)
                    clean_eof = True
                    return
                if not self._flowing.is_set():
                    with self._lock:
                        self.held += 1
                while not self._flowing.wait(0.1):
                    if conn.closed:
                        return
                if conn.closed:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # an error ends the pair at once; a clean EOF only once both directions are done
            if not clean_eof or conn.pump_done():
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.close()


class TcpForwarder(_Forwarder):
    """Listens on a free 127.0.0.1 port and forwards to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = listen_port
        super().__init__()

    def _bind(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if self.port == 0 or time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.05)
        self.port = s.getsockname()[1]
        return s

    def _connect_target(self) -> socket.socket:
        s = socket.create_connection(self.target, timeout=5)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"TcpForwarder(:{self.port}->{self.target[0]}:{self.target[1]})"


class UnixForwarder(_Forwarder):
    """Listens on a unix socket in a fresh temp dir and forwards to ``target_path``."""

    def __init__(self, target_path: str = "/var/run/docker.sock", path: str | None = None) -> None:
        self.target_path = target_path
        self._tmpdir: str | None = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="rgt-fwd-")
            path = os.path.join(self._tmpdir, "fwd.sock")
        self.path = path
        super().__init__()

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        return s

    def _unbind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _connect_target(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.target_path)
        except OSError:
            s.close()
            raise
        s.settimeout(None)
        return s

    def close(self) -> None:
        super().close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def __repr__(self) -> str:
        return f"UnixForwarder({self.path}->{self.target_path})"


__all__ = ["TcpForwarder", "UnixForwarder"]
