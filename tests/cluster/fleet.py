"""Services deployed over a simulated cluster: what the real-tier cluster test, ``make demo``
and the cluster bench share.

A ``Fleet`` names the services (each gets one frontend port on every router), places
instances of a version on hosts, starts the routers with one ``--bind`` per service, and
waits for the events a deploy is made of: keys present or gone in etcd, addresses entering
or leaving every router's rendered config, every frontend answering. It runs ``registrar
promote`` / ``ls`` the way an operator would: from the root namespace, through the cluster's
etcd forwarders.

    fleet = Fleet(cluster, ["web", "api"])
    v1 = fleet.run({"web": [0, 1], "api": [1, 2]}, "v1")
    cluster.start_agents(); fleet.start_routers()
    fleet.wait_keys(present=fleet.keys(v1)); fleet.wait_routed(present=addresses(v1))
    load = cluster.start_load(fleet.load_targets(), rate=50)
    result = fleet.promote("web", "v2")
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .cluster import Cluster, ClusterContainer, Host, Router
from .netns import http_get_in

T = TypeVar("T")

DEFAULT_BASE_PORT = 8000
_SERVER_LINE = re.compile(r"^\s*server\s+\S+\s+(\S+)", re.MULTILINE)
# HAProxy's own warning, as `registrar haproxy` logs it: "2026-12-01 11:20:40,723 WARNING
# haproxy: [WARNING]  (28587) : Server be_web/_spare4 is DOWN, reason: Layer4 timeout, ..."
_DOWN_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*Server (\S+) is DOWN", re.MULTILINE
)


class FleetTimeout(AssertionError):
    pass


def poll(
    what: str | Callable[[], str],
    fn: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
) -> T:
    """``fn()`` until it gives something truthy (returned); FleetTimeout naming ``what`` and
    the last value (or exception) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            # transient (etcd electing, a forwarder reconnecting): report the last one
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise FleetTimeout(f"{text}: not within {timeout:g} s (last: {last!r})"[:4000])
        time.sleep(interval)


def addresses(containers: Iterable[ClusterContainer]) -> set[str]:
    """``HOST_IP:PORT`` of each container: what a router's config lists as its server."""
    return {c.address for c in containers}


def parallel(fn: Callable[[T], object], items: Iterable[T], workers: int = 4) -> None:
    """``fn(item)`` for every item, ``workers`` at a time; the first exception is raised."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, list(items)):
            pass


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time of the command, interpreter start included

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return (
            f"`registrar {' '.join(self.argv)}` exit {self.returncode} in {self.seconds:.2f} s\n"
            f"{self.stdout}{self.stderr}"
        )


class Fleet:
    """Services over a cluster's hosts, their instances by version, and the routers."""

    def __init__(
        self,
        cluster: Cluster,
        services: Sequence[str],
        *,
        base_port: int = DEFAULT_BASE_PORT,
        prefix: str = "/services",
    ) -> None:
        if len(set(services)) != len(services):
            raise ValueError("service names must be unique")
        self.cluster = cluster
        self.ports = {name: base_port + i for i, name in enumerate(services)}
        self.prefix = prefix
        self.instances: dict[str, dict[str, list[ClusterContainer]]] = {s: {} for s in services}

    @property
    def services(self) -> list[str]:
        return list(self.ports)

    # -- placement -------------------------------------------------------------------------------
    def spread(
        self, copies: int, *, offset: int = 0, hosts: Sequence[int] | None = None
    ) -> dict[str, list[int]]:
        """Round-robin placement: service ``i`` gets ``copies`` instances on consecutive hosts
        starting at ``i * copies + offset`` (indexes into ``hosts``, default every host), so
        instances of one service land on different hosts while there are enough of them."""
        pool = list(hosts) if hosts is not None else list(range(len(self.cluster.hosts)))
        out: dict[str, list[int]] = {}
        for i, service in enumerate(self.services):
            start = i * copies + offset
            out[service] = [pool[(start + k) % len(pool)] for k in range(copies)]
        return out

    def beside(self, placement: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
        """For each service, as many hosts as in ``placement`` but other ones where possible
        (v2 started beside v1 on other hosts, as a rolling deploy does)."""
        n = len(self.cluster.hosts)
        out: dict[str, list[int]] = {}
        for service, used in placement.items():
            # the hosts after the last one it uses, wrapping: keeps a spread placement spread
            after = [(max(used, default=-1) + 1 + j) % n for j in range(n)]
            free = [h for h in after if h not in used] or after
            out[service] = [free[k % len(free)] for k in range(len(used))]
        return out

    def run(
        self,
        placement: Mapping[str, Sequence[int]],
        version: str,
        *,
        workers: int = 4,
        labels: Mapping[str, str] | None = None,
        after_start: Callable[[ClusterContainer], None] | None = None,
    ) -> list[ClusterContainer]:
        """``docker run -d`` an instance of ``version`` for each (service, host) of
        ``placement``, ``workers`` at a time; ``after_start(container)`` right after each
        (where an ``ExecStartPost=`` sidecar would start)."""
        jobs = [(service, h) for service, hs in placement.items() for h in hs]
        made: list[ClusterContainer] = []

        def one(job: tuple[str, int]) -> None:
            service, h = job
            c = self.cluster.hosts[h].run_container(service, version, labels=labels)
            if after_start is not None:
                after_start(c)
            made.append(c)

        parallel(one, jobs, workers)
        for c in made:
            self.instances[c.service].setdefault(version, []).append(c)
        return made

    def of(self, version: str, services: Iterable[str] | None = None) -> list[ClusterContainer]:
        """The running instances of ``version`` (of ``services``, default all)."""
        return [
            c
            for s in (services if services is not None else self.services)
            for c in self.instances[s].get(version, [])
        ]

    def on_host(self, host: int | Host) -> list[ClusterContainer]:
        node = host if isinstance(host, Host) else self.cluster.hosts[host]
        return [c for vs in self.instances.values() for cs in vs.values() for c in cs
                if c.host is node]  # fmt: skip

    def stop(
        self, containers: Sequence[ClusterContainer], *, timeout: int = 1, workers: int = 8
    ) -> None:
        """``docker stop -t TIMEOUT`` (PID 1 httpd ignores SIGTERM: each takes ``timeout``
        seconds, so they go ``workers`` at a time), then forget them."""
        parallel(lambda c: c.stop(timeout), containers, workers)
        gone = {id(c) for c in containers}
        for vs in self.instances.values():
            for version in list(vs):
                vs[version] = [c for c in vs[version] if id(c) not in gone]

    # -- keys --------------------------------------------------------------------------------------
    def keys(self, containers: Iterable[ClusterContainer]) -> set[str]:
        return {c.key(self.prefix) for c in containers}

    def etcd_keys(self) -> set[str]:
        return set(self.cluster.etcd_keys(self.prefix + "/"))

    def wait_keys(
        self,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        timeout: float = 30.0,
        interval: float = 0.1,
    ) -> float:
        """Until every ``present`` key is in etcd and no ``absent`` one is; seconds it took."""
        want, gone = set(present), set(absent)
        t = time.monotonic()
        state: dict[str, set[str]] = {}

        def check() -> bool:
            keys = self.etcd_keys()
            state["missing"], state["still"] = want - keys, gone & keys
            return not state["missing"] and not state["still"]

        poll(
            lambda: f"keys: {len(state.get('missing', want))} missing "
            f"{sorted(state.get('missing', want))[:5]}, {len(state.get('still', gone))} "
            f"not gone {sorted(state.get('still', gone))[:5]}",
            check, timeout, interval,
        )  # fmt: skip
        return time.monotonic() - t

    # -- routers -----------------------------------------------------------------------------------
    def router_args(self, router: Router, *extra: str) -> list[str]:
        return router.haproxy_args(self.ports, *extra)

    def start_routers(self, *extra: str, routers: Sequence[Router] | None = None) -> None:
        """``registrar haproxy`` on every router, one ``--bind SERVICE=IP:PORT`` per service."""
        for r in routers if routers is not None else self.cluster.routers:
            r.start(*self.router_args(r, *extra))

    def frontends(self, service: str) -> list[str]:
        return [r.frontend(self.ports[service]) for r in self.cluster.routers]

    def load_targets(self, weights: Mapping[str, int] | None = None) -> list[str]:
        """``SERVICE=ROUTER_IP:PORT`` for every service on every router, interleaved so that
        consecutive requests go to different services and routers; a service with weight
        ``w`` is listed ``w`` times (gets ``w`` times the share of requests)."""
        weights = weights or {}
        out: list[str] = []
        for r in self.cluster.routers:
            for service, port in self.ports.items():
                out += [f"{service}={r.frontend(port)}"] * max(1, weights.get(service, 1))
        return out

    def routed(self, router: Router) -> set[str]:
        """The server addresses in ``router``'s rendered config (the file follows every
        runtime-API change, so it says what that HAProxy has in rotation)."""
        try:
            text = router.config_path.read_text()
        except FileNotFoundError:
            return set()
        return set(_SERVER_LINE.findall(text))

    def routed_by_service(self, router: Router) -> dict[str, set[str]]:
        """Service -> server addresses in ``router``'s rendered config (backends ``be_NAME``)."""
        try:
            text = router.config_path.read_text()
        except FileNotFoundError:
            return {}
        out: dict[str, set[str]] = {}
        current: str | None = None
        for line in text.splitlines():
            words = line.split()
            if not words:
                continue
            if words[0] in ("frontend", "defaults", "global", "listen"):
                current = None
            elif words[0] == "backend" and len(words) > 1:
                current = words[1].removeprefix("be_")
                out.setdefault(current, set())
            elif words[0] == "server" and len(words) > 2 and current is not None:
                out[current].add(words[2])
        return out

    def marked_down(self, router: Router, after: float) -> list[tuple[float, str]]:
        """(wall time, ``be_SERVICE/SERVER``) of every server ``router``'s HAProxy marked
        DOWN (its health check or live traffic) after wall time ``after``, from its log."""
        try:
            text = (router.dir / "router.log").read_text(errors="replace")
        except OSError:
            return []
        out = []
        for m in _DOWN_LINE.finditer(text):
            at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            if at >= after:
                out.append((at, m.group(3)))
        return out

    def wait_routed(
        self,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        timeout: float = 30.0,
        routers: Sequence[Router] | None = None,
    ) -> float:
        """Until every router lists every ``present`` address and none of ``absent``."""
        want, gone = set(present), set(absent)
        rs = list(routers if routers is not None else self.cluster.routers)
        t = time.monotonic()
        state: dict[str, object] = {}

        def check() -> bool:
            for r in rs:
                have = self.routed(r)
                if not want <= have or gone & have:
                    state["last"] = (r.name, sorted(want - have)[:5], sorted(gone & have)[:5])
                    return False
            return True

        poll(lambda: f"routers (name, missing, not gone) {state.get('last')}", check, timeout)
        return time.monotonic() - t

    def serving(self, router: Router, service: str, timeout: float = 2.0) -> bool:
        """A GET through the router's frontend of ``service`` (from ops) answers 200."""
        host, _, port = router.frontend(self.ports[service]).rpartition(":")
        try:
            status, _ = http_get_in(self.cluster.ops.ns, host, int(port), "/", timeout)
        except OSError:
            return False
        return status == 200

    def wait_serving(self, timeout: float = 60.0, services: Iterable[str] | None = None) -> float:
        """Until every router's frontend of every service (or of ``services``) answers 200."""
        todo = {(r.name, s) for r in self.cluster.routers
                for s in (services if services is not None else self.services)}  # fmt: skip
        by_name = {r.name: r for r in self.cluster.routers}
        t = time.monotonic()

        def check() -> bool:
            for name, s in sorted(todo):
                if self.serving(by_name[name], s):
                    todo.discard((name, s))
            return not todo

        poll(lambda: f"frontends not serving: {sorted(todo)[:6]} ({len(todo)})", check, timeout,
             interval=0.2)  # fmt: skip
        return time.monotonic() - t

    # -- the operator's commands -------------------------------------------------------------------
    def registrar(self, *args: str, timeout: float = 60.0) -> CliResult:
        """``python -m registrar ARGS --etcd <the forwarders>`` from the root namespace."""
        argv = [*args, "--etcd", self.cluster.etcd_url_from_root]
        t = time.monotonic()
        proc = subprocess.run(
            [self.cluster.python, "-m", "registrar", *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1",
                 **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ
                    else {})},
        )  # fmt: skip
        return CliResult(list(args), proc.returncode, proc.stdout, proc.stderr,
                         time.monotonic() - t)  # fmt: skip

    def promote(self, service: str, version: str, *extra: str, timeout: float = 30.0) -> CliResult:
        """``registrar promote SERVICE VERSION EXTRA`` (waits until the rotation matches)."""
        return self.registrar("promote", service, version, "--timeout", f"{timeout:g}", *extra,
                              timeout=timeout + 30)  # fmt: skip

    def ls(self, service: str | None = None) -> str:
        result = self.registrar("ls", *([service] if service else []))
        return result.stdout if result.ok else result.describe()
