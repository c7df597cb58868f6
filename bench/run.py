"""`make bench`: registrar's host agent and sidecar against the classic shell sidekick, on the
real Docker engine and private etcd servers. Prints a table and writes it to bench/results.md.

    .venv/bin/python -m bench [--quick] [--max-n N] [--out PATH] [--only PART]

Phases, each subject on its own private etcd so that revisions and request counts are its own:
1. latency: `docker run -d` containers one at a time (each subject attached right after `docker
   run -d` returns, the moment an ExecStartPost= runs); registration = the key's first PUT in an
   etcd watch minus Docker's `start` event time;
2. steady state: the same containers for a while, no Docker activity: revision delta, requests,
   CPU and RSS;
3. deregistration: `docker stop -t 5` issued for each container (staggered) to the key's DELETE
   in the watch;
4. convergence: a subject started on a host that already runs N containers: time from process
   start to every key visible, and the etcd requests it took;
5. the parts of bench/parts.py, each its own section: routing (bench/haproxy_bench.py), health
   checks (bench/checks_bench.py), canary (bench/canary_bench.py), the seed's cluster
   (bench/cluster_bench.py), past the seed (bench/scale_bench.py: 100 to 1,000 simulated
   hosts). `--only NAME` runs one phase or part.
Every container is named `rgbench-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.observe import (
    DockerEvents,
    EtcdCounters,
    Footprint,
    KeyLog,
    cpu_seconds,
    etcd_counters,
    footprint,
    mean_of,
    registrar_etcd_requests,
    rss_kib,
    tree_rss_kib,
)
from bench.parts import PARTS, add_section, section_of, write_section
from bench.report import Row, median, ms, num, p95
from bench.subjects import (
    SERVICE,
    RegisterSidecars,
    ShellSidekicks,
    Subject,
    WatchAgent,
    key_for,
)
from tests.support.docker_env import DOCKER, docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.proc import RegistrarProcess

RESULTS = Path(__file__).with_name("results.md")
WARM_IMPORTS = (
    "import registrar.cli, registrar.settings, registrar.logs, registrar.agent.command, "
    "registrar.adapters.etcd_store"
)
PREFIX = "/services"


@dataclass(frozen=True)
class Plan:
    latency_n: int  # containers per subject for the latency phases (>= 20 in a full run)
    steady_watch: float  # seconds of steady state watched (agent: also its idle CPU window)
    steady_other: float
    conv_ns: tuple[int, ...]  # convergence of the host agent at these N
    conv_per_container_ns: tuple[int, ...]  # ... and of N sidecars / sidekicks started at once
    conv_repeats: int
    published_max: int  # convergence containers beyond this many use the host's network
    ttl: int = 15
    stop_timeout: int = 5
    stop_gap: float = 0.25  # between two `docker stop`s: each takes the whole stop timeout
    start_gap: float = 0.1
    start_workers: int = 4


FULL = Plan(20, 60.0, 30.0, (10, 100, 300), (10, 100), 3, 100)
QUICK = Plan(6, 10.0, 10.0, (5, 20, 40), (5, 20), 2, 20)


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- results -----------------------------------------------------------------------------


@dataclass
class LatencyResult:
    label: str
    n: int = 0
    registration: list[float] = field(default_factory=list)
    run_returned: list[float] = field(default_factory=list)  # `docker run -d` back, after start
    startup: list[float] = field(default_factory=list)  # process spawned -> its start log line
    deregistration: list[float] = field(default_factory=list)
    kill_to_delete: list[float] = field(default_factory=list)
    not_registered: list[str] = field(default_factory=list)
    not_deregistered: list[str] = field(default_factory=list)
    window: float = 0.0
    steady: EtcdCounters | None = None
    foreign_revisions: int = 0  # writes in the window for containers the bench did not start
    cpu_seconds: float = 0.0
    rss_kib: int = 0  # all processes of the subject, N containers registered
    agent_latency: float | None = None  # the agent's own mean: event time to etcd ack
    rss0_kib: int | None = None  # the host agent with no container of the bench
    exit_codes: list[int | None] = field(default_factory=list)
    footprints: list[Footprint] = field(default_factory=list)  # one per registering process

    @property
    def writes_per_min(self) -> float | None:
        if self.steady is None or not self.window:
            return None
        return (self.steady.revision - self.foreign_revisions) * 60 / self.window

    @property
    def requests_per_min(self) -> float | None:
        if self.steady is None or not self.window:
            return None
        return (self.steady.total - self.foreign_revisions) * 60 / self.window

    @property
    def cpu_per_hour(self) -> float | None:
        return self.cpu_seconds * 3600 / self.window if self.window else None


@dataclass
class ConvergenceRun:
    seconds: float | None  # process start -> last key visible
    requests: int  # etcd requests the server handled meanwhile (the bench's watch excluded)
    by_method: dict[str, int]
    own_requests: dict[str, int] = field(default_factory=dict)  # registrar's /metrics
    startup: float | None = None  # process start -> start log line (watch)
    shutdown: float | None = None  # SIGTERM -> the last of the N keys gone (watch)
    rss_kib: int = 0
    rss_root_kib: int = 0  # the processes started, without their children (sidekick: bash)


@dataclass
class Convergence:
    label: str
    n: int
    runs: list[ConvergenceRun] = field(default_factory=list)

    def seconds(self) -> float | None:
        return median([r.seconds for r in self.runs if r.seconds is not None])

    def requests(self) -> float | None:
        return median([r.requests for r in self.runs])

    def rss(self) -> float | None:
        return median([r.rss_kib for r in self.runs])

    def shutdown(self) -> float | None:
        return median([r.shutdown for r in self.runs if r.shutdown is not None])


# --- helpers -----------------------------------------------------------------------------


def first_event(keys: KeyLog, kind: str, key: str, after: float) -> float | None:
    for event in keys.since(after):
        if event.kind == kind and event.key == key:
            return event.at
    return None


def logged_start(proc: RegistrarProcess) -> float | None:
    """When a registrar process logged its start line (JSON logs)."""
    for line in proc.logs().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            if entry.get("event") == "start":
                return datetime.fromisoformat(entry["time"]).timestamp()
    return None


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.run_id = f"rgbench-{secrets.token_hex(3)}"
        self.image = ""
        self.etcds: dict[str, EtcdServer] = {}
        self.events: DockerEvents | None = None
        self.latency: dict[str, LatencyResult] = {}
        self.convergence: list[Convergence] = []
        self.foreign_containers = 0
        self.startup_probe: dict[str, float | None] = {}
        # registrar's processes run with cached bytecode, as installed by pip or the image
        # (an editable install under PYTHONDONTWRITEBYTECODE=1 would compile it at every start).
        self.python_env = {
            "PYTHONDONTWRITEBYTECODE": "",
            "PYTHONPYCACHEPREFIX": str(work / "pycache"),
        }
        self.load: list[float] = []
        self._sampling = threading.Event()

    # --- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        say(f"run {self.run_id}; logs in {self.work}")
        self.image = ensure_busybox_image()
        for label in report.SUBJECTS:
            name = label.replace(" ", "-")
            self.etcds[label] = EtcdServer(self.work / f"etcd-{name}", name=name).start()
        self.events = DockerEvents()
        threading.Thread(target=self._sample_load, name="load", daemon=True).start()
        # Compile once what registrar's processes import into the bench's bytecode cache.
        for warm in (["-c", WARM_IMPORTS], ["-m", "registrar", "--version"]):
            subprocess.run(
                [sys.executable, *warm], env={**os.environ, **self.python_env},
                stdout=subprocess.DEVNULL, check=True,
            )
        running = docker("ps", "--format", "{{.Names}}").split()
        self.foreign_containers = len([n for n in running if not n.startswith(self.run_id)])

    def _sample_load(self) -> None:
        """The 1-minute load average every 10 s: how busy the machine was (the bench included)."""
        while not self._sampling.wait(10.0):
            with contextlib.suppress(OSError, ValueError), open("/proc/loadavg") as handle:
                self.load.append(float(handle.read().split()[0]))

    def cleanup(self) -> None:
        self._sampling.set()
        with contextlib.suppress(Exception):
            remove_prefixed(self.run_id)
        if self.events is not None:
            self.events.close()
        for server in self.etcds.values():
            with contextlib.suppress(Exception):
                server.destroy()

    def run_container(self, name: str, host_network: bool = False) -> None:
        args = ["run", "-d", "--name", name, "--label", f"registrar.service={SERVICE}"]
        if host_network:
            # No docker-proxy per container; registrar registers the exposed port at --host-ip.
            args += ["--network", "host", "--expose", "8080", self.image, "sleep", "86400"]
        else:
            args += ["-p", "127.0.0.1::8080", self.image, "httpd", "-f", "-p", "8080"]
        docker(*args)

    def remove(self, names: Sequence[str]) -> None:
        for start in range(0, len(names), 50):
            docker("rm", "-f", "-v", *names[start : start + 50], check=False, timeout=300)

    # --- startup probe --------------------------------------------------------------------

    def probe_startup(self, repeats: int = 5) -> None:
        """Interpreter start and imports alone: `registrar --version`, and what a sidecar
        imports before its first request."""
        probes = {
            "`registrar --version`": [sys.executable, "-m", "registrar", "--version"],
            "importing what a sidecar imports": [sys.executable, "-c", WARM_IMPORTS],
        }
        envs = {"": {**os.environ, **self.python_env}}
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            envs[" (without cached bytecode for registrar, as in this shell)"] = dict(os.environ)
        for label, cmd in probes.items():
            for variant, env in envs.items():
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    subprocess.run(cmd, capture_output=True, check=True, env=env)
                    times.append(time.perf_counter() - started)
                self.startup_probe[label + variant] = median(times)

    # --- phases 1-3: latency, steady state, deregistration ---------------------------------

    def latency_phase(self, cls: type[Subject], tag: str) -> LatencyResult:
        plan = self.plan
        assert self.events is not None
        etcd = self.etcds[cls.label]
        subject = cls(etcd.url, PREFIX, plan.ttl, self.work / tag, self.python_env)
        result = LatencyResult(cls.label, n=plan.latency_n)
        self.latency[cls.label] = result
        keys = KeyLog(etcd.url, PREFIX)
        names: list[str] = []
        say(f"{cls.label}: registration of {plan.latency_n} containers")
        try:
            subject.begin()
            if isinstance(subject, WatchAgent):
                subject.wait_ready()
                time.sleep(1.0)
                result.rss0_kib = tree_rss_kib(subject.pids())
            for i in range(plan.latency_n):
                name = f"{self.run_id}-{tag}-{i:02d}"
                names.append(name)
                self.run_container(name)
                returned = time.time()
                subject.attach(name)
                key = key_for(PREFIX, name)
                if not keys.wait(lambda k, key=key: key in k.first_put, timeout=30):  # type: ignore[misc]
                    result.not_registered.append(name)
                    continue
                started = self.events.time_of(name, "start")
                if started is not None:
                    result.registration.append(keys.first_put[key] - started)
                    result.run_returned.append(returned - started)
                if isinstance(subject, RegisterSidecars):
                    start_line = logged_start(subject.procs[-1])
                    if start_line is not None:
                        result.startup.append(start_line - returned)
                time.sleep(plan.start_gap)

            window = plan.steady_watch if isinstance(subject, WatchAgent) else plan.steady_other
            say(f"{cls.label}: steady state for {window:g} s")
            time.sleep(2.0)
            before = etcd_counters(etcd.url)
            cpu_before = cpu_seconds(subject.pids())
            started_window = time.time()
            time.sleep(window)
            result.cpu_seconds = cpu_seconds(subject.pids()) - cpu_before
            result.steady = etcd_counters(etcd.url).minus(before)
            result.window = time.time() - started_window
            result.rss_kib = tree_rss_kib(subject.pids())
            result.footprints = [footprint(pid) for pid in subject.pids()]
            foreign = {e.revision for e in keys.since(started_window) if self.run_id not in e.key}
            result.foreign_revisions = len(foreign)

            say(f"{cls.label}: deregistration (docker stop -t {plan.stop_timeout})")
            issued: dict[str, float] = {}
            stoppers = []
            for name in names:
                issued[name] = time.time()
                stoppers.append(subprocess.Popen(
                    [DOCKER, "stop", "-t", str(plan.stop_timeout), name],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ))  # fmt: skip
                time.sleep(plan.stop_gap)

            def all_gone(k: KeyLog) -> bool:
                return all(key_for(PREFIX, n) not in k.live for n in names)

            keys.wait(all_gone, timeout=plan.stop_timeout + 30)
            for name in names:
                gone = first_event(keys, "delete", key_for(PREFIX, name), issued[name])
                if gone is None:
                    result.not_deregistered.append(name)
                    continue
                result.deregistration.append(gone - issued[name])
                killed = self.events.time_of(name, "kill", timeout=1.0)
                if killed is not None:
                    result.kill_to_delete.append(gone - killed)
            for stopper in stoppers:
                stopper.wait(60)
            if isinstance(subject, RegisterSidecars | ShellSidekicks):
                deadline = time.monotonic() + 15
                while subject.pids() and time.monotonic() < deadline:
                    time.sleep(0.1)
                result.exit_codes = subject.exit_codes()
        finally:
            if isinstance(subject, WatchAgent):
                with contextlib.suppress(OSError):
                    result.agent_latency = mean_of(
                        subject.metrics_url, "registrar_registration_latency_seconds"
                    )
            codes = subject.finish()
            if isinstance(subject, WatchAgent):
                result.exit_codes = codes
            keys.close()
            self.remove(names)
        return result

    # --- phase 4: convergence ---------------------------------------------------------------

    def convergence_phase(self) -> None:
        plan = self.plan
        names: list[str] = []
        tag = f"{self.run_id}-c-"

        def start(index: int) -> None:
            name = f"{tag}{index:03d}"
            self.run_container(name, host_network=index >= plan.published_max)

        try:
            for n in plan.conv_ns:
                if n > len(names):
                    say(f"convergence: starting containers {len(names)}..{n - 1}")
                    with ThreadPoolExecutor(plan.start_workers) as pool:
                        list(pool.map(start, range(len(names), n)))
                    names.extend(f"{tag}{i:03d}" for i in range(len(names), n))
                present = names[:n]
                watch = Convergence(WatchAgent.label, n)
                for rep in range(plan.conv_repeats):
                    watch.runs.append(self.converge(WatchAgent, present, f"/conv{n}r{rep}"))
                self.convergence.append(watch)
                if n in plan.conv_per_container_ns:
                    for cls in (RegisterSidecars, ShellSidekicks):
                        result = Convergence(cls.label, n)
                        reps = plan.conv_repeats if n <= 20 else 1
                        for rep in range(reps):
                            result.runs.append(self.converge(cls, present, f"/conv{n}r{rep}"))
                        self.convergence.append(result)
                say(self.describe_convergence(n))
        finally:
            self.remove(names)

    def converge(self, cls: type[Subject], names: Sequence[str], prefix: str) -> ConvergenceRun:
        etcd = self.etcds[cls.label]
        subject = cls(
            etcd.url, prefix, self.plan.ttl, self.work / f"conv-{cls.label[-7:]}", self.python_env
        )
        keys = KeyLog(etcd.url, prefix)
        wanted = {key_for(prefix, name) for name in names}
        before = etcd_counters(etcd.url)
        try:
            started = time.time()
            subject.begin()
            for name in names:
                subject.attach(name)
            seen = keys.wait(lambda k: wanted <= k.live, timeout=60 + len(names))
            counted = etcd_counters(etcd.url).minus(before)
            run = ConvergenceRun(
                seconds=max(keys.first_put[k] for k in wanted) - started if seen else None,
                requests=counted.total,
                by_method=counted.requests,
                rss_kib=tree_rss_kib(subject.pids()),
                rss_root_kib=sum(rss_kib(pid) for pid in subject.pids()),
            )
            if isinstance(subject, WatchAgent):
                with contextlib.suppress(OSError):
                    run.own_requests = registrar_etcd_requests(subject.metrics_url)
                running = subject.running_at()
                run.startup = running - started if running is not None else None
                if seen and subject.proc is not None:
                    # SIGTERM: the lease is revoked, every key goes in one request.
                    terminated = time.time()
                    subject.proc.terminate()
                    if keys.wait(lambda k: not (wanted & k.live), timeout=15):
                        run.shutdown = max(keys.deleted[k] for k in wanted) - terminated
            return run
        finally:
            subject.finish()
            keys.close()

    def describe_convergence(self, n: int) -> str:
        parts = []
        for conv in self.convergence:
            if conv.n == n:
                parts.append(
                    f"{conv.label} {ms(conv.seconds())} ms / {num(conv.requests())} requests"
                )
        return f"N={n}: " + "; ".join(parts)

    # --- the report -------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        lat = self.latency
        w = lat.get(WatchAgent.label)
        rows: list[Row] = []

        def per(get: Callable[[LatencyResult], Any]) -> dict[str, Any]:
            return {label: get(res) for label, res in lat.items()}

        reg_p50 = per(lambda x: median(x.registration))
        rows.append(Row(
            f"registration: `start` event → key in watch, p50 / p95 (ms), {self.plan.latency_n} "
            "containers",
            per(lambda x: f"**{ms(median(x.registration))}** / {ms(p95(x.registration))}"),
            reg_p50,
            "watch p50 ≤ 5; register p50 ≤ 60 (issue 21)",
            _both(_le(reg_p50.get("registrar watch"), 0.005),
                  _le(reg_p50.get("registrar register"), 0.060)),
        ))  # fmt: skip
        dereg_p50 = per(lambda x: median(x.deregistration))
        rows.append(Row(
            f"deregistration: `docker stop -t {self.plan.stop_timeout}` issued → key gone, "
            "p50 / p95 (ms)",
            per(lambda x: f"**{ms(median(x.deregistration))}** / {ms(p95(x.deregistration))}"),
            dereg_p50,
            "watch p50 and p95 ≤ 60",
            _verdict("watch", _le(p95(w.deregistration) if w else None, 0.060)),
        ))  # fmt: skip
        writes = per(lambda x: x.writes_per_min)
        rows.append(Row(
            f"steady state: etcd writes/min (revision delta), {self.plan.latency_n} containers",
            {k: _bold(v) for k, v in writes.items()},
            writes,
            "watch 0",
            _verdict("watch", None if w is None or w.writes_per_min is None
                     else w.writes_per_min == 0),
        ))  # fmt: skip
        requests = per(lambda x: x.requests_per_min)
        rows.append(Row(
            "steady state: etcd requests/min (server count; keepalives, reads, writes)",
            {k: num(v) for k, v in requests.items()},
            requests,
        ))
        for n in self.plan.conv_ns:
            convs = {c.label: c for c in self.convergence if c.n == n}
            if not convs:
                continue
            hosted = n > self.plan.published_max
            seconds = {k: c.seconds() for k, c in convs.items()}
            target, met = "", ""
            if n == 100:
                target = "watch ≤ 1000 ms"
                met = _verdict("watch", _le(seconds.get("registrar watch"), 1.0))
            rows.append(Row(
                f"converge on a host running N={n}"
                f"{f' ({n - self.plan.published_max} on the host network)' if hosted else ''}"
                ": time (ms) / etcd requests",
                {k: f"**{ms(c.seconds())}** / {num(c.requests())}" for k, c in convs.items()},
                seconds, target, met,
            ))  # fmt: skip
        shutdowns = [c for c in self.convergence
                     if c.label == "registrar watch" and c.shutdown() is not None]
        if shutdowns:
            rows.append(Row(
                "SIGTERM to every key gone, agent holding N keys (ms): "
                + ", ".join(f"N={c.n}" for c in shutdowns),
                {"registrar watch": " / ".join(f"**{ms(c.shutdown())}**" for c in shutdowns)},
            ))  # fmt: skip
        rss_n = 100 if any(c.n == 100 for c in self.convergence) else max(self.plan.conv_ns)
        rss100 = {c.label: c.rss() for c in self.convergence if c.n == rss_n}
        rss_cells = {}
        rss_raw: dict[str, float | None] = {}
        for label in report.SUBJECTS:
            zero = lat[label].rss0_kib if label in lat else None
            at_n = rss100.get(label)
            rss_raw[label] = at_n
            zero_text = _mib(zero) if zero is not None else "0"
            rss_cells[label] = f"{zero_text} / **{_mib(at_n)}**"
        watch_rss = max(
            [v for v in (rss100.get("registrar watch"), w.rss0_kib if w else None) if v]
            or [0]
        )
        rows.append(Row(
            f"resident memory, N=0 / N={rss_n} (MiB, all processes of the subject)",
            rss_cells, rss_raw, "watch ≤ 60 MiB",
            _verdict("watch", watch_rss / 1024 <= 60 if watch_rss else None),
        ))  # fmt: skip
        rows.append(self._footprint_row())
        cpu = per(lambda x: x.cpu_per_hour)
        rows.append(Row(
            f"CPU seconds per hour, idle with {self.plan.latency_n} containers registered",
            {k: num(v) for k, v in cpu.items()},
            cpu,
        ))
        return rows

    def _footprint_row(self) -> Row:
        """One registering process (an agent, a sidecar, a sidekick with its children) once
        its containers are registered: medians over the processes."""
        def mib(values: Sequence[int]) -> float | None:
            return median([v / 1024 for v in values]) if values else None

        cells: dict[str, str] = {}
        raw: dict[str, float | None] = {}
        for label, res in self.latency.items():
            rss = mib([f.rss_kib for f in res.footprints])
            anon = mib([f.anon_kib for f in res.footprints])
            threads = median([float(f.threads) for f in res.footprints]) if res.footprints \
                else None
            cells[label] = f"**{num(rss)}** / {num(anon)} / {num(threads)}"
            raw[label] = rss
        sidecar = self.latency.get(RegisterSidecars.label)
        agent = self.latency.get(WatchAgent.label)
        met_sidecar = None
        if sidecar is not None and sidecar.footprints:
            met_sidecar = (
                (mib([f.rss_kib for f in sidecar.footprints]) or 0) <= 20
                and (mib([f.anon_kib for f in sidecar.footprints]) or 0) <= 10
                and (median([float(f.threads) for f in sidecar.footprints]) or 0) <= 6
            )
        met_agent = None
        if agent is not None and agent.footprints:
            met_agent = (mib([f.rss_kib for f in agent.footprints]) or 0) <= 25
        return Row(
            f"one registering process, {self.plan.latency_n} containers registered, median: "
            "RSS / private (RssAnon) MiB / threads",
            cells, raw, "register RSS ≤ 20, private ≤ 10, threads ≤ 6; watch RSS ≤ 25",
            _both(met_agent, met_sidecar),
        )

    def settings_text(self) -> dict[str, str]:
        p = self.plan
        return {
            "run": f"`python -m bench {' '.join(sys.argv[1:])}`".replace(" `", "`")
            + (" (quick: fewer containers, shorter windows)" if p == QUICK else ""),
            "subjects": (
                "`registrar watch` (one agent; `--metrics-addr` on); `registrar register NAME` "
                "spawned right after `docker run -d` returns, as ExecStartPost= would; "
                "`bench/sidekick.sh NAME` the same way (bash, docker CLI, etcdctl v3: poll "
                "`docker port` every 0.2 s, then `lease grant` + `put --lease` every TTL/3, "
                "`docker wait` for the exit, `etcdctl del`)"
            ),
            "ttl": (
                f"{p.ttl} s for all three (registrar heartbeats every TTL/3, with or without "
                "metrics)"
            ),
            "etcd": "a private single-member etcd per subject, on loopback",
            "containers": (
                f"busybox `httpd -f -p 8080` (PID 1 ignores SIGTERM, so `docker stop -t "
                f"{p.stop_timeout}` takes {p.stop_timeout} s) published on 127.0.0.1; convergence "
                f"containers beyond the first {p.published_max} run `sleep` on the host network "
                "with `--expose 8080` (no docker-proxy each)"
            ),
            "registration": (
                "Docker's `start` event time (`timeNano`) to the key's first PUT delivered by an "
                "etcd watch to the bench process; containers started one at a time"
            ),
            "deregistration": (
                f"`docker stop` CLI spawned (one every {p.stop_gap:g} s) to the key's DELETE "
                "in the watch"
            ),
            "steady state": (
                f"{p.steady_watch:g} s (watch) / {p.steady_other:g} s (others) with no Docker "
                "activity from the bench, scaled to a minute / an hour; writes = etcd revision "
                "delta; requests = etcd's `grpc_server_started_total` (calls and streams "
                "opened; the bench's own watch was opened before); both minus the writes for "
                "containers the bench did not start, if any came and went meanwhile; CPU = "
                "utime+stime of the subject's processes and their children (/proc)"
            ),
            "convergence": (
                "from spawning the process(es) to the last of the N keys in the watch; "
                f"median of {p.conv_repeats} runs for the agent (sidecars and sidekicks: "
                f"{p.conv_repeats} runs at N ≤ 20, one above); the sidecar and sidekick columns "
                "start N processes at once for N running containers"
            ),
            "python": "registrar's processes run with cached bytecode (`PYTHONPYCACHEPREFIX` in "
            "the bench's work directory, filled before measuring), as after `pip install` or in "
            "the image",
            "memory": "VmRSS summed over the subject's processes (sidekick: bash and its "
            "children of the moment, mostly `timeout docker wait`)",
            "other containers": f"{self.foreign_containers} container(s) not started by the "
            "bench were running on the engine at the start",
        }

    def details(self) -> list[str]:
        out = []
        w = self.latency.get("registrar watch")
        r = self.latency.get("registrar register")
        if self.startup_probe:
            out.append("Interpreter start and imports (median of 5): " + "; ".join(
                f"{label} {ms(value)} ms" for label, value in self.startup_probe.items()
            ) + ".")  # fmt: skip
        if r is not None:
            out.append(
                "`registrar register`, median: `docker run -d` returns "
                f"{ms(median(r.run_returned))} ms after the `start` event; the sidecar logs its "
                f"start line {ms(median(r.startup))} ms after being spawned; the key is visible "
                f"{ms(median(r.registration))} ms after the `start` event."
            )
        if w is not None and w.agent_latency is not None:
            out.append(
                "registrar watch, its own `registrar_registration_latency_seconds` (Docker's "
                f"event time to etcd's acknowledgement): mean {ms(w.agent_latency)} ms."
            )
        for label, res in self.latency.items():
            if res.kill_to_delete:
                out.append(
                    f"{label}: `kill` event → key gone, p50 {ms(median(res.kill_to_delete))} ms, "
                    f"p95 {ms(p95(res.kill_to_delete))} ms."
                )
            problems = []
            if res.not_registered:
                problems.append(f"never registered: {', '.join(res.not_registered)}")
            if res.not_deregistered:
                problems.append(f"never deregistered: {', '.join(res.not_deregistered)}")
            odd = [c for c in res.exit_codes if c != 0]
            if odd:
                problems.append(f"exit codes other than 0: {odd}")
            if res.foreign_revisions:
                problems.append(
                    f"{res.foreign_revisions} revisions in the steady window came from "
                    "containers the bench did not start (subtracted)"
                )
            if problems:
                out.append(f"{label}: " + "; ".join(problems) + ".")
            if res.steady is not None and res.steady.requests:
                methods = ", ".join(f"{m} {v}" for m, v in sorted(res.steady.requests.items()))
                out.append(f"{label}, steady window of {res.window:.0f} s, etcd requests: "
                           f"{methods}.")
        if w is not None and w.rss0_kib:
            out.append(f"registrar watch RSS with no bench container: {_mib(w.rss0_kib)} MiB.")
        for conv in self.convergence:
            runs = conv.runs
            if not runs:
                continue
            line = (
                f"converge {conv.label} N={conv.n}: "
                + ", ".join(f"{ms(x.seconds)} ms" for x in runs)
            )
            last = runs[-1]
            line += "; etcd requests " + ", ".join(
                f"{m} {v}" for m, v in sorted(last.by_method.items())
            )
            if last.own_requests:
                line += " (registrar's own count: " + ", ".join(
                    f"{op} {v}" for op, v in sorted(last.own_requests.items())
                ) + ")"
            startups = [x.startup for x in runs if x.startup is not None]
            if startups:
                line += f"; process start → running {ms(median(startups))} ms"
            line += f"; RSS {_mib(conv.rss())} MiB"
            if conv.label == ShellSidekicks.label:
                line += f" (the bash processes alone: {_mib(last.rss_root_kib)} MiB)"
            line += "."
            out.append(line)
        return [f"- {line}" for line in out]


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _verdict(who: str, met: bool | None) -> str:
    if met is None:
        return ""
    return f"{who} met" if met else f"{who} **missed**"


def _both(watch: bool | None, register: bool | None) -> str:
    return ", ".join(v for v in (_verdict("watch", watch), _verdict("register", register)) if v)


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _bold(value: float | None) -> str:
    return f"**{num(value)}**" if value is not None else "-"


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer containers and shorter windows (for development)")
    parser.add_argument("--max-n", type=int, default=None,
                        help="the largest N of the convergence phase (default 300; quick 40)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the table goes (default {RESULTS}; with --quick: nowhere)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs directory")
    parser.add_argument("--only", default=None,
                        choices=("table", "latency", "convergence",
                                 *(part.name for part in PARTS)),
                        help="run one part only (alone, a part's section is replaced in the "
                        "file and the rest kept; `table`: the single-host table, latency and "
                        "convergence, without the parts)")
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.max_n:
        ns = sorted({n for n in plan.conv_ns[:-1] if n < args.max_n} | {args.max_n})
        plan = replace(plan, conv_ns=tuple(ns))
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="rgbench-"))
    parts: dict[str, str] = {}  # heading -> its section, for the parts that ran
    bench = Bench(plan, work)
    began = time.monotonic()
    try:
        bench.setup()
        bench.probe_startup()
        if args.only in (None, "table", "latency"):
            bench.latency_phase(WatchAgent, "w")
            bench.latency_phase(RegisterSidecars, "r")
            bench.latency_phase(ShellSidekicks, "s")
        if args.only in (None, "table", "convergence"):
            bench.convergence_phase()
        for part in PARTS:
            if args.only in (None, part.name):
                say(f"{part.name}: {part.says}")
                try:
                    parts[part.heading] = part.run(args.quick)
                except Exception as exc:  # one part failing must not lose the others' results
                    say(f"{part.name} FAILED: {type(exc).__name__}: {exc}")
                    parts[part.heading] = (f"{part.heading}\n\n**This part failed** in the run "
                                           f"of {report.revision()}: `{type(exc).__name__}: "
                                           f"{str(exc)[:300]}`\n")
    finally:
        bench.cleanup()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    rows = bench.rows()
    settings = bench.settings_text()
    settings["duration"] = f"{(time.monotonic() - began) / 60:.1f} min"
    if bench.load:
        settings["load"] = (
            f"1-minute load average during the run (the bench included): median "
            f"{median(bench.load):.1f}, max {max(bench.load):.1f}"
        )
    info = report.machine()
    info["registrar"] = report.revision()
    out = args.out or (None if args.quick else RESULTS)
    if args.only in {part.name for part in PARTS}:
        # one part alone: its section replaced in the file, the rest of it kept
        for heading, block in parts.items():
            print(block)
            if out is not None:
                write_section(out, heading, block)
    else:
        text = report.render(rows, info, settings, bench.details())
        old = out.read_text() if out is not None and out.exists() else ""
        for part in PARTS:  # the parts that did not run keep their last section
            block = parts.get(part.heading) or section_of(old, part.heading)
            if block:
                text = add_section(text, part.heading, block)
        print(text)
        if out is not None:
            out.write_text(text)
    if out is not None:
        say(f"wrote {out}")
    return 0
