"""`registrar drain CONTAINER`: its instances out of rotation, confirmed by the routers.

It writes only `{control_prefix}/draining/{NODE}/{CONTAINER}`, on a lease of its own (DRAIN_TTL):
the owner of the container's keys (agent or sidecar) moves the instances to standby and takes
the entry over (core.drain). The command then waits for the owner (the instances' keys leave
`{prefix}/`: a watch replayed from before the write gives the revision they left at) and for
the routers (router_wait): every live router has applied that revision and has none of them in
flight. `--undo` deletes the entry and waits until they are back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from registrar.adapters.etcd_store import EtcdStore
from registrar.commands.oneshot import OneShot, read_until
from registrar.commands.output import address, say
from registrar.core import timestamps
from registrar.core.control import parse_control
from registrar.core.drain import DRAIN_TTL, Report, entry_value, reports
from registrar.core.layout import Layout
from registrar.core.planner import json_object, version_of
from registrar.core.store import StoredKey
from registrar.errors import FatalError
from registrar.router_wait import Waited, removal_revision, wait_for_routers
from registrar.settings import DrainSettings, Settings

KEEPALIVE_EVERY = DRAIN_TTL / 3


@dataclass(frozen=True)
class Snapshot:
    """One read of the prefix and the control prefix, as of one revision."""

    revision: int
    stored: dict[str, StoredKey]
    control: dict[str, StoredKey]

    def instances(self, layout: Layout, node: str, container: str, in_rotation: bool
                  ) -> dict[tuple[str, str], str]:
        """(service, instance) -> value of the container's instances, in rotation or not."""
        found = {}
        for key, item in (self.stored if in_rotation else self.control).items():
            parsed = layout.parse(key)
            if parsed is None or parsed[2] != in_rotation:
                continue
            parts = parsed[1].split(":")
            if parts[:2] == [node, container]:
                found[(parsed[0], parsed[1])] = item.value
        return found


def snapshot(etcd: OneShot, layout: Layout, serializable: bool = False) -> Snapshot:
    """Both prefixes as of one revision (one transaction: see oneshot.read_prefixes)."""
    (stored, control), revision = etcd(lambda store: store.list_prefixes(
        [layout.prefix, layout.control], serializable=serializable))
    return Snapshot(revision, stored, control)


def describe(service: str, instance: str, raw: str) -> str:
    value = json_object(raw) or {}
    return f"{service} {instance} {address(value)} {version_of(raw) or '-'}"


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    d = settings.drain_cmd
    assert d is not None
    layout = Layout(settings.prefix, settings.control_prefix)
    store = EtcdStore(settings.etcd)
    etcd = OneShot(store, d.timeout)
    try:
        if d.undo:
            return _undo(etcd, layout, d, out)
        return _drain(etcd, layout, d, out)
    finally:
        store.close()


def _drain(etcd: OneShot, layout: Layout, d: DrainSettings, out: TextIO) -> int:
    started = time.monotonic()
    key = layout.drain_key(d.node, d.container)
    before = snapshot(etcd, layout)
    active = before.instances(layout, d.node, d.container, in_rotation=True)
    held = before.instances(layout, d.node, d.container, in_rotation=False)
    what = f"{d.container} on {d.node}"
    if not active and not held:
        out.write(f"{what}: nothing registered or held out: nothing to drain\n")
        return 0
    lease = None
    if key not in before.control:  # taken over already: leave it on its owner's lease
        lease = etcd(lambda store: store.grant(DRAIN_TTL))
        at = timestamps.now()
        etcd(lambda store: store.put(key, entry_value(at), lease))
    keys = [layout.key(service, instance) for service, instance in active]
    revision = etcd(lambda store: removal_revision(
        store, layout.prefix, keys, before.revision, time.monotonic() + etcd.left()))
    if keys and revision is None:
        raise FatalError(f"timed out after {d.timeout:g}s (--timeout): {what}: its instances "
                         "are still in rotation (is its agent or sidecar running, with this "
                         "--node?)")
    instances = [*active, *held]
    kept = _Keepalive(etcd, lease)
    waited = wait_for_routers(lambda: _reports(etcd, layout, kept), revision, instances,
                              etcd.deadline, vacuous=True)
    _say(out, what, active, held, waited, time.monotonic() - started)
    if waited.waiting:
        raise FatalError(
            f"timed out after {d.timeout:g}s (--timeout) waiting for routers: " + "; ".join(
                f"{node} ({why})" for node, why in sorted(waited.waiting.items()))
            + f"; {what} stays out of rotation")
    return 0


class _Keepalive:
    """Keeps the command's own lease alive while it waits longer than a third of its TTL (the
    entry is on it until the owner takes it over)."""

    def __init__(self, etcd: OneShot, lease: int | None) -> None:
        self.etcd, self.lease, self.last = etcd, lease, time.monotonic()

    def __call__(self) -> None:
        lease = self.lease
        if lease is not None and time.monotonic() - self.last >= KEEPALIVE_EVERY:
            self.etcd(lambda store: store.keepalive(lease))
            self.last = time.monotonic()


def _reports(etcd: OneShot, layout: Layout, keepalive: Callable[[], None]) -> list[Report]:
    keepalive()
    stored, _revision = etcd(lambda store: store.list_prefix(layout.routers))
    return reports(stored, layout.routers)


def _say(out: TextIO, what: str, active: dict[tuple[str, str], str],
         held: dict[tuple[str, str], str], waited: Waited, took: float) -> None:
    idle = len(waited.routers) - len(waited.waiting) - len(waited.unversioned)
    state = "drained" if not waited.waiting else "not drained yet"
    out.write(f"{what}: {state} in {took:.2f}s: {len(active)} instance(s) left rotation, "
              f"{idle} router(s) idle on them\n")
    for (service, instance), raw in sorted(active.items()):
        say(f"  left rotation: {describe(service, instance, raw)}", out)
    for (service, instance), raw in sorted(held.items()):
        say(f"  already out: {describe(service, instance, raw)}", out)
    if waited.unversioned:
        out.write("  not waited for (their reports do not say what they applied): "
                  f"{', '.join(waited.unversioned)}\n")
    if not waited.routers:
        out.write("  no router reports under the control prefix: nothing to wait for\n")


def _undo(etcd: OneShot, layout: Layout, d: DrainSettings, out: TextIO) -> int:
    key = layout.drain_key(d.node, d.container)
    what = f"{d.container} on {d.node}"
    before = snapshot(etcd, layout)
    if key not in before.control:
        out.write(f"{what}: not drained: nothing to undo\n")
        return 0
    etcd(lambda store: store.delete(key))
    control = parse_control({k: v for k, v in before.control.items() if k != key}, layout)
    held = before.instances(layout, d.node, d.container, in_rotation=False)
    due = {i for i, raw in held.items() if control.in_rotation(i[0], i[1], version_of(raw))}

    def missing(view: Snapshot) -> set[tuple[str, str]]:
        back = view.instances(layout, d.node, d.container, in_rotation=True)
        return {i for i in due if i not in back}

    after = read_until(etcd, lambda serializable: snapshot(etcd, layout, serializable),
                       lambda now: not missing(now))
    back = after.instances(layout, d.node, d.container, in_rotation=True)
    out.write(f"{what}: drain undone: {len(back)} instance(s) in rotation\n")
    for (service, instance), raw in sorted(back.items()):
        say(f"  back in rotation: {describe(service, instance, raw)}", out)
    if missing(after):
        raise FatalError(f"timed out after {d.timeout:g}s (--timeout): {len(missing(after))} "
                         f"instance(s) of {what} still out of rotation")
    return 0
