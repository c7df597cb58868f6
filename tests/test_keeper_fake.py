"""LeaseKeeper and ContainerWatcher against in-memory fakes of etcd and Docker.

Threads are involved: every check polls with `wait_until` (short timeouts) and nothing asserts
on timing. "Nothing happened" is checked with a sentinel: events and writes are applied in order,
so once a later change is visible, an earlier one that should have written nothing has not.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.agent.watcher import REPLAY_SPAN, ContainerWatcher
from registrar.core import timestamps
from registrar.core.layout import Layout
from registrar.core.naming import NamingContext
from registrar.core.ownership import Ownership
from registrar.core.store import KeyEvent, StoredKey
from registrar.health import health_problem
from registrar.metrics import Metrics
from tests.fakes import NOSPACE, FakeDocker, FakeEtcd
from tests.inspect_data import inspect_doc, published

PREFIX = "/services"
CONTROL = "/registrar"
NODE = "core-01"
DEFAULT_IP = "10.0.0.5"


def wait_until(condition: Callable[[], Any], timeout: float = 3.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.005)


# --- helpers ------------------------------------------------------------------------------


def cid_of(name: str) -> str:
    return (name.encode().hex() + "0" * 64)[:64]


def container(name: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("labels", {"registrar.service": "web"})
    kw.setdefault("ports", {"8080/tcp": published(32768 + len(name))})
    return inspect_doc(name, cid=cid_of(name), **kw)


def key(name: str, service: str = "web", port: int = 8080, node: str = NODE) -> str:
    return f"{PREFIX}/{service}/{node}:{name}:{port}"


def encoded(name: str, port: int = 32768, version: str = "v1") -> str:
    return json.dumps({"service": "web", "container_name": name, "port": port,
                       "version": version}, sort_keys=True)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def make_keeper(fake_etcd: FakeEtcd, metrics: Metrics, heartbeat: float = 0.05) -> LeaseKeeper:
    fake_etcd.metrics = metrics
    keeper = LeaseKeeper(fake_etcd, ttl=3, layout=Layout(PREFIX, CONTROL),
                         ownership=Ownership(NODE), metrics=metrics,
                         heartbeat_interval=heartbeat)
    # The first full picture of what runs (the watcher's first reconcile) allows writing.
    keeper.replace_all({})
    return keeper


@pytest.fixture
def fake_etcd() -> FakeEtcd:
    return FakeEtcd()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def keeper(fake_etcd: FakeEtcd, metrics: Metrics) -> Iterator[LeaseKeeper]:
    keeper = make_keeper(fake_etcd, metrics)
    yield keeper
    fake_etcd.down = False
    keeper.shutdown(time.monotonic() + 1.0)


def synced(keeper: LeaseKeeper) -> None:
    """Waits until the keeper has written everything it was told so far."""
    wait_until(keeper.synced.is_set, what="the keeper to be in sync")


# --- LeaseKeeper --------------------------------------------------------------------------


def test_keys_are_written_once(keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics) -> None:
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.set_container("c2", {key("b"): encoded("b"), key("b", port=9090): encoded("b", 9)})
    keeper.start()
    wait_until(lambda: len(fake_etcd.stored()) == 3, what="three keys")
    synced(keeper)
    lease = keeper.lease
    assert lease is not None
    assert all(stored.lease == lease for stored in fake_etcd.kv.values())
    assert fake_etcd.writes() == 3
    assert sample(metrics, "registrar_registrations_total") == 3
    assert sample(metrics, "registrar_registered_services") == 3
    assert sample(metrics, "registrar_etcd_up") == 1


def test_replace_all_with_the_same_state_writes_nothing(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd
) -> None:
    state = {"c1": {key("a"): encoded("a")}, "c2": {key("b"): encoded("b")}}
    keeper.replace_all(state)
    keeper.start()
    wait_until(lambda: len(fake_etcd.stored()) == 2)
    synced(keeper)
    writes, reads = fake_etcd.writes(), fake_etcd.reads
    for _ in range(3):
        keeper.replace_all(copy.deepcopy(state))
        synced(keeper)
    keeper.set_container("c1", {key("a"): encoded("a")})  # unchanged: not even a wake-up
    wait_until(lambda: fake_etcd.reads > reads, what="a re-read of etcd")  # it did look
    synced(keeper)
    assert fake_etcd.writes() == writes
    assert fake_etcd.stored() == {key("a"): encoded("a"), key("b"): encoded("b")}


def test_set_change_and_drop_a_container(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics
) -> None:
    keeper.start()
    keeper.set_container("c1", {key("a"): encoded("a")})
    wait_until(lambda: fake_etcd.stored() == {key("a"): encoded("a")})
    keeper.set_container("c1", {key("a"): encoded("a", version="v2")})
    wait_until(lambda: fake_etcd.stored() == {key("a"): encoded("a", version="v2")})
    keeper.drop_container("c1")
    wait_until(lambda: fake_etcd.stored() == {})
    synced(keeper)
    assert fake_etcd.ops == [("put", key("a")), ("put", key("a")), ("delete", key("a"))]
    assert sample(metrics, "registrar_registrations_total") == 1  # a changed value is not new
    assert sample(metrics, "registrar_deregistrations_total") == 1
    assert sample(metrics, "registrar_registered_services") == 0


def test_etcd_down_then_up_keeps_the_desired_state(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics
) -> None:
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.start()
    wait_until(lambda: key("a") in fake_etcd.stored())
    fake_etcd.down = True
    keeper.set_container("c2", {key("b"): encoded("b")})
    keeper.drop_container("c1")
    wait_until(lambda: fake_etcd.refused >= 2, what="the keeper to try while etcd is down")
    wait_until(lambda: sample(metrics, "registrar_etcd_up") == 0, what="etcd_up 0")
    assert not keeper.synced.is_set()
    assert keeper.desired_keys() == {key("b"): encoded("b")}
    assert key("b") not in fake_etcd.kv
    fake_etcd.down = False
    wait_until(lambda: fake_etcd.stored() == {key("b"): encoded("b")}, what="the catch-up")
    wait_until(lambda: sample(metrics, "registrar_etcd_up") == 1, what="etcd_up 1")
    synced(keeper)
    assert sample(metrics, "registrar_lease_regrants_total") == 0  # the lease outlived it


def test_etcd_down_at_start(keeper: LeaseKeeper, fake_etcd: FakeEtcd) -> None:
    fake_etcd.down = True
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.start()
    wait_until(lambda: fake_etcd.refused >= 2)
    fake_etcd.down = False
    wait_until(lambda: fake_etcd.stored() == {key("a"): encoded("a")})


@pytest.mark.parametrize("how", ["ttl0", "raise"])
def test_expired_lease_is_granted_anew_and_every_key_put_again(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics, how: str
) -> None:
    fake_etcd.keepalive_expired = how
    state = {key("a"): encoded("a"), key("b"): encoded("b"), key("c"): encoded("c")}
    keeper.set_container("c1", state)
    keeper.start()
    wait_until(lambda: fake_etcd.stored() == state)
    old = keeper.lease
    assert old is not None
    fake_etcd.expire(old)  # found by the next heartbeat
    wait_until(lambda: fake_etcd.stored() == state, what="every key back")
    new = keeper.lease
    assert new is not None and new != old
    assert all(stored.lease == new for stored in fake_etcd.kv.values())
    assert all(fake_etcd.puts_of(k) == 2 for k in state)
    assert sample(metrics, "registrar_lease_regrants_total") == 1
    assert sample(metrics, "registrar_lease_keepalive_failures_total") >= (1 if how == "ttl0"
                                                                         else 0)
    assert sample(metrics, "registrar_registered_services") == 3
    # Put again under the new lease: not new registrations.
    assert sample(metrics, "registrar_registrations_total") == 3


def test_expired_lease_found_by_a_write(fake_etcd: FakeEtcd, metrics: Metrics) -> None:
    keeper = make_keeper(fake_etcd, metrics, heartbeat=60)  # no heartbeat will notice
    try:
        keeper.set_container("c1", {key("a"): encoded("a")})
        keeper.start()
        wait_until(lambda: key("a") in fake_etcd.stored())
        synced(keeper)
        old = keeper.lease
        assert old is not None
        fake_etcd.expire(old)
        keeper.set_container("c2", {key("b"): encoded("b")})
        wait_until(lambda: fake_etcd.stored() == {key("a"): encoded("a"), key("b"): encoded("b")})
        assert keeper.lease != old
        assert sample(metrics, "registrar_lease_regrants_total") == 1
    finally:
        keeper.shutdown(time.monotonic() + 1.0)


def test_start_deletes_this_nodes_stale_keys_only(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd
) -> None:
    stale = {
        key("old"): StoredKey(encoded("old"), 999),  # ours, from a previous run
        key("old", port=53) + ":udp": StoredKey(encoded("old"), 999),
        f"{CONTROL}/standby/web/{NODE}:old2:8080": StoredKey(encoded("old2"), 999),
        key("keep"): StoredKey(encoded("keep"), 999),  # ours and still running: re-put
    }
    foreign = {
        key("x", node="core-02"): StoredKey(encoded("x"), 5),
        key("x", node=NODE + "x"): StoredKey(encoded("x"), 5),  # a node named like ours
        key("x", node="core-0"): StoredKey(encoded("x"), 5),
        f"{CONTROL}/standby/web/core-02:y:8080": StoredKey(encoded("y"), 5),
        f"{PREFIX}-old/web/{NODE}:z:8080": StoredKey(encoded("z"), 5),  # another prefix
        f"/elsewhere/web/{NODE}:z:8080": StoredKey(encoded("z"), 5),
        f"{PREFIX}/web/{NODE}:not-an-instance": StoredKey("?", 5),
        f"{PREFIX}/web/{NODE}:a:8080/deeper": StoredKey("?", 5),
        f"{CONTROL}/promoted/api": StoredKey(json.dumps({"version": "v1", "at": "x"}), 0),
    }
    fake_etcd.kv.update(stale)
    fake_etcd.kv.update(foreign)
    keeper.replace_all({"c-keep": {key("keep"): encoded("keep")}})
    keeper.start()
    wait_until(lambda: key("old") not in fake_etcd.kv, what="the stale key deleted")
    synced(keeper)
    assert {k: v for k, v in fake_etcd.kv.items() if k not in foreign} == {
        key("keep"): StoredKey(encoded("keep"), keeper.lease or -1),
    }
    for k, v in foreign.items():
        assert fake_etcd.kv[k] == v, k
    deleted = {k for op, k in fake_etcd.ops if op == "delete"}
    assert deleted == set(stale) - {key("keep")}


def promote_event(fake: FakeEtcd, service: str, version: str) -> KeyEvent:
    """Writes `{control}/promoted/SERVICE` into the fake etcd; the event a follower sees."""
    promoted = f"{CONTROL}/promoted/{service}"
    value = json.dumps({"version": version, "at": "x"})
    fake.kv[promoted] = StoredKey(value, 0)
    fake.revision += 1
    return KeyEvent(promoted, value, fake.revision)


def test_a_promotion_is_applied_from_its_event_without_reading_etcd(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd
) -> None:
    """The follower's event of a promotion is applied to the control state the keeper
    read: its instance of another version leaves rotation in one write, no read; a
    promotion of a service it has no instance of moves nothing, and its first instance
    goes straight to standby, still without a read."""
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.start()
    wait_until(lambda: key("a") in fake_etcd.kv, what="web registered")
    synced(keeper)
    reads = fake_etcd.reads
    keeper.control_changed([promote_event(fake_etcd, "web", "v2")])
    standby = f"{CONTROL}/standby/web/{NODE}:a:8080"
    wait_until(lambda: standby in fake_etcd.kv, what="web's v1 instance on standby")
    assert key("a") not in fake_etcd.kv
    synced(keeper)
    writes = fake_etcd.writes()
    keeper.control_changed([promote_event(fake_etcd, "api", "v1")])  # concerns it not (yet)
    time.sleep(0.1)
    assert fake_etcd.writes() == writes  # moves nothing
    value = json.dumps({"service": "api", "container_name": "b", "port": 1, "version": "v2"})
    keeper.set_container("c2", {key("b", service="api"): value})
    wait_until(lambda: f"{CONTROL}/standby/api/{NODE}:b:8080" in fake_etcd.kv,
               what="api's v2 instance on standby")
    synced(keeper)
    assert ("put", key("b", service="api")) not in fake_etcd.ops
    assert fake_etcd.reads == reads


class GatedEtcd(FakeEtcd):
    """A FakeEtcd whose reads wait for `gate` (`entered` is set once one does), before they
    take their snapshot or, `snapshot_first`, after (a change made meanwhile is then newer
    than the read)."""

    def __init__(self, snapshot_first: bool = False) -> None:
        super().__init__()
        self.snapshot_first = snapshot_first
        self.gate = threading.Event()
        self.entered = threading.Event()

    def list_starting(self, starts: Sequence[str]) -> tuple[dict[str, StoredKey], int]:
        found = super().list_starting(starts) if self.snapshot_first else None
        self.entered.set()
        self.gate.wait(5)
        return found if found is not None else super().list_starting(starts)


def test_a_control_change_during_a_read_is_read_for_again(metrics: Metrics) -> None:
    """A change of another service's entries that came while a read was under way, newer
    than that read, is not applied (the read replaces the state) but remembered: the first
    instance of that service is read for before its key is written."""
    fake = GatedEtcd(snapshot_first=True)
    fake.gate.set()
    keeper = make_keeper(fake, metrics)
    keeper.set_container("c0", {key("z"): encoded("z")})
    try:
        keeper.start()
        wait_until(lambda: key("z") in fake.kv, what="web registered")
        synced(keeper)
        fake.gate.clear()
        fake.entered.clear()
        keeper.request_reread()
        assert fake.entered.wait(3)  # a second read, its snapshot taken
        keeper.control_changed([promote_event(fake, "api", "v1")])
        reads = fake.reads
        fake.gate.set()
        wait_until(lambda: keeper.read_revision == fake.revision - 1, what="the read")
        value = json.dumps({"service": "api", "container_name": "b", "port": 1,
                            "version": "v2"})
        keeper.set_container("c2", {key("b", service="api"): value})
        wait_until(lambda: f"{CONTROL}/standby/api/{NODE}:b:8080" in fake.kv,
                   what="api's v2 instance on standby")
        assert fake.reads == reads + 1  # read for api before its key was written
        assert ("put", key("b", service="api")) not in fake.ops
    finally:
        keeper.shutdown(time.monotonic() + 1.0)


def test_a_first_instance_of_a_service_whose_entries_did_not_change_reads_nothing(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd
) -> None:
    """Every read takes every service's control entries: a first instance of a service
    whose entries did not change since (no event of it, or one the last read reached) is
    written from what the keeper holds, without reading etcd again."""
    fake_etcd.kv[f"{CONTROL}/promoted/api"] = StoredKey(
        json.dumps({"version": "v1", "at": "x"}), 0)
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.start()
    wait_until(lambda: key("a") in fake_etcd.kv, what="web registered")
    synced(keeper)
    stale = KeyEvent(f"{CONTROL}/promoted/api", json.dumps({"version": "v0", "at": "x"}),
                     keeper.read_revision)
    keeper.control_changed([stale])  # the read reached it: an older state, ignored
    reads = fake_etcd.reads
    value = json.dumps({"service": "api", "container_name": "b", "port": 1, "version": "v2"})
    keeper.set_container("c2", {key("b", service="api"): value})
    standby = f"{CONTROL}/standby/api/{NODE}:b:8080"
    wait_until(lambda: standby in fake_etcd.kv, what="api's v2 instance on standby")
    assert fake_etcd.reads == reads  # the promotion read at the start holds
    assert key("b", service="api") not in fake_etcd.kv


@pytest.mark.parametrize(("ahead", "reads"), [(0, 1), (1, 2)])
def test_a_reread_asked_while_reading_is_made_only_past_that_read(
    metrics: Metrics, ahead: int, reads: int,
) -> None:
    """A follower's read (or event) of revision R asks for a read while the keeper reads: a
    read that ends at R or later holds it already (a sidecar's start reads once, not twice)."""
    fake = GatedEtcd()
    keeper = make_keeper(fake, metrics)
    keeper.set_container("c0", {key("z"): encoded("z")})  # its service is read from the first
    try:
        keeper.start()
        assert fake.entered.wait(3)
        keeper.request_reread(fake.revision + ahead)
        fake.gate.set()
        keeper.set_container("c1", {key("a"): encoded("a")})  # written after any read again
        wait_until(lambda: key("a") in fake.stored(), what="the key")
        assert fake.reads == reads
        keeper.request_reread(fake.revision - 1)  # older than the last read: nothing
        keeper.set_container("c2", {key("b"): encoded("b")})
        wait_until(lambda: key("b") in fake.stored(), what="the second key")
        assert fake.reads == reads
    finally:
        keeper.shutdown(time.monotonic() + 1.0)


def test_shutdown_revokes_the_lease(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics
) -> None:
    fake_etcd.kv[key("x", node="core-02")] = StoredKey(encoded("x"), 5)
    keeper.set_container("c1", {key("a"): encoded("a"), key("b"): encoded("b")})
    keeper.start()
    wait_until(lambda: len(fake_etcd.stored()) == 3)
    lease = keeper.lease
    assert keeper.shutdown(time.monotonic() + 1.0) is True
    assert fake_etcd.revoked == [lease]
    assert fake_etcd.stored() == {key("x", node="core-02"): encoded("x")}
    assert not keeper.alive()
    assert sample(metrics, "registrar_registered_services") == 0
    assert sample(metrics, "registrar_deregistrations_total") == 2


def test_shutdown_with_etcd_down_gives_up(keeper: LeaseKeeper, fake_etcd: FakeEtcd) -> None:
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.start()
    wait_until(lambda: key("a") in fake_etcd.stored())
    fake_etcd.down = True
    assert keeper.shutdown(time.monotonic() + 0.5) is False  # the keys expire with the lease
    assert fake_etcd.revoked == []


def test_shutdown_before_any_lease(fake_etcd: FakeEtcd, metrics: Metrics) -> None:
    keeper = make_keeper(fake_etcd, metrics)
    assert keeper.shutdown(time.monotonic() + 0.5) is True
    assert fake_etcd.revoked == []


# --- ContainerWatcher ---------------------------------------------------------------------


# A StartedAt of a few seconds ago, and the same as `since` takes it
STARTED_NS = (time.time_ns() // 1_000_000_000 - 5) * 1_000_000_000 + 123_456_789
STARTED_AT = timestamps.since(STARTED_NS)


@dataclass
class Rig:
    fake_etcd: FakeEtcd
    docker: FakeDocker
    metrics: Metrics
    keeper: LeaseKeeper
    watcher: ContainerWatcher

    def start(self) -> None:
        self.keeper.start()
        self.watcher.start()
        # subscribed and listed once: what runs now is known
        wait_until(lambda: self.docker.opened and self.docker.running_calls >= 1)

    def resyncs(self, count: int = 2) -> None:
        seen = self.docker.running_calls
        wait_until(lambda: self.docker.running_calls >= seen + count, what=f"{count} resyncs")

    def sentinel(self, name: str) -> None:
        """Starts a container and waits for its key: everything before it was handled."""
        cid = self.docker.add(container(name))
        self.docker.emit("start", cid)
        wait_until(lambda: key(name) in self.fake_etcd.stored(), what=f"sentinel {name}")


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(resync: float = 0.0, host_ip: str | None = None, *,
             docker: FakeDocker | None = None, sidecar: str | None = None,
             started_at: str | None = None) -> Rig:
        """`sidecar`: the name of a container made running, which the watcher is a sidecar of,
        given the inspect that found it (`started_at`: its State.StartedAt; default
        STARTED_NS's)."""
        fake_etcd, metrics = FakeEtcd(), Metrics()
        docker = docker or FakeDocker()
        keeper = make_keeper(fake_etcd, metrics)
        naming = NamingContext(prefix=PREFIX, node=NODE, host_ip=host_ip, default_ip=DEFAULT_IP,
                               sidecar=sidecar is not None)
        only = first = None
        if sidecar is not None:
            only = docker.add(container(sidecar))
            docker.state(only, StartedAt=started_at or time.strftime(
                "%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(STARTED_NS // 1_000_000_000)))
            first = docker.inspect(only)
            assert first is not None and first.started_at
        watcher = ContainerWatcher(docker, keeper, naming, metrics,
                                   resync=resync, only=only, first=first)
        rig = Rig(fake_etcd, docker, metrics, keeper, watcher)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.docker.down = False
        rig.fake_etcd.down = False
        rig.watcher.request_stop()
        rig.watcher.join(time.monotonic() + 2.0)
        rig.keeper.shutdown(time.monotonic() + 1.0)


def test_running_containers_are_registered_at_start(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.docker.add(container("web-1"))
    rig.docker.add(container("web-2", running=False))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    value = json.loads(rig.fake_etcd.stored()[key("web-1")])
    assert value["host"] == DEFAULT_IP and value["node"] == NODE
    assert value["container_id"] == cid_of("web-1")
    rig.sentinel("z")
    assert key("web-2") not in rig.fake_etcd.stored()
    assert sample(rig.metrics, "registrar_docker_up") == 1


def test_start_event_registers(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()  # no periodic resync: only the event can do it
    rig.start()
    cid = rig.docker.add(container("web-1"))
    rig.docker.emit("create", cid)
    rig.docker.emit("start", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    assert sample(rig.metrics, "registrar_docker_events_total", action="start") == 1
    assert sample(rig.metrics, "registrar_docker_events_total", action="create") == 1
    assert rig.docker.running_calls == 1


def test_kill_withdraws_and_resync_does_not_bring_it_back(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(resync=0.05)
    cid = rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.emit("kill", cid, signal="15")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="withdrawn on kill 15")
    rig.resyncs()  # the container still runs (it is stopping): it stays out
    rig.sentinel("z1")
    assert key("web-1") not in rig.fake_etcd.stored()
    rig.docker.state(cid, Running=False, Status="exited", ExitCode=143)
    rig.docker.emit("die", cid, exitCode="143")
    rig.docker.emit("stop", cid)
    rig.resyncs()
    rig.sentinel("z2")
    assert key("web-1") not in rig.fake_etcd.stored()
    assert rig.fake_etcd.puts_of(key("web-1")) == 1
    rig.docker.state(cid, Running=True, Status="running")
    rig.docker.emit("start", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="back after a new start")


@pytest.mark.parametrize(("stop_signal", "signal"), [(None, "9"), (None, "2"), (None, "3"),
                                                     ("SIGUSR1", "10"), ("10", "10")])
def test_kill_with_an_ending_signal(
    rig_factory: Callable[..., Rig], stop_signal: str | None, signal: str
) -> None:
    rig = rig_factory()
    cid = rig.docker.add(container("web-1", stop_signal=stop_signal))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.emit("kill", cid, signal=signal)
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored())


@pytest.mark.parametrize("signal", ["1", "10", "12"])
def test_kill_with_another_signal_changes_nothing(
    rig_factory: Callable[..., Rig], signal: str
) -> None:
    rig = rig_factory()
    cid = rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.emit("kill", cid, signal=signal)
    rig.sentinel("z")
    assert key("web-1") in rig.fake_etcd.stored()
    assert rig.fake_etcd.ops.count(("delete", key("web-1"))) == 0
    assert rig.fake_etcd.puts_of(key("web-1")) == 1


def test_pause_and_unpause(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(resync=0.05)
    cid = rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.state(cid, Paused=True, Status="paused")
    rig.docker.emit("pause", cid)
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out while paused")
    rig.resyncs()
    rig.sentinel("z")
    assert key("web-1") not in rig.fake_etcd.stored()
    rig.docker.state(cid, Paused=False, Status="running")
    rig.docker.emit("unpause", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="back on unpause")


def test_health_events(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    cid = rig.docker.add(container("web-1", healthcheck=["CMD", "true"], health="starting"))
    rig.start()
    rig.docker.emit("start", cid)
    rig.docker.emit("health_status: starting", cid)
    rig.sentinel("z")
    assert key("web-1") not in rig.fake_etcd.stored()  # not before it is healthy
    rig.docker.health(cid, "healthy")
    rig.docker.emit("health_status: healthy", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="in when healthy")
    rig.docker.health(cid, "unhealthy")
    rig.docker.emit("health_status: unhealthy", cid)
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out when unhealthy")
    rig.docker.health(cid, "healthy")
    rig.docker.emit("health_status: healthy", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="in again")
    assert sample(rig.metrics, "registrar_docker_events_total",
                  action="health_status:healthy") == 2


def test_die_and_destroy(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    one = rig.docker.add(container("web-1"))
    two = rig.docker.add(container("web-2"))
    rig.start()
    wait_until(lambda: {key("web-1"), key("web-2")} <= set(rig.fake_etcd.stored()))
    rig.docker.state(one, Running=False)
    rig.docker.emit("die", one, exitCode="1")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored())
    rig.docker.remove(two)
    rig.docker.emit("destroy", two)
    wait_until(lambda: key("web-2") not in rig.fake_etcd.stored())


def test_rejected_container_is_counted_once(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(resync=0.05)
    cid = rig.docker.add(container("evil", labels={"registrar.service": "../etc"}))
    rig.start()
    rig.docker.emit("start", cid)
    rig.resyncs(3)
    rig.sentinel("z")
    assert sample(rig.metrics, "registrar_rejected_containers_total",
                  reason="invalid_service_name") == 1
    assert set(rig.fake_etcd.stored()) == {key("z")}
    assert all(k.startswith(f"{PREFIX}/web/") for k in rig.fake_etcd.kv)


def test_resync_writes_nothing_when_nothing_changed(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(resync=0.05)
    rig.docker.add(container("web-1"))
    rig.docker.add(container("web-2"))
    rig.start()
    wait_until(lambda: len(rig.fake_etcd.stored()) == 2)
    synced(rig.keeper)
    writes = rig.fake_etcd.writes()
    rig.resyncs(3)
    rig.sentinel("z")
    assert rig.fake_etcd.writes() == writes + 1  # the sentinel only


def test_resync_removes_what_stopped_unseen(rig_factory: Callable[..., Rig]) -> None:
    """An event lost (Docker keeps only its last events): the periodic resync repairs it."""
    rig = rig_factory(resync=0.05)
    cid = rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.state(cid, Running=False)  # and no event
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored())


def test_docker_down_then_up_catches_up(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()  # no periodic resync: the reconnect itself must reconcile
    gone = rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.emit("exec_create: sh", gone)  # some event, so the resumed stream has a `since`
    rig.docker.cut()
    wait_until(lambda: sample(rig.metrics, "registrar_docker_up") == 0, what="docker_up 0")
    rig.docker.state(gone, Running=False)  # meanwhile one stopped, another started
    rig.docker.add(container("web-2"))
    rig.docker.down = False
    wait_until(lambda: set(rig.fake_etcd.stored()) == {key("web-2")}, what="the catch-up")
    wait_until(lambda: sample(rig.metrics, "registrar_docker_up") == 1, what="docker_up 1")
    assert len(rig.docker.opened) >= 2
    assert rig.docker.opened[0] is None and rig.docker.opened[-1] is not None


def test_host_ip_is_written(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(host_ip="192.168.1.9")
    rig.docker.add(container("web-1"))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    assert json.loads(rig.fake_etcd.stored()[key("web-1")])["host"] == "192.168.1.9"


def test_nothing_is_written_before_the_first_full_reconcile(metrics: Metrics) -> None:
    """A restarted agent must not delete its node's keys before it knows what runs."""
    fake_etcd = FakeEtcd()
    stale = key("a")
    fake_etcd.kv[stale] = StoredKey(encoded("a"), 99)
    keeper = LeaseKeeper(fake_etcd, ttl=3, layout=Layout(PREFIX, CONTROL),
                         ownership=Ownership(NODE), metrics=metrics)
    keeper.start()
    try:
        keeper.set_container("c1", {key("b"): encoded("b")})
        # the lease and the read are had meanwhile, and nothing is written
        wait_until(lambda: keeper.read_revision > 0 and fake_etcd.reads == 1,
                   what="the read before the first picture")
        steps = keeper.steps
        wait_until(lambda: keeper.steps > steps, what="the keeper to look again")
        assert fake_etcd.stored() == {stale: encoded("a")}
        assert len(fake_etcd.granted) == 1
        keeper.replace_all({"c1": {stale: encoded("a")}})
        wait_until(lambda: fake_etcd.kv[stale].lease == keeper.lease, what="taken over")
        assert key("b") not in fake_etcd.stored()
        assert fake_etcd.reads == 1  # that read was fresh: the first write needed no other
    finally:
        keeper.shutdown(time.monotonic() + 1.0)


def test_before_the_first_picture_every_control_entry_concerns_the_keeper(
    metrics: Metrics,
) -> None:
    """The read made before the first picture stands for the first write's: a control entry
    of any service changed meanwhile makes the keeper read again (its services are not
    known yet); after it, only its own services' do."""
    keeper = LeaseKeeper(FakeEtcd(), ttl=3, layout=Layout(PREFIX, CONTROL),
                         ownership=Ownership(NODE), metrics=metrics)
    assert keeper.concerns("api") and keeper.concerns("web")
    keeper.replace_all({"c1": {key("web-1"): encoded("web-1")}})
    assert keeper.concerns("web") and not keeper.concerns("api")


# --- etcd refusing writes (its NOSPACE alarm), heartbeats on their own clock --------------


def test_refused_writes_never_stop_the_heartbeats(
    keeper: LeaseKeeper, fake_etcd: FakeEtcd, metrics: Metrics
) -> None:
    keeper.set_container("c1", {key("a"): encoded("a")})
    keeper.set_container("c2", {key("b"): encoded("b")})
    keeper.start()
    wait_until(lambda: len(fake_etcd.stored()) == 2)
    lease = keeper.lease
    fake_etcd.refuse_puts = NOSPACE
    keeper.set_container("c3", {key("c"): encoded("c")})  # refused, retried
    keeper.drop_container("c2")  # a delete can go alone, and does
    wait_until(lambda: key("b") not in fake_etcd.stored(), what="the delete, alone")
    wait_until(lambda: sample(metrics, "registrar_etcd_write_refusals_total",
                              code="RESOURCE_EXHAUSTED") >= 2, what="retries")
    beats = fake_etcd.keepalives
    wait_until(lambda: fake_etcd.keepalives >= beats + 5, what="heartbeats going on")
    assert keeper.lease == lease and lease in fake_etcd.leases
    assert sample(metrics, "registrar_etcd_up") == 1  # etcd answers: it is up
    assert sample(metrics, "registrar_etcd_writes_refused") == 1
    assert sample(metrics, "registrar_lease_regrants_total") == 0
    assert key("c") not in fake_etcd.stored() and not keeper.synced.is_set()
    fake_etcd.refuse_puts = None
    wait_until(lambda: key("c") in fake_etcd.stored(), timeout=5, what="the pending put")
    synced(keeper)
    assert sample(metrics, "registrar_etcd_writes_refused") == 0
    assert fake_etcd.stored() == {key("a"): encoded("a"), key("c"): encoded("c")}


def test_the_heartbeat_keeps_its_clock_while_a_write_hangs(fake_etcd: FakeEtcd, metrics: Metrics
                                                          ) -> None:
    keeper = make_keeper(fake_etcd, metrics, heartbeat=0.05)
    release = threading.Event()
    real_apply = fake_etcd.apply

    def slow_apply(puts: Mapping[str, str], deletes: Iterable[str], lease: int) -> None:
        release.wait(5)
        real_apply(puts, deletes, lease)

    try:
        keeper.set_container("c1", {key("a"): encoded("a")})
        keeper.start()
        wait_until(lambda: key("a") in fake_etcd.stored())
        fake_etcd.apply = slow_apply  # type: ignore[method-assign]
        keeper.set_container("c2", {key("b"): encoded("b")})
        beats = fake_etcd.keepalives
        wait_until(lambda: fake_etcd.keepalives >= beats + 5, what="heartbeats during the write")
        release.set()
        wait_until(lambda: key("b") in fake_etcd.stored())
    finally:
        release.set()
        keeper.shutdown(time.monotonic() + 1.0)


# --- events: replays and order ------------------------------------------------------------


def test_a_replayed_event_is_not_applied_again(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    cid = rig.docker.add(container("web-1"))
    rig.start()
    started = rig.docker.emit("start", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    rig.docker.emit("kill", cid, signal="15")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored())
    rig.docker.replay(started)  # a resumed stream delivers the old start again
    rig.sentinel("z")
    assert key("web-1") not in rig.fake_etcd.stored()
    assert sample(rig.metrics, "registrar_docker_events_total", action="start") == 2  # + z


def test_an_event_stamped_earlier_than_the_last_one_is_applied(
    rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory()
    one = rig.docker.add(container("web-1"))
    two = rig.docker.add(container("web-2"))
    rig.start()
    wait_until(lambda: {key("web-1"), key("web-2")} <= set(rig.fake_etcd.stored()))
    rig.docker.clock += 50_000_000
    rig.docker.emit("kill", one, signal="15")
    rig.docker.clock -= 20_000_000  # Docker's stream across containers: not in time order
    rig.docker.emit("kill", two, signal="15")
    wait_until(lambda: not {key("web-1"), key("web-2")} & set(rig.fake_etcd.stored()),
               what="both withdrawn")


def test_podman_health_events(rig_factory: Callable[..., Rig]) -> None:
    """Podman: a bare `health_status` at every check, its `HealthStatus` the state before the
    check, the new state saved after the check's `exec_died`; no `kill` at stop, then `die`."""
    rig = rig_factory()
    cid = rig.docker.add(container("web-1", healthcheck=["CMD", "true"], health="starting"))
    rig.start()
    rig.docker.emit("start", cid)
    rig.docker.emit("health_status", cid)  # HealthStatus "starting": stale
    rig.docker.health(cid, "healthy")  # saved after the check
    rig.docker.emit("exec_died", cid, containerExitCode="0")
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="in when healthy")
    rig.docker.emit("health_status", cid)
    rig.docker.health(cid, "unhealthy")
    rig.docker.emit("exec_died", cid, containerExitCode="1")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out when unhealthy")
    rig.docker.health(cid, "healthy")
    rig.docker.emit("exec_died", cid, containerExitCode="0")
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="in again")
    rig.docker.state(cid, Running=False)
    rig.docker.emit("die", cid, containerExitCode="0")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out at die")
    rig.docker.remove(cid)
    rig.docker.emit("remove", cid)
    rig.sentinel("z")


# --- registrar's own checks: a checked port is registered only while its check holds ------


def test_a_checked_port_follows_its_check(rig_factory: Callable[..., Rig]) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    rig = rig_factory(host_ip="127.0.0.1")
    labels = {"registrar.service": "web", "registrar.check": "tcp",
              "registrar.check.interval": "0.2", "registrar.check.fall": "1"}
    cid = rig.docker.add(container("web-1", labels=labels,
                                   ports={"8080/tcp": published(port)}))
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="in once the check passes")
    listener.close()  # refused from now on
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out when it fails")
    assert sample(rig.metrics, "registrar_failing_checks") == 1
    back = socket.socket()
    back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    back.bind(("127.0.0.1", port))
    back.listen(16)
    try:
        wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="back when it passes")
        rig.docker.emit("kill", cid, signal="15")
        wait_until(lambda: key("web-1") not in rig.fake_etcd.stored(), what="out at kill")
        assert sample(rig.metrics, "registrar_check_results_total", result="fail") >= 1
    finally:
        back.close()


def test_the_checker_counts_in_health_once_a_port_is_checked(
    rig_factory: Callable[..., Rig],
) -> None:
    """Without a checked port there is no checker (and nothing of it to go stale in /healthz:
    an idle, never-started checker used to read as stalled after STALL_LIMIT); the first
    checked port makes one, running, whose loop /healthz then follows."""
    rig = rig_factory(host_ip="127.0.0.1")
    rig.start()
    rig.sentinel("plain")
    assert rig.watcher.checker_loops() == ()
    cid = rig.docker.add(container("web-1", labels={"registrar.service": "web",
                                                    "registrar.check": "tcp"}))
    rig.docker.emit("start", cid)
    loops = wait_until(rig.watcher.checker_loops, what="a checker for the checked port")
    assert [loop.name for loop in loops] == ["checker"]
    assert health_problem(loops, time.monotonic()) is None


def test_a_bad_check_label_rejects_the_container(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.docker.add(container("web-1", labels={"registrar.service": "web",
                                              "registrar.check": "ping"}))
    rig.start()
    rig.sentinel("z")
    assert key("web-1") not in rig.fake_etcd.stored()
    assert sample(rig.metrics, "registrar_rejected_containers_total",
                  reason="invalid_check") == 1


def network_event(rig: Rig, action: str, cid: str, network: str) -> None:
    with rig.docker.lock:
        rig.docker.clock += 1_000_000
        clock = rig.docker.clock
    rig.docker.events.put({
        "Type": "network", "Action": action, "scope": "local", "time": clock // 1_000_000_000,
        "timeNano": clock,
        "Actor": {"ID": f"net-{network}", "Attributes": {"container": cid, "name": network,
                                                         "type": "overlay"}},
    })


def test_network_connect_and_disconnect_re_register_at_the_new_address(
    rig_factory: Callable[..., Rig],
) -> None:
    """registrar.network: the container's address on that network, read again at Docker's
    network events (connect, disconnect) about it."""
    rig = rig_factory()
    doc = container("web-1", labels={"registrar.service": "web", "registrar.network": "ov"})
    doc["NetworkSettings"]["Networks"]["ov"] = {"IPAddress": "10.20.0.7"}
    cid = rig.docker.add(doc)
    rig.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    value = json.loads(rig.fake_etcd.stored()[key("web-1")])
    assert (value["host"], value["port"]) == ("10.20.0.7", 8080)

    del rig.docker.docs[cid]["NetworkSettings"]["Networks"]["ov"]
    network_event(rig, "disconnect", cid, "ov")
    wait_until(lambda: key("web-1") not in rig.fake_etcd.stored())
    assert sample(rig.metrics, "registrar_rejected_containers_total",
                  reason="invalid_address") >= 1

    rig.docker.docs[cid]["NetworkSettings"]["Networks"]["ov"] = {"IPAddress": "10.20.0.9"}
    network_event(rig, "connect", cid, "ov")
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    value = json.loads(rig.fake_etcd.stored()[key("web-1")])
    assert (value["host"], value["port"]) == ("10.20.0.9", 8080)
    assert sample(rig.metrics, "registrar_docker_events_total", action="network_connect") == 1


class GatedDocker(FakeDocker):
    """A FakeDocker whose events stream opens only once `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def open_events(self, since: str | None, filters: Mapping[str, str] | None = None
                    ) -> Iterator[dict[str, Any]]:
        self.gate.wait(5)
        return super().open_events(since, filters)


def test_a_sidecar_registers_from_its_first_inspect_and_replays_from_the_start(
    rig_factory: Callable[..., Rig],
) -> None:
    """The key is written before the events stream opens, from the inspect that found the
    container; the stream then opens from the container's start, and its opening reads
    nothing again: a stop after that first inspect comes as an event."""
    docker = GatedDocker()
    rig = rig_factory(docker=docker, sidecar="web-1")
    cid = cid_of("web-1")
    rig.keeper.start()
    rig.watcher.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="key before the stream")
    assert docker.opened == [] and docker.inspects == 1
    docker.gate.set()
    wait_until(lambda: sample(rig.metrics, "registrar_docker_up") == 1)
    assert docker.opened == [STARTED_AT]
    docker.emit("start", cid)  # the replay of the run it registered from: no inspect
    docker.state(cid, Running=False)
    docker.emit("die", cid)
    wait_until(lambda: rig.watcher.finished.is_set(), what="container gone")
    assert docker.inspects == 1


def test_a_sidecar_of_a_container_started_long_ago_replays_one_minute_only(
    rig_factory: Callable[..., Rig],
) -> None:
    """Its older events (a health check's, each an inspect) are not asked for again."""
    rig = rig_factory(sidecar="web-1", started_at="2015-07-20T12:00:00.123456789Z")
    before = time.time_ns()
    rig.keeper.start()
    rig.watcher.start()
    wait_until(lambda: rig.docker.opened, what="the stream")
    since = rig.docker.opened[0]
    assert since is not None
    seconds = float(since)
    assert before / 1e9 - REPLAY_SPAN - 1 <= seconds <= time.time() - REPLAY_SPAN + 1


def test_a_sidecar_whose_first_stream_fails_reconciles_in_full(
    rig_factory: Callable[..., Rig],
) -> None:
    """A stream opened after a failure is opened from the container's start too (nothing of
    its events was seen yet), and the container is inspected again."""
    rig = rig_factory(sidecar="web-1")
    docker = rig.docker
    docker.down = True  # the first subscription fails
    rig.keeper.start()
    rig.watcher.start()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored())
    assert docker.opened == []
    docker.down = False
    wait_until(lambda: docker.inspects == 2, what="a full reconcile")
    assert docker.opened == [STARTED_AT]
