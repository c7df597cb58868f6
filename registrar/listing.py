"""`registrar ls`: the registrations under the prefix, as a table or as JSON lines."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from registrar.naming import parse_key
from registrar.planner import StoredKey


def _age(registered_at: Any, now: datetime) -> str:
    try:
        then = datetime.strptime(str(registered_at), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "?"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def rows(prefix: str, stored: dict[str, StoredKey], service: str | None) -> list[dict[str, Any]]:
    """One dict per key: the stored value object plus its key (or why it is not one)."""
    result = []
    for key in sorted(stored):
        parsed = parse_key(prefix, key)
        if service is not None and (parsed is None or parsed[0] != service):
            continue
        raw = stored[key].value
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            result.append({"key": key, "invalid": "not a JSON object", "raw": raw[:200]})
            continue
        result.append({**value, "key": key})
    return result


def render(entries: list[dict[str, Any]], prefix: str, as_json: bool, out: TextIO) -> None:
    if as_json:
        for entry in entries:
            out.write(json.dumps(entry, sort_keys=True) + "\n")
        return
    now = datetime.now(UTC)
    table = [("SERVICE", "INSTANCE", "ADDRESS", "VERSION", "NODE", "AGE")]
    for entry in entries:
        parsed = parse_key(prefix, entry["key"]) or ("?", entry["key"])
        if "invalid" in entry:
            table.append((parsed[0], parsed[1], "(" + entry["invalid"] + ")", "-", "-", "-"))
            continue
        table.append((
            str(entry.get("service", parsed[0])), parsed[1],
            f"{entry.get('host', '?')}:{entry.get('port', '?')}",
            str(entry.get("version", "-")), str(entry.get("node", "-")),
            _age(entry.get("registered_at"), now),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def run(settings: Any, out: TextIO = sys.stdout) -> int:
    from registrar.agent import FatalError
    from registrar.etcd_store import EtcdStore, EtcdUnavailable

    store = EtcdStore(settings.etcd)
    try:
        stored, _revision = store.list_prefix(settings.prefix)
    except EtcdUnavailable as exc:
        raise FatalError(f"cannot read {settings.prefix}/ from etcd: {exc}") from None
    finally:
        store.close()
    render(rows(settings.prefix, stored, settings.service), settings.prefix, settings.json, out)
    return 0
