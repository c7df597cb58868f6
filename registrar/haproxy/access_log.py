"""The reader of HAProxy's per-request log: a unix datagram socket the router binds before
HAProxy starts, read on a thread of its own.

HAProxy sends each line without waiting for us: when the socket's queue is full it drops the
line and counts it (`show info` DroppedLogs, read by the router with the other counters), so a
burst the router cannot read in time costs lines, never HAProxy's latency.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

from registrar.exposition import Counter, Histogram, HistogramChild, Registry
from registrar.haproxy.latency import BUCKETS, Latency, parse_line
from registrar.haproxy.traffic import Owner
from registrar.worker import Worker

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 4 * 1024 * 1024  # room for a burst while the thread is not scheduled
READ_TIMEOUT = 0.5  # how soon the thread sees a stop


class LatencyMetrics:
    """The histogram by service and version, and the lines HAProxy dropped."""

    def __init__(self, registry: Registry) -> None:
        self.response_seconds = Histogram(
            "registrar_haproxy_response_seconds",
            "Time from a request sent to its server to the response headers received "
            "(HAProxy's Tr), by service and version (http mode), cumulative across reloads.",
            ["service", "version"], buckets=BUCKETS, registry=registry,
        )
        self.log_dropped = Counter(
            "registrar_haproxy_log_dropped",
            "Per-request log lines HAProxy could not send (the router did not read them in "
            "time): responses missing from registrar_haproxy_response_seconds.",
            registry=registry,
        )
        self._children: dict[Owner, HistogramChild] = {}

    def observe(self, owner: Owner, seconds: float) -> None:
        """One response into the histogram (`Latency.on_counted`: the reader's thread, or the
        router's when held lines are counted)."""
        child = self._children.get(owner)
        if child is None:
            child = self._children[owner] = self.response_seconds.labels(*owner)
        child.observe(seconds)


class AccessLogReader(Worker):
    """Binds `path` (a unix datagram socket) and counts every line into `latency` and the
    histogram, until `stop()`."""

    def __init__(self, path: str, latency: Latency, metrics: LatencyMetrics) -> None:
        super().__init__("access log")
        self.path = path
        self._latency = latency
        self._metrics = metrics
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        with contextlib.suppress(OSError):  # capped by net.core.rmem_max: best effort
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._sock.settimeout(READ_TIMEOUT)
        self.lines = 0  # counted so far (for tests and the bench)

    def run(self) -> None:
        recv, observe, parse = self._sock.recv, self._latency.observe, parse_line
        while not self.stopping:
            try:
                data = recv(4096)
            except TimeoutError:
                continue
            except OSError as exc:
                if not self.stopping:
                    log.error("reading HAProxy's log socket failed: %s", exc)
                return
            record = parse(data)
            if record is not None:
                observe(record)
                self.lines += 1

    def stop(self, deadline: float | None = None) -> None:
        """Stops reading (within READ_TIMEOUT, by `deadline`: 1 s from now when not given)
        and removes the socket."""
        super().stop(time.monotonic() + 1.0 if deadline is None else deadline)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
