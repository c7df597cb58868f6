"""Response times by version, from HAProxy's per-request log (pure).

HAProxy's own counters give no distribution (its exporter has averages over the last 1,024
requests), so in http mode the built-in template has HAProxy send one short line per request
(`LOG_FORMAT`: worker pid, backend, server slot, Tr, status) to a unix datagram socket the
router reads. `parse_line` reads one line; `Latency` counts each into its service and
version's buckets (a slot's owner as the router knew it in that worker: a reload's old worker
keeps its own slots), cumulative across reloads because the counts live here, not in HAProxy.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from registrar.haproxy.traffic import Owner, Slot

# The report's buckets (seconds; docs/routing.md, "Response times by version"); a 12th, +Inf,
# holds the rest.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# What the built-in template asks HAProxy to log: pid backend server Tr(ms) status.
LOG_FORMAT = "%pid %b %s %Tr %ST"
# Lines of a worker whose slots the router has not read yet (a reload from outside, noticed
# within a second), kept until it has; at most this many.
PENDING_MAX = 100_000


@dataclass(frozen=True)
class LogRecord:
    pid: int
    backend: str
    server: str
    seconds: float  # Tr: from the request sent to the server to its response headers
    status: int


def parse_line(data: bytes) -> LogRecord | None:
    """One datagram of LOG_FORMAT (raw, no syslog header; a trailing newline allowed); None for
    anything else (HAProxy's own alerts on the same socket, a request that got no response
    headers: Tr is -1, one that no server took: `<NOSRV>`)."""
    fields = data.split()
    if len(fields) != 5:
        return None
    pid, backend, server, tr, status = fields
    if not (pid.isdigit() and tr.isdigit() and status.isdigit()) or server.startswith(b"<"):
        return None
    return LogRecord(int(pid), backend.decode("utf-8", "replace"),
                     server.decode("utf-8", "replace"), int(tr) / 1000, int(status))


def bucket_of(seconds: float) -> int:
    """The index (0..11) of the first bucket whose upper bound holds `seconds` (11: +Inf)."""
    return bisect.bisect_left(BUCKETS, seconds)


def cumulative(counts: list[int]) -> list[int]:
    """Per-bucket counts -> the report's cumulative counts (Prometheus' `le` buckets: each is
    the number of responses at most that long; the last, +Inf, is the total)."""
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


@dataclass
class Latency:
    """Per-bucket counts by (service, version); thread-safe (the log reader counts, the
    reporter reads, the router sets the owners). `on_counted(owner, seconds)` is called for
    each response counted (the histogram metric), outside the lock."""

    on_counted: Callable[[Owner, float], None] = lambda owner, seconds: None
    counts: dict[Owner, list[int]] = field(default_factory=dict)
    _pid: int | None = None
    _current: Mapping[Slot, Owner] = field(default_factory=dict)
    _by_pid: Mapping[int, Mapping[Slot, Owner]] = field(default_factory=dict)
    _pending: deque[LogRecord] = field(default_factory=lambda: deque(maxlen=PENDING_MAX))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_owners(self, pid: int | None, current: Mapping[Slot, Owner],
                   by_pid: Mapping[int, Mapping[Slot, Owner]]) -> None:
        """Which service and version each slot serves: `current` for the worker `pid` (None:
        not known, then for every line of a pid not in `by_pid`), `by_pid` for old workers.
        Lines held back for a worker now known are counted."""
        with self._lock:
            self._pid, self._current, self._by_pid = pid, current, by_pid
            held, self._pending = self._pending, deque(maxlen=PENDING_MAX)
        for record in held:
            self.observe(record)

    def _owners(self, pid: int) -> Mapping[Slot, Owner] | None:
        owners = self._by_pid.get(pid)
        if owners is None and (self._pid is None or pid == self._pid):
            owners = self._current
        return owners

    def observe(self, record: LogRecord) -> tuple[Owner, int] | None:
        """Counts one response; its owner and bucket (None: a slot nobody owns, or a worker
        whose slots are not known yet: held back until they are)."""
        slot = (record.backend, record.server)
        with self._lock:
            owners = self._owners(record.pid)
            if owners is None:
                self._pending.append(record)
                return None
            owner = owners.get(slot)
            if owner is None:
                return None
            bucket = bucket_of(record.seconds)
            counts = self.counts.get(owner)
            if counts is None:
                counts = self.counts[owner] = [0] * (len(BUCKETS) + 1)
            counts[bucket] += 1
        self.on_counted(owner, record.seconds)
        return owner, bucket

    def report(self) -> dict[str, dict[str, list[int]]]:
        """The report's `latency`: {SERVICE: {VERSION: [N1..N12]}}, cumulative counts."""
        with self._lock:
            items = sorted((owner, list(counts)) for owner, counts in self.counts.items())
        out: dict[str, dict[str, list[int]]] = {}
        for (service, version), counts in items:
            out.setdefault(service, {})[version] = cumulative(counts)
        return out
