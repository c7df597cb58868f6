"""Deciding what to write: differences between what should be in etcd and what is (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
        if promoted is not None and version_of(value) != promoted:
            key = f"{standby_prefix(control_prefix)}/{service}/{instance}"
        placed[key] = value
    return placed


def json_object(raw: str) -> dict[str, Any] | None:
    """A stored value as a JSON object, or None. Values under the prefixes are anyone's input:
    not JSON, not an object, or nested deep enough to exhaust the parser's stack."""
    import json

    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def version_of(raw: str) -> str | None:
    """The `version` of a stored value, when it is a string."""
    version = (json_object(raw) or {}).get("version")
    return version if isinstance(version, str) else None


def parse_promotions(stored: Mapping[str, StoredKey], control_prefix: str) -> dict[str, str]:
    """`{control_prefix}/promoted/{service}` = {"version": V, ...} -> {service: V}."""
    base = promoted_prefix(control_prefix) + "/"
    promotions = {}
    for key, item in stored.items():
        service = key[len(base) :] if key.startswith(base) else ""
        if not service or "/" in service:
            continue
        version = version_of(item.value)
        if version:
            promotions[service] = version
    return promotions
