"""`registrar promote SERVICE VERSION`: one version in rotation, the others on standby.

It only writes (or, with --clear, deletes) `{control_prefix}/promoted/{SERVICE}`; every agent
and sidecar follows that key and moves its own instances between rotation and standby. This
command then waits until the rotation matches and says what entered and left it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from registrar.adapters.etcd_store import EtcdStore
from registrar.commands.oneshot import OneShot, read_prefixes, read_until
from registrar.commands.output import address, say
from registrar.core import timestamps
from registrar.core.control import parse_control
from registrar.core.layout import Layout, parse_key
from registrar.core.planner import json_object
from registrar.errors import FatalError
from registrar.settings import Settings


@dataclass(frozen=True)
class Instance:
    instance: str
    version: str | None
    address: str


@dataclass(frozen=True)
class Rotation:
    """One service's instances: in rotation and on standby, by instance id; `held`: those on
    standby that maintenance or a drain holds out (a promotion does not wait for them)."""

    active: dict[str, Instance]
    standby: dict[str, Instance]
    held: frozenset[str] = frozenset()

    def count(self, version: str) -> int:
        return sum(1 for i in [*self.active.values(), *self.standby.values()]
                   if i.version == version)

    def settled(self, version: str | None) -> bool:
        """Promoted `version`: all of it in rotation, nothing else. None (cleared): no standby."""
        waiting = [i for name, i in self.standby.items() if name not in self.held]
        if version is None:
            return not waiting
        return (
            bool(self.active)
            and all(i.version == version for i in self.active.values())
            and not any(i.version == version for i in waiting)
        )


def _instances(stored: dict[str, Any], prefix: str, service: str) -> dict[str, Instance]:
    """The instances of `service` among the keys under `{prefix}/{service}/`."""
    found = {}
    for key, item in stored.items():
        parsed = parse_key(prefix, key)
        value = json_object(item.value)
        if value is None or parsed is None or parsed[0] != service:
            continue
        instance = parsed[1]
        version = value.get("version")
        found[instance] = Instance(
            instance=instance,
            version=version if isinstance(version, str) else None,
            address=address(value),
        )
    return found


def read_rotation(etcd: OneShot, settings: Settings, service: str,
                  serializable: bool = False) -> Rotation:
    """`service`'s rotation, its standby and what holds instances out, in one transaction."""
    layout = Layout(settings.prefix, settings.control_prefix)
    active, standby, holding, drains = read_prefixes(
        etcd, [f"{layout.prefix}/{service}", f"{layout.standby}/{service}",
               layout.maintenance, layout.draining], serializable)
    control = parse_control({**holding, **drains}, layout)
    on_standby = _instances(standby, layout.standby, service)
    held = frozenset(name for name in on_standby
                     if control.in_maintenance(service, name) or control.drained(name))
    return Rotation(_instances(active, settings.prefix, service), on_standby, held)


def refuse_unless_registered(before: Rotation, service: str, version: str, minimum: int) -> None:
    have = before.count(version)
    if have < minimum:
        raise FatalError(
            f"refusing to promote {service} {version}: {have} instance(s) of it "
            f"registered, --min-instances is {minimum}; nothing changed"
        )


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    assert settings.promote is not None
    p = settings.promote
    store = EtcdStore(settings.etcd)
    etcd = OneShot(store, p.timeout)
    try:
        if p.steer is not None:
            from registrar.commands.steer import run_steering

            return run_steering(store, settings, out)
        before = read_rotation(etcd, settings, p.service)
        if p.version is not None:
            refuse_unless_registered(before, p.service, p.version, p.min_instances)
        return promote_and_wait(etcd, settings, before, out)
    finally:
        store.close()


def promote_and_wait(etcd: OneShot, settings: Settings, before: Rotation, out: TextIO) -> int:
    """Writes (or with --clear deletes) the promotion, then waits until the rotation matches
    and says what entered and left it."""
    p = settings.promote
    assert p is not None
    key = f"{Layout(settings.prefix, settings.control_prefix).promoted}/{p.service}"
    if p.version is not None:
        value = json.dumps({"version": p.version, "at": timestamps.now()})
        etcd(lambda store: store.put(key, value))
    else:
        etcd(lambda store: store.delete(key))
    after = read_until(etcd, lambda serializable: read_rotation(etcd, settings, p.service,
                                                               serializable),
                       lambda rotation: rotation.settled(p.version))

    what = f"promoted {p.version}" if p.version is not None else "promotion cleared"
    out.write(f"{p.service}: {what} ({len(after.active)} in rotation, "
              f"{len(after.standby)} on standby)\n")
    for label, names, side in (
        ("entered rotation", after.active.keys() - before.active.keys(), after.active),
        ("left rotation", before.active.keys() - after.active.keys(), before.active),
    ):
        for name in sorted(names):
            i = side[name]
            say(f"  {label}: {name} {i.address} {i.version or '-'}", out)
    if not after.settled(p.version):
        waiting = "instances still on standby" if p.version is None else (
            "rotation does not match yet")
        raise FatalError(f"timed out after {p.timeout:g}s (--timeout): {waiting}; "
                         "agents that are down or cut off apply it when they are back")
    return 0
