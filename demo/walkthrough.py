"""`make demo`: the whole product on one machine, in under 2 minutes, narrated.

    sudo make demo                      # or: .venv/bin/python -m demo [--hosts 4] [--services 6]

A small simulated cluster (tests/cluster/: each host its own network namespace, Docker engine
and `registrar watch`; a 3-member etcd; two `registrar haproxy` routers; Prometheus; a client
sending requests through both routers), then the deploy of the article, step by step:
v1 running, v2 started beside it, traffic reaching both, `registrar promote`, v1 stopped; at
each step what etcd holds (`registrar ls`), what HAProxy serves and how many client requests
failed. Then a host dies, and everything is torn down. Needs root (namespaces, engines).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from types import FrameType

from tests.cluster import Cluster, ClusterContainer, LoadStats
from tests.cluster.fleet import Fleet, FleetTimeout, addresses
from tests.cluster.load import ClientLoad

SERVICES = ("web", "api", "auth", "search", "cart", "mail")
TTL = 5
RATE = 60.0
CANARY_SERVICE = "web"
# `registrar promote` with canary steps, once it has them (the hook: used as soon as
# `registrar promote --help` lists --canary; until then every service is promoted at once).
CANARY_ARGS = ("--canary", "10,50", "--interval", "5")
WIDTH = 92
T0 = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, title: str) -> None:
    say()
    say(f"=== {n}. {title} " + "=" * max(0, WIDTH - len(title) - 8))


def note(text: str) -> None:
    say(f"  {text}")


def detail(text: str) -> None:
    for line in text.rstrip().splitlines():
        say(f"    | {line}")


def clock() -> str:
    return f"[{time.monotonic() - T0:5.1f}s]"


class Demo:
    def __init__(self, hosts: int, services: Sequence[str], rate: float, verbose: bool) -> None:
        self.verbose = verbose
        self.rate = rate
        self.cluster = Cluster(hosts=hosts, routers=2, agent_ttl=TTL, progress=self._progress)
        self.fleet = Fleet(self.cluster, list(services))
        self.load: ClientLoad | None = None
        self.mark: LoadStats | None = None
        self.failed_in_deploy = 0
        self.all_containers: list[ClusterContainer] = []

    def _progress(self, text: str) -> None:
        if self.verbose:
            say(f"    · {text}")

    # -- what is where -----------------------------------------------------------------------
    def by_address(self) -> dict[str, ClusterContainer]:
        return {c.address: c for c in self.all_containers}

    def show_etcd(self, service: str | None = None) -> None:
        values = self.cluster.etcd_get_prefix(self.fleet.prefix + "/")
        per: dict[str, Counter[str]] = {}
        for key, raw in values.items():
            value = json.loads(raw)
            per.setdefault(key.split("/")[2], Counter())[str(value.get("version"))] += 1
        standby = self.cluster.etcd_keys("/registrar/standby/")
        summary = ", ".join(
            f"{s} " + "+".join(f"{v}x{n}" for v, n in sorted(per.get(s, Counter()).items()))
            for s in self.fleet.services
        )
        note(f"etcd {self.fleet.prefix}/: {len(values)} keys ({summary}); "
             f"{len(standby)} on standby")  # fmt: skip
        shown = service or CANARY_SERVICE
        note(f"`registrar ls {shown}`:")
        detail(self.fleet.ls(shown))

    def show_routers(self) -> None:
        where = self.by_address()
        for r in self.cluster.routers:
            routed = self.fleet.routed_by_service(r)
            parts = []
            for s in self.fleet.services:
                servers = sorted(routed.get(s, set()))
                what = Counter(where[a].version if a in where else "?" for a in servers)
                parts.append(f"{s} " + "+".join(f"{v}x{n}" for v, n in sorted(what.items())))
            note(f"HAProxy on {r.name} ({r.ip}) serves: " + ", ".join(parts))

    def show_traffic(self, until: float | None = None) -> LoadStats:
        """The client's requests since the previous step (up to ``until``, default in 0.6 s:
        what was in flight has ended): sent, failed, who answered."""
        assert self.load is not None
        now = self.load.stats_after(until if until is not None else time.time() + 0.6)
        since = now.since(self.mark) if self.mark is not None else now
        versions = "; ".join(
            f"{s} " + ", ".join(f"{v}:{n}" for v, n in sorted(since.versions.get(s, {}).items()))
            for s in self.fleet.services
        )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(since.reasons.items()))
        note(f"client: {since.sent} requests since the last step, {since.failed} failed"
             f"{f' ({reasons})' if reasons else ''}")  # fmt: skip
        note(f"  answered by version: {versions}")
        self.mark = now
        return since

    def show(self, service: str | None = None, until: float | None = None) -> LoadStats:
        self.show_etcd(service)
        self.show_routers()
        return self.show_traffic(until)

    def log_tails(self, lines: int = 8) -> None:
        """The end of every agent's and router's log (before teardown removes them)."""
        detail(self.cluster.log_tails(lines))

    # -- the walk-through ----------------------------------------------------------------------
    def run(self) -> bool:
        c, fleet = self.cluster, self.fleet
        n_hosts = len(c.hosts)
        step(1, "a cluster on this machine")
        note(f"{n_hosts} hosts (h01..h{n_hosts:02d}): each a network namespace with its own "
             "Docker engine and a `registrar watch`")  # fmt: skip
        note("3 etcd members, 2 routers (r01, r02) each running `registrar haproxy`, "
             "Prometheus, and a client")  # fmt: skip
        c.start()
        note(f"{clock()} started in {c.timings['start_total']:.1f} s (prefix {c.prefix}, "
             f"state in {c.state_dir})")  # fmt: skip
        c.start_agents()
        fleet.start_routers()
        note(f"agents started on every host (lease TTL {TTL} s here, 15 by default); routers "
             f"with one frontend per service: "
             + ", ".join(f"{s}=:{p}" for s, p in fleet.ports.items()))  # fmt: skip

        step(2, "v1 running")
        placement = fleet.spread(2)
        v1 = fleet.run(placement, "v1")
        self.all_containers += v1
        note(f"{clock()} `docker run -d` {len(v1)} containers: 2 of each service on different "
             "hosts, labelled registrar.service and registrar.version=v1")  # fmt: skip
        t = fleet.wait_keys(present=fleet.keys(v1))
        fleet.wait_routed(present=addresses(v1))
        fleet.wait_serving()
        note(f"{clock()} every key in etcd {t:.2f} s later, both routers serving")
        weights = {CANARY_SERVICE: 3} if CANARY_SERVICE in fleet.ports else {}
        self.load = c.start_load(fleet.load_targets(weights), rate=self.rate)
        self.load.wait_requests(int(self.rate))
        note(f"the client sends {self.rate:g} requests/s through both routers to every service "
             f"({CANARY_SERVICE} gets 3 shares: enough requests to judge a canary step)")
        self.show()
        self._prometheus()

        step(3, "v2 started beside v1")
        v2 = fleet.run(fleet.beside(placement), "v2")
        self.all_containers += v2
        note(f"{clock()} {len(v2)} v2 containers on other hosts; the agents register them too")
        fleet.wait_keys(present=fleet.keys(v2))
        fleet.wait_routed(present=addresses(v1) | addresses(v2))
        base = self.load.stats_after(time.time())
        self.load.wait_for(lambda s: all(
            len(s.since(base).versions.get(svc, {})) >= 2 for svc in fleet.services
        ), timeout=20)  # fmt: skip
        note(f"{clock()} traffic reaches both versions of every service:")
        self.failed_in_deploy += self.show().failed

        step(4, "registrar promote: only v2 in rotation, v1 kept on standby")
        canary = self._has_canary()
        if not canary:
            note("(`registrar promote` has no --canary yet: each service is promoted at once. "
                 f"Once it has, this step runs `registrar promote {CANARY_SERVICE} v2 "
                 f"{' '.join(CANARY_ARGS)}`.)")  # fmt: skip
        times = []
        for s in fleet.services:
            extra = CANARY_ARGS if canary and s == CANARY_SERVICE else ()
            result = fleet.promote(s, "v2", "--min-instances", "2", *extra, timeout=60)
            times.append(result.seconds)
            if s == fleet.services[0] or not result.ok:
                note(f"$ registrar promote {s} v2 --min-instances 2 {' '.join(extra)}".rstrip())
                detail(result.stdout + result.stderr)
            if not result.ok:
                raise RuntimeError(f"promote {s} failed")
        note(f"{clock()} {len(times)} services promoted, {min(times):.2f}-{max(times):.2f} s each "
             "(the command waits until the rotation matches)")  # fmt: skip
        fleet.wait_routed(present=addresses(v2), absent=addresses(v1))
        note("the routers took v1 out through HAProxy's runtime API (no reload); v1 still runs:")
        self.failed_in_deploy += self.show().failed
        note("(a rollback now would be `registrar promote SERVICE v1`: v1 is back at once)")

        step(5, "v1 stopped")
        fleet.stop(v1)
        note(f"{clock()} `docker stop` the {len(v1)} v1 containers; their standby keys go with "
             "them")  # fmt: skip
        fleet.wait_keys(absent=fleet.keys(v1))
        self.failed_in_deploy += self.show().failed
        note(f"the whole deploy: {self.failed_in_deploy} failed client requests")

        self._kill_host()

        step(7, "teardown")
        assert self.load is not None
        final = self.load.stop()
        note(f"client, whole run: {final.summary()}")
        return self.failed_in_deploy == 0

    def _kill_host(self) -> None:
        c, fleet = self.cluster, self.fleet
        assert self.load is not None
        victim = max(range(len(c.hosts)), key=lambda i: len(fleet.on_host(i)))
        h = c.hosts[victim]
        values = c.etcd_get_prefix(fleet.prefix + "/")
        mine = {k for k in values if k.split("/")[-1].startswith(f"{h.node}:")}
        dead = {f"{json.loads(values[k])['host']}:{json.loads(values[k])['port']}" for k in mine}
        step(6, f"a host dies: {h.name}")
        note(f"{h.name} runs {len(mine)} instances in rotation. Its agent is SIGKILLed and its "
             "network cable cut:")  # fmt: skip
        note("its containers keep running but nobody can reach them, and nobody deregisters "
             "them.")  # fmt: skip
        self.mark = self.load.stats_after(time.time())
        t = time.monotonic()
        c.kill_host(victim)
        killed_at = time.time()
        note(f"{clock()} {h.name} killed; its keys stay in etcd until its lease expires "
             f"(TTL {TTL} s)...")  # fmt: skip
        fleet.wait_keys(absent=mine, timeout=TTL + 10)
        gone = time.monotonic() - t
        fleet.wait_routed(absent=dead, timeout=10)
        out = time.monotonic() - t
        out_at = time.time()
        note(f"{clock()} its keys expired {gone:.1f} s after the kill; both routers dropped its "
             f"servers {out:.1f} s after")  # fmt: skip
        # a request sent to the dead host just before may still time out (2 s) after that
        since = self.show(until=out_at + 2.5)
        down = [at for r in c.routers for at, _ in fleet.marked_down(r, killed_at) if at <= out_at]
        if down:
            note(
                f"HAProxy's health checks marked {h.name}'s servers DOWN "
                f"{max(down) - killed_at:.1f} s after the kill, long before the lease expired;"
            )
            note(f"{since.failed} requests failed: those already sent to {h.name} before that.")
        else:
            note(
                f"{since.failed} requests failed: those sent to {h.name} during the "
                f"{out_at - killed_at:.1f} s its keys still stood: HAProxy has no health check"
            )
            note(
                "yet, so it sends to a dead host until its lease expires. Once the router marks a "
                "server down after"
            )
            note(
                "~2 s of failed connections (SPEC: 'a server that stops answering leaves rotation "
                "within about 2 s'), this drops to ~0."
            )
        tail_from = self.mark
        self.load.wait_requests(int(self.rate * 2))
        tail = self.load.stats().since(tail_from) if tail_from is not None else None
        if tail is not None:
            note(f"{clock()} after that: {tail.sent} requests, {tail.failed} failed: the "
                 "survivors carry the traffic")  # fmt: skip
        self.mark = self.load.stats()
        self._prometheus()

    def _prometheus(self) -> None:
        c = self.cluster
        try:
            up = c.prom_value('sum(up{job="registrar-watch"})')
            keys = c.prom_value("sum(registrar_registered_services)")
        except (OSError, RuntimeError, ValueError) as exc:
            note(f"Prometheus: not answering ({exc})")
            return
        note(f"Prometheus (scraping every agent every 2 s): agents up {up:g}/{len(c.hosts)}, "
             f"sum(registrar_registered_services) {keys:g}" if up is not None and keys is not None
             else "Prometheus: no samples yet")  # fmt: skip

    def _has_canary(self) -> bool:
        out = subprocess.run(
            [self.cluster.python, "-m", "registrar", "promote", "--help"],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        return "--canary" in out


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--services", type=int, default=len(SERVICES), choices=range(1, 7),
                   metavar="1..6")  # fmt: skip
    p.add_argument("--rate", type=float, default=RATE, help="client requests/s")
    p.add_argument("--verbose", action="store_true", help="the cluster's own progress too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        say("demo: needs root (network namespaces, one Docker engine per host): sudo make demo")
        return 2
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    say(f"registrar demo: {args.hosts} hosts, {args.services} services, a rolling deploy under "
        "load, then a host dies")  # fmt: skip
    demo = Demo(args.hosts, SERVICES[: args.services], args.rate, args.verbose)
    ok = False
    try:
        ok = demo.run()
    except (FleetTimeout, RuntimeError, AssertionError) as exc:
        say(f"demo: FAILED: {exc}")
        demo.log_tails()
    except KeyboardInterrupt as exc:
        say(f"demo: interrupted ({exc})")
    finally:
        left = demo.cluster.destroy()
        note(f"{clock()} everything removed: " + ("nothing left (processes, namespaces, "
             "engines, files)" if left.empty else f"LEFT {left.summary()}"))  # fmt: skip
        ok = ok and left.empty
    say()
    say(f"demo {'done' if ok else 'FAILED'} in {time.monotonic() - T0:.0f} s: "
        f"{demo.failed_in_deploy} failed requests during the deploy")  # fmt: skip
    return 0 if ok else 1
