"""The keeper's decision: what runs, what etcd holds, what holds instances out -> the writes,
and what each acknowledged write means for the log and the counters (pure).

The LeaseKeeper's thread only gathers these inputs, applies `Plan.changes` in etcd and, once
etcd acknowledged them, records `Plan.held` and reports `Plan.notes`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from registrar.core.control import Control, place
from registrar.core.layout import Layout
from registrar.core.ownership import Ownership
from registrar.core.planner import Changes, plan_changes
from registrar.core.store import StoredKey


class Happened(enum.Enum):
    REGISTER = "register"  # a new instance, in rotation
    REGISTER_STANDBY = "register_standby"  # a new instance, held out from the start
    STANDBY = "standby"  # left rotation, kept on standby
    ROTATION_IN = "rotation_in"  # back in rotation from standby
    REPUT = "reput"  # put again under a new lease (not a new registration)
    DEREGISTER = "deregister"


NEW = frozenset({Happened.REGISTER, Happened.REGISTER_STANDBY})


@dataclass(frozen=True)
class Note:
    happened: Happened
    service: str
    instance: str
    key: str


@dataclass(frozen=True)
class Plan:
    changes: Changes
    notes: tuple[Note, ...] = ()
    held: Mapping[str, StoredKey] = field(default_factory=dict)  # ours, once applied
    known: frozenset[str] = frozenset()  # "service/instance" registered and not withdrawn

    def counts(self) -> tuple[int, int]:
        """(new registrations, deregistrations) this plan makes."""
        new = sum(1 for n in self.notes if n.happened in NEW)
        return new, sum(1 for n in self.notes if n.happened is Happened.DEREGISTER)


def mine(stored: Mapping[str, StoredKey], layout: Layout, ownership: Ownership
         ) -> dict[str, StoredKey]:
    """The keys among `stored` that this keeper owns (in rotation or on standby)."""
    out = {}
    for key, item in stored.items():
        parsed = layout.parse(key)
        if parsed is not None and ownership.owns(parsed[1]):
            out[key] = item
    return out


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
) -> Plan:
    """`desired`: `{prefix}/{service}/{instance}` -> value of what runs; `held`: this keeper's
    keys as etcd holds them (or as last written). Keys not owned are neither put nor deleted."""
    ours = mine(held, layout, ownership)
    wanted = {
        key: value for key, value in place(desired, control, layout).items()
        if (parsed := layout.parse(key)) is not None and ownership.owns(parsed[1])
    }
    changes = plan_changes(wanted, ours, lease)
    notes: list[Note] = []
    now_known = set(known)
    for key in changes.puts:
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
