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


def standby_prefix(control_prefix: str) -> str:
    return f"{control_prefix}/standby"


def promoted_prefix(control_prefix: str) -> str:
    return f"{control_prefix}/promoted"


def place(
    desired: Mapping[str, str],
    promotions: Mapping[str, str],
    prefix: str,
    control_prefix: str,
) -> dict[str, str]:
    """Moves instances of a promoted service whose version differs to standby.

    `desired` maps `{prefix}/{service}/{instance}` to its JSON value; the result has the same
    values, with the keys of demoted instances at `{control_prefix}/standby/{service}/{instance}`.
    """
    if not promotions:
        return dict(desired)
    placed = {}
    for key, value in desired.items():
        service, _, instance = key[len(prefix) + 1 :].partition("/")
        promoted = promotions.get(service)
        if promoted is not None and _version(value) != promoted:
            key = f"{standby_prefix(control_prefix)}/{service}/{instance}"
        placed[key] = value
    return placed


def _version(value: str) -> str | None:
    import json

    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return None
    version = parsed.get("version") if isinstance(parsed, dict) else None
    return version if isinstance(version, str) else None


def parse_promotions(stored: Mapping[str, StoredKey], control_prefix: str) -> dict[str, str]:
    """`{control_prefix}/promoted/{service}` = {"version": V, ...} -> {service: V}."""
    import json

    base = promoted_prefix(control_prefix) + "/"
    promotions = {}
    for key, item in stored.items():
        service = key[len(base) :] if key.startswith(base) else ""
        if not service or "/" in service:
            continue
        try:
            value = json.loads(item.value)
        except (ValueError, RecursionError):
            continue
        version = value.get("version") if isinstance(value, dict) else None
        if isinstance(version, str) and version:
            promotions[service] = version
    return promotions
