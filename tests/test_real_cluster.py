"""The seed's cluster, small: 4 hosts (each its own network namespace, Docker engine and
`registrar watch`), a 3-member etcd, 2 routers (`registrar haproxy`), 3 services with 2
instances each, and a client load through both routers on every service (tests/cluster/).

Needs root. Run it alone, under the real-tier lock (it starts a whole cluster):

    flock /tmp/registrar-realtier.lock .venv/bin/pytest -s tests/test_real_cluster.py

The tests share one cluster (module scope) and run in file order: a rolling deploy, a host cut
off from etcd, a host killed. Each one finds the state it needs (a live host with instances),
so any one of them also runs alone (`-k`). Figures are printed as `CLUSTER ...` lines (`-s`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.cluster import ClientLoad, Cluster, ClusterContainer, LoadStats
from tests.cluster.fleet import Fleet, addresses
from tests.support.observe import KeyLog

pytestmark = [pytest.mark.real, pytest.mark.timeout(240)]

TTL = 5  # the agents' lease TTL: a dead host's keys are gone within TTL + 2 s
SERVICES = ("web", "api", "auth")
COPIES = 2  # instances of each version of each service
RATE = 60.0  # client requests per second, in all (every service through both routers)
CONTROL = "/registrar"


@dataclass
class World:
    cluster: Cluster
    fleet: Fleet
    load: ClientLoad
    placement: dict[str, list[int]]  # where v1 went
    dead: set[int] = field(default_factory=set)  # hosts killed by a test
    events: list[tuple[str, float]] = field(default_factory=list)  # for failure timelines
    t0: float = field(default_factory=time.monotonic)

    def mark(self, event: str) -> None:
        self.events.append((event, time.time()))
        print(f"CLUSTER [{time.monotonic() - self.t0:6.1f}s] {event}", flush=True)

    def live_hosts_with_instances(self) -> list[int]:
        return [i for i in range(len(self.cluster.hosts))
                if i not in self.dead and self.host_keys(i)]  # fmt: skip

    def host_keys(self, i: int) -> set[str]:
        node = self.cluster.hosts[i].node
        return {k for k in self.fleet.etcd_keys() if k.split("/")[-1].startswith(f"{node}:")}


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    failed_before = request.session.testsfailed
    if os.geteuid() != 0:
        pytest.fail("the cluster tier needs root (network namespaces, Docker engines)",
                    pytrace=False)  # fmt: skip
    started = time.monotonic()
    cluster = Cluster(hosts=4, routers=2, agent_ttl=TTL, prometheus=False,
                      progress=lambda m: print(m, flush=True))  # fmt: skip
    cluster.start()
    try:
        fleet = Fleet(cluster, SERVICES)
        # as on a real cluster: the agents (a global unit) and the routers run first, then
        # the app units start their containers
        cluster.start_agents()
        fleet.start_routers()
        placement = fleet.spread(COPIES)
        v1 = fleet.run(placement, "v1")
        fleet.wait_keys(present=fleet.keys(v1), timeout=30)
        fleet.wait_routed(present=addresses(v1), timeout=30)
        fleet.wait_serving(timeout=30)
        load = cluster.start_load(fleet.load_targets(), rate=RATE)
        st = load.wait_requests(int(RATE), timeout=30)
        assert st.failed == 0, f"failures before any fault: {st.summary()}"
        w = World(cluster, fleet, load, placement)
        w.mark(f"v1 up: {len(v1)} instances, {len(SERVICES)} services, load {RATE:g}/s "
               f"({time.monotonic() - started:.1f} s after the start)")  # fmt: skip
        yield w
        final = load.stop()
        w.mark(f"client load, whole run: {final.summary()}")
    except BaseException:
        print(cluster.log_tails(), flush=True)
        raise
    finally:
        if request.session.testsfailed > failed_before:
            print(cluster.log_tails(), flush=True)
        left = cluster.destroy()
        print(f"CLUSTER whole module {time.monotonic() - started:.1f} s", flush=True)
    assert left.empty, f"destroy left {left.summary()}"


def _standby_keys(world: World, containers: list[ClusterContainer]) -> set[str]:
    return {f"{CONTROL}/standby/{c.service}/{c.instance}" for c in containers}


def test_rolling_deploy_under_load_fails_no_request(world: World) -> None:
    """v2 of every service started beside v1 on other hosts, `registrar promote` (run from the
    root namespace through the etcd forwarders), v1 stopped: 0 failed client requests."""
    c, fleet, load = world.cluster, world.fleet, world.load
    v1 = fleet.of("v1")
    assert v1, "no v1 running"
    before = load.stats()

    v2 = fleet.run(fleet.beside(world.placement), "v2")
    world.mark(f"started {len(v2)} v2 instances beside v1")
    fleet.wait_keys(present=fleet.keys(v2), timeout=20)
    fleet.wait_routed(present=addresses(v1) | addresses(v2), timeout=20)
    base = load.stats_after(time.time())

    def both_answer(s: LoadStats) -> bool:
        versions = s.since(base).versions
        return all(versions.get(svc, {}).get(v, 0) > 0 for svc in SERVICES for v in ("v1", "v2"))

    st = load.wait_for(both_answer, timeout=20)
    world.mark(f"traffic reaches both versions: {st.since(base).versions}")

    for svc in SERVICES:
        result = fleet.promote(svc, "v2", "--min-instances", str(COPIES), timeout=20)
        assert result.ok, result.describe()
        world.mark(f"promote {svc} v2: {result.seconds:.2f} s; {result.stdout.strip()}")
    fleet.wait_routed(present=addresses(v2), absent=addresses(v1), timeout=10)
    standby = _standby_keys(world, v1)
    assert standby <= set(c.etcd_keys(f"{CONTROL}/standby/")), "v1 not on standby"

    fleet.stop(v1)
    world.mark(f"stopped {len(v1)} v1 instances")
    fleet.wait_keys(absent=fleet.keys(v1), timeout=10)
    fleet.wait_keys(absent=standby, timeout=10)  # standby keys go with their containers
    removed = time.time()
    after = load.stats_after(removed + 0.5)
    tail = load.wait_requests(int(RATE)).since(after)
    assert set().union(*(tail.versions.get(s, {}) for s in SERVICES)) == {"v2"}, tail.versions

    during = load.stats().since(before)
    world.mark(f"rolling deploy: {during.failed} failed of {during.sent} "
               f"({during.summary()})")  # fmt: skip
    assert during.failed == 0, "failed requests during the deploy:\n" + (
        load.stats().timeline(world.events)
    )


def test_host_cut_from_etcd_only_its_keys_expire_and_come_back(world: World) -> None:
    """A host cut off from etcd (nothing else): its keys expire with the lease; the other
    hosts' keys see no DELETE and no PUT in an etcd watch; after the heal they come back."""
    c, fleet, load = world.cluster, world.fleet, world.load
    candidates = world.live_hosts_with_instances()
    assert candidates, "no live host with instances"
    victim = 1 if 1 in candidates else candidates[0]
    node = c.hosts[victim].node
    mine = world.host_keys(victim)
    others = fleet.etcd_keys() - mine
    assert others, "no other host's keys to watch"
    watch = KeyLog(c.etcd[0].url_from_root, fleet.prefix + "/")
    try:
        before = load.stats()
        t = time.monotonic()
        watched_from = time.time()
        c.cut_from_etcd(victim)
        world.mark(f"{node} cut from etcd ({len(mine)} keys)")
        fleet.wait_keys(absent=mine, timeout=TTL + 10)
        gone = time.monotonic() - t
        world.mark(f"{node}'s keys expired {gone:.1f} s after the cut (TTL {TTL})")
        assert others <= fleet.etcd_keys(), "other hosts' keys went during the cut"

        c.heal(victim)
        t = time.monotonic()
        fleet.wait_keys(present=mine, timeout=30)
        back = time.monotonic() - t
        world.mark(f"{node}'s keys back {back:.1f} s after the heal")
        assert watch.wait(lambda k: mine <= k.live, timeout=10), "the watch missed the re-puts"
        touched = [e for e in watch.since(watched_from) if e.key in others]
        assert not touched, f"other hosts' keys were written: {touched[:10]}"
        assert not watch.errors, watch.errors
        own = {e.key for e in watch.since(watched_from)}
        assert own <= mine, f"unexpected keys in the watch: {sorted(own - mine)}"

        ours = {(e.kind, e.key) for e in watch.since(watched_from)}
        assert {("delete", k) for k in mine} <= ours and {("put", k) for k in mine} <= ours
    finally:
        watch.close()
    fleet.wait_routed(present={json.loads(v)["host"] + ":" + str(json.loads(v)["port"])
                               for k, v in c.etcd_get_prefix(fleet.prefix + "/").items()
                               if k in mine}, timeout=10)  # fmt: skip
    during = load.stats_after(time.time() + 0.5).since(before)
    world.mark(f"etcd cut: {during.failed} failed of {during.sent} ({during.summary()})")
    assert gone <= TTL + 2, f"keys took {gone:.1f} s to expire (TTL {TTL})"
    assert during.failed == 0, "failed requests during the etcd cut:\n" + (
        load.stats().timeline(world.events)
    )


def test_host_killed_keys_gone_within_ttl(world: World) -> None:
    """A host dies (agent SIGKILL, link cut): its keys are gone within TTL + 2 s, the routers
    stop sending to it, the other hosts' keys stay, and no client request fails."""
    c, fleet, load = world.cluster, world.fleet, world.load
    candidates = world.live_hosts_with_instances()
    assert candidates, "no live host with instances"
    victim = 3 if 3 in candidates else candidates[-1]
    node = c.hosts[victim].node
    mine = world.host_keys(victim)
    others = fleet.etcd_keys() - mine
    values = c.etcd_get_prefix(fleet.prefix + "/")
    dead_addresses = {f"{json.loads(values[k])['host']}:{json.loads(values[k])['port']}"
                      for k in mine}  # fmt: skip
    before = load.stats()
    t = time.monotonic()
    killed_at = time.time()
    c.kill_host(victim)
    world.dead.add(victim)
    world.mark(f"{node} killed ({len(mine)} keys, servers {sorted(dead_addresses)})")

    fleet.wait_keys(absent=mine, timeout=TTL + 10)
    gone = time.monotonic() - t
    fleet.wait_routed(absent=dead_addresses, timeout=5)
    out = time.monotonic() - t
    out_at = time.time()
    world.mark(f"{node}'s keys gone {gone:.1f} s after the kill, out of both routers "
               f"after {out:.1f} s")  # fmt: skip
    assert gone <= TTL + 2, f"keys took {gone:.1f} s to go (TTL {TTL})"
    assert others <= fleet.etcd_keys(), "other hosts' keys went with the dead host's"

    # A request sent before the routers dropped the dead servers may time out up to the
    # client timeout (2 s) later: count from then.
    settled = load.stats_after(out_at + 2.5)
    during = settled.since(before)
    world.mark(f"host killed: {during.failed} failed of {during.sent} ({during.summary()})")
    for r in c.routers:
        down = [at for at, _ in fleet.marked_down(r, killed_at) if at <= out_at]
        world.mark(f"{r.name}'s HAProxy marked {len(down)} servers DOWN before the keys went"
                   + (f", the last {max(down) - killed_at:.1f} s after the kill" if down else ""))
    print("CLUSTER failures around the kill:\n" + settled.timeline(world.events), flush=True)
    tail = load.wait_requests(int(RATE * 2)).since(settled)
    assert tail.failed == 0, f"failures after the dead host left rotation: {tail.summary()}"
    # While the dead host's keys still stand, HAProxy's own checks take its servers out
    # (~1.2 s) and a connection attempt to it gives up after `timeout connect 1s` and is
    # redispatched to another server (`retries 3`, `option redispatch 1`), well within the
    # clients' 2 s: no request fails.
    assert during.failed == 0, "failed requests around the host's death:\n" + (
        settled.timeline(world.events))
