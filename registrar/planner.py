"""Deciding what to write: differences between what should be in etcd and what is (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoredKey:
    """One key of this node as etcd holds it (or as we last wrote it)."""

    value: str
    lease: int


@dataclass(frozen=True)
class Changes:
    puts: Mapping[str, str] = field(default_factory=dict)
    deletes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)


def plan_changes(
    desired: Mapping[str, str], actual: Mapping[str, StoredKey], lease: int
) -> Changes:
    """Puts for keys missing, changed or bound to another lease; deletes for keys not desired.

    `actual` holds only this node's keys, so nothing of another node can be deleted.
    """
    puts = {
        key: value
        for key, value in desired.items()
        if (stored := actual.get(key)) is None or stored.value != value or stored.lease != lease
    }
    deletes = tuple(sorted(key for key in actual if key not in desired))
    return Changes(puts=dict(sorted(puts.items())), deletes=deletes)
