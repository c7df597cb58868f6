"""`make bench`, the scale part: 100, 300 and 1,000 simulated hosts x 10 instances against a
real 3-member etcd, two real `registrar haproxy` routers and one `registrar catalog`.

    .venv/bin/python -m bench.scale_bench [--quick] [--sizes 100,300,1000] [--out PATH]

The hosts are the agents' own classes over the real etcd client, many per process
(bench/scale_hosts.py; Docker replaced by the in-memory source of the fast tier); each runs 10
containers, of as many services as there are hosts (each service's 10 instances on 10 hosts).
Every instance points at one of a few shared loopback listeners (bench/scale_listener.py), by
version, so a router's `show servers state` says which version it serves. The routers bind
every service through `--bind-file`, keep SPARE_SLOTS empty slots a backend (`--spare-slots`)
and check each server every CHECK_INTERVAL seconds
(`--check-interval`: 10,000 servers x 2 routers at the default 0.5 s would be 40,000 checks a
second into the few listeners of this one machine; across real hosts each server would see 4).

For each size, on a fresh cluster: bring-up; etcd at rest; start-to-traffic (a new instance
of a service nobody served before, until a request through each router reaches it); one
promotion; a rolling deploy of up to 100 services under client load; a router restarted; the
etcd leader killed (under client load). Run alone, a full run replaces the section in
bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.observe import cpu_seconds, process_tree, rss_kib, scrape
from bench.report import add_section, median, ms, p95
from bench.scale_listener import raise_open_files
from registrar.adapters.etcd_store import GatewayError
from registrar.core.planner import json_object
from registrar.haproxy.process import cli, socket_paths
from tests.cluster.load import LoadStats
from tests.support.etcd import EtcdCluster
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port

RESULTS = Path(__file__).with_name("results.md")
HEADING = "## Past the seed: 1,000 hosts simulated (bench/scale_bench.py)"
PREFIX, CONTROL = "/scale", "/scale-ctl"
SIZES = (100, 300, 1000)
QUICK_SIZES = (30,)
PER_HOST = 10
START_WAVE = 100  # hosts started at once (bring-up)
HOSTS_PER_PROCESS = 63  # 16 processes at 1,000 hosts: less waiting on each one's GIL
CHECK_INTERVAL = "10"
# 1,000 backends x 32 slots (the default at least) needed 33,569 file descriptors, over this
# machine's hard limit of 20,000: 4 a backend, and more instances than that are a reload.
SPARE_SLOTS = 4
OBSERVER_TIMEOUT = 30.0  # the bench's own etcd reads
MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None  # etcd's data (ScaleRun)
PROBES = 30  # start-to-traffic samples, each a service of its own (bound, never served before)
DEPLOYED = 100  # services in the rolling deploy
PORT_A, PORT_B = 21000, 24000  # the routers' frontends: PORT + service index
LISTEN_V1, LISTEN_V2, LISTEN_PROBE = (27000, 27001), (27002, 27003), 27010
LOAD_RATE = 200.0
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[scale {time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.05) -> float:
    """Seconds until `check()` held; TimeoutError naming `what`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - start


# --- the simulated hosts ----------------------------------------------------------------------


class SimProcess:
    """One `python -m bench.scale_hosts`: requests in, answers out, matched by id."""

    _ids = itertools.count(1)

    def __init__(self, etcd: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale_hosts", "--etcd", etcd, "--prefix", PREFIX,
             "--control-prefix", CONTROL],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),  # noqa: SIM115
            text=True, bufsize=1, preexec_fn=_elsewhere)
        self._waiting: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            answer = json.loads(line)
            with self._lock:
                future = self._waiting.pop(answer.get("id"), None)
            if future is not None:
                future.set_result(answer)
        with self._lock:
            for future in self._waiting.values():
                future.set_exception(RuntimeError(f"simulated hosts exited: see {self.log}"))

    def send(self, op: str, **fields: Any) -> Future[dict[str, Any]]:
        request_id = next(self._ids)
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._waiting[request_id] = future
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": request_id, "op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return future

    def ask(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        return self.send(op, **fields).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit", timeout=30)
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --- a router ---------------------------------------------------------------------------------


class Router:
    def __init__(self, name: str, work: Path, etcd: str, bind_file: Path) -> None:
        self.name = name
        self.work = work
        self.config = work / f"{name}.cfg"
        self.metrics_port = free_port()
        self.args = ["haproxy", "--etcd", etcd, "--prefix", PREFIX, "--control-prefix", CONTROL,
                     "--bind-file", str(bind_file), "--check-interval", CHECK_INTERVAL,
                     "--spare-slots", str(SPARE_SLOTS),
                     "--node", name, "--config", str(self.config), "--log-format", "json",
                     "--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        self.stats_socket = socket_paths(str(work), str(self.config))[1]
        self.reloads_before = 0.0  # of the processes before a restart
        self.proc = self._start()

    def _start(self) -> RegistrarProcess:
        return RegistrarProcess(self.args, log_dir=self.work / f"logs-{self.name}")

    def restart(self) -> float:
        """Stops it (SIGTERM: HAProxy soft-stops), starts it again; how long the stop took."""
        self.reloads_before += self.metric("registrar_haproxy_reloads_total")
        t0 = time.monotonic()
        self.proc.stop(60)
        stopped = time.monotonic() - t0
        self.proc = self._start()
        return stopped

    def metric(self, name: str) -> float:
        with contextlib.suppress(OSError):
            return sum(v for n, _labels, v in scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")
                       if n == name)
        return 0.0

    def rows(self, backend: str | None = None) -> list[list[str]]:
        """`show servers state [BACKEND]`: fields 1 backend, 3 server name, 5 op_state (2 up),
        6 admin_state (1, 4, 5: in maintenance), 17 address... 18 port."""
        try:
            text = cli(self.stats_socket, "show servers state" + (f" be_{backend}"
                                                                  if backend else ""), 10.0)
        except OSError:
            return []
        return [f for line in text.splitlines() if len(f := line.split()) > 18
                and f[0].isdigit()]

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def haproxy_pids(self) -> list[int]:
        return [p for p in process_tree([self.proc.pid]) if p != self.proc.pid]


def up_ports(rows: Iterable[list[str]]) -> list[int]:
    """The ports of the servers that take traffic: up (op 2) and not in maintenance."""
    return [int(f[18]) for f in rows if f[5] == "2" and int(f[6]) & 1 == 0 and f[18] != "0"]


# --- one size ---------------------------------------------------------------------------------


@dataclass
class SizeResult:
    hosts: int
    services: int
    instances: int
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ScaleRun:
    def __init__(self, hosts: int, work: Path) -> None:
        self.n = hosts
        self.work = work
        self.services = [f"s{i:04d}" for i in range(hosts)]
        self.probes = [f"probe{i}" for i in range(PROBES)]
        self.nodes = [f"h{i:04d}" for i in range(hosts)]
        self.result = SizeResult(hosts, hosts, hosts * PER_HOST)
        self.f = self.result.figures
        self.placement: dict[str, str] = {}  # container name -> node
        self.procs: list[SimProcess] = []
        self.by_node: dict[str, SimProcess] = {}
        self.etcd = EtcdCluster(work / "etcd", 3)
        # etcd wants a disk of its own (its WAL's fsync under 10 ms at p99); here the three
        # members share one virtual disk with everything else, and one rolling deploy saw
        # fdatasync take 1.1 s, the leader miss heartbeats and 401 leases expire. Their data
        # lives in memory, as on disks of their own (their logs stay in `work`).
        self.etcd_data = Path(tempfile.mkdtemp(prefix=f"scale-{hosts}-etcd-", dir=MEMORY_DIR))
        for member in self.etcd.members:  # a busy 2-core machine: no elections for nothing
            member.heartbeat_ms, member.election_ms = 100, 1000
            member.extra_args += ["--quota-backend-bytes", str(8 * 1024**3)]
            member.data_dir = self.etcd_data / member.name
        self.routers: list[Router] = []
        self.catalog: RegistrarProcess | None = None
        self.listeners: list[subprocess.Popen[bytes]] = []
        self.reader: EtcdReader | None = None

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        say(f"{self.n} hosts: etcd, listeners, routers, catalog")
        self.etcd.start()
        endpoints = self.etcd.endpoints
        # the bench's own reads (10,000 keys at once) wait as long as a busy etcd takes: an
        # observer's timeout is no failure of what it observes
        self.reader = EtcdReader(self.etcd.urls[0], timeout=OBSERVER_TIMEOUT)
        # One process a port (a probe's apart): each stands for other machines, so it runs at
        # a higher priority than the cluster on this one; a failure then is the cluster's.
        groups = [[f"{p}=v1"] for p in LISTEN_V1] + [[f"{p}=v2"] for p in LISTEN_V2] + [
            [f"{LISTEN_PROBE + i}=probe{i}" for i in range(PROBES)]]
        for labels in groups:
            proc = subprocess.Popen([sys.executable, "-m", "bench.scale_listener", *labels],
                                    stdout=subprocess.PIPE, preexec_fn=_outside)
            assert proc.stdout is not None
            proc.stdout.readline()
            self.listeners.append(proc)
        for name, base in (("router-a", PORT_A), ("router-b", PORT_B)):
            bind_file = self.work / f"{name}.binds"
            bind_file.write_text("".join(
                f"{s}=127.0.0.1:{base + i}\n" for i, s in enumerate(self.services + self.probes)))
            self.routers.append(Router(name, self.work, endpoints, bind_file))
        self.catalog_port = free_port()
        self.catalog = RegistrarProcess(
            ["catalog", "--etcd", endpoints, "--prefix", PREFIX, "--control-prefix", CONTROL,
             "--listen", f"127.0.0.1:{self.catalog_port}", "--log-format", "json"],
            log_dir=self.work / "logs-catalog")
        for router in self.routers:
            router.proc.wait_for_log("haproxy started", timeout=120)
        urls = self.etcd.urls
        for i in range(0, self.n, HOSTS_PER_PROCESS):
            # each process's hosts talk to the members in their own order (spread like a fleet)
            order = urls[len(self.procs) % 3:] + urls[:len(self.procs) % 3]
            sim = SimProcess(",".join(order), self.work / f"hosts-{len(self.procs)}.log")
            self.procs.append(sim)
            for node in self.nodes[i:i + HOSTS_PER_PROCESS]:
                self.by_node[node] = sim

    def close(self) -> None:
        for sim in self.procs:
            sim.close()
        for router in self.routers:
            with contextlib.suppress(Exception):
                router.proc.stop(30)
            router.proc.kill()
        if self.catalog is not None:
            with contextlib.suppress(Exception):
                self.catalog.stop(10)
            self.catalog.kill()
        for listener in self.listeners:
            listener.kill()
            listener.wait(10)
        if self.reader is not None:
            self.reader.close()
        self.etcd.destroy()
        shutil.rmtree(self.etcd_data, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------
    def ask_all(self, op: str, timeout: float = 120.0, **fields: Any) -> list[dict[str, Any]]:
        futures = [sim.send(op, **fields) for sim in self.procs]
        return [f.result(timeout) for f in futures]

    def start_containers(self, specs: Sequence[tuple[str, str, str, str, int]]
                         ) -> dict[str, float]:
        """(node, name, service, version, port) each: wall time of each `start` event."""
        futures = {}
        for node, name, service, version, port in specs:
            self.placement[name] = node
            futures[name] = self.by_node[node].send("start", node=node, name=name,
                                                     service=service, version=version, port=port)
        return {name: f.result(600)["t"] for name, f in futures.items()}

    def stop_containers(self, names: Iterable[str]) -> None:
        futures = [self.by_node[self.placement.pop(n)].send("stop", name=n) for n in names]
        for f in futures:
            f.result(600)

    def acked(self, names: Sequence[str]) -> dict[str, float | None]:
        got: dict[str, float | None] = {}
        for sim in self.procs:
            got.update(sim.ask("acked", timeout=300, names=list(names))["t"])
        return got

    def all_acked(self, names: Sequence[str]) -> bool:
        return all(v is not None for v in self.acked(names).values())

    def etcd_figures(self) -> dict[str, Any]:
        """Requests by gRPC method summed over the members, the revision, the largest DB."""
        requests: dict[str, int] = {}
        revision, db, db_in_use = 0, 0, 0
        for url in self.etcd.urls:
            with contextlib.suppress(OSError):
                for name, labels, value in scrape(f"{url}/metrics"):
                    if name == "grpc_server_started_total":
                        method = labels.get("grpc_method", "?")
                        requests[method] = requests.get(method, 0) + int(value)
                    elif name == "etcd_debugging_mvcc_current_revision":
                        revision = max(revision, int(value))
                    elif name == "etcd_mvcc_db_total_size_in_bytes":
                        db = max(db, int(value))
                    elif name == "etcd_mvcc_db_total_size_in_use_in_bytes":
                        db_in_use = max(db_in_use, int(value))
        return {"requests": requests, "revision": revision, "db": db, "db_in_use": db_in_use}

    def placements(self, version: str, services: Sequence[str], shift: int = 0
                   ) -> list[tuple[str, str, str, str, int]]:
        """10 instances of each service on 10 different hosts (spread evenly)."""
        step = max(1, self.n // PER_HOST)
        ports = LISTEN_V1 if version == "v1" else LISTEN_V2
        specs = []
        for s in services:
            index = self.services.index(s)
            for k in range(PER_HOST):
                node = self.nodes[(index + k * step + shift) % self.n]
                specs.append((node, f"{s}-{version}-{k}", s, version, ports[k % len(ports)]))
        return specs

    def total_up(self, router: Router) -> int:
        return len(up_ports(router.rows()))

    def has_up(self, router: Router, count: int, service: str | None = None,
               ports: Sequence[int] | None = None) -> bool:
        """Whether `router` has at least `count` servers up (of `service`, on `ports`)."""
        up = up_ports(router.rows(service))
        return sum(1 for p in up if ports is None or p in ports) >= count

    # -- the phases ----------------------------------------------------------------------------
    def bring_up(self) -> None:
        say(f"{self.n} hosts: agents starting")
        started = time.monotonic()
        # As a fleet starts: in waves of up to START_WAVE hosts (spread over the processes), each
        # once the one before has its leases; a thousand agents connecting in the same second
        # to one etcd on this 2-core machine time out and retry together (docs/scale.md).
        per_process = {sim: [n for n in self.nodes if self.by_node[n] is sim] for sim in self.procs}
        step = max(1, START_WAVE // len(self.procs))
        ready = 0
        for i in range(0, max(len(v) for v in per_process.values()), step):
            futures = [sim.send("hosts", nodes=nodes[i:i + step])
                       for sim, nodes in per_process.items() if nodes[i:i + step]]
            ready += sum(f.result(600)["ready"] for f in futures)
        self.f["agents_ready_s"] = time.monotonic() - started
        say(f"{ready} agents with a lease in {self.f['agents_ready_s']:.1f} s; "
            f"{self.n * PER_HOST} containers starting")
        specs = self.placement_v1 = self.placements("v1", self.services)
        t0 = time.time()
        names: list[str] = []
        # the containers too, a wave of START_WAVE * PER_HOST at a time, each once the one
        # before is in etcd
        for i in range(0, len(specs), START_WAVE * PER_HOST):
            wave = list(self.start_containers(specs[i:i + START_WAVE * PER_HOST]))
            names += wave
            wait_for("every key in etcd", functools.partial(self.all_acked, wave), 600, 0.5)
        total = len(names)
        acked = self.acked(names)
        self.f["bring_up_keys_s"] = max(v for v in acked.values() if v is not None) - t0
        keys = len(self.reader.keys(PREFIX + "/")) if self.reader else 0
        self.f["keys"] = keys
        lasts = []
        for router in self.routers:
            wait_for(f"{router.name} serving all {total}",
                     functools.partial(self.has_up, router, total), 600, every=0.5)
            lasts.append(time.time() - t0)
        self.f["bring_up_routers_s"] = max(lasts)
        say(f"bring-up: keys {self.f['bring_up_keys_s']:.1f} s, routers serving "
            f"{self.f['bring_up_routers_s']:.1f} s")

    def at_rest(self, window: float) -> None:
        """No change, a light client load over every service of both routers (so each
        router's report carries every service, as in production)."""
        say(f"at rest: settling, then {window:g} s measured")
        targets = [f"{s}=127.0.0.1:{base + i}" for i, s in enumerate(self.services)
                   for base in (PORT_A, PORT_B)]
        with Load(self.work / "load-rest.json", targets):
            self._at_rest(window)

    def _at_rest(self, window: float) -> None:
        time.sleep(10)
        before = self.etcd_figures()
        cpu0 = self._cpu()
        t = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t
        after = self.etcd_figures()
        cpu1 = self._cpu()
        by_method = {m: (after["requests"].get(m, 0) - before["requests"].get(m, 0)) / elapsed
                     for m in after["requests"]}
        self.f["rest_requests_per_s"] = sum(by_method.values())
        self.f["rest_by_method"] = {m: round(v, 1) for m, v in sorted(
            by_method.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        self.f["rest_writes_per_s"] = (after["revision"] - before["revision"]) / elapsed
        self.f["db_bytes"] = after["db"]
        self.f["db_in_use_bytes"] = after["db_in_use"]
        self.f["db_growth_per_hour"] = (after["db"] - before["db"]) / elapsed * 3600
        self.f["cpu"] = {role: (cpu1[role] - cpu0[role]) / elapsed for role in cpu1}
        self.f["rss_mib"] = self._rss()
        report = self.reader.get(f"{CONTROL}/routers/router-a") if self.reader else None
        self.f["report_bytes"] = len(report or "")
        say(f"at rest: {self.f['rest_requests_per_s']:.0f} etcd requests/s "
            f"({self.f['rest_by_method']}), {self.f['rest_writes_per_s']:.1f} writes/s, "
            f"report {self.f['report_bytes']} B, cpu {self.f['cpu']}, rss {self.f['rss_mib']}")

    def _roles(self) -> dict[str, list[int]]:
        roles = {"routers": [p for r in self.routers for p in r.pids()],
                 "haproxy": [p for r in self.routers for p in r.haproxy_pids()],
                 "catalog": [self.catalog.pid] if self.catalog else [],
                 "etcd": [m.pid for m in self.etcd.members if m.pid],
                 "hosts": [s.proc.pid for s in self.procs]}
        return roles

    def _cpu(self) -> dict[str, float]:
        return {role: cpu_seconds(pids) for role, pids in self._roles().items()}

    def _rss(self) -> dict[str, float]:
        roles = self._roles()
        return {"router": max(rss_kib(p) for p in roles["routers"]) / 1024,
                "haproxy": max(sum(rss_kib(p) for p in r.haproxy_pids())
                               for r in self.routers) / 1024,
                "catalog": rss_kib(roles["catalog"][0]) / 1024,
                "hosts_per_process": max(rss_kib(p) for p in roles["hosts"]) / 1024}

    def start_to_traffic(self) -> None:
        """A new instance of a service no router served before, on some host; the time from
        its `start` event to the first request through each router that it answered."""
        say("start to traffic")
        samples: list[float] = []
        to_key: list[float] = []
        timeline: list[dict[str, Any]] = []
        for i, probe in enumerate(self.probes):
            node = self.nodes[(i * 37) % self.n]
            index = len(self.services) + i
            got: dict[str, float] = {}
            done = threading.Event()

            def poll(router: str, port: int, got: dict[str, float] = got,
                     done: threading.Event = done) -> None:
                deadline = time.monotonic() + 20
                while not done.is_set() and time.monotonic() < deadline:
                    if _answers(port):
                        got[router] = time.time()
                        return
                    time.sleep(0.001)

            pollers = [threading.Thread(target=poll, args=(r.name, base + index))
                       for r, base in zip(self.routers, (PORT_A, PORT_B), strict=True)]
            for p in pollers:
                p.start()
            started = self.start_containers([(node, f"{probe}-v1-0", probe, "v1",
                                              LISTEN_PROBE + i)])[f"{probe}-v1-0"]
            for p in pollers:
                p.join(25)
            done.set()
            acked = self.acked([f"{probe}-v1-0"]).get(f"{probe}-v1-0")
            if acked is not None:
                to_key.append(acked - started)
            timeline.append({"probe": probe, "start": started, "key": acked, **got})
            if len(got) == len(self.routers):
                samples.append(max(got.values()) - started)
            else:
                self.result.notes.append(f"probe {probe} not served by both routers in 20 s")
        self.f["start_to_traffic"] = samples
        self.f["start_to_key"] = to_key
        self.f["probe_timeline"] = timeline
        say(f"start to traffic: p50 {ms(median(samples))} ms p95 {ms(p95(samples))} ms "
            f"(to the key: p50 {ms(median(to_key))} ms)")

    def promotion(self) -> None:
        """v2 of one service beside its v1; `registrar promote`; until every agent saw it and
        both routers serve only v2."""
        service = self.services[1]
        say(f"one promotion ({service})")
        specs = self.placements("v2", [service], shift=1)
        names = [s[1] for s in specs]
        self.start_containers(specs)
        wait_for("v2 keys", functools.partial(self.all_acked, names), 60)
        for router in self.routers:
            wait_for(f"{router.name}: v1 and v2 serve",
                     functools.partial(self.has_up, router, 2 * PER_HOST, service), 60, 0.1)
        before = self.etcd_figures()
        stop = threading.Event()
        only_v2: dict[str, float] = {}

        def watch(router: Router) -> None:
            while not stop.is_set():
                ports = up_ports(router.rows(service))
                if ports and set(ports) <= set(LISTEN_V2):
                    only_v2[router.name] = time.time()
                    return
                time.sleep(0.002)

        watchers = [threading.Thread(target=watch, args=(r,)) for r in self.routers]
        for w in watchers:
            w.start()
        t0 = time.time()
        promote = RegistrarProcess(["promote", service, "v2", "--etcd", self.etcd.endpoints,
                                    "--prefix", PREFIX, "--control-prefix", CONTROL],
                                   log_dir=self.work / "logs-promote")
        code = promote.wait(120)
        self.f["promote_command_s"] = time.time() - t0
        for w in watchers:
            w.join(30)
        stop.set()
        meta = self.reader.get_meta(f"{CONTROL}/promoted/{service}") if self.reader else None
        revision = meta[1].mod_revision if meta else 0
        seen: dict[str, float | None] = {}
        for sim in self.procs:
            seen.update(sim.ask("seen", revision=revision)["t"])
        times = [t for t in seen.values() if t is not None]
        first = min(times) if times else t0
        self.f["promote_exit"] = code
        self.f["promote_agents_missing"] = sum(1 for t in seen.values() if t is None)
        self.f["promote_agents_s"] = max(times) - first if times else None
        self.f["promote_routers_s"] = (max(only_v2.values()) - first
                                       if len(only_v2) == len(self.routers) else None)
        after = self.etcd_figures()
        self.f["promote_etcd_requests"] = sum(after["requests"].values()) - sum(
            before["requests"].values())
        self.f["promote_etcd_writes"] = after["revision"] - before["revision"]
        say(f"promotion: command {self.f['promote_command_s']:.2f} s (exit {code}); every "
            f"agent saw it {self.f['promote_agents_s']} s after the first; both routers only "
            f"v2 {self.f['promote_routers_s']} s; etcd {self.f['promote_etcd_requests']} "
            f"requests, {self.f['promote_etcd_writes']} writes")

    def rolling_deploy(self) -> None:
        """Up to DEPLOYED services v1 -> v2 at once, under client load through both routers:
        start v2, promote each, stop v1."""
        services = self.services[2:2 + min(DEPLOYED, self.n - 2)]
        say(f"rolling deploy of {len(services)} services under load")
        targets = [f"{s}=127.0.0.1:{base + self.services.index(s)}"
                   for s in services for base in (PORT_A, PORT_B)]
        lost_before = self.leases_lost()
        with Load(self.work / "load-deploy.json", targets) as load:
            time.sleep(3)
            t0 = time.monotonic()
            specs = self.placements("v2", services, shift=1)
            names = [s[1] for s in specs]
            self.start_containers(specs)
            wait_for("v2 keys", functools.partial(self.all_acked, names),
                     300, 0.5)
            for router in self.routers:  # v2 takes traffic before v1 goes
                wait_for(f"{router.name}: v2 serving", functools.partial(
                    self.has_up, router, len(names), None, LISTEN_V2), 300, 0.5)
            with ThreadPoolExecutor(8) as pool:
                promoted = list(pool.map(self._promote, services))
            old = [s[1] for s in self.placements("v1", services)]
            self.stop_containers(old)
            for router in self.routers:
                wait_for(f"{router.name}: v1 gone", functools.partial(
                    self.v1_gone, router, services), 300, 0.5)
            self.f["deploy_s"] = time.monotonic() - t0
            time.sleep(2)
        stats = load.stats
        failed = [(service, why) for service, (code, _took, why)
                  in zip(services, promoted, strict=True) if code != 0]
        self.f["deploy_promote_failures"] = len(failed)
        self.f["deploy_promote_s"] = [took for _code, took, _why in promoted]
        self.f["deploy_promote_errors"] = dict(failed[:10])
        for service, why in failed[:3]:
            self.result.notes.append(f"`promote {service} v2` failed in the rolling deploy: {why}"
                                     f"{self.still_v1(service)}")
        self.f["deploy_leases_lost"] = self.leases_lost() - lost_before
        self.f["deploy_requests"] = stats.sent if stats else 0
        self.f["deploy_failed"] = stats.failed if stats else None
        self.f["deploy_reasons"] = stats.reasons if stats else {}
        say(f"rolling deploy: {self.f['deploy_s']:.1f} s, {self.f['deploy_failed']} of "
            f"{self.f['deploy_requests']} requests failed {self.f['deploy_reasons']}, "
            f"{self.f['deploy_leases_lost']} leases lost")

    def leases_lost(self) -> int:
        """Keepalives so far, over every simulated host, that found their lease expired."""
        return sum(int(sim.ask("beats", after=time.time())["lost"]) for sim in self.procs)

    def still_v1(self, service: str) -> str:
        """After a failed promotion: the v1 keys still in rotation, with the revision that
        last wrote each and the promotion's (was it never applied, or put back after?)."""
        if self.reader is None:
            return ""
        try:
            promoted = self.reader.get_meta(f"{CONTROL}/promoted/{service}")
            stored = self.reader.get_meta_prefix(f"{PREFIX}/{service}/")
        except (OSError, GatewayError) as exc:
            return f" (etcd not read: {exc})"
        left = [meta for value, meta in stored.values()
                if (json_object(value) or {}).get("version") == "v1"]
        if not left:
            return " (no v1 left in rotation now)"
        at = promoted[1].mod_revision if promoted else None
        return (f" (promoted at revision {at}; v1 still in rotation: "
                + ", ".join(f"{m.key.rsplit('/', 1)[-1]} written at {m.mod_revision}, "
                            f"lease {m.lease_id:x}" for m in left[:3]) + ")")

    def v1_gone(self, router: Router, services: Sequence[str]) -> bool:
        names = {f"be_{s}" for s in services}
        return not any(p in LISTEN_V1 for p in up_ports(f for f in router.rows()
                                                          if f[1] in names))

    def _promote(self, service: str) -> tuple[int, float, str]:
        """`registrar promote SERVICE v2`: its exit code, how long it took and, when it failed,
        the last line it wrote (the work directory, and its logs, go with the run)."""
        started = time.monotonic()
        proc = RegistrarProcess(["promote", service, "v2", "--etcd", self.etcd.endpoints,
                                 "--prefix", PREFIX, "--control-prefix", CONTROL,
                                 "--timeout", "120"], log_dir=self.work / "logs-promote")
        code = proc.wait(180)
        lines = proc.logs().strip().splitlines() if code != 0 else []
        return code, time.monotonic() - started, lines[-1][:300] if lines else ""

    def router_restart(self) -> None:
        router = self.routers[0]
        total = self.total_up(self.routers[1])
        say(f"router restart at {total} servers")
        self.f["router_stop_s"] = router.restart()
        t0 = time.monotonic()
        progress: list[tuple[float, int]] = []  # (seconds, servers up) whenever it moved

        def serving_all() -> bool:
            up = self.total_up(router)
            if not progress or progress[-1][1] != up:
                progress.append((round(time.monotonic() - t0, 2), up))
            return up >= total

        wait_for(f"{router.name} serving {total} again", serving_all, 600, 0.1)
        self.f["router_restart_s"] = time.monotonic() - t0
        self.f["router_restart_progress"] = progress[:20]
        self.f["router_restart_servers"] = total
        say(f"router restart: stopped in {self.f['router_stop_s']:.1f} s, serving everything "
            f"again {self.f['router_restart_s']:.1f} s after its start")

    def leader_kill(self) -> None:
        """Under client load over a few services of both routers."""
        say("etcd leader killed")
        keys_before = len(self.reader.keys(PREFIX + "/")) if self.reader else 0
        services = self.services[:20]
        targets = [f"{s}=127.0.0.1:{base + self.services.index(s)}"
                   for s in services for base in (PORT_A, PORT_B)]
        lost_before = self.leases_lost()
        with Load(self.work / "load-leader.json", targets) as load:
            time.sleep(3)
            leader = self.etcd.leader_index(30)
            killed_at = time.time()
            self.etcd.kill(leader)
            after = killed_at + 0.001

            def beats_back() -> bool:
                for sim in self.procs:
                    if any(t is None for t in sim.ask("beats", after=after)["t"].values()):
                        return False
                return True

            wait_for("every agent's heartbeat", beats_back, 120, 0.5)
            beats: dict[str, float | None] = {}
            lost = -lost_before
            for sim in self.procs:
                answer = sim.ask("beats", after=after)
                beats.update(answer["t"])
                lost += answer["lost"]
            self.f["leader_heartbeats_back_s"] = max(
                t for t in beats.values() if t is not None) - killed_at
            self.f["leader_leases_lost"] = lost
            time.sleep(5)
        reader = EtcdReader(self.etcd.urls[(leader + 1) % 3], timeout=OBSERVER_TIMEOUT)
        keys_after = len(reader.keys(PREFIX + "/"))
        reader.close()
        self.f["leader_keys_lost"] = keys_before - keys_after
        stats = load.stats
        self.f["leader_requests"] = stats.sent if stats else 0
        self.f["leader_failed"] = stats.failed if stats else None
        self.etcd.start_member(leader)
        say(f"leader kill: heartbeats back {self.f['leader_heartbeats_back_s']:.2f} s, keys "
            f"lost {self.f['leader_keys_lost']}, leases lost {lost}, "
            f"{self.f['leader_failed']} of {self.f['leader_requests']} requests failed")

    def totals(self) -> None:
        self.f["reloads"] = {r.name: r.reloads_before + r.metric(
            "registrar_haproxy_reloads_total") for r in self.routers}
        self.f["router_rss_mib_end"] = max(rss_kib(p) for r in self.routers
                                           for p in r.pids()) / 1024
        threads = fds = 0
        for sim in self.procs:
            st = sim.ask("stats")
            threads += st["threads"]
            fds += st["fds"]
        self.f["sim_threads"] = threads
        self.f["sim_fds"] = fds


def _elsewhere() -> None:
    """(in a child) The simulated hosts stand for a thousand other machines: a lower priority
    than etcd, the routers and the catalog, which would have machines of their own. (Without
    it, 5,000 threads of simulated agents left etcd's members under 1 % of a core each: its
    leader missed heartbeats and leases expired.)"""
    os.nice(10)


def _outside() -> None:
    """(in a child) The clients and servers stand for other machines: a higher priority."""
    os.nice(-5)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


class Load:
    """tests/cluster/load.py as a plain subprocess over the given frontends."""

    def __init__(self, stats: Path, targets: Sequence[str]) -> None:
        self.path = stats
        args = [a for t in targets for a in ("--target", t)]
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent.parent / "tests/cluster/load.py"), *args,
             "--rate", str(LOAD_RATE), "--stats", str(stats), "--timeout", "5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_outside)
        self.stats: LoadStats | None = None

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        with contextlib.suppress(OSError, ValueError):
            self.stats = LoadStats(json.loads(self.path.read_text()))


def leases_lost(count: int | None) -> str:
    """What the deploy's table cell adds when leases expired during it (their keys went)."""
    return f"; {count} leases lost" if count else ""


def promote_failures(count: int | None) -> str:
    """What the deploy's table cell adds when some of its `promote` commands failed."""
    return f"; `promote` failed {count} times" if count else ""


PHASES = ("bring_up", "at_rest", "start_to_traffic", "promotion", "rolling_deploy",
          "router_restart", "leader_kill")


def run_size(hosts: int, quick: bool, keep: bool = False, through: str = PHASES[-1]
             ) -> SizeResult:
    work = Path(tempfile.mkdtemp(prefix=f"scale-{hosts}-"))
    run = ScaleRun(hosts, work)
    try:
        run.start()
        for phase in PHASES[:PHASES.index(through) + 1]:
            if phase == "at_rest":
                run.at_rest(10 if quick else 30)
            else:
                getattr(run, phase)()
        run.totals()
    except (TimeoutError, RuntimeError, AssertionError, OSError) as exc:
        where = [f for f in traceback.extract_tb(exc.__traceback__) if "/bench/" in f.filename]
        at = f" (in {where[-1].name}, line {where[-1].lineno})" if where else ""
        run.result.notes.append(f"stopped: {type(exc).__name__}: {exc}{at}")
        say(f"{hosts} hosts: stopped: {type(exc).__name__}: {exc}{at} (logs in {work})")
        keep = True
    finally:
        run.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return run.result


def _s(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 1024**2:.1f}"


def _ok(value: float | None, limit: float) -> str:
    return "" if value is None else (" ✓" if value <= limit else " ✗")


def section(results: Sequence[SizeResult]) -> str:
    """The markdown for bench/results.md: a line per size in each table, targets marked at
    the largest."""
    out = [HEADING, "",
           f"Simulated hosts x {PER_HOST} instances (as many services as hosts), a 3-member "
           "etcd 3.4 (its data in memory, as on disks of its own), two `registrar haproxy` "
           "(tcp, `--bind-file`, "
           f"`--check-interval {CHECK_INTERVAL}`, `--spare-slots {SPARE_SLOTS}`) and one "
           "`registrar catalog`, on this one 2-core machine; hosts and their containers start "
           f"in waves of {START_WAVE} hosts (docs/scale.md says why and what each figure means). "
           "Targets (at 1,000 hosts): promotion applied "
           "everywhere <= 2 s, router RSS <= 200 MiB, start to traffic p50 <= 50 ms, etcd at "
           "rest <= 250 requests/s.", "",
           "| hosts | instances | agents with a lease | every key in etcd | both routers "
           "serving all | start -> key p50 | start -> traffic p50 / p95 |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.figures
        traffic = f.get("start_to_traffic") or []
        p50 = median(traffic)
        out.append(f"| {r.hosts} | {r.instances} | {_s(f.get('agents_ready_s'))} s | "
                   f"{_s(f.get('bring_up_keys_s'))} s | {_s(f.get('bring_up_routers_s'))} s | "
                   f"{ms(median(f.get('start_to_key') or []))} ms | {ms(p50)} / "
                   f"{ms(p95(traffic))} ms{_ok(p50, 0.05) if r.hosts >= 1000 else ''} |")
    out += ["", "At rest (a light load over every service of both routers; 30 s):", "",
            "| hosts | etcd requests/s | by method | writes/s | etcd DB | DB growth / hour "
            "(no compaction) | a router's report | router CPU / RSS (registrar) | HAProxy RSS "
            "| catalog CPU / RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.figures
        cpu, rss = f.get("cpu") or {}, f.get("rss_mib") or {}
        rps = f.get("rest_requests_per_s")
        by = ", ".join(f"{m} {v:g}" for m, v in (f.get("rest_by_method") or {}).items())
        out.append(
            f"| {r.hosts} | {_s(rps, 0)}{_ok(rps, 250) if r.hosts >= 1000 else ''} | {by} | "
            f"{_s(f.get('rest_writes_per_s'))} | {_mib(f.get('db_bytes'))} MiB | "
            f"{_mib(f.get('db_growth_per_hour'))} MiB | {(f.get('report_bytes') or 0) / 1024:.1f}"
            f" KiB | {_s((cpu.get('routers') or 0) * 50, 0)} % / {_s(rss.get('router'))} MiB"
            f"{_ok(rss.get('router'), 200) if r.hosts >= 1000 else ''} | "
            f"{_s(rss.get('haproxy'))} MiB | {_s((cpu.get('catalog') or 0) * 100, 1)} % / "
            f"{_s(rss.get('catalog'))} MiB |")
    out += ["", "Changes (one promotion with every agent following; a rolling deploy of up to "
            f"{DEPLOYED} services under {LOAD_RATE:g} requests/s; router A restarted; the etcd "
            "leader SIGKILLed under load):", "",
            "| hosts | promotion: every agent saw it / both routers only v2 / `promote` exits | "
            "its etcd requests | rolling deploy: time, failed of sent | router restart: "
            "stop / serving all again | reloads (A, B) | leader kill: keys lost, heartbeats "
            "back, failed of sent |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.figures
        routers = f.get("promote_routers_s")
        reloads = f.get("reloads") or {}
        out.append(
            f"| {r.hosts} | {_s(f.get('promote_agents_s'), 2)} / {_s(routers, 2)}"
            f"{_ok(routers, 2.0) if r.hosts >= 1000 else ''} / "
            f"{_s(f.get('promote_command_s'), 2)} s | {f.get('promote_etcd_requests', '-')} | "
            f"{_s(f.get('deploy_s'))} s, {f.get('deploy_failed', '-')} of "
            f"{f.get('deploy_requests', '-')}"
            f"{promote_failures(f.get('deploy_promote_failures'))}"
            f"{leases_lost(f.get('deploy_leases_lost'))} | "
            f"{_s(f.get('router_stop_s'))} / "
            f"{_s(f.get('router_restart_s'))} s | "
            f"{', '.join(str(int(v)) for v in reloads.values()) or '-'} | "
            f"{f.get('leader_keys_lost', '-')}, {_s(f.get('leader_heartbeats_back_s'), 2)} s, "
            f"{f.get('leader_failed', '-')} of {f.get('leader_requests', '-')} |")
    notes = [f"- {r.hosts} hosts: {note}" for r in results for note in r.notes]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def run(quick: bool = False, sizes: Sequence[int] | None = None, keep: bool = False,
        through: str = PHASES[-1]) -> list[SizeResult]:
    raise_open_files()
    return [run_size(n, quick, keep, through)
            for n in (sizes or (QUICK_SIZES if quick else SIZES))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.scale_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, short windows")
    p.add_argument("--sizes", default=None, help="comma-separated host counts")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep each size's work directory")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--through", choices=PHASES, default=PHASES[-1],
                   help="run the phases up to this one, then stop (the table leaves the rest "
                   "blank; bench/results.md is then not written)")
    p.add_argument("--render", type=Path, nargs="*", default=None,
                   help="run nothing: the section from figures written by --json (sizes run "
                   "apart, one at a time), into bench/results.md")
    args = p.parse_args(argv)
    if args.render is not None:
        results = [SizeResult(**r) for path in args.render for r in json.loads(path.read_text())]
        block = section(sorted(results, key=lambda r: r.hosts))
        print(block)
        RESULTS.write_text(add_section(RESULTS.read_text(), HEADING, block))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    # A SIGTERM (a `kill`, a CI timeout) stops the run as Ctrl-C does: run_size's cleanup then
    # stops the etcd members, routers, HAProxies and listeners it started. Left running, one
    # killed run's routers kept checking 10,000 servers and slowed every bench after it.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    results = run(args.quick, sizes, args.keep, args.through)
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], default=str, indent=1))
    block = section(results)
    print(block)
    if args.out is not None:
        args.out.write_text(block)
    elif not args.quick and not args.sizes and args.through == PHASES[-1]:
        RESULTS.write_text(add_section(RESULTS.read_text(), HEADING, block))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
