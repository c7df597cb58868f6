"""The keeper's decision: what runs, what etcd holds, what holds instances out -> the writes,
and what each acknowledged write means for the log and the counters (pure).

The drain entries of the keeper's containers are keys it holds too (core.drain): taken over
under its lease while they hold a run that still lasts, deleted once it has ended.

The LeaseKeeper's thread only gathers these inputs, applies `Plan.changes` in etcd and, once
etcd acknowledged them, records `Plan.held` and reports `Plan.notes`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from registrar.core.control import Control, place
from registrar.core.drain import Run, hold, parse_drain
from registrar.core.layout import Layout
from registrar.core.ownership import Ownership
from registrar.core.planner import Changes, plan_changes
from registrar.core.store import StoredKey
from registrar.typing_shim import NamedTuple


class Happened(enum.Enum):
    REGISTER = "register"  # a new instance, in rotation
    REGISTER_STANDBY = "register_standby"  # a new instance, held out from the start
    STANDBY = "standby"  # left rotation, kept on standby
    ROTATION_IN = "rotation_in"  # back in rotation from standby
    REPUT = "reput"  # put again under a new lease (not a new registration)
    DEREGISTER = "deregister"
    DRAIN_HOLD = "drain_hold"  # a drain entry taken over (its container's instances held out)
    DRAIN_END = "drain_end"  # a drain entry deleted: its run ended


NEW = frozenset({Happened.REGISTER, Happened.REGISTER_STANDBY})


class Note(NamedTuple):
    happened: Happened
    service: str
    instance: str
    key: str


class Plan(NamedTuple):
    changes: Changes
    notes: tuple[Note, ...] = ()
    held: Mapping[str, StoredKey] = {}  # ours, once applied
    known: frozenset[str] = frozenset()  # "service/instance" registered and not withdrawn

    def counts(self) -> tuple[int, int]:
        """(new registrations, deregistrations) this plan makes."""
        new = sum(1 for n in self.notes if n.happened in NEW)
        return new, sum(1 for n in self.notes if n.happened is Happened.DEREGISTER)


def mine(stored: Mapping[str, StoredKey], layout: Layout, ownership: Ownership
         ) -> dict[str, StoredKey]:
    """The keys among `stored` that this keeper owns (in rotation or on standby, and the drain
    entries of its containers)."""
    out = {}
    for key, item in stored.items():
        parsed, drained = layout.parse(key), layout.parse_drain(key)
        if ((parsed is not None and ownership.owns(parsed[1]))
                or (drained is not None and ownership.owns_container(*drained))):
            out[key] = item
    return out


def instance_keys(held: Mapping[str, StoredKey], layout: Layout) -> dict[str, StoredKey]:
    """The instances among a keeper's keys (without its drain entries): what it counts."""
    return {key: item for key, item in held.items() if layout.parse(key) is not None}


def _identity(layout: Layout, key: str) -> tuple[str, str]:
    parsed = layout.parse(key)
    return (parsed[0], parsed[1]) if parsed is not None else ("?", key)


def plan(
    desired: Mapping[str, str],
    held: Mapping[str, StoredKey],
    control: Control,
    layout: Layout,
    ownership: Ownership,
    lease: int,
    known: frozenset[str] = frozenset(),
    runs: Mapping[str, Run] | None = None,
) -> Plan:
    """`desired`: `{prefix}/{service}/{instance}` -> value of what runs; `held`: this keeper's
    keys as etcd holds them (or as last written); `runs`: container name -> its run, for the
    containers running now (not stopping). Keys not owned are neither put nor deleted."""
    ours = mine(held, layout, ownership)
    # an entry this keeper holds is as it last wrote it (the run it took it over with), which
    # the control state read before that write does not know yet
    drains = {**control.draining, **{
        drained: parse_drain(drained[1], item) for key, item in ours.items()
        if (drained := layout.parse_drain(key)) is not None}}
    holding = hold(drains, runs or {}, ownership.owns_container, layout.drain_key)
    effective = control._replace(
        draining={d: v for d, v in drains.items() if d in holding.held})
    wanted = {
        key: value for key, value in place(desired, effective, layout).items()
        if (parsed := layout.parse(key)) is not None and ownership.owns(parsed[1])
    }
    wanted.update(holding.entries)
    changes = plan_changes(wanted, ours, lease)
    notes: list[Note] = []
    now_known = set(known)
    for key in changes.puts:
        if (drained := layout.parse_drain(key)) is not None:
            if key not in ours or ours[key].lease != lease:  # taken over (not a new `at`)
                notes.append(Note(Happened.DRAIN_HOLD, drained[0], drained[1], key))
            continue
        if key in ours:
            continue  # rewritten in place (a new value or lease)
        service, instance = _identity(layout, key)
        identity = f"{service}/{instance}"
        moved = layout.twin(key) in ours
        if moved:
            happened = Happened.ROTATION_IN if layout.in_rotation(key) else Happened.STANDBY
        elif identity in known:
            happened = Happened.REPUT
        else:
            happened = Happened.REGISTER if layout.in_rotation(key) else Happened.REGISTER_STANDBY
        notes.append(Note(happened, service, instance, key))
        now_known.add(identity)
    for key in changes.deletes:
        if layout.twin(key) in changes.puts:
            continue  # moved: noted with its put
        if (drained := layout.parse_drain(key)) is not None:
            notes.append(Note(Happened.DRAIN_END, drained[0], drained[1], key))
            continue
        service, instance = _identity(layout, key)
        now_known.discard(f"{service}/{instance}")
        notes.append(Note(Happened.DEREGISTER, service, instance, key))
    after = {k: v for k, v in ours.items() if k not in set(changes.deletes)}
    after.update((k, StoredKey(v, lease)) for k, v in changes.puts.items())
    return Plan(changes, tuple(notes), after, frozenset(now_known))


def split_deletes(changes: Changes, layout: Layout) -> Changes:
    """The deletes that are not half of a move: they can go alone when etcd refuses puts (its
    quota full), so that a stopped container still leaves rotation."""
    deletes = tuple(k for k in changes.deletes if layout.twin(k) not in changes.puts)
    return Changes(puts={}, deletes=deletes)
