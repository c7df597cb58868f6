"""What the benchmark watches: etcd keys (a watch), Docker events, etcd's own counters, and
processes (/proc). Every time is the wall clock of this host (Docker's `timeNano` is the same
clock), in seconds since the epoch.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from tests.support.observe import DockerEvents, KeyEvent, KeyLog

__all__ = ["DockerEvents", "KeyEvent", "KeyLog"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- etcd's own counters (scraped over HTTP, so the scrape is not an etcd request) ---------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        with contextlib.suppress(ValueError):
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def scrape(url: str, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_prometheus(response.read().decode())


@dataclass(frozen=True)
class EtcdCounters:
    revision: int
    requests: dict[str, int]  # gRPC method -> calls (unary) and streams started

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def minus(self, before: EtcdCounters) -> EtcdCounters:
        methods = set(self.requests) | set(before.requests)
        delta = {m: self.requests.get(m, 0) - before.requests.get(m, 0) for m in methods}
        return EtcdCounters(self.revision - before.revision, {m: n for m, n in delta.items() if n})


def etcd_counters(etcd_url: str) -> EtcdCounters:
    """The revision and the requests etcd has served. Take deltas only between two calls made
    while the bench's own KeyLog stays open: its Watch stream was started before both."""
    revision = 0
    requests: dict[str, int] = {}
    for name, labels, value in scrape(f"{etcd_url}/metrics"):
        if name == "etcd_debugging_mvcc_current_revision":
            revision = int(value)
        elif name == "grpc_server_started_total":
            method = labels.get("grpc_method", "?")
            requests[method] = requests.get(method, 0) + int(value)
    return EtcdCounters(revision, requests)


def registrar_etcd_requests(metrics_url: str) -> dict[str, int]:
    """registrar's own count of etcd requests by op (`..._request_duration_seconds_count`)."""
    return {
        labels.get("op", "?"): int(value)
        for name, labels, value in scrape(metrics_url)
        if name == "registrar_etcd_request_duration_seconds_count"
    }


def metric_value(metrics_url: str, metric: str) -> float | None:
    """The value of an unlabelled metric (or the first sample of a labelled one)."""
    for name, _labels, value in scrape(metrics_url, timeout=1.0):
        if name == metric:
            return value
    return None


def mean_of(metrics_url: str, histogram: str) -> float | None:
    """A histogram's mean: `_sum` / `_count`."""
    total = metric_value(metrics_url, f"{histogram}_sum")
    count = metric_value(metrics_url, f"{histogram}_count")
    return total / count if total is not None and count else None


# --- processes ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    return text[text.rindex(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def process_tree(pids: Iterable[int]) -> list[int]:
    """The processes and all their live descendants."""
    tree = _children()
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(tree.get(pid, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of these processes and their descendants, reaped ones included
    (a live process's cutime/cstime counts the children it has waited for)."""
    ticks = 0
    for pid in process_tree(pids):
        fields = _stat_fields(pid)
        if fields is not None:
            # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pids: Iterable[int]) -> int:
    return sum(rss_kib(pid) for pid in process_tree(pids))


@dataclass(frozen=True)
class Footprint:
    """What one registering process (with its children) holds: resident memory, the private
    part of it (RssAnon: what each copy costs beyond the shared interpreter and libraries'
    file pages), and threads."""

    rss_kib: int
    anon_kib: int
    threads: int


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)
    except OSError:
        return {}


def footprint(pid: int) -> Footprint:
    """The process `pid` and its descendants, summed."""
    rss = anon = threads = 0
    for each in process_tree([pid]):
        status = _status(each)
        rss += int(status.get("VmRSS", "0 kB").split()[0])
        anon += int(status.get("RssAnon", "0 kB").split()[0])
        threads += int(status.get("Threads", "0"))
    return Footprint(rss, anon, threads)
