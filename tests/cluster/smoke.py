"""Smoke test of the simulated cluster: ``python -m tests.cluster.smoke --hosts 3``.

Starts a cluster, runs one container per host, starts ``registrar watch`` on every host,
checks that every container's key appears in etcd (etcdctl through a forwarder), routes a
client load through ``registrar haproxy`` on the routers, checks that Prometheus scrapes every
agent, cuts one host from etcd (its keys expire, the others' stay; they come back after the
heal), kills a host (its keys expire within TTL + 2 s), then destroys everything and checks
that nothing of it is left (processes, namespaces, links, cgroups, mounts, files).
Prints timings and memory figures. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TypeVar

from .cleanup import cleanup_leftovers, find_resources, known_prefixes
from .cluster import PROJECT_ROOT, Cluster, ClusterContainer, Router
from .load import ClientLoad, LoadStats

T = TypeVar("T")
T0 = time.monotonic()
FRONTEND_PORT = 8000


def say(msg: str) -> None:
    print(f"{time.monotonic() - T0:7.1f}s  {msg}", flush=True)


class SmokeFailure(AssertionError):
    pass


def wait(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
        except Exception as exc:  # keep polling through transient errors; report the last
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(interval)


def failure_timeline(stats: LoadStats, events: list[tuple[str, float]]) -> str:
    """The load's recent failures, grouped by second since the load started, with events."""
    started = float(stats.raw.get("started", 0.0))
    marks = [(round(t - started, 1), name) for name, t in events]
    per_second: dict[int, Counter[str]] = {}
    for f in stats.recent_failures:
        per_second.setdefault(int(f["t"]), Counter())[str(f["reason"])] += 1
    lines = [f"  event at {t:6.1f} s: {name}" for t, name in marks]
    lines += [
        f"  failures in second {sec:4d}: " + ", ".join(f"{r} {n}" for r, n in c.items())
        for sec, c in sorted(per_second.items())
    ]
    return "\n".join(lines)


def serving(router: Router) -> Callable[[], bool]:
    return lambda: router.http_get(FRONTEND_PORT, timeout=2)[0] == 200


def ensure_venv() -> None:
    """The agents run in the project's venv: wait for it (another process may be making it),
    or make it (``make setup``) when it is missing."""
    venv = PROJECT_ROOT / ".venv"
    marker = venv / ".installed"
    if not venv.exists():
        say("no .venv: running `make setup`")
        subprocess.run(["make", "-C", str(PROJECT_ROOT), "setup"], check=True)
    if not marker.exists():
        say("waiting for .venv/.installed (the venv is being made)")
        wait(".venv/.installed", marker.exists, timeout=900, interval=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster.smoke", description=__doc__)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--ttl", type=int, default=5, help="agents' lease TTL (default 5)")
    p.add_argument("--rate", type=float, default=20.0, help="client requests/s (default 20)")
    p.add_argument("--engine-batch", type=int, default=0, help="engines started at a time")
    p.add_argument("--no-cut", action="store_true", help="skip the cut-from-etcd step")
    p.add_argument("--state-root", default="/tmp")
    p.add_argument("--json", help="write the figures to this JSON file too")
    args = p.parse_args(argv)

    # SIGTERM/SIGHUP end the run like Ctrl-C: through the `finally` that destroys the cluster
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    ensure_venv()
    removed = cleanup_leftovers([args.state_root], progress=say)
    say(f"leftovers of earlier runs removed: {[r.summary() for r in removed] or 'none'}")

    figures: dict[str, object] = {"hosts": args.hosts, "routers": args.routers, "ttl": args.ttl}
    cluster = Cluster(
        hosts=args.hosts,
        routers=args.routers,
        state_root=args.state_root,
        progress=say,
        agent_ttl=args.ttl,
        engine_batch=args.engine_batch,
        clean_leftovers=False,
    )
    ok = False
    load: ClientLoad | None = None
    events: list[tuple[str, float]] = []
    try:
        cluster.start()
        figures["start"] = dict(cluster.timings)
        figures["engine_ready_after_s"] = {
            h.name: round(h.engine_ready_after or -1, 2) for h in cluster.hosts
        }
        mem = cluster.memory()
        say("memory with engines only:\n" + mem.format())
        figures["memory_engines_only"] = {
            "by_role": mem.by_role,
            "engine_per_host_mib": round(
                sum(mem.engine_per_host_kb.values()) / max(1, len(mem.engine_per_host_kb)) / 1024,
                1,
            ),
            "total_rss_mib": round(mem.total_kb / 1024),
            "mem_available_drop_mib": round(mem.mem_available_drop_kb / 1024),
        }

        # one container per host
        t = time.monotonic()
        with ThreadPoolExecutor(max_workers=4) as pool:
            containers: list[ClusterContainer] = list(
                pool.map(lambda h: h.run_container("web", "v1"), cluster.hosts)
            )
        figures["containers_s"] = round(time.monotonic() - t, 2)
        say(f"{len(containers)} containers running ({figures['containers_s']} s)")
        for c in containers[:2]:
            status, body = c.http_get()
            say(f"  {c.name} on {c.address} answers {status} {body.decode().strip()!r}")

        # agents -> keys
        t = time.monotonic()
        for h in cluster.hosts:
            h.start_agent()
        expected = {c.key(): c for c in containers}

        def all_keys() -> bool:
            return set(expected) <= set(cluster.etcd_keys("/services/"))

        wait("every container's key in etcd", all_keys, timeout=60 + 2 * args.hosts)
        figures["agents_to_all_keys_s"] = round(time.monotonic() - t, 2)
        values = cluster.etcd_get_prefix("/services/")
        for key, c in expected.items():
            v = json.loads(values[key])
            if (v["host"], v["port"], v["version"]) != (c.host.ip, c.host_port, "v1"):
                raise SmokeFailure(f"{key}: value {v} does not match {c.address} v1")
        say(f"all {len(expected)} keys in etcd, values right ({figures['agents_to_all_keys_s']} s"
            " after the agents started)")  # fmt: skip

        # routers + client load
        if cluster.routers:
            t = time.monotonic()
            for r in cluster.routers:
                r.start(*r.haproxy_args({"web": FRONTEND_PORT}))
            for r in cluster.routers:
                wait(f"{r.name} serving web", serving(r), timeout=60)
            figures["routers_serving_s"] = round(time.monotonic() - t, 2)
            say(f"{len(cluster.routers)} routers serving ({figures['routers_serving_s']} s)")
            frontends = [r.frontend(FRONTEND_PORT) for r in cluster.routers]
            load = cluster.start_load({"web": frontends}, rate=args.rate)
            st = load.wait_requests(int(args.rate * 3), timeout=30)
            say(f"client load: {st.summary()}; {len(st.backends)} backends answered")

        # Prometheus scrapes every agent
        if cluster.prometheus is not None:
            t = time.monotonic()
            n = args.hosts
            wait(
                f"Prometheus sees {n} agents up",
                lambda: cluster.prom_value('sum(up{job="registrar-watch"})') == n,
                timeout=60,
                interval=1,
            )
            figures["prometheus_all_agents_up_s"] = round(time.monotonic() - t, 2)
            regs = cluster.prom_value("sum(registrar_registered_services)")
            etcd_up = cluster.prom_value('sum(up{job="etcd"})')
            say(f"Prometheus: {n} agents up, registrar_registered_services sum {regs}, "
                f"etcd members up {etcd_up}")  # fmt: skip

        mem = cluster.memory()
        say("memory with agents, containers, routers, load:\n" + mem.format())
        figures["memory_running"] = {
            "by_role": mem.by_role,
            "agent_rss_mib": round(mem.rss_per("registrar-watch"), 1),
            "router_rss_mib": round(mem.rss_per("registrar-haproxy"), 1),
            "total_rss_mib": round(mem.total_kb / 1024),
            "mem_available_drop_mib": round(mem.mem_available_drop_kb / 1024),
        }

        def host_keys(i: int) -> set[str]:
            node = cluster.hosts[i].node
            return {k for k in cluster.etcd_keys("/services/") if f"/{node}:" in k}

        # cut one host from etcd: its keys expire, the others stay; back after the heal
        if not args.no_cut and args.hosts >= 2:
            victim = 1
            others = set(expected) - host_keys(victim)
            t = time.monotonic()
            cluster.cut_from_etcd(victim)
            events.append((f"cut {cluster.hosts[victim].name} from etcd", time.time()))
            wait(
                f"{cluster.hosts[victim].name}'s keys expire while cut",
                lambda: not host_keys(victim),
                timeout=args.ttl + 10,
            )
            gone = time.monotonic() - t
            missing = others - set(cluster.etcd_keys("/services/"))
            if missing:
                raise SmokeFailure(f"other hosts' keys vanished during the cut: {missing}")
            cluster.heal(victim)
            events.append((f"heal {cluster.hosts[victim].name}", time.time()))
            t2 = time.monotonic()
            wait(
                f"{cluster.hosts[victim].name}'s keys back after the heal",
                lambda: host_keys(victim),
                timeout=60,
            )
            figures["cut_keys_gone_s"] = round(gone, 2)
            figures["heal_keys_back_s"] = round(time.monotonic() - t2, 2)
            say(f"cut from etcd: keys gone after {gone:.1f} s (TTL {args.ttl}), others kept; "
                f"back {figures['heal_keys_back_s']} s after the heal")  # fmt: skip

        # kill a host: its keys expire within TTL + 2 s
        victim = 0
        before = load.stats() if load is not None else None
        t = time.monotonic()
        cluster.kill_host(victim)
        events.append((f"kill {cluster.hosts[victim].name}", time.time()))
        wait(
            f"{cluster.hosts[victim].name}'s keys expire after the kill",
            lambda: not host_keys(victim),
            timeout=args.ttl + 10,
        )
        gone = time.monotonic() - t
        figures["kill_keys_gone_s"] = round(gone, 2)
        if gone > args.ttl + 2:
            raise SmokeFailure(f"keys of the killed host took {gone:.1f} s (> TTL + 2 s)")
        others = set(expected) - {k for k in expected if f"/{cluster.hosts[victim].node}:" in k}
        missing = others - set(cluster.etcd_keys("/services/"))
        if missing:
            raise SmokeFailure(f"other hosts' keys vanished after the kill: {missing}")
        say(f"killed {cluster.hosts[victim].name}: its keys gone after {gone:.1f} s "
            f"(TTL {args.ttl}), the others' kept")  # fmt: skip

        if load is not None and before is not None:
            time.sleep(1)
            during = load.stats().since(before)
            say(f"client load since the kill: {during.summary()}")
            final = load.stop()
            figures["load"] = {
                "sent": final.sent,
                "ok": final.ok,
                "failed": final.failed,
                "reasons": final.reasons,
                "failed_after_kill": during.failed,
            }
            say(f"client load, whole run: {final.summary()}")
            if final.failed:
                say("failed requests (last 50) against events:\n" + failure_timeline(final, events))
        ok = True
    except (SmokeFailure, KeyboardInterrupt) as exc:
        say(f"FAILED: {exc}")
    finally:
        left = cluster.destroy()
        figures["destroy_s"] = round(cluster.timings.get("destroy", -1), 2)
        after = find_resources(cluster.prefix, cluster.state_dir)
        stray = {p for p in known_prefixes([args.state_root]) if p == cluster.prefix}
        if left.empty and after.empty and not stray:
            say(f"destroyed: nothing of {cluster.prefix} left (no process, netns, link, cgroup,"
                " mount, shim socket or file)")  # fmt: skip
        else:
            ok = False
            say(f"LEFT after destroy: {after.summary()} {stray}")
    figures["ok"] = ok
    say("figures: " + json.dumps(figures, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str) + "\n")
    say("SMOKE OK" if ok else "SMOKE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
