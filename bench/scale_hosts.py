"""Simulated hosts for the scale part (bench/scale_bench.py): many host agents in one process.

Each simulated host is what `registrar watch` runs (registrar/agent/command.py), built from the
same classes: its own `EtcdStore` (its own connections and lease) with a `LeaseKeeper`, the
follower of `{prefix}/` and `{control_prefix}/`, and a `ContainerWatcher`; only Docker is
replaced, by the fast tier's in-memory `FakeDocker` (tests/fakes.py), into which this process
starts and stops containers when told. Nothing of registrar is re-implemented here.

    python -m bench.scale_hosts --etcd URL[,URL...] --prefix P --control-prefix C

Commands come on stdin, one JSON object a line, and each is answered on stdout by one JSON
object with the same "id" (asynchronous: answers may come in another order):

- `{"op": "hosts", "nodes": [NAME, ...]}`: start these hosts (each its own agent); answered
  once every one of them has written its first (empty) state.
- `{"op": "start", "node", "name", "service", "version", "port"}`: a container starts there
  (published on 127.0.0.1:port); answered at once with the wall time of its `start` event.
- `{"op": "stop", "node", "name"}`: it is killed (SIGTERM: `kill`, `die`, gone).
- `{"op": "acked", "names": [...]}`: for each container, the wall time etcd acknowledged the
  write that put its key (null: not yet).
- `{"op": "seen", "revision": R}`: for each host, the wall time its follower first saw a
  revision >= R (null: not yet).
- `{"op": "beats", "after": T}`: for each host, the wall time of its first successful lease
  keepalive at or after wall time T (null: none yet), and its lease losses so far.
- `{"op": "stats"}`: threads, RSS, open files, hosts, containers.
- `{"op": "quit"}`: every host shuts down as an agent does (revoke its lease), then exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.scale_listener import raise_open_files
from registrar.adapters.etcd_store import EtcdStore
from registrar.agent.control_follower import follower as etcd_follower
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.agent.watcher import ContainerWatcher
from registrar.core.layout import Layout
from registrar.core.naming import NamingContext
from registrar.core.ownership import Ownership
from registrar.core.store import LeaseNotFound, StoredKey
from registrar.metrics import Metrics
from registrar.settings import EtcdEndpoint, EtcdSettings
from tests.fakes import FakeDocker
from tests.inspect_data import inspect_doc, published

RESYNC = 30.0  # the agents' default --resync
SAMPLE = 0.01  # how often the followers' revisions are looked at


class TimedStore(EtcdStore):
    """The real client, noting when etcd acknowledged what (the bench's only addition)."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(settings, Metrics())
        self.acked: dict[str, float] = {}  # key -> wall time of the write that put it
        self.beats: deque[float] = deque(maxlen=64)  # wall times of successful keepalives
        self.lost = 0  # keepalives that found their lease gone (expired)

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str], lease: int) -> None:
        super().apply(puts, deletes, lease)
        now = time.time()
        for key in puts:
            self.acked.setdefault(key, now)

    def list_starting(self, starts: Sequence[str]) -> tuple[dict[str, StoredKey], int]:
        # A write whose answer timed out (etcd busy) is not written again: the keeper finds
        # it in its next read, which is then when it knows the key is in.
        found, revision = super().list_starting(starts)
        now = time.time()
        for key in found:
            self.acked.setdefault(key, now)
        return found, revision

    def keepalive(self, lease: int, patience: float | None = None) -> int:
        try:
            ttl = super().keepalive(lease, patience)
        except LeaseNotFound:  # how the real client says it (it never answers TTL 0)
            self.lost += 1
            raise
        self.beats.append(time.time())
        return ttl


class Host:
    def __init__(self, node: str, etcd: EtcdSettings, layout: Layout, ttl: int) -> None:
        self.node = node
        self.docker = FakeDocker()
        self.store = TimedStore(etcd)
        metrics = Metrics()
        self.keeper = LeaseKeeper(self.store, ttl=ttl, layout=layout,
                                  ownership=Ownership(node), metrics=metrics)
        self.follower = etcd_follower(self.store, self.keeper, layout, metrics)
        naming = NamingContext(prefix=layout.prefix, node=node, host_ip="127.0.0.1",
                               default_ip="127.0.0.1")
        self.watcher = ContainerWatcher(self.docker, self.keeper, naming, metrics,
                                        resync=RESYNC)
        self.ids: dict[str, str] = {}  # container name -> id
        self.revisions: deque[tuple[int, float]] = deque(maxlen=256)

    def start(self) -> None:
        self.keeper.start()
        self.follower.start()
        self.watcher.start()

    def run(self, name: str, service: str, version: str, port: int) -> float:
        cid = f"{abs(hash((self.node, name, time.time_ns()))):016x}".ljust(64, "0")[:64]
        doc = inspect_doc(name, f"sim/{service}:{version}", cid=cid,
                          labels={"registrar.service": service, "registrar.version": version},
                          ports={"8080/tcp": published(port, "127.0.0.1", ipv6=False)})
        self.docker.add(doc)
        self.ids[name] = cid
        started = time.time()
        self.docker.emit("start", cid)
        return started

    def kill(self, name: str) -> float:
        cid = self.ids.pop(name)
        stopped = time.time()
        self.docker.emit("kill", cid, signal="15")
        self.docker.state(cid, Running=False, Status="exited", Pid=0)
        self.docker.emit("die", cid, exitCode="0")
        self.docker.remove(cid)
        return stopped

    def key_acked(self, name: str) -> float | None:
        found = [t for key, t in list(self.store.acked.items()) if f":{name}:" in key]
        return min(found) if found else None

    def shutdown(self, deadline: float) -> None:
        self.watcher.request_stop()
        self.follower.request_stop()
        self.keeper.shutdown(deadline)
        self.watcher.join(deadline)
        self.follower.join(deadline)
        self.store.close()


class Simulation:
    def __init__(self, etcd: EtcdSettings, layout: Layout, ttl: int) -> None:
        self.etcd = etcd
        self.layout = layout
        self.ttl = ttl
        self.hosts: dict[str, Host] = {}
        self.where: dict[str, str] = {}  # container name -> node
        self._out = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, name="sampler", daemon=True).start()

    def answer(self, request: Mapping[str, Any], **fields: Any) -> None:
        line = json.dumps({"id": request.get("id"), **fields})
        with self._out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _sample(self) -> None:
        """Notes when each host's follower moved to a new revision."""
        while not self._stop.wait(SAMPLE):
            now = time.time()
            for host in list(self.hosts.values()):
                revision = host.follower.revision
                if not host.revisions or host.revisions[-1][0] != revision:
                    host.revisions.append((revision, now))

    def handle(self, request: Mapping[str, Any]) -> bool:
        op = request["op"]
        if op == "hosts":
            threading.Thread(target=self._hosts, args=(request,), daemon=True).start()
        elif op == "start":
            host = self.hosts[request["node"]]
            self.where[request["name"]] = host.node
            self.answer(request, t=host.run(request["name"], request["service"],
                                            request["version"], int(request["port"])))
        elif op == "stop":
            host = self.hosts[self.where.pop(request["name"])]
            self.answer(request, t=host.kill(request["name"]))
        elif op == "acked":
            self.answer(request, t={name: self.hosts[node].key_acked(name)
                                    for name in request["names"]
                                    if (node := self.where.get(name)) is not None})
        elif op == "seen":
            revision = int(request["revision"])
            self.answer(request, t={node: next((t for r, t in list(host.revisions)
                                                if r >= revision), None)
                                    for node, host in self.hosts.items()})
        elif op == "beats":
            after = float(request["after"])
            self.answer(request, t={node: next((t for t in list(h.store.beats) if t >= after),
                                               None) for node, h in self.hosts.items()},
                        lost=sum(h.store.lost for h in self.hosts.values()))
        elif op == "stats":
            self.answer(request, **stats(len(self.hosts), len(self.where)))
        elif op == "quit":
            self._stop.set()
            deadline = time.monotonic() + 10.0
            for host in self.hosts.values():
                host.watcher.request_stop()
            for host in self.hosts.values():
                host.shutdown(deadline)
            self.answer(request, done=True)
            return False
        else:
            self.answer(request, error=f"unknown op {op!r}")
        return True

    def _hosts(self, request: Mapping[str, Any]) -> None:
        made = []
        for node in request["nodes"]:
            host = Host(node, self.etcd, self.layout, self.ttl)
            host.start()
            made.append(host)
            self.hosts[node] = host
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and not all(h.keeper.lease for h in made):
            time.sleep(0.05)
        self.answer(request, ready=sum(1 for h in made if h.keeper.lease))


def stats(hosts: int, containers: int) -> dict[str, Any]:
    status = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            status[name] = value.strip()
    return {"hosts": hosts, "containers": containers, "threads": threading.active_count(),
            "rss_kib": int(status["VmRSS"].split()[0]),
            "fds": len(os.listdir("/proc/self/fd"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.scale_hosts", description=__doc__.split("\n\n")[0])
    p.add_argument("--etcd", required=True, help="comma-separated http:// endpoints")
    p.add_argument("--prefix", required=True)
    p.add_argument("--control-prefix", required=True)
    p.add_argument("--ttl", type=int, default=15)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(message)s")
    raise_open_files()
    # Hundreds of threads in one process: hand the GIL over less often than every 5 ms, or
    # the kernel spends the machine switching them (100 % system time seen at 1,000 hosts).
    sys.setswitchinterval(0.05)
    endpoints = []
    for url in args.etcd.split(","):
        host, _, port = url.removeprefix("http://").rpartition(":")
        endpoints.append(EtcdEndpoint(host, int(port), secure=False))
    sim = Simulation(EtcdSettings(tuple(endpoints)), Layout(args.prefix, args.control_prefix),
                     args.ttl)
    for line in sys.stdin:
        if line.strip() and not sim.handle(json.loads(line)):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
