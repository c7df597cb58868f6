"""`make bench`, the routing part: `registrar haproxy` with a real HAProxy, fed by a real
`registrar watch` agent on a private etcd, busybox httpd containers on the real Docker engine.

    .venv/bin/python -m bench.haproxy_bench [--quick] [--out PATH]

Alone, it prints its section and (without --quick) puts it in bench/results.md in place of the
old one; `make bench` (bench/run.py) does the same with every part.

`run(quick) -> list[dict]`, one dict per measurement (see `Row`):
  metric    what was measured, e.g. "start to traffic p50 (runtime API)"
  value     a number (None when it could not be measured)
  unit      "ms", "s", "count", "requests" or "%"
  target    the goal as text ("<= 25 ms", "0"), "" when there is none
  met       True / False against the target, None without one
  detail    one line: samples, spread, how it was measured
  baseline  the same figure before (a number, None when there is none) and `baseline_note`:
            where it comes from (or, without a number, what it was)

Measurements, the first three for the built-in template (changes of servers go through HAProxy's
runtime API) and for a `--template` copy of it (every change is a reload, SIGUSR2 to the master),
the others for the built-in template only:
1. start to traffic: `docker run -d` one container into an empty backend; Docker's `start`
   event time to the first response through HAProxy that this container served (a client polls
   HAProxy without pause); the container is removed and the backend empty again before the
   next one. Median and p95 over N (20; 6 with --quick).
2. deploy of 20 containers (8 with --quick), started 4 at a time: the reloads it took
   (`registrar_haproxy_reloads_total`), the runtime-API updates, and the time until all serve.
3. rolling replace under load: 4 instances (2 with --quick) replaced one by one (start the new
   one, wait until it is in rotation, `docker stop -t 2` the old one) while a client sends
   requests without pause; failed requests / total.
4. a frozen server under 4 concurrent clients (2 s timeout each): `kill -STOP` of its host pid
   (its key stands); failed requests, time until HAProxy's `show servers state` says it is down
   (op_state 0), and after SIGCONT the time until it serves a client again.
5. a refusing server: httpd killed inside a container whose PID 1 (a shell) stays, so nothing
   tells the agent; failed requests and time until it is down.
6. weights: `{control_prefix}/weights/{SERVICE}` = {"version": "v2", "percent": P, ...} with 1
   and 3 instances a side; v2's share of 1,000 requests (300 with --quick) at P = 10 and 50, and
   the split once the key is deleted.
7. traffic by version: the router's report `{control_prefix}/routers/{NODE}` against what a
   client counted by version, before and after a reload from outside (SIGUSR2 to HAProxy's master
   pid, the one the router logged as "master pid N"); after it, the old version's instances are
   removed and the time until they are out of rotation measured.
Every container is named `rgbench-hx-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.observe import DockerEvents, rss_kib
from bench.report import part_main, ratio
from registrar.core.control import Canary
from registrar.haproxy.config import Server, builtin_template_text, server_weights
from registrar.haproxy.process import cli, socket_paths
from tests.helpers import scrape
from tests.support.docker_env import docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

SERVICE = "rgbench-hx"
PREFIX = "/services"
CONTROL = "/rgbench-ctl"
TARGET_P50 = 0.025  # issue 14: Docker start -> first request served, p50 <= 25 ms
HEADING = "## Routing: `registrar haproxy` (bench/haproxy_bench.py)"
# bench/results.md at commit 10fb7a8, before the router changes of issue 14
BEFORE = "commit 10fb7a8"
SERVE = "hostname > /www/index.html && exec httpd -f -p 8080 -h /www"
# httpd in the background, PID 1 a shell: killing httpd leaves the container (and its key) up
SERVE_BEHIND_SHELL = "hostname > /www/index.html && httpd -p 8080 -h /www && exec sleep 1d"


@dataclass
class Row:
    metric: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    detail: str = ""
    baseline: float | None = None
    baseline_note: str = ""


def say(message: str) -> None:
    print(f"bench haproxy: {message}", file=sys.stderr, flush=True)


def p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def request(port: int, timeout: float = 2.0, path: str = "/") -> tuple[int, str]:
    """One GET through HAProxy on a new connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    finally:
        conn.close()


# --- clients, HAProxy's server state, the results table (also used by the other parts) ---


@dataclass(frozen=True)
class Sample:
    start: float  # wall clock (time.time()), as etcd watches and Docker events are
    end: float
    status: int  # 0: no HTTP answer
    body: str  # the body, or the error


class Clients:
    """`per_port` clients on each port at once (a request hung on a frozen server holds up only
    its own client), each giving up after `timeout`, one new connection per request, a pause of
    `pause` between two: every request as a `Sample`. Bounded in time, stops by itself."""

    def __init__(self, ports: Sequence[int], per_port: int = 4, timeout: float = 2.0,
                 path: str = "/", pause: float = 0.005, seconds: float = 300.0) -> None:
        self.timeout, self.path, self.pause, self.seconds = timeout, path, pause, seconds
        self.samples: list[Sample] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True)
                         for p in ports for _ in range(per_port)]

    def _run(self, port: int) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._done.is_set() and time.monotonic() < deadline:
            started = time.time()
            try:
                code, body = request(port, self.timeout, self.path)
            except Exception as exc:
                code, body = 0, type(exc).__name__
            self.samples.append(Sample(started, time.time(), code, body))
            time.sleep(self.pause)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(10)

    def since(self, at: float) -> list[Sample]:
        """The requests that ended at `at` or later."""
        return [s for s in list(self.samples) if s.end >= at]


def server_rows(stats_socket: str) -> dict[str, list[str]]:
    """`show servers state` of the running worker, by server name. Fields as HAProxy 2.6 gives
    them: 3 name, 5 op_state (0 down, 2 up), 6 admin_state, 7 user weight, 18 port."""
    rows = {}
    for line in cli(stats_socket, "show servers state").splitlines():
        fields = line.split()
        if len(fields) > 18 and fields[0].isdigit():
            rows[fields[3]] = fields
    return rows


def slot_for(stats_socket: str, port: int) -> str:
    """The server slot of the backend that routes to this (published) port."""
    def find() -> str | None:
        return next((name for name, f in server_rows(stats_socket).items()
                     if f[18] == str(port) and f[6] in ("0", "4")), None)

    return wait_until(find, timeout=10, message=f"no server slot for port {port}")


def published_port(cid: str) -> int:
    out = docker("port", cid, "8080/tcp").splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def host_pid(cid: str) -> int:
    return int(docker("inspect", "--format", "{{.State.Pid}}", cid))


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The markdown table of a part: the value beside the one before (and their ratio)."""
    out = ["| metric | value | before | ratio | target | | how |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        unit = row["unit"]
        value = "-" if row["value"] is None else f"**{row['value']:g}** {unit}"
        before = "" if row.get("baseline") is None else f"{row['baseline']:g} {unit}"
        note = row.get("baseline_note", "")
        if note:
            before = f"{before} ({note})" if before else note
        rate = ""
        if row["value"] is not None and row.get("baseline") is not None:
            rate = ratio(row["value"], row["baseline"])
        met = {True: "met", False: "**missed**", None: ""}[row["met"]]
        out.append(f"| {row['metric']} | {value} | {before} | {rate} | {row['target']} | {met} "
                   f"| {row['detail']} |")
    return out


def section(rows: Sequence[Mapping[str, Any]]) -> str:
    out = [HEADING, ""]
    out.append(
        "A private etcd, one `registrar watch` agent (`--host-ip 127.0.0.1 --explicit`), one "
        "`registrar haproxy` in http mode (Debian's HAProxy 2.6, master-worker) with "
        f"`--control-prefix {CONTROL}`; busybox httpd containers publishing 8080 on 127.0.0.1; "
        "every request a new connection (`Connection: close`). Before: the same bench at "
        f"{BEFORE} (bench/results.md then), or what issue 14 measured from outside."
    )
    out.append("")
    out.extend(table(rows))
    out.append("")
    return "\n".join(out)


# --- the stack ----------------------------------------------------------------------------


class Stack:
    """A private etcd, the host agent and one `registrar haproxy` in http mode."""

    def __init__(self, work: Path, run_id: str, template: bool) -> None:
        self.work = work
        self.run_id = run_id
        self.label = "reload (--template)" if template else "runtime API"
        tag = "template" if template else "builtin"
        self.etcd = EtcdServer(work / f"etcd-{tag}", name=f"hx-{tag}").start()
        self.reader = EtcdReader(self.etcd.url)
        self.port = free_port()
        self.metrics_port = free_port(exclude=[self.port])
        self.node = f"hx-{tag}"
        self.router_node = f"hx-router-{tag}"
        self.config = work / f"haproxy-{tag}.cfg"
        self.stats_socket = socket_paths(str(work), str(self.config))[1]
        common = ["--etcd", self.etcd.url, "--prefix", PREFIX, "--control-prefix", CONTROL,
                  "--log-format", "json"]
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
             "--node", self.router_node, "--config", str(self.config),
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

    def rows(self) -> dict[str, list[str]]:
        return server_rows(self.stats_socket)

    def master_pid(self) -> int:
        """The master pid the router logged last ("haproxy started (master pid N, ...)")."""
        return int(re.findall(r"master pid (\d+)", self.router.logs())[-1])

    def report(self) -> dict[str, Any]:
        raw = self.reader.get(f"{CONTROL}/routers/{self.router_node}")
        value: dict[str, Any] = json.loads(raw) if raw else {}
        return value

    def close(self) -> None:
        for proc in (self.router, self.agent):
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
        self.reader.close()
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
        self.versioned: dict[str, str] = {}  # the weights rows' containers: short id -> version
        self.versioned_cids: list[str] = []

    def name(self) -> str:
        self._n += 1
        return f"{self.run_id}-{self._n}"

    def start(self, name: str, version: str | None = None, command: str = SERVE) -> str:
        labels = ["--label", f"registrar.service={SERVICE}"]
        if version is not None:
            labels += ["--label", f"registrar.version={version}"]
        return docker("run", "-d", "--name", name, *labels, "-p", "127.0.0.1::8080",
                      self.image, "sh", "-c", command)

    def serving(self, stack: Stack, cids: Sequence[str], timeout: float = 15) -> None:
        """Waits until exactly these containers answer through HAProxy."""
        want = {c[:12] for c in cids}

        got: set[str] = set()

        def seen() -> bool:
            got.clear()
            for _ in range(4 * len(want) + 4):
                with contextlib.suppress(OSError):
                    got.add(request(stack.port)[1][:40])
            return got == want

        try:
            wait_until(seen, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"never served by exactly {sorted(want)} in {timeout} s "
                                 f"(last seen: {sorted(got)})") from None

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

    # --- 4. a frozen server ---------------------------------------------------------------

    def frozen(self, stack: Stack) -> tuple[int, int, float | None, float | None, list[str]]:
        """(failed, requests, seconds until down, seconds from SIGCONT to serving again,
        errors) for one server frozen under 4 clients."""
        healthy, frozen = self.start(self.name()), self.start(self.name())
        try:
            self.serving(stack, [healthy, frozen])
            slot = slot_for(stack.stats_socket, published_port(frozen))
            pid = host_pid(frozen)
            out_after: float | None = None
            back_after: float | None = None
            with Clients([stack.port], per_port=4, timeout=2.0) as clients:
                time.sleep(1.0)
                froze = time.time()
                os.kill(pid, signal.SIGSTOP)  # its key stands: only HAProxy can tell
                try:
                    with contextlib.suppress(AssertionError):
                        wait_until(lambda: stack.rows()[slot][5] == "0", timeout=10,
                                   interval=0.02)
                        out_after = time.time() - froze
                    time.sleep(2.5)  # every client's hung request has given up by now
                finally:
                    os.kill(pid, signal.SIGCONT)
                thawed = time.time()
                with contextlib.suppress(AssertionError):
                    first = wait_until(lambda: next(
                        (s.end for s in clients.since(thawed) if s.body == frozen[:12]), None),
                        timeout=10, interval=0.02)
                    back_after = first - thawed
                time.sleep(0.2)
            after = clients.since(froze)
            failed = [s for s in after if s.status != 200]
            return (len(failed), len(after), out_after, back_after,
                    sorted({f"{s.status} {s.body}" for s in failed}))
        finally:
            docker("rm", "-f", "-v", healthy, frozen, check=False)
            wait_until(lambda: stack.servers() == 0, timeout=30)

    # --- 5. a server refusing connections -------------------------------------------------

    def refusing(self, stack: Stack) -> tuple[int, int, float | None, bool]:
        """(failed, requests, seconds until down, its key still stood) for one server whose
        httpd is killed behind the container's back, under 4 clients."""
        staying = self.start(self.name())
        refusing = self.start(self.name(), command=SERVE_BEHIND_SHELL)
        try:
            self.serving(stack, [staying, refusing])
            slot = slot_for(stack.stats_socket, published_port(refusing))
            top = docker("top", refusing, "-o", "pid,comm")
            httpd = [int(line.split()[0]) for line in top.splitlines()[1:]
                     if line.split()[1] == "httpd"]
            out_after: float | None = None
            with Clients([stack.port], per_port=4, timeout=2.0) as clients:
                time.sleep(1.0)
                killed = time.time()
                for pid in httpd:
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: stack.rows()[slot][5] == "0", timeout=10, interval=0.02)
                    out_after = time.time() - killed
                time.sleep(1.0)
            key_stood = bool(self.keys_of(stack, refusing))
            after = clients.since(killed)
            failed = [s for s in after if s.status != 200]
            return len(failed), len(after), out_after, key_stood
        finally:
            docker("rm", "-f", "-v", staying, refusing, check=False)
            wait_until(lambda: stack.servers() == 0, timeout=30)

    def keys_of(self, stack: Stack, cid: str) -> list[str]:
        name = docker("inspect", "--format", "{{.Name}}", cid).lstrip("/")
        return [k for k in stack.reader.keys(f"{PREFIX}/{SERVICE}/") if name in k]

    # --- 6. weights -----------------------------------------------------------------------

    def weights(self, stack: Stack, each_side: int, n: int) -> tuple[dict[int, float], float]:
        """(v2's share by percent, v2's share after the key was deleted), each over n requests,
        with `each_side` instances of v1 and of v2; the containers are left running."""
        old = [self.start(self.name(), "v1") for _ in range(each_side)]
        new = [self.start(self.name(), "v2") for _ in range(each_side)]
        self.serving(stack, [*old, *new])
        self.versioned = {c[:12]: "v1" for c in old} | {c[:12]: "v2" for c in new}
        self.versioned_cids = [*old, *new]
        slots = {slot_for(stack.stats_socket, published_port(c)) for c in new}
        new_hosts = {c[:12] for c in new}

        def share() -> float:
            seen: Counter[str] = Counter()
            for _ in range(n):
                with contextlib.suppress(OSError):
                    seen[request(stack.port)[1]] += 1
            return sum(v for body, v in seen.items() if body in new_hosts) / max(
                1, sum(seen.values()))

        shares = {}
        key = f"{CONTROL}/weights/{SERVICE}"
        for percent in (10, 50):
            stack.reader.put(key, {"version": "v2", "percent": percent,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            model = [Server(f"o{i}", "127.0.0.1", i, f"o{i}", "v1") for i in range(each_side)]
            model += [Server(f"n{i}", "127.0.0.1", i, f"n{i}", "v2") for i in range(each_side)]
            want = str(server_weights(model, Canary("v2", percent))["n0"])
            wait_until(lambda w=want: {stack.rows()[s][7] for s in slots} == {w},  # type: ignore[misc]
                       timeout=10, message="the weights never reached HAProxy")
            shares[percent] = share()
            say(f"weights, {each_side} a side: {percent} % -> v2 got {shares[percent]:.1%}")
        stack.reader.delete(key)
        wait_until(lambda: {stack.rows()[s][7] for s in slots} == {"100"}, timeout=10)
        even = share()
        say(f"weights, {each_side} a side: key deleted -> v2 got {even:.1%}")
        return shares, even

    # --- 7. traffic by version, and a reload from outside ---------------------------------

    def settled_report(self, stack: Stack) -> dict[str, dict[str, int]]:
        """The router's report once a newer one repeats the same counts (every 2 s)."""
        def counts() -> tuple[str, dict[str, dict[str, int]]]:
            report = stack.report()
            service: dict[str, dict[str, int]] = report.get("services", {}).get(SERVICE, {})
            return str(report.get("at", "")), service

        at, last = counts()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now_at, now = counts()
            if now_at != at:
                if now == last:
                    return now
                at, last = now_at, now
        return last

    def by_version(self, stack: Stack, n: int) -> tuple[Counter[str], dict[str, int], float]:
        """Sends n requests; (what the client counted by version, what the router reported
        for them, seconds after the last request until the report matched within 5 %, or the
        time it was given)."""
        base = self.settled_report(stack)
        sent: Counter[str] = Counter()
        for _ in range(n):
            with contextlib.suppress(OSError):
                code, body = request(stack.port)
                if code == 200:
                    sent[self.versioned.get(body, "?")] += 1
        ended = time.monotonic()

        def reported() -> dict[str, int]:
            now = stack.report().get("services", {}).get(SERVICE, {})
            return {v: int(now.get(v, {}).get("2xx", 0)) - int(base.get(v, {}).get("2xx", 0))
                    for v in ("v1", "v2")}

        got = reported()
        while time.monotonic() - ended < 8:
            got = reported()
            if all(abs(got[v] - sent[v]) <= 0.05 * sent[v] for v in ("v1", "v2")):
                break
            time.sleep(0.1)
        return sent, got, time.monotonic() - ended

    def outside_reload(self, stack: Stack) -> tuple[int, float | None]:
        """SIGUSR2 to HAProxy's master, as `systemctl reload haproxy` would; (the master pid,
        seconds until the router logged that it noticed)."""
        master = stack.master_pid()
        before = stack.router.logs().count("reloaded from outside")
        sent = time.monotonic()
        os.kill(master, signal.SIGUSR2)
        try:
            wait_until(lambda: stack.router.logs().count("reloaded from outside") > before,
                       timeout=10, interval=0.02)
        except AssertionError:
            return master, None
        return master, time.monotonic() - sent

    # --- all of it ------------------------------------------------------------------------

    def run(self) -> list[Row]:
        latency_n, deploy_n, replace_n = (6, 8, 2) if self.quick else (20, 20, 4)
        fault_n = 1 if self.quick else 3
        share_n, version_n = (300, 200) if self.quick else (1000, 600)
        rows: list[Row] = []
        self.image = ensure_busybox_image()
        self.events = DockerEvents()
        try:
            for template in (False, True):
                stack = Stack(self.work, self.run_id, template)
                try:
                    rows += self.common_rows(stack, latency_n, deploy_n, replace_n)
                    if not template:
                        rows += self.fault_rows(stack, fault_n)
                        rows += self.weight_rows(stack, share_n)
                        rows += self.version_rows(stack, version_n)
                finally:
                    stack.close()
        finally:
            self.events.close()
            with contextlib.suppress(Exception):
                remove_prefixed(self.run_id)
        return rows

    def common_rows(self, stack: Stack, latency_n: int, deploy_n: int,
                    replace_n: int) -> list[Row]:
        template = stack.label != "runtime API"
        rows = []
        say(f"{stack.label}: start to traffic, {latency_n} containers")
        samples = self.start_to_traffic(stack, latency_n)
        p50 = med(samples)
        say(f"{stack.label}: start to traffic p50 {(p50 or 0) * 1000:.1f} ms")
        rows.append(Row(
            f"start to traffic p50 ({stack.label})", rounded(None if p50 is None else p50 * 1000),
            "ms", "" if template else f"<= {TARGET_P50 * 1000:.0f} ms",
            None if template else le(p50, TARGET_P50),
            f"Docker start event to the first response it served through HAProxy; "
            f"{len(samples)}/{latency_n} samples, p95 {(p95(samples) or 0) * 1000:.0f} ms, "
            f"min {min(samples, default=0) * 1000:.0f} ms"
            + ("; every change is a reload, gathered by the SPEC (100 ms quiet, 1 s at most)"
               if template else "; the server goes in through the runtime API at once"),
            baseline=197.9 if template else 110.4,
            baseline_note=BEFORE if template else f"{BEFORE}; issue 14: 110, from outside "
            "112-118",
        ))
        say(f"{stack.label}: deploy of {deploy_n} containers")
        reloads, runtime, took = self.deploy(stack, deploy_n)
        rows.append(Row(
            f"reloads for a deploy of {deploy_n} ({stack.label})", reloads, "count",
            "<= 2 (issue 14)" if template else "0",
            reloads <= 2 if template else reloads == 0,
            f"{deploy_n} `docker run -d`, 4 at a time; {runtime:.0f} runtime-API updates; all "
            f"serving after {'-' if took is None else f'{took:.1f} s'}"
            + ("; with --template every change is a reload and the SPEC's gathering (100 ms "
               "quiet, 1 s at most) makes a deploy spread over ~4 s several reloads"
               if template else ""),
            baseline=9 if template else 0, baseline_note=BEFORE,
        ))
        say(f"{stack.label}: rolling replace of {replace_n} under load")
        failed, total = self.rolling_replace(stack, replace_n)
        rows.append(Row(
            f"failed requests, rolling replace ({stack.label})", failed, "requests", "0",
            failed == 0,
            f"{replace_n} instances replaced one by one (`docker stop -t 2`) under a client "
            f"without pause: {failed} of {total} requests failed",
            baseline=0, baseline_note=BEFORE,
        ))
        if not template:
            rss = rss_kib(stack.router.pid) / 1024
            rows.append(Row(
                "RSS of `registrar haproxy` (its own process)", rounded(rss), "MiB",
                "<= 25 MiB (issue 21)", le(rss, 25.0),
                f"VmRSS of the router's process after the deploy of {deploy_n} and the rolling "
                "replace (HAProxy's processes apart)",
                baseline=29.5, baseline_note="issue 21's probe before prometheus-client, "
                "`http.server` and libcrypto's hashes left",
            ))
        return rows

    def fault_rows(self, stack: Stack, n: int) -> list[Row]:
        rows = []
        runs = []
        for i in range(n):
            say(f"frozen server under 4 clients, {i + 1}/{n}")
            runs.append(self.frozen(stack))
            failed, total, out, back, errors = runs[-1]
            say(f"  {failed} failed of {total}; down after {out}; serving {back} after SIGCONT"
                + (f"; {errors}" if errors else ""))
        failed_n = [r[0] for r in runs]
        outs = [r[2] for r in runs if r[2] is not None]
        backs = [r[3] for r in runs if r[3] is not None]
        errors = sorted({e for r in runs for e in r[4]})
        how = (f"{n} run(s): 2 httpd instances, 4 clients (2 s timeout each) without pause, "
               f"`kill -STOP` of one's host pid (its key stands), SIGCONT after it is down + "
               f"2.5 s; requests that ended from the freeze on, by run: "
               f"{', '.join(f'{r[0]} of {r[1]}' for r in runs)}"
               + (f" ({', '.join(errors)})" if errors else ""))
        rows.append(Row(
            "frozen server: failed requests, median of runs", med(failed_n), "requests",
            "0 (issue 14)", le(med(failed_n), 0), how,
            baseline_note="issue 14, from outside: 8-12 of ~20-30 in 6 s (no server checks)",
        ))
        rows.append(Row(
            "frozen server: `kill -STOP` → down in HAProxy, median", rounded(med(outs), 2), "s",
            "<= 2 s", le(med(outs), 2.0),
            f"`show servers state` op_state 0 on the stats socket, polled every 20 ms; by run: "
            f"{', '.join(f'{x:.2f}' for x in outs) or '-'} s",
            baseline_note="never (its key stands)",
        ))
        rows.append(Row(
            "frozen server: SIGCONT → serving a client again, median", rounded(med(backs), 2),
            "s", "<= 2 s", le(med(backs), 2.0),
            f"the first response it served after SIGCONT; by run: "
            f"{', '.join(f'{x:.2f}' for x in backs) or '-'} s",
        ))
        runs2 = []
        for i in range(n):
            say(f"refusing server under 4 clients, {i + 1}/{n}")
            runs2.append(self.refusing(stack))
            failed, total, out, stood = runs2[-1]
            say(f"  {failed} failed of {total}; down after {out}; key stood: {stood}")
        failed_n = [r[0] for r in runs2]
        outs = [r[2] for r in runs2 if r[2] is not None]
        rows.append(Row(
            "refusing server: failed requests, median of runs", med(failed_n), "requests",
            "0 (issue 14)", le(med(failed_n), 0),
            f"{n} run(s): httpd killed inside a container whose PID 1 (a shell) stays, its key "
            f"standing ({sum(r[3] for r in runs2)}/{n} runs checked it still stood after); 4 "
            f"clients; by run: {', '.join(f'{r[0]} of {r[1]}' for r in runs2)}",
        ))
        rows.append(Row(
            "refusing server: kill → down in HAProxy, median", rounded(med(outs), 2), "s",
            "<= 2 s", le(med(outs), 2.0),
            f"`show servers state` op_state 0; by run: {', '.join(f'{x:.2f}' for x in outs)} s",
            baseline_note="never (its key stands)",
        ))
        return rows

    def weight_rows(self, stack: Stack, n: int) -> list[Row]:
        rows = []
        for each_side in (1, 3):
            say(f"weights with {each_side} instance(s) a side, {n} requests a share")
            shares, even = self.weights(stack, each_side, n)
            for percent, got in shares.items():
                rows.append(Row(
                    f"weights, {each_side} a side: v2's share at P = {percent}",
                    round(got * 100, 1), "%", f"{percent} ± 5", abs(got * 100 - percent) <= 5,
                    f"`{CONTROL}/weights/{SERVICE}` = {{\"version\": \"v2\", \"percent\": "
                    f"{percent}}}; {n} requests once HAProxy's weights were set (runtime API)",
                ))
            rows.append(Row(
                f"weights, {each_side} a side: v2's share once the key is deleted",
                round(even * 100, 1), "%", "50 ± 5", abs(even * 100 - 50) <= 5,
                f"{n} requests once every weight was back to 100",
            ))
            if each_side == 1:
                docker("rm", "-f", "-v", *self.versioned_cids, check=False)
                wait_until(lambda: stack.servers() == 0, timeout=30)
        reloads = stack.metric("registrar_haproxy_reloads_total")
        rows[-1].detail += f"; reloads so far on this router: {reloads:.0f}"
        return rows

    def version_rows(self, stack: Stack, n: int) -> list[Row]:
        """With the 3 + 3 instances of the weights rows still running."""
        rows = []
        say(f"traffic by version: {n} requests, the report against the client's count")
        before = self.by_version(stack, n)
        say(f"  client {dict(before[0])}, report {before[1]}")
        master, noticed = self.outside_reload(stack)
        say(f"reload from outside: SIGUSR2 to master pid {master}; noticed after {noticed}")
        time.sleep(0.5)
        after = self.by_version(stack, n)
        say(f"  client {dict(after[0])}, report {after[1]}")
        for label, (sent, got, waited) in (("before", before), ("after", after)):
            off = max((abs(got[v] - sent[v]) / max(1, sent[v]) * 100 for v in ("v1", "v2")),
                      default=0.0)
            extra = ""
            if label == "after":
                extra = (f"; SIGUSR2 to the master pid it logged ({master}): the router logged "
                         f"\"reloaded from outside\" after "
                         f"{'-' if noticed is None else f'{noticed:.2f} s'}")
            rows.append(Row(
                f"traffic by version, report vs client, {label} a reload from outside "
                "(largest gap)", round(off, 1), "%", "<= 5", off <= 5,
                f"{sum(sent.values())} requests over 3 + 3 instances: client v1 {sent['v1']}, "
                f"v2 {sent['v2']}; `{CONTROL}/routers/{stack.router_node}` 2xx delta v1 "
                f"{got['v1']}, v2 {got['v2']} ({waited:.1f} s after the last request){extra}",
            ))
        # the router's view after that reload: the old version leaving takes it out of rotation
        old = [c for c in self.versioned_cids if self.versioned[c[:12]] == "v1"]
        removed = time.monotonic()
        docker("rm", "-f", "-v", *old, check=False)
        left: float | None = None
        with contextlib.suppress(AssertionError):
            new = [c for c in self.versioned_cids if c not in old]
            self.serving(stack, new)
            left = time.monotonic() - removed
        rows[-1].detail += (f"; then `docker rm -f` of the 3 v1 instances: only v2 served after "
                            f"{'-' if left is None else f'{left:.2f} s'}")
        docker("rm", "-f", "-v", *self.versioned_cids, check=False)
        wait_until(lambda: stack.servers() == 0, timeout=30)
        return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """The routing measurements as dicts (metric, value, unit, target, met, detail, baseline,
    baseline_note)."""
    work = Path(tempfile.mkdtemp(prefix="rgbench-hx-"))
    say(f"logs in {work}")
    return [asdict(row) for row in Bench(quick, work).run()]


def main(argv: Sequence[str] | None = None) -> int:
    return part_main(argv, "python -m bench.haproxy_bench",
                     "fewer samples, for a smoke run (writes nothing)", HEADING,
                     lambda quick: section(run(quick)))


if __name__ == "__main__":
    sys.exit(main())
