"""`make bench`, the cluster part: the seed's cluster on one machine (tests/cluster/).

    .venv/bin/python -m bench.cluster_bench [--quick] [--mode both|agents|sidecars]
                                             [--out PATH] [--keep-logs]

18 hosts (each a network namespace with its own Docker engine), 70 services x 2 instances, a
3-member etcd, two `registrar haproxy` routers with one `--bind` per service (70 frontends
each), Prometheus scraping everything, and a client sending >= 200 requests/s spread over all
services through both routers. Run twice: once with a `registrar watch` host agent per host,
once with a `registrar register` sidecar per container (started right after its `docker run
-d`, as an `ExecStartPost=` does) and no agent. A fresh cluster each time. Measured:

1. bring-up: every v1 container started (routers and agents already running); last container
   start -> every key in etcd -> every server in both routers' configs -> every frontend of
   both routers answering;
2. steady state (no change for a while, the load running): etcd requests per minute for the
   whole cluster, from the members' own /metrics (`grpc_server_started_total`: unary calls
   and streams opened; `grpc_server_msg_received_total`: messages), summed over the three
   members; the revision delta (writes); RSS of each agent / sidecar / router;
3. a rolling deploy of every service v1 -> v2, in waves: start v2 beside v1 on other hosts,
   `registrar promote SERVICE v2` (one at a time, from the root namespace through the etcd
   forwarders: its wall time, interpreter start included), then `docker stop` v1; failed
   client requests over the whole deploy;
4. a host death (its registrar processes SIGKILLed, its link cut): failed requests, the time
   until its keys are gone and until both routers dropped its servers.

`run(quick, modes) -> ClusterResults`; `section(results)` is the markdown that `make bench`
puts into bench/results.md. Run alone, a full run replaces that section in bench/results.md
(`--quick` writes nothing unless `--out`). Needs root; hold the real-tier lock around it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench.observe import scrape
from bench.report import add_section
from tests.cluster import Cluster, ClusterContainer, LoadStats
from tests.cluster.fleet import Fleet, addresses
from tests.cluster.load import ClientLoad
from tests.cluster.procs import role_of

RESULTS = Path(__file__).with_name("results.md")
HEADING = "## The seed's cluster on one machine (bench/cluster_bench.py)"
MODES = ("agents", "sidecars")
LABELS = {"agents": "host agents (`registrar watch`)",
          "sidecars": "sidecars (`registrar register`)"}  # fmt: skip
T0 = time.monotonic()


@dataclass(frozen=True)
class Shape:
    hosts: int
    services: int
    copies: int
    rate: float  # client requests/s, in all
    steady: float  # seconds of steady state measured
    wave: int  # services deployed together
    ttl: int = 15
    routers: int = 2


FULL = Shape(hosts=18, services=70, copies=2, rate=200.0, steady=45.0, wave=10)
QUICK = Shape(hosts=4, services=8, copies=2, rate=60.0, steady=15.0, wave=4)


def say(message: str) -> None:
    print(f"bench cluster [{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


# --- etcd's own counters, summed over the members --------------------------------------------
@dataclass(frozen=True)
class EtcdLoad:
    revision: int
    started: dict[str, int]  # gRPC method -> calls / streams started
    received: dict[str, int]  # gRPC method -> messages received

    def minus(self, before: EtcdLoad) -> EtcdLoad:
        def sub(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            out = {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b)}
            return {k: v for k, v in out.items() if v}

        return EtcdLoad(self.revision - before.revision, sub(self.started, before.started),
                        sub(self.received, before.received))  # fmt: skip


def etcd_load(cluster: Cluster) -> EtcdLoad:
    """Every member's /metrics (HTTP, so reading them is no gRPC request), summed."""
    revision = 0
    started: dict[str, int] = {}
    received: dict[str, int] = {}
    for m in cluster.etcd:
        for name, labels, value in scrape(f"{m.url_from_root}/metrics"):
            method = labels.get("grpc_method", "?")
            if name == "etcd_debugging_mvcc_current_revision":
                revision = max(revision, int(value))
            elif name == "grpc_server_started_total":
                started[method] = started.get(method, 0) + int(value)
            elif name == "grpc_server_msg_received_total":
                received[method] = received.get(method, 0) + int(value)
    return EtcdLoad(revision, started, received)


# --- CPU and the machine's load -------------------------------------------------------------
def _cpu_ticks(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_by_role(cluster: Cluster) -> dict[int, tuple[str, int]]:
    """pid -> (role, CPU ticks so far) for every process of the cluster."""
    out: dict[int, tuple[str, int]] = {}
    for p in cluster.processes():
        ticks = _cpu_ticks(p.pid)
        if ticks is not None:
            out[p.pid] = (role_of(p), ticks)
    return out


def cpu_delta(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
              seconds: float) -> dict[str, tuple[int, float]]:  # fmt: skip
    """role -> (processes alive at both ends, % of one core per process over the window)."""
    per: dict[str, list[int]] = {}
    for pid, (role, ticks) in after.items():
        if pid in before:
            per.setdefault(role, []).append(ticks - before[pid][1])
    hz = os.sysconf("SC_CLK_TCK")
    return {role: (len(v), 100.0 * sum(v) / hz / seconds / len(v)) for role, v in per.items()}


class LoadAverage:
    """The 1-minute load average every 5 s, by phase (how busy the 2 cores were)."""

    def __init__(self) -> None:
        self.phase = "start"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            with contextlib.suppress(OSError, ValueError):
                value = float(Path("/proc/loadavg").read_text().split()[0])
                self.samples.setdefault(self.phase, []).append(value)

    def describe(self) -> str:
        return "; ".join(f"{phase} {statistics.median(v):.1f} (max {max(v):.1f})"
                         for phase, v in self.samples.items() if v)  # fmt: skip

    def close(self) -> None:
        self._stop.set()


# --- results ---------------------------------------------------------------------------------
@dataclass
class ModeResult:
    mode: str
    shape: Shape
    ok: bool = False
    error: str | None = None
    cluster_start: float | None = None
    containers: int = 0
    start_containers: float | None = None  # first `docker run` -> last container started
    to_keys: float | None = None  # last container start -> every key in etcd
    to_routed: float | None = None  # ... -> every server in both routers' configs
    to_serving: float | None = None  # ... -> every frontend of both routers answering
    steady_window: float = 0.0
    steady: EtcdLoad | None = None
    steady_failed: int | None = None
    rss_mib: dict[str, float] = field(default_factory=dict)  # role -> MiB per process
    rss_count: dict[str, int] = field(default_factory=dict)
    engine_mib: float | None = None
    total_rss_mib: float | None = None
    promote: list[float] = field(default_factory=list)  # wall time per `registrar promote`
    switched: list[float] = field(default_factory=list)  # promote start -> v1 out of routers
    deploy_seconds: float | None = None
    deploy_sent: int = 0
    deploy_failed: int | None = None
    deploy_reasons: dict[str, int] = field(default_factory=dict)
    death_host: str = ""
    death_instances: int = 0
    death_keys_gone: float | None = None
    death_marked_down: float | None = None  # kill -> the last DOWN its HAProxys logged
    death_out_of_rotation: float | None = None
    death_failed: int | None = None
    death_sent: int = 0
    death_after_failed: int | None = None
    cpu: dict[str, tuple[int, float]] = field(default_factory=dict)  # role -> (n, % core each)
    wave_failed: list[int] = field(default_factory=list)
    own_requests: dict[str, float] = field(default_factory=dict)  # job/op -> per minute
    phase_failed: dict[str, int] = field(default_factory=dict)  # deploy: failures by step
    cpu_per_promotion: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    etcd_per_promotion: dict[str, float] = field(default_factory=dict)  # method -> requests
    loadavg: str = ""
    load_final: str = ""
    interpreter: float | None = None  # `registrar --version` wall time, for the promote times

    @property
    def requests_per_min(self) -> float | None:
        if self.steady is None or not self.steady_window:
            return None
        return sum(self.steady.started.values()) * 60 / self.steady_window

    @property
    def messages_per_min(self) -> float | None:
        if self.steady is None or not self.steady_window:
            return None
        return sum(self.steady.received.values()) * 60 / self.steady_window

    @property
    def writes_per_min(self) -> float | None:
        if self.steady is None or not self.steady_window:
            return None
        return self.steady.revision * 60 / self.steady_window


@dataclass
class ClusterResults:
    shape: Shape
    modes: dict[str, ModeResult] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = ""  # the copy of registrar/ the run used


# --- one run --------------------------------------------------------------------------------
class ClusterRun:
    def __init__(self, shape: Shape, mode: str, state_root: str) -> None:
        self.shape = shape
        self.mode = mode
        self.result = ModeResult(mode, shape)
        self.cluster = Cluster(
            hosts=shape.hosts, routers=shape.routers, agent_ttl=shape.ttl,
            progress=lambda m: say(f"  {m}"), userland_proxy=False, scrape_interval="5s",
            state_root=state_root,
        )  # fmt: skip
        names = [f"s{i:02d}" for i in range(shape.services)]
        self.fleet = Fleet(self.cluster, names)
        self.load: ClientLoad | None = None
        self.placement: dict[str, list[int]] = {}
        self.sidecar_procs = 0
        self.loadavg = LoadAverage()

    # -- sidecars ----------------------------------------------------------------------------------
    def start_sidecar(self, c: ClusterContainer) -> None:
        h = c.host
        h.start_registrar(
            "register", c.name, "--docker", h.docker_url, "--node", h.node,
            "--host-ip", h.ip, "--etcd", self.cluster.etcd_endpoints,
            "--ttl", str(self.shape.ttl), name=f"sidecar-{c.name}",
        )  # fmt: skip
        self.sidecar_procs += 1

    def run_version(self, placement: dict[str, list[int]], version: str) -> list[ClusterContainer]:
        hook = self.start_sidecar if self.mode == "sidecars" else None
        return self.fleet.run(placement, version, workers=4, after_start=hook)

    # -- phases ------------------------------------------------------------------------------------
    def run(self) -> ModeResult:
        r, c, fleet, shape = self.result, self.cluster, self.fleet, self.shape
        c.start()
        r.cluster_start = c.timings.get("start_total")
        r.interpreter = self._interpreter_start()
        fleet.start_routers()
        if self.mode == "agents":
            c.start_agents()
            for h in c.hosts:
                assert h.agent is not None
                h.agent.wait_for_log("docker connected", timeout=60)
            say(f"{shape.hosts} agents running")
        self.bring_up()
        self.steady_state()
        self.deploy()
        self.host_death()
        assert self.load is not None
        final = self.load.stop()
        r.load_final = final.summary(versions=False)
        self.loadavg.close()
        r.loadavg = self.loadavg.describe()
        say(f"client load, whole run: {r.load_final}")
        r.ok = True
        return r

    def bring_up(self) -> None:
        r, c, fleet, shape = self.result, self.cluster, self.fleet, self.shape
        self.loadavg.phase = "bring-up"
        placement = fleet.spread(shape.copies)
        n = sum(len(v) for v in placement.values())
        say(f"bring-up: {n} v1 containers ({shape.services} services x {shape.copies}) on "
            f"{shape.hosts} hosts" + (", a sidecar each" if self.mode == "sidecars" else ""))
        starts: list[float] = []
        t = time.monotonic()

        def note(cont: ClusterContainer) -> None:
            if self.mode == "sidecars":
                self.start_sidecar(cont)
            starts.append(time.monotonic())
            if len(starts) % 20 == 0:
                say(f"  {len(starts)}/{n} containers started")

        v1 = fleet.run(placement, "v1", workers=4, after_start=note)
        last = max(starts)
        r.containers = len(v1)
        r.start_containers = last - t
        fleet.wait_keys(present=fleet.keys(v1), timeout=120 + n)
        r.to_keys = time.monotonic() - last
        say(f"every key in etcd {r.to_keys:.2f} s after the last container start")
        fleet.wait_routed(present=addresses(v1), timeout=60)
        r.to_routed = time.monotonic() - last
        fleet.wait_serving(timeout=60)
        r.to_serving = time.monotonic() - last
        say(f"both routers list every server {r.to_routed:.2f} s, every frontend answers "
            f"{r.to_serving:.2f} s after the last container start")  # fmt: skip
        self.placement = placement
        self.load = c.start_load(fleet.load_targets(), rate=shape.rate, timeout=2.0,
                                 niceness=-10)  # fmt: skip
        st = self.load.wait_requests(int(shape.rate * 2), timeout=60)
        say(f"client load running: {st.summary(versions=False)}")

    def steady_state(self) -> None:
        r, c, shape = self.result, self.cluster, self.shape
        assert self.load is not None
        say(f"steady state: {shape.steady:g} s without a change")
        self.loadavg.phase = "steady"
        before_stats = self.load.stats_after(time.time())
        before = etcd_load(c)
        cpu0 = cpu_by_role(c)
        t = time.monotonic()
        time.sleep(shape.steady)  # the measurement window itself: nothing to wait for
        after = etcd_load(c)
        r.steady_window = time.monotonic() - t
        r.cpu = cpu_delta(cpu0, cpu_by_role(c), r.steady_window)
        r.steady = after.minus(before)
        r.steady_failed = self.load.stats_after(time.time()).since(before_stats).failed
        mem = c.memory()
        for role in ("registrar-watch", "registrar-register", "registrar-haproxy", "haproxy",
                     "etcd", "client-load", "containerd-shim", "prometheus"):  # fmt: skip
            if role in mem.by_role:
                r.rss_count[role] = mem.by_role[role][0]
                r.rss_mib[role] = round(mem.rss_per(role), 1)
        eng = list(mem.engine_per_host_kb.values())
        r.engine_mib = round(sum(eng) / len(eng) / 1024, 1) if eng else None
        r.total_rss_mib = round(mem.total_kb / 1024)
        per_min = {k: round(v * 60 / r.steady_window) for k, v in sorted(r.steady.started.items())}
        say(f"etcd: {r.requests_per_min:.0f} requests/min ({r.messages_per_min:.0f} messages, "
            f"{r.writes_per_min:.0f} writes); per minute by method {per_min}")
        r.own_requests = self._own_requests(r.steady_window)
        if r.own_requests:
            say(f"registrar's own count of its etcd requests per minute: {r.own_requests}")
        say("memory:\n" + mem.format())
        say("CPU, % of one core per process: " + ", ".join(
            f"{role} {pct:.1f} (x{n})" for role, (n, pct) in sorted(r.cpu.items())))

    def _own_requests(self, window: float) -> dict[str, float]:
        """`job/op` -> requests per minute, from the agents' and routers' own
        `registrar_etcd_request_duration_seconds_count` as Prometheus scraped it (sidecars
        serve no metrics)."""
        expr = ("sum by (job, op) (increase(registrar_etcd_request_duration_seconds_count"
                f"[{max(10, int(window))}s]))")  # fmt: skip
        try:
            result = self.cluster.prom_query(expr)
        except (OSError, RuntimeError, ValueError) as exc:
            say(f"Prometheus: {exc}")
            return {}
        out = {}
        for sample in result:
            labels = sample["metric"]
            per_min = float(sample["value"][1]) * 60 / max(10, int(window))
            if per_min >= 0.5:
                key = f"{labels.get('job', '?').removeprefix('registrar-')}/{labels.get('op')}"
                out[key] = round(per_min)
        return dict(sorted(out.items()))

    def deploy(self) -> None:
        r, fleet, shape = self.result, self.fleet, self.shape
        assert self.load is not None
        say(f"rolling deploy v1 -> v2 of {shape.services} services, {shape.wave} at a time")
        self.loadavg.phase = "deploy"
        before = self.load.stats_after(time.time())
        t = time.monotonic()
        services = fleet.services
        phase_failed = {"start v2": 0, "promote": 0, "stop v1": 0}
        cpu_ticks: dict[str, int] = {}
        etcd_during: dict[str, int] = {}
        mark = self.load.stats()

        def count(phase: str) -> None:
            nonlocal mark
            assert self.load is not None
            now = self.load.stats()
            phase_failed[phase] += now.since(mark).failed
            mark = now

        for lo in range(0, len(services), shape.wave):
            wave = services[lo : lo + shape.wave]
            v1 = fleet.of("v1", wave)
            v2 = self.run_version(fleet.beside({s: self.placement[s] for s in wave}), "v2")
            fleet.wait_keys(present=fleet.keys(v2), timeout=60 + len(v2))
            fleet.wait_routed(present=addresses(v2), timeout=30)
            count("start v2")
            cpu0, etcd0 = cpu_by_role(self.cluster), etcd_load(self.cluster)
            for s in wave:
                started = time.monotonic()
                result = fleet.promote(s, "v2", "--min-instances", str(shape.copies))
                if not result.ok:
                    raise RuntimeError(result.describe())
                r.promote.append(result.seconds)
                fleet.wait_routed(present=addresses(fleet.of("v2", [s])),
                                  absent=addresses(fleet.of("v1", [s])), timeout=30)  # fmt: skip
                r.switched.append(time.monotonic() - started)
            cpu1, etcd1 = cpu_by_role(self.cluster), etcd_load(self.cluster)
            for pid, (role, ticks) in cpu1.items():
                if pid in cpu0:
                    cpu_ticks[role] = cpu_ticks.get(role, 0) + ticks - cpu0[pid][1]
            for method, n in etcd1.minus(etcd0).started.items():
                etcd_during[method] = etcd_during.get(method, 0) + n
            count("promote")
            fleet.stop(v1, timeout=1, workers=8)
            fleet.wait_keys(absent=fleet.keys(v1), timeout=30)
            count("stop v1")
            failed = self._failed_since(before)
            r.wave_failed.append(failed - sum(r.wave_failed))
            say(f"  wave {lo // shape.wave + 1}: {len(wave)} services on v2 (promote p50 "
                f"{statistics.median(r.promote):.2f} s); {failed} failed so far")  # fmt: skip
        hz = os.sysconf("SC_CLK_TCK")
        n = max(1, len(r.promote))
        r.phase_failed = phase_failed
        r.cpu_per_promotion = {k: round(v / hz / n, 2) for k, v in sorted(cpu_ticks.items())
                               if v / hz / n >= 0.01}  # fmt: skip
        r.etcd_per_promotion = {k: round(v / n, 1) for k, v in sorted(etcd_during.items())}
        say(f"failures by phase {phase_failed}; per promotion: CPU s {r.cpu_per_promotion}, "
            f"etcd requests {r.etcd_per_promotion}")
        r.deploy_seconds = time.monotonic() - t
        during = self.load.stats_after(time.time() + 0.5).since(before)
        r.deploy_sent, r.deploy_failed = during.sent, during.failed
        r.deploy_reasons = during.reasons
        say(f"deploy done in {r.deploy_seconds:.0f} s: {during.failed} failed of {during.sent}")
        if during.failed:
            say("failures:\n" + self.load.stats().timeline())

    def _failed_since(self, before: LoadStats) -> int:
        assert self.load is not None
        return self.load.stats().since(before).failed

    def host_death(self) -> None:
        r, c, fleet, shape = self.result, self.cluster, self.fleet, self.shape
        assert self.load is not None
        values = c.etcd_get_prefix(fleet.prefix + "/")
        by_host: dict[int, set[str]] = {}
        for i, h in enumerate(c.hosts):
            by_host[i] = {k for k in values if k.split("/")[-1].startswith(f"{h.node}:")}
        self.loadavg.phase = "host death"
        victim = max(by_host, key=lambda i: (len(by_host[i]), -abs(i - shape.hosts // 2)))
        h = c.hosts[victim]
        mine = by_host[victim]
        dead = {f"{json.loads(values[k])['host']}:{json.loads(values[k])['port']}" for k in mine}
        r.death_host, r.death_instances = h.name, len(mine)
        before = self.load.stats_after(time.time())
        t = time.monotonic()
        killed_at = time.time()
        c.kill_host(victim)
        fleet.wait_keys(absent=mine, timeout=shape.ttl + 15, interval=0.2)
        r.death_keys_gone = time.monotonic() - t
        fleet.wait_routed(absent=dead, timeout=15)
        r.death_out_of_rotation = time.monotonic() - t
        out_at = time.time()
        down = [at for router in c.routers for at, _ in fleet.marked_down(router, killed_at)
                if at <= out_at]  # fmt: skip
        r.death_marked_down = max(down) - killed_at if down else None
        settled = self.load.stats_after(out_at + 2.5)  # requests sent before may time out (2 s)
        during = settled.since(before)
        r.death_failed, r.death_sent = during.failed, during.sent
        tail = self.load.wait_requests(int(shape.rate * 3)).since(settled)
        r.death_after_failed = tail.failed
        say(f"host death ({h.name}, {len(mine)} instances): keys gone {r.death_keys_gone:.1f} s, "
            f"out of both routers {r.death_out_of_rotation:.1f} s after the kill; "
            f"{during.failed} failed of {during.sent}; afterwards {tail.failed} failed")

    def _interpreter_start(self) -> float:
        t = time.monotonic()
        subprocess.run([self.cluster.python, "-m", "registrar", "--version"],
                       capture_output=True, check=False)  # fmt: skip
        return time.monotonic() - t

    def save_logs(self, dest: Path, limit: int = 200_000) -> None:
        """The end of every log of the cluster (agents, sidecars, routers, engines, etcd,
        load), to ``dest/NODE/`` (the state dir goes with the cluster)."""
        for log in sorted([*self.cluster.state_dir.glob("*/*.log"),
                           *self.cluster.state_dir.glob("*/load-*.json")]):  # fmt: skip
            to = dest / log.parent.name / log.name
            to.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "rb") as src:
                size = src.seek(0, os.SEEK_END)
                src.seek(max(0, size - limit))
                to.write_bytes(src.read())

    def destroy(self) -> None:
        left = self.cluster.destroy()
        if not left.empty:
            say(f"LEFT after destroy: {left.summary()}")


# Everything registrar imports when it runs (a broken import fails here, not in a sidecar).
IMPORT_CHECK = (
    "import importlib, pkgutil, registrar\n"
    "for m in pkgutil.walk_packages(registrar.__path__, 'registrar.'):\n"
    "    if not m.name.endswith('__main__'):\n"
    "        importlib.import_module(m.name)"
)


def freeze_registrar(work: Path, attempts: int = 12) -> Path:
    """A copy of the working tree's `registrar` package in ``work``, put first on the
    PYTHONPATH of every process the bench starts: a run of many minutes measures one version
    of the code, even while someone edits the tree. Copied again (5 s apart) until it imports."""
    src = Path(__file__).resolve().parents[1] / "registrar"
    python = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")
    for attempt in range(attempts):
        dest = work / f"src{attempt}"
        shutil.copytree(src, dest / "registrar", ignore=shutil.ignore_patterns("__pycache__"))
        check = subprocess.run([python if os.path.exists(python) else sys.executable, "-c",
                                IMPORT_CHECK], env={**os.environ, "PYTHONPATH": str(dest)},
                               capture_output=True, text=True, check=False)  # fmt: skip
        if check.returncode == 0:
            os.environ["PYTHONPATH"] = str(dest)
            return dest
        say(f"registrar does not import right now ({check.stderr.strip().splitlines()[-1]}); "
            "copying again in 5 s")  # fmt: skip
        time.sleep(5)  # someone is editing the tree: nothing to wait on but time
    raise RuntimeError("registrar kept failing to import")


def run(quick: bool = False, modes: Sequence[str] = MODES, state_root: str = "/tmp",
        keep_going: bool = True, logs: Path | None = None) -> ClusterResults:  # fmt: skip
    """Each mode on a fresh cluster. ``logs``: where the clusters' logs are saved (always
    after a failure: a temporary directory when None)."""
    shape = QUICK if quick else FULL
    results = ClusterResults(shape)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rgbench-cluster-src-"))
    saved_path = os.environ.get("PYTHONPATH")
    results.source = str(freeze_registrar(work))
    say(f"registrar as of now, copied to {results.source}")
    try:
        _run_modes(results, shape, modes, state_root, keep_going, logs)
    finally:
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
        shutil.rmtree(work, ignore_errors=True)
    results.seconds = time.monotonic() - began
    return results


def _run_modes(results: ClusterResults, shape: Shape, modes: Sequence[str], state_root: str,
               keep_going: bool, logs: Path | None) -> None:  # fmt: skip
    for mode in modes:
        say(f"=== {LABELS[mode]}: {shape.hosts} hosts x {shape.services} services x "
            f"{shape.copies}, {shape.routers} routers, {shape.rate:g} requests/s ===")
        one = ClusterRun(shape, mode, state_root)
        try:
            results.modes[mode] = one.run()
        except (Exception, KeyboardInterrupt) as exc:
            one.result.error = f"{type(exc).__name__}: {exc}"[:2000]
            results.modes[mode] = one.result
            say(f"{mode}: FAILED: {one.result.error}")
            if isinstance(exc, KeyboardInterrupt) or not keep_going:
                one.destroy()
                raise
        finally:
            if mode not in results.modes:
                results.modes[mode] = one.result
            if logs is not None or one.result.error is not None:
                where = (logs or Path(tempfile.mkdtemp(prefix="rgbench-cluster-"))) / mode
                with contextlib.suppress(OSError):
                    one.save_logs(where)
                    say(f"{mode}: logs saved in {where}")
            with contextlib.suppress(Exception):
                one.destroy()


# --- the report -------------------------------------------------------------------------------
def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _registrar_rss(r: ModeResult) -> tuple[float, int]:
    """MiB per process and how many, of the agents or else the sidecars."""
    role = "registrar-watch" if "registrar-watch" in r.rss_mib else "registrar-register"
    return r.rss_mib.get(role, 0.0), r.rss_count.get(role, 0)


def _registrar_cpu_s(r: ModeResult) -> float:
    """CPU seconds of the registrar processes per promotion."""
    return sum(v for k, v in r.cpu_per_promotion.items() if k.startswith("registrar"))


def _registrar_cpu(r: ModeResult) -> float:
    role = "registrar-watch" if "registrar-watch" in r.cpu else "registrar-register"
    return r.cpu.get(role, (0, 0.0))[1]


@dataclass(frozen=True)
class Line:
    metric: str
    cells: dict[str, str]
    target: str = ""
    met: str = ""
    how: str = ""


def _verdict(checks: dict[str, bool | None]) -> str:
    parts = [f"{LABELS[m].split(' (')[0]} {'met' if ok else '**missed**'}"
             for m, ok in checks.items() if ok is not None]  # fmt: skip
    return ", ".join(parts)


def lines(results: ClusterResults) -> list[Line]:
    m = results.modes
    sh = results.shape

    def per(fn: Callable[[ModeResult], str]) -> dict[str, str]:
        return {k: (fn(v) if v.error is None or fn(v) != "-" else "failed") for k, v in m.items()}

    def ok(fn: Callable[[ModeResult], bool | None]) -> dict[str, bool | None]:
        return {k: fn(v) for k, v in m.items()}

    out = [
        Line("bring-up: last container start → every key in etcd / in both routers / every "
             "frontend answering",
             per(lambda r: f"**{_s(r.to_keys)}** / {_s(r.to_routed)} / {_s(r.to_serving)}"),
             how=f"{sh.services * sh.copies} v1 containers started 4 at a time (first → last: "
             + ", ".join(f"{k} {_s(v.start_containers, 1)}" for k, v in m.items())
             + "); routers and agents were running; sidecars spawned right after each "
             "`docker run -d`; keys polled with etcdctl every 0.1 s, routers' rendered configs "
             "read, then a GET through each of the 2 x 70 frontends"),
        Line("steady state: etcd requests / min, whole cluster",
             per(lambda r: f"**{_n(r.requests_per_min)}**"),
             "≤ 300 (issue 17, point 5)",
             _verdict(ok(lambda r: None if r.requests_per_min is None
                         else r.requests_per_min <= 300)),
             f"`grpc_server_started_total` (unary calls + streams opened) summed over the 3 "
             f"members, delta over a {sh.steady:g} s window with the load running and nothing "
             "changing; by method: "
             + "; ".join(f"{k}: " + ", ".join(f"{a} {b * 60 / v.steady_window:.0f}" for a, b in
                                               sorted(v.steady.started.items()))
                         for k, v in m.items() if v.steady is not None and v.steady_window)),
        Line("steady state: registrar's own count of its etcd requests / min (Prometheus)",
             per(lambda r: ", ".join(f"{k} {v:g}" for k, v in r.own_requests.items()) or "-"),
             how="`increase(registrar_etcd_request_duration_seconds_count[window])` by job and "
             "op, as Prometheus scraped the agents and routers (sidecars serve no metrics)"),
        Line("steady state: etcd messages received / min; writes / min",
             per(lambda r: f"{_n(r.messages_per_min)}; {_n(r.writes_per_min)}"),
             how="`grpc_server_msg_received_total` summed over the members; writes = revision "
             "delta (the routers' `/registrar/routers/NODE` key, every 2 s each)"),
        Line("rolling deploy of every service: failed requests / sent",
             per(lambda r: "-" if r.deploy_failed is None
                 else f"**{r.deploy_failed}** / {r.deploy_sent:,}"),
             "0", _verdict(ok(lambda r: None if r.deploy_failed is None
                              else r.deploy_failed == 0)),
             f"waves of {sh.wave} services: start v2 beside v1 on other hosts, wait until both "
             "routers list it, `registrar promote S v2 --min-instances 2` one service at a time, "
             "`docker stop -t 1` v1; the whole deploy took "
             + ", ".join(f"{k} {_s(v.deploy_seconds, 0)}" for k, v in m.items())
             + "; failed per wave: "
             + "; ".join(f"{k} {v.wave_failed}" for k, v in m.items())
             + "; by step (start v2 / promote / stop v1, as the failures were counted): "
             + "; ".join(f"{k} {v.phase_failed}" for k, v in m.items())),
        Line("during the promotions: CPU seconds / etcd requests per `registrar promote`",
             per(lambda r: f"**{_registrar_cpu_s(r):.2f} s** / "
                 f"{sum(r.etcd_per_promotion.values()):.0f}" if r.etcd_per_promotion else "-"),
             how="utime + stime of the cluster's registrar processes (agents or sidecars, "
             "routers; the promote command itself not included) and etcd's request count, over "
             "each wave's promotions, divided by their number; by role and method: "
             + "; ".join(f"{k} CPU {v.cpu_per_promotion}, etcd {v.etcd_per_promotion}"
                         for k, v in m.items())),
        Line("`registrar promote`: wall time per service, p50 / max",
             per(lambda r: f"**{_s(pct(r.promote, 0.5))}** / {_s(max(r.promote, default=None))}"),
             how="from the root namespace through the etcd forwarders, interpreter start "
             "included (`registrar --version`: "
             + ", ".join(f"{k} {_s(v.interpreter)}" for k, v in m.items())
             + "); it returns once etcd's rotation matches"),
        Line("promote start → v1 out of both routers' configs, p50 / max",
             per(lambda r: f"{_s(pct(r.switched, 0.5))} / {_s(max(r.switched, default=None))}")),
        Line("host death: failed requests / sent until it was out of rotation (+2.5 s)",
             per(lambda r: "-" if r.death_failed is None
                 else f"**{r.death_failed}** / {r.death_sent:,} ({r.death_host}, "
                 f"{r.death_instances} instances)"),
             "0",
             _verdict(ok(lambda r: None if r.death_failed is None else r.death_failed == 0)),
             "agent / sidecars SIGKILLed and the host's link cut; afterwards, over "
             f"{sh.rate * 3:.0f} more requests: "
             + ", ".join(f"{k} {v.death_after_failed} failed" for k, v in m.items())),
        Line("host death: kill → HAProxy marked its servers DOWN / its keys gone / out of both "
             "routers' configs",
             per(lambda r: f"{_s(r.death_marked_down, 1)} / {_s(r.death_keys_gone, 1)} / "
                 f"**{_s(r.death_out_of_rotation, 1)}**"),
             f"keys ≤ TTL + 2 = {sh.ttl + 2} s",
             _verdict(ok(lambda r: None if r.death_keys_gone is None
                         else r.death_keys_gone <= sh.ttl + 2)),
             "DOWN: the last `Server ... is DOWN` either router's HAProxy logged (health check "
             "or live traffic) before the keys went; - when none did"),
        Line("RSS per agent / per sidecar (MiB)",
             per(lambda r: f"**{_registrar_rss(r)[0]:.1f}** (x{_registrar_rss(r)[1]})"),
             "sidecar ≤ 45",
             _verdict({k: (v.rss_mib.get("registrar-register", 0) <= 45) if k == "sidecars"
                       and v.rss_mib else None for k, v in m.items()})),
        Line("CPU at steady state, % of one core: per agent or sidecar / per `registrar "
             "haproxy` / per HAProxy process",
             per(lambda r: f"**{_registrar_cpu(r):.2f}** / "
                 f"{r.cpu.get('registrar-haproxy', (0, 0.0))[1]:.1f} / "
                 f"{r.cpu.get('haproxy', (0, 0.0))[1]:.1f}"),
             how="utime + stime over the steady window (/proc), the load running"),
        Line("RSS per router: `registrar haproxy` / its HAProxy processes (MiB)",
             per(lambda r: f"{r.rss_mib.get('registrar-haproxy', 0):.1f} / "
                 f"{r.rss_mib.get('haproxy', 0):.1f} (x{r.rss_count.get('haproxy', 0)})"),
             how="VmRSS at the end of the steady window; HAProxy: master and worker"),
        Line("RSS per host engine (dockerd + containerd); whole cluster (MiB)",
             per(lambda r: f"{r.engine_mib or 0:.0f}; {r.total_rss_mib or 0:,.0f}")),
    ]
    return out


def section(results: ClusterResults) -> str:
    sh = results.shape
    modes = list(results.modes)
    head = ["metric", *(LABELS[m] for m in modes), "target", "", "how"]
    out = [HEADING, ""]
    out.append(
        f"{sh.hosts} hosts (a network namespace, a Docker engine each), {sh.services} services x "
        f"{sh.copies} instances (busybox httpd), 3 etcd members, {sh.routers} routers "
        f"(`registrar haproxy`, one `--bind` per service), Prometheus, a client sending "
        f"{sh.rate:g} requests/s (each a new connection, 2 s timeout) round-robin over every "
        f"service on both routers; lease TTL {sh.ttl} s; ports published with NAT in each host's "
        f"namespace (`--userland-proxy=false`). A fresh cluster per column, every process "
        f"running one copy of registrar/ taken at the start; "
        f"{results.seconds / 60:.1f} min in all."
    )
    out.append("")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for line in lines(results):
        cells = [line.cells.get(m, "-") for m in modes]
        out.append("| " + " | ".join([line.metric, *cells, line.target, line.met, line.how])
                   + " |")  # fmt: skip
    out.append("")
    for mode, r in results.modes.items():
        out.append(f"- {LABELS[mode]}: client, whole run: {r.load_final or '-'}; 1-minute load "
                   f"average by phase: {r.loadavg or '-'} (2 cores; the client runs at nice "
                   "-10, as if on a machine of its own)")  # fmt: skip
    for mode, r in results.modes.items():
        if r.error:
            out.append("")
            out.append(f"{LABELS[mode]}: **failed**: `{r.error.splitlines()[0][:300]}`")
    out.append("")
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------------
def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_bench",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK.hosts} hosts x {QUICK.services} services (writes nothing)")
    p.add_argument("--mode", choices=("both", *MODES), default="both")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where the section goes (default: replaced in {RESULTS}; --quick: "
                   "nowhere)")  # fmt: skip
    p.add_argument("--state-root", default="/tmp")
    p.add_argument("--logs", type=Path, default=None,
                   help="save every log of the clusters there (after a failure: always, in a "
                   "temporary directory by default)")  # fmt: skip
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cluster_bench: needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = run(args.quick, modes, args.state_root, logs=args.logs)
    block = section(results)
    print(block)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        old = out.read_text() if out.exists() else ""
        out.write_text(add_section(old, HEADING, block))
        say(f"wrote {out}")
    return 0 if all(r.ok for r in results.modes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
