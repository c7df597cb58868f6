"""What the benchmark watches: etcd keys (a watch), Docker events, etcd's own counters, and
processes (/proc). Every time is the wall clock of this host (Docker's `timeNano` is the same
clock), in seconds since the epoch.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyetcd

from tests.support.etcd_reader import parse_url

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class KeyEvent:
    at: float  # when the watch delivered it here
    kind: str  # "put" or "delete"
    key: str
    revision: int


class KeyLog:
    """Every PUT and DELETE under `prefix`, in the order an etcd watch delivers them."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = parse_url(url)
        self.prefix = prefix
        self._client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=[pyetcd.Endpoint(host, port, secure=False, time_retry=0.2)],
            timeout=5.0,
            failover=True,
        )
        self._cond = threading.Condition()
        self.events: list[KeyEvent] = []
        self.first_put: dict[str, float] = {}
        self.deleted: dict[str, float] = {}  # key -> last delete
        self.live: set[str] = set()
        self.errors: list[str] = []
        self._watch_id = self._client.add_watch_prefix_callback(prefix, self._on_response)

    def _on_response(self, response: Any) -> None:
        at = time.time()
        if isinstance(response, Exception):
            with self._cond:
                self.errors.append(repr(response))
                self._cond.notify_all()
            return
        with self._cond:
            for event in response.events:
                key = bytes(event.key).decode()
                kind = "delete" if isinstance(event, pyetcd.events.DeleteEvent) else "put"
                self.events.append(KeyEvent(at, kind, key, int(event.mod_revision)))
                if kind == "put":
                    self.first_put.setdefault(key, at)
                    self.live.add(key)
                else:
                    self.deleted[key] = at
                    self.live.discard(key)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[KeyLog], bool], timeout: float) -> bool:
        """Waits until `predicate(self)` holds (checked under the lock, after each response)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def live_matching(self, tag: str) -> set[str]:
        with self._cond:
            return {key for key in self.live if tag in key}

    def since(self, start: float) -> list[KeyEvent]:
        with self._cond:
            return [e for e in self.events if e.at >= start]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.cancel_watch(self._watch_id)
        with contextlib.suppress(Exception):
            self._client.close()


class DockerEvents:
    """Container events from the engine's stream: per container name, the first time of each
    action (`kill` events only with a signal that ends the process)."""

    ENDING = frozenset({"2", "3", "9", "15"})

    def __init__(self) -> None:
        import docker

        self._api = docker.APIClient(version="auto", timeout=30)
        self._stream = self._api.events(decode=True, filters={"type": "container"})
        self._cond = threading.Condition()
        self.times: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                action = str(event.get("Action") or "")
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                name = str(attributes.get("name") or "")
                if action == "kill" and str(attributes.get("signal")) not in self.ENDING:
                    continue
                at = int(event.get("timeNano") or 0) / 1e9 or time.time()
                with self._cond:
                    self.times.setdefault(name, {}).setdefault(action, at)
                    self._cond.notify_all()

    def time_of(self, name: str, action: str, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while action not in self.times.get(name, {}):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.times[name][action]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        with contextlib.suppress(Exception):
            self._api.close()


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
