"""Client load: HTTP GETs at a steady rate, spread round-robin over frontends.

Run inside a namespace (the cluster starts it as a script: ``python tests/cluster/load.py``,
stdlib only, so the load process stays small):

    load.py --target web=10.231.2.1:8000 --target web=10.231.2.2:8000 --rate 200 \\
            --stats STATS.json [--timeout 2] [--duration 0] [--path /]

Every request is a new connection (``Connection: close``). A response counts as ``ok`` when
its status is 200; its body, ``NODE NAME VERSION`` as the cluster's containers serve it,
tells which backend and version answered. Anything else is a failure with a reason:
``refused``, ``reset``, ``connect_timeout``, ``timeout``, ``unreachable``, ``empty`` (closed
without an answer, as HAProxy in tcp mode does with no server), ``http_503``, ``bad_response``,
``error:<class>``. Requests that could not be sent because ``--max-inflight`` were already
waiting count as ``skipped`` (a sign the load is not what was asked).

The stats file (JSON, replaced atomically every ``--interval`` s and at exit, with
``"done": true``) holds cumulative counters: sent, ok, failed, skipped, reasons, per target,
versions per service, backends, latency percentiles, the last failures. SIGTERM/SIGINT: stop
sending, wait for the requests in flight, write the final stats, exit 0.

``ClientLoad`` (below) is the test side: ``stats()``, ``wait_for(...)``, ``stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .procs import NsProcess


# --- the generator (runs in the namespace) ----------------------------------------------------
@dataclass
class _Target:
    service: str
    host: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.service}={self.host}:{self.port}"


def parse_target(spec: str) -> _Target:
    """``SERVICE=HOST:PORT`` or ``HOST:PORT`` (service ``-``)."""
    service, _, addr = spec.rpartition("=")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad target {spec!r}: want SERVICE=HOST:PORT")
    return _Target(service or "-", host, int(port))


@dataclass
class _Counters:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    lagged: int = 0
    in_flight: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    targets: dict[str, Counter[str]] = field(default_factory=dict)
    versions: dict[str, Counter[str]] = field(default_factory=dict)
    backends: Counter[str] = field(default_factory=Counter)
    latency_ms: Counter[int] = field(default_factory=Counter)
    failures: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))


def _percentiles(hist: Counter[int], qs: Sequence[float]) -> dict[str, float | None]:
    total = sum(hist.values())
    out: dict[str, float | None] = {}
    if not total:
        out = {f"p{int(q * 100)}": None for q in qs}
        out["max"] = None
        return out
    items = sorted(hist.items())
    for q in qs:
        need = q * total
        acc = 0
        for ms, n in items:
            acc += n
            if acc >= need:
                out[f"p{int(q * 100)}"] = float(ms)
                break
    out["max"] = float(items[-1][0])
    return out


class LoadGenerator:
    def __init__(self, targets: Sequence[_Target], rate: float, timeout: float, path: str,
                 stats_path: Path, interval: float, max_inflight: int) -> None:  # fmt: skip
        if rate <= 0 or not targets:
            raise ValueError("need a positive rate and at least one target")
        self.targets = list(targets)
        self.rate = rate
        self.timeout = timeout
        self.path = path
        self.stats_path = stats_path
        self.interval = interval
        self.max_inflight = max_inflight
        self.c = _Counters()
        for t in self.targets:
            self.c.targets.setdefault(t.label, Counter())
        self.started = time.time()
        self._t0 = time.monotonic()
        self.stopping = asyncio.Event()
        self.done = False

    def _fail(self, t: _Target, reason: str, start: float) -> None:
        """Count a failure; ``t`` in the record is when the request was sent (seconds since
        the load started), so failures line up with the events that caused them."""
        self.c.failed += 1
        self.c.reasons[reason] += 1
        self.c.targets[t.label]["failed"] += 1
        self.c.failures.append(
            {
                "t": round(start - self._t0, 3),
                "took": round(time.monotonic() - start, 3),
                "target": t.label,
                "reason": reason,
            }
        )

    async def _one(self, t: _Target) -> None:
        self.c.in_flight += 1
        start = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                reader, w = await asyncio.wait_for(
                    asyncio.open_connection(t.host, t.port), self.timeout
                )
            except TimeoutError:
                self._fail(t, "connect_timeout", start)
                return
            writer = w
            request = (
                f"GET {self.path} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n"
                "User-Agent: rgc-load\r\nConnection: close\r\n\r\n"
            )
            w.write(request.encode())
            left = self.timeout - (time.monotonic() - start)
            try:  # until EOF (the request asked the server to close), within the timeout
                data = await asyncio.wait_for(reader.read(-1), max(left, 0.01))
            except TimeoutError:
                self._fail(t, "timeout", start)
                return
            self._answer(t, data, start)
        except ConnectionRefusedError:
            self._fail(t, "refused", start)
        except ConnectionResetError:
            self._fail(t, "reset", start)
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                self._fail(t, "unreachable", start)
            else:
                self._fail(t, f"error:{errno.errorcode.get(e.errno or 0, type(e).__name__)}", start)
        except Exception as e:
            self._fail(t, f"error:{type(e).__name__}", start)
        finally:
            self.c.in_flight -= 1
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    def _answer(self, t: _Target, data: bytes, start: float) -> None:
        if not data:
            self._fail(t, "empty", start)
            return
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            self._fail(t, "bad_response", start)
            return
        status = int(status_line[1])
        if status != 200:
            self._fail(t, f"http_{status}", start)
            return
        self.c.ok += 1
        self.c.targets[t.label]["ok"] += 1
        self.c.latency_ms[int((time.monotonic() - start) * 1000)] += 1
        words = body.decode(errors="replace").split()
        if len(words) >= 3:
            node, name, version = words[:3]
            self.c.versions.setdefault(t.service, Counter())[version] += 1
            self.c.backends[f"{node}/{name}"] += 1
        else:
            self.c.versions.setdefault(t.service, Counter())["?"] += 1

    def snapshot(self) -> dict[str, Any]:
        c = self.c
        return {
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "elapsed": round(time.monotonic() - self._t0, 3),
            "rate": self.rate,
            "sent": c.sent,
            "ok": c.ok,
            "failed": c.failed,
            "skipped": c.skipped,
            "lagged": c.lagged,
            "in_flight": c.in_flight,
            "reasons": dict(c.reasons),
            "targets": {k: dict(v) for k, v in c.targets.items()},
            "versions": {k: dict(v) for k, v in c.versions.items()},
            "backends": dict(c.backends),
            "latency_ms": _percentiles(c.latency_ms, (0.5, 0.9, 0.99)),
            "recent_failures": list(c.failures),
            "done": self.done,
        }

    def write(self) -> None:
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.stats_path)

    async def _writer(self) -> None:
        while not self.stopping.is_set():
            self.write()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.interval)

    async def run(self, duration: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        writer = asyncio.create_task(self._writer())
        tasks: set[asyncio.Task[None]] = set()
        step = 1.0 / self.rate
        next_at = loop.time()
        end = next_at + duration if duration > 0 else None
        i = 0
        while not self.stopping.is_set():
            now = loop.time()
            if end is not None and now >= end:
                break
            if next_at > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), next_at - now)
                continue
            if now - next_at > 1.0:  # stalled for over a second: do not burst to catch up
                missed = int((now - next_at) / step)
                self.c.lagged += missed
                next_at += missed * step
            t = self.targets[i % len(self.targets)]
            i += 1
            next_at += step
            if self.c.in_flight >= self.max_inflight:
                self.c.skipped += 1
                continue
            self.c.sent += 1
            task = asyncio.create_task(self._one(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        self.stopping.set()
        if tasks:
            await asyncio.wait(set(tasks), timeout=self.timeout + 1)
        self.done = True
        await writer
        self.write()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", required=True, help="SERVICE=HOST:PORT")
    p.add_argument("--rate", type=float, required=True, help="requests per second, in all")
    p.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    p.add_argument("--path", default="/")
    p.add_argument("--stats", required=True, help="JSON file rewritten every --interval s")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until SIGTERM")
    p.add_argument("--max-inflight", type=int, default=2000)
    args = p.parse_args(argv)
    gen = LoadGenerator(
        [parse_target(t) for t in args.target],
        args.rate,
        args.timeout,
        args.path,
        Path(args.stats),
        args.interval,
        args.max_inflight,
    )
    asyncio.run(gen.run(args.duration))
    return 0


# --- the test side ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadStats:
    """One snapshot of the generator's counters (cumulative since it started)."""

    raw: dict[str, Any]

    @property
    def sent(self) -> int:
        return int(self.raw.get("sent", 0))

    @property
    def ok(self) -> int:
        return int(self.raw.get("ok", 0))

    @property
    def failed(self) -> int:
        return int(self.raw.get("failed", 0))

    @property
    def skipped(self) -> int:
        return int(self.raw.get("skipped", 0))

    @property
    def elapsed(self) -> float:
        return float(self.raw.get("elapsed", 0.0))

    @property
    def done(self) -> bool:
        return bool(self.raw.get("done", False))

    @property
    def reasons(self) -> dict[str, int]:
        return dict(self.raw.get("reasons", {}))

    @property
    def versions(self) -> dict[str, dict[str, int]]:
        """Service -> version -> successful responses."""
        return {k: dict(v) for k, v in self.raw.get("versions", {}).items()}

    @property
    def backends(self) -> dict[str, int]:
        """``NODE/CONTAINER`` -> successful responses."""
        return dict(self.raw.get("backends", {}))

    @property
    def targets(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.raw.get("targets", {}).items()}

    @property
    def latency_ms(self) -> dict[str, float | None]:
        return dict(self.raw.get("latency_ms", {}))

    @property
    def recent_failures(self) -> list[dict[str, Any]]:
        return list(self.raw.get("recent_failures", []))

    def since(self, earlier: LoadStats) -> LoadStats:
        """The counters between ``earlier`` and this snapshot (latency and failures as now)."""

        def sub(a: Any, b: Any) -> Any:
            if isinstance(a, dict):
                b = b if isinstance(b, dict) else {}
                out = {k: sub(v, b.get(k)) for k, v in a.items()}
                return {k: v for k, v in out.items() if v not in (0, {}, None)}
            if isinstance(a, int | float) and not isinstance(a, bool):
                return a - (b if isinstance(b, int | float) else 0)
            return a

        raw = dict(self.raw)
        for key in ("sent", "ok", "failed", "skipped", "lagged", "elapsed"):
            raw[key] = sub(self.raw.get(key, 0), earlier.raw.get(key, 0))
        for key in ("reasons", "targets", "versions", "backends"):
            raw[key] = sub(self.raw.get(key, {}), earlier.raw.get(key, {}))
        return LoadStats(raw)

    def timeline(self, events: Sequence[tuple[str, float]] = ()) -> str:
        """The recent failures (the last 50) per second since the load started, with
        ``events`` (name, ``time.time()``) placed on the same scale."""
        started = float(self.raw.get("started", 0.0))
        lines = [f"  event at {t - started:6.1f} s: {name}" for name, t in events]
        per_second: dict[int, Counter[str]] = {}
        for f in self.recent_failures:
            per_second.setdefault(int(f["t"]), Counter())[str(f["reason"])] += 1
        lines += [
            f"  failures in second {sec:4d}: " + ", ".join(f"{r} {n}" for r, n in c.items())
            for sec, c in sorted(per_second.items())
        ]
        return "\n".join(lines) or "  (no failure, no event)"

    def summary(self, versions: bool = True) -> str:
        lat = self.latency_ms
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) or "none"
        by_version = "; ".join(
            f"{svc}: " + ", ".join(f"{v} {n}" for v, n in sorted(vs.items()))
            for svc, vs in sorted(self.versions.items())
        )
        text = (
            f"{self.sent} sent, {self.ok} ok, {self.failed} failed ({reasons}), "
            f"{self.skipped} skipped in {self.elapsed:.1f} s; p50 {lat.get('p50')} ms, "
            f"p99 {lat.get('p99')} ms"
        )
        return f"{text}; versions {by_version or '-'}" if versions else text


class ClientLoad:
    """Handle on a running load generator (made by ``Cluster.start_load``)."""

    def __init__(self, proc: NsProcess, stats_path: Path) -> None:
        self.proc = proc
        self.stats_path = stats_path
        self.final: LoadStats | None = None

    def stats(self) -> LoadStats:
        if self.final is not None:
            return self.final
        for _ in range(20):
            try:
                return LoadStats(json.loads(self.stats_path.read_text()))
            except FileNotFoundError:
                if not self.proc.alive:
                    raise RuntimeError(f"client load exited:\n{self.proc.logs()}") from None
                return LoadStats({})
            except ValueError:  # replaced atomically, so only a torn read of a bad write
                time.sleep(0.01)
        raise RuntimeError(f"unreadable load stats {self.stats_path}")

    def wait_for(self, predicate: Callable[[LoadStats], bool], timeout: float = 30.0) -> LoadStats:
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if predicate(st):
                return st
            if not self.proc.alive:
                raise RuntimeError(f"client load exited:\n{self.proc.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"load condition not met within {timeout} s: {st.summary()}")
            time.sleep(0.2)

    def stats_after(self, t: float, timeout: float = 10.0) -> LoadStats:
        """The first snapshot written at or after wall time ``t`` (``time.time()``): it counts
        every request that ended before ``t`` (snapshots are written every ``--interval``)."""
        return self.wait_for(lambda s: float(s.raw.get("updated", 0.0)) >= t, timeout)

    def wait_requests(self, n: int, timeout: float = 30.0) -> LoadStats:
        """Until at least ``n`` more requests were answered (ok or failed) than now."""
        base = self.stats()
        done0 = base.ok + base.failed
        return self.wait_for(lambda s: s.ok + s.failed >= done0 + n, timeout)

    def stop(self, timeout: float = 15.0) -> LoadStats:
        """SIGTERM, wait for the final stats; they are kept (``stats()`` returns them)."""
        if self.final is not None:
            return self.final
        self.proc.stop(timeout)
        st = self.stats()
        self.final = st
        return st

    def __enter__(self) -> ClientLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
