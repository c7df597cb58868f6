"""A drain held by the keeper and watcher, against the in-memory fakes: taken over under the
keeper's lease, kept across resyncs and pauses, ended by a stop or a new start, kept across a
lost lease and handed over at shutdown."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from registrar.core.drain import entry_value
from registrar.core.store import StoredKey
from tests.test_keeper_fake import (
    CONTROL,
    NODE,
    Rig,
    cid_of,
    container,
    key,
    rig_factory,
    wait_until,
)

__all__ = ["rig_factory"]  # the fixture, imported to be used here

ENTRY = f"{CONTROL}/draining/{NODE}/web-1"
STANDBY = f"{CONTROL}/standby/web/{NODE}:web-1:8080"


def drained(rig: Rig) -> str:
    """Starts web-1, writes a drain entry for it as the command does, waits for the hold."""
    cid = rig.docker.add(container("web-1"))
    rig.docker.emit("start", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="registered")
    lease = rig.fake_etcd.grant(60)
    rig.fake_etcd.put(ENTRY, entry_value("2026-12-04T20:00:00Z"), lease)
    rig.keeper.request_reread()  # what the control follower does on the entry's event
    wait_until(lambda: STANDBY in rig.fake_etcd.stored(CONTROL)
               and rig.fake_etcd.kv[ENTRY].lease == rig.keeper.lease, what="held")
    assert key("web-1") not in rig.fake_etcd.stored()
    return cid


def entry(rig: Rig) -> dict[str, str] | None:
    item = rig.fake_etcd.kv.get(ENTRY)
    return None if item is None else dict(json.loads(item.value))


def test_the_owner_takes_the_entry_over_with_the_run_and_keeps_it_across_resyncs_and_pauses(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(resync=0.05)
    rig.start()
    cid = drained(rig)
    assert entry(rig) == {"at": "2026-12-04T20:00:00Z", "container_id": cid_of("web-1"),
                          "started_at": "2015-07-20T12:00:00.123456789Z"}
    rig.resyncs()
    rig.docker.state(cid, Paused=True)
    rig.docker.emit("pause", cid)
    rig.docker.state(cid, Paused=False)
    rig.docker.emit("unpause", cid)
    rig.resyncs()
    rig.sentinel("z")
    assert key("web-1") not in rig.fake_etcd.stored() and entry(rig) is not None
    assert rig.fake_etcd.puts_of(key("web-1")) == 1


def test_a_stop_ends_the_hold_and_a_new_start_registers_again(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    rig.start()
    cid = drained(rig)
    rig.docker.emit("kill", cid, signal="15")
    wait_until(lambda: entry(rig) is None, what="entry deleted at the stop")
    rig.docker.state(cid, StartedAt="2026-12-04T21:00:00Z")
    rig.docker.emit("start", cid)
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="back after a new start")


def test_a_restart_unseen_ends_the_hold(rig_factory: Callable[..., Rig]) -> None:
    """The entry holds one run: a container that started again (an agent that missed it, or
    a restarted agent) is not held by it, and the entry is deleted."""
    rig = rig_factory()
    rig.start()
    cid = drained(rig)
    rig.docker.state(cid, StartedAt="2026-12-04T21:00:00Z")
    rig.docker.emit("update", cid)  # any re-inspect sees the new run
    wait_until(lambda: entry(rig) is None and key("web-1") in rig.fake_etcd.stored(),
               what="released")


def test_undo_deletes_the_entry_and_the_instance_comes_back(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    rig.start()
    drained(rig)
    rig.fake_etcd.delete(ENTRY)
    rig.keeper.request_reread()
    wait_until(lambda: key("web-1") in rig.fake_etcd.stored(), what="back after --undo")
    assert STANDBY not in rig.fake_etcd.stored(CONTROL)


def test_a_lost_lease_keeps_the_hold(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.start()
    drained(rig)
    old = rig.keeper.lease
    assert old is not None
    rig.fake_etcd.expire(old)
    wait_until(lambda: rig.keeper.lease not in (None, old) and entry(rig) is not None
               and STANDBY in rig.fake_etcd.stored(CONTROL), what="put again")
    assert rig.fake_etcd.kv[ENTRY].lease == rig.keeper.lease
    assert key("web-1") not in rig.fake_etcd.stored()


def test_shutdown_hands_the_entry_over_to_a_lease_of_its_own(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    rig.start()
    drained(rig)
    lease = rig.keeper.lease
    rig.watcher.request_stop()
    assert rig.keeper.shutdown(time.monotonic() + 5.0)
    kept = rig.fake_etcd.kv.get(ENTRY)
    assert kept is not None and kept.lease not in (0, lease)
    assert rig.fake_etcd.leases[kept.lease] == 60
    assert STANDBY not in rig.fake_etcd.stored(CONTROL)  # the instances went with the revoke
    assert rig.keeper.revoked == {STANDBY: StoredKey(rig.keeper.revoked[STANDBY].value,
                                                     lease or 0)}
