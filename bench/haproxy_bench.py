"""`make bench`, the routing part: `registrar haproxy` with a real HAProxy, fed by a real
`registrar watch` agent on a private etcd, busybox httpd containers on the real Docker engine.

    .venv/bin/python -m bench.haproxy_bench [--quick]

`run(quick) -> list[dict]`, one dict per measurement (see `Row`):
  metric   what was measured, e.g. "start to traffic p50 (runtime API)"
  value    a number (None when it could not be measured)
  unit     "ms", "count" or "requests"
  target   the goal as text ("<= 250 ms", "0"), "" when there is none
  met      True / False against the target, None without one
  detail   one line: samples, spread, how it was measured

Measurements, each for the built-in template (changes of servers go through HAProxy's runtime
API) and for a `--template` copy of it (every change is a reload, SIGUSR2 to the master):
1. start to traffic: `docker run -d` one container into an empty backend; Docker's `start`
   event time to the first response through HAProxy that this container served (a client polls
   HAProxy without pause); the container is removed and the backend empty again before the
   next one. Median and p95 over N (20; 6 with --quick).
2. deploy of 20 containers (8 with --quick), started 4 at a time: the reloads it took
   (`registrar_haproxy_reloads_total`), the runtime-API updates, and the time until all serve.
3. rolling replace under load: 4 instances (2 with --quick) replaced one by one (start the new
   one, wait until it is in rotation, `docker stop -t 2` the old one) while a client sends
   requests without pause; failed requests / total.
Every container is named `rgbench-hx-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.observe import DockerEvents
from registrar.haproxy.config import builtin_template_text
from tests.helpers import scrape
from tests.support.docker_env import docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.proc import RegistrarProcess, free_port, wait_until

SERVICE = "rgbench-hx"
PREFIX = "/services"
TARGET_P50 = 0.250


@dataclass
class Row:
    metric: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    detail: str = ""


def say(message: str) -> None:
    print(f"bench haproxy: {message}", file=sys.stderr, flush=True)


def p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]


def request(port: int, timeout: float = 2.0) -> tuple[int, str]:
    """One GET / through HAProxy on a new connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    finally:
        conn.close()


class Stack:
    """A private etcd, the host agent and one `registrar haproxy` in http mode."""

    def __init__(self, work: Path, run_id: str, template: bool) -> None:
        self.work = work
        self.run_id = run_id
        self.label = "reload (--template)" if template else "runtime API"
        tag = "template" if template else "builtin"
        self.etcd = EtcdServer(work / f"etcd-{tag}", name=f"hx-{tag}").start()
        self.port = free_port()
        self.metrics_port = free_port(exclude=[self.port])
        self.node = f"hx-{tag}"
        common = ["--etcd", self.etcd.url, "--prefix", PREFIX, "--log-format", "json"]
        self.agent = RegistrarProcess(
            ["watch", *common, "--node", self.node, "--host-ip", "127.0.0.1", "--explicit",
             "--metrics-addr", "127.0.0.1:0"],
            log_dir=work / f"logs-{tag}",
        )
        extra: list[str] = []
        if template:
            path = work / "copy-of-builtin.j2"
            path.write_text(builtin_template_text())
            extra = ["--template", str(path)]
        self.router = RegistrarProcess(
            ["haproxy", *common, "--bind", f"{SERVICE}=127.0.0.1:{self.port}", "--mode", "http",
             "--config", str(work / f"haproxy-{tag}.cfg"),
             "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *extra],
            log_dir=work / f"logs-{tag}",
        )
        self.agent.wait_for_log("docker connected", timeout=30)
        self.router.wait_for_log("haproxy started", timeout=30)

    def metric(self, name: str) -> float:
        """A sample of the router's /metrics, like 'name{label="v"}' (0 when absent)."""
        return scrape(self.metrics_port).get(name, 0.0)

    def servers(self) -> float:
        return self.metric(f'registrar_haproxy_backend_servers{{service="{SERVICE}"}}')

    def close(self) -> None:
        for proc in (self.router, self.agent):
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
        with contextlib.suppress(Exception):
            self.etcd.destroy()


class Bench:
    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self.work = work
        self.run_id = f"rgbench-hx-{secrets.token_hex(3)}"
        self.image = ""
        self.events: DockerEvents | None = None
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return f"{self.run_id}-{self._n}"

    def start(self, name: str) -> str:
        return docker("run", "-d", "--name", name, "--label", f"registrar.service={SERVICE}",
                      "-p", "127.0.0.1::8080", self.image, "sh", "-c",
                      "hostname > /www/index.html && exec httpd -f -p 8080 -h /www")

    # --- 1. start to traffic --------------------------------------------------------------

    def start_to_traffic(self, stack: Stack, n: int) -> list[float]:
        assert self.events is not None
        samples: list[float] = []
        for i in range(n):
            name = self.name()
            first: list[tuple[float, str]] = []
            done = threading.Event()

            def poll(first: list[tuple[float, str]] = first, done: threading.Event = done) -> None:
                deadline = time.monotonic() + 15
                while not done.is_set() and time.monotonic() < deadline:
                    try:
                        code, body = request(stack.port)
                    except OSError:
                        continue
                    if code == 200:
                        first.append((time.time(), body))
                        return

            poller = threading.Thread(target=poll)
            poller.start()
            cid = self.start(name)
            poller.join(20)
            done.set()
            started = self.events.time_of(name, "start", timeout=5)
            if first and started is not None and first[0][1] == cid[:12]:
                samples.append(first[0][0] - started)
            else:
                say(f"{stack.label}: container {i + 1} never served ({first!r})")
            docker("rm", "-f", "-v", name, check=False)
            wait_until(lambda: request(stack.port)[0] == 503, timeout=15, ignore=(OSError,))
        return samples

    # --- 2. a deploy ----------------------------------------------------------------------

    def deploy(self, stack: Stack, n: int) -> tuple[float, float, float | None]:
        """(reloads, runtime-API updates, seconds until all serve) for n containers."""
        reloads0 = stack.metric("registrar_haproxy_reloads_total")
        runtime0 = stack.metric("registrar_haproxy_runtime_updates_total")
        names = [self.name() for _ in range(n)]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self.start, names))
        try:
            wait_until(lambda: stack.servers() == n, timeout=60)
            took: float | None = time.monotonic() - started
        except AssertionError:
            took = None
        time.sleep(1.5)  # anything still pending is applied by now
        reloads = stack.metric("registrar_haproxy_reloads_total") - reloads0
        runtime = stack.metric("registrar_haproxy_runtime_updates_total") - runtime0
        for start in range(0, len(names), 50):
            docker("rm", "-f", "-v", *names[start : start + 50], check=False, timeout=300)
        wait_until(lambda: stack.servers() == 0, timeout=30)
        return reloads, runtime, took

    # --- 3. rolling replace under load ----------------------------------------------------

    def rolling_replace(self, stack: Stack, n: int) -> tuple[int, int]:
        """(failed requests, all requests) while n instances are replaced one by one."""
        old = [self.name() for _ in range(n)]
        for name in old:
            self.start(name)
        wait_until(lambda: stack.servers() == n, timeout=30)
        done = threading.Event()
        counts = {"ok": 0, "failed": 0}
        errors: list[str] = []

        def load() -> None:
            while not done.is_set():
                try:
                    code, _body = request(stack.port)
                except OSError as exc:
                    code, _body = 0, repr(exc)
                if code == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    errors.append(f"{code} {_body[:80]}")

        client = threading.Thread(target=load)
        client.start()
        new: list[str] = []
        try:
            time.sleep(0.5)
            for name in old:
                fresh = self.name()
                new.append(fresh)
                self.start(fresh)
                wait_until(lambda: stack.servers() == n + 1, timeout=30)
                docker("stop", "-t", "2", name, timeout=60)
                wait_until(lambda: stack.servers() == n, timeout=30)
            time.sleep(0.5)
        finally:
            done.set()
            client.join(10)
            docker("rm", "-f", "-v", *old, *new, check=False, timeout=120)
        if errors:
            say(f"{stack.label}: failed requests during the rolling replace: {errors[:5]}")
        return counts["failed"], counts["ok"] + counts["failed"]

    # --- all of it ------------------------------------------------------------------------

    def run(self) -> list[Row]:
        latency_n, deploy_n, replace_n = (6, 8, 2) if self.quick else (20, 20, 4)
        rows: list[Row] = []
        self.image = ensure_busybox_image()
        self.events = DockerEvents()
        try:
            for template in (False, True):
                stack = Stack(self.work, self.run_id, template)
                try:
                    say(f"{stack.label}: start to traffic, {latency_n} containers")
                    samples = self.start_to_traffic(stack, latency_n)
                    p50 = statistics.median(samples) if samples else None
                    rows.append(Row(
                        f"start to traffic p50 ({stack.label})",
                        None if p50 is None else round(p50 * 1000, 1), "ms",
                        f"<= {TARGET_P50 * 1000:.0f} ms",
                        None if p50 is None else p50 <= TARGET_P50,
                        f"Docker start event to the first response it served through HAProxy; "
                        f"{len(samples)}/{latency_n} samples, p95 "
                        f"{(p95(samples) or 0) * 1000:.0f} ms, min "
                        f"{min(samples, default=0) * 1000:.0f} ms",
                    ))
                    say(f"{stack.label}: deploy of {deploy_n} containers")
                    reloads, runtime, took = self.deploy(stack, deploy_n)
                    rows.append(Row(
                        f"reloads for a deploy of {deploy_n} ({stack.label})", reloads, "count",
                        "" if template else "0", None if template else reloads == 0,
                        f"{deploy_n} `docker run -d`, 4 at a time; {runtime:.0f} runtime-API "
                        f"updates; all serving after "
                        f"{'-' if took is None else f'{took:.1f} s'}",
                    ))
                    say(f"{stack.label}: rolling replace of {replace_n} under load")
                    failed, total = self.rolling_replace(stack, replace_n)
                    rows.append(Row(
                        f"failed requests, rolling replace ({stack.label})", failed, "requests",
                        "0", failed == 0,
                        f"{replace_n} instances replaced one by one (`docker stop -t 2`) under "
                        f"a client without pause: {failed} of {total} requests failed",
                    ))
                finally:
                    stack.close()
        finally:
            self.events.close()
            with contextlib.suppress(Exception):
                remove_prefixed(self.run_id)
        return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """The routing measurements as dicts (metric, value, unit, target, met, detail)."""
    work = Path(tempfile.mkdtemp(prefix="rgbench-hx-"))
    say(f"logs in {work}")
    return [asdict(row) for row in Bench(quick, work).run()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.haproxy_bench")
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke run")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(row["met"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
