"""Stored values and the difference between what should be in etcd and what is (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from registrar.core.store import StoredKey
from registrar.typing_shim import Any, NamedTuple


class Changes(NamedTuple):
    puts: Mapping[str, str] = {}
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
