"""`registrar maint`: take instances, services or nodes out of rotation, bring them back, list.

An entry is one key without a lease under `{control_prefix}/maintenance/` (it outlives agents
and reboots until disabled). This command only writes or deletes it; every agent and sidecar
follows the control prefix and moves its own matching instances to standby (or back), in one
transaction each. Then it waits, up to --timeout, until the rotation matches, and prints the
instances that left or came back. `enable` waits on the routers too, as `registrar drain` does
(router_wait): every live router has applied the removal and has nothing in flight on the
instances the entry holds out, so a host drained before a reboot is really idle.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from registrar.adapters.etcd_store import EtcdStore
from registrar.commands.oneshot import OneShot, read_prefixes, read_until
from registrar.commands.output import address, say, write_table
from registrar.core import timestamps
from registrar.core.control import Control, parse_control
from registrar.core.layout import Layout
from registrar.core.maintenance import Target, entries
from registrar.core.planner import json_object, version_of
from registrar.core.store import StoredKey
from registrar.errors import FatalError
from registrar.router_wait import Waited, read_reports, removal_revision, wait_for_routers
from registrar.settings import MaintSettings, Settings


@dataclass(frozen=True)
class View:
    """One read of etcd: who is in rotation, who on standby, and the control state."""

    active: dict[tuple[str, str], str]  # (service, instance) -> value
    standby: dict[tuple[str, str], str]
    control: Control
    stored_control: dict[str, StoredKey]

    def held_by(self, target: Target) -> list[tuple[str, str]]:
        return sorted(i for i in self.standby if target.matches(*i))

    def rotating(self, target: Target) -> list[tuple[str, str]]:
        return sorted(i for i in self.active if target.matches(*i))


def read_view(etcd: OneShot, layout: Layout, serializable: bool = False) -> View:
    stored, control = read_prefixes(etcd, [layout.prefix, layout.control], serializable)
    active: dict[tuple[str, str], str] = {}
    standby: dict[tuple[str, str], str] = {}
    for key, item in [*stored.items(), *control.items()]:
        parsed = layout.parse(key)
        if parsed is not None:
            (active if parsed[2] else standby)[(parsed[0], parsed[1])] = item.value
    return View(active, standby, parse_control(control, layout), control)


def _address(raw: str) -> str:
    value = json_object(raw) or {}
    return f"{address(value)} {version_of(raw) or '-'}"


def _wait(etcd: OneShot, layout: Layout, settled: Callable[[View], object]) -> View:
    return read_until(etcd, lambda serializable: read_view(etcd, layout, serializable), settled)


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    m = settings.maint
    assert m is not None
    layout = Layout(settings.prefix, settings.control_prefix)
    store = EtcdStore(settings.etcd)
    etcd = OneShot(store, m.timeout)
    try:
        if m.action == "list":
            return _list(etcd, layout, out)
        return _change(etcd, layout, m, out)
    finally:
        store.close()


def _change(etcd: OneShot, layout: Layout, m: MaintSettings, out: TextIO) -> int:
    target = Target(m.service, m.instance, m.node)
    key = target.key(layout)
    # a revision before `before`: a watch from it sees every key of `before` that leaves
    _reports, since = etcd(lambda store: store.list_prefix(layout.routers))
    before = read_view(etcd, layout)
    if m.action == "enable":
        at = timestamps.now()
        value = json.dumps({"reason": m.reason, "at": at})
        etcd(lambda store: store.put(key, value))
        matching = before.rotating(target) + before.held_by(target)
        if not matching:
            out.write(f"maintenance on {target}: holds nothing yet (no instance registered); "
                      "written all the same\n")
            return 0
        after = _wait(etcd, layout, lambda v: not v.rotating(target))
        moved = [i for i in before.rotating(target) if i in after.standby]
        out.write(f"maintenance on {target}: {len(after.held_by(target))} instance(s) out of "
                  "rotation\n")
        for service, instance in moved:
            say(f"  left rotation: {service} {instance} "
                f"{_address(after.standby[(service, instance)])}", out)
        if after.rotating(target):
            raise FatalError(f"timed out after {m.timeout:g}s (--timeout): "
                             f"{len(after.rotating(target))} instance(s) still in rotation; "
                             "agents that are down or cut off apply it when they are back")
        return _wait_for_routers(etcd, layout, m, before, target, since, out)
    etcd(lambda store: store.delete(key))
    control = parse_control({k: v for k, v in before.stored_control.items() if k != key},
                            layout)

    def back(view: View) -> list[tuple[str, str]]:
        """Held by this entry and by nothing else: due back in rotation."""
        return [i for i in before.held_by(target)
                if control.in_rotation(i[0], i[1], version_of(before.standby[i]))
                and i in view.standby]

    after = _wait(etcd, layout, lambda v: not back(v))
    came = [i for i in before.held_by(target) if i in after.active]
    out.write(f"maintenance on {target} lifted: {len(came)} instance(s) back in rotation\n")
    for service, instance in came:
        say(f"  back in rotation: {service} {instance} "
            f"{_address(after.active[(service, instance)])}", out)
    if back(after):
        raise FatalError(f"timed out after {m.timeout:g}s (--timeout): {len(back(after))} "
                         "instance(s) still on standby")
    return 0


def _wait_for_routers(etcd: OneShot, layout: Layout, m: MaintSettings, before: View,
                      target: Target, since: int, out: TextIO) -> int:
    """After `enable`: until every live router has applied the removal of what left rotation
    and has nothing in flight on what the entry holds out."""
    started = time.monotonic()
    keys = [layout.key(*i) for i in before.rotating(target)]
    revision = etcd(lambda store: removal_revision(store, layout.prefix, keys, since,
                                                   time.monotonic() + etcd.left()))
    instances = before.rotating(target) + before.held_by(target)
    waited = wait_for_routers(lambda: etcd(lambda store: read_reports(store, layout)),
                              revision, instances, etcd.deadline, vacuous=True)
    _say_routers(waited, time.monotonic() - started, out)
    if waited.waiting or (keys and revision is None):
        why = "; ".join(f"{n} ({w})" for n, w in sorted(waited.waiting.items()))
        raise FatalError(f"timed out after {m.timeout:g}s (--timeout) waiting for routers: "
                         f"{why or 'the removal was not seen'}; the instances stay out")
    return 0


def _say_routers(waited: Waited, took: float, out: TextIO) -> None:
    if not waited.routers:
        return
    idle = len(waited.routers) - len(waited.waiting) - len(waited.unversioned)
    out.write(f"  routers: {idle} idle on them after {took:.2f}s\n")
    if waited.unversioned:
        out.write("  not waited for (their reports do not say what they applied): "
                  f"{', '.join(waited.unversioned)}\n")


def _list(etcd: OneShot, layout: Layout, out: TextIO) -> int:
    view = read_view(etcd, layout)
    found = entries(view.stored_control, layout)
    if not found:
        out.write("no maintenance entry\n")
        return 0
    table = [("WHAT", "REASON", "SINCE", "HOLDS")]
    for target in sorted(found, key=str):
        entry = found[target]
        table.append((str(target), entry["reason"] or "-", entry["at"],
                      str(len(view.held_by(target)))))
    write_table(table, out)
    return 0
