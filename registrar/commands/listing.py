"""`registrar ls`: the registrations under the prefix, as a table or as JSON lines."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from registrar.commands.output import address, say, write_table
from registrar.core import timestamps
from registrar.core.control import parse_control, parse_promotions
from registrar.core.layout import Layout, child_name, parse_key
from registrar.core.maintenance import entries
from registrar.core.planner import json_object
from registrar.core.store import StoredKey
from registrar.settings import Settings


def _age(registered_at: Any, now: datetime) -> str:
    try:
        then = timestamps.parse(str(registered_at))
    except ValueError:
        return "?"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def rows(
    prefix: str,
    stored: dict[str, StoredKey],
    service: str | None,
    promotions: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per key: the stored value object plus its key (or why it is not one).

    Objects of a promoted service carry `"promoted": VERSION`.
    """
    promotions = promotions or {}
    result = []
    for key in sorted(stored):
        parsed = parse_key(prefix, key)
        if service is not None and (parsed is None or parsed[0] != service):
            continue
        raw = stored[key].value
        value = json_object(raw)
        if value is None:
            result.append({"key": key, "invalid": "not a JSON object", "raw": raw[:200]})
            continue
        entry = {**value, "key": key}
        if parsed is not None and parsed[0] in promotions:
            entry["promoted"] = promotions[parsed[0]]
        result.append(entry)
    return result


def render_promotions(
    promoted: dict[str, StoredKey],
    standby: list[dict[str, Any]],
    control_prefix: str,
    service: str | None,
    out: TextIO,
) -> None:
    """After the table: `SERVICE PROMOTED SINCE`, a row a promoted service, and its standby."""
    base = Layout("/", control_prefix).promoted
    table = [("SERVICE", "PROMOTED", "SINCE")]
    for key in sorted(promoted):
        name = child_name(base, key)  # what agents take for a promotion, and nothing else
        if name is None or (service is not None and name != service):
            continue
        value = json_object(promoted[key].value)
        if value is None:
            table.append((name, "(not a JSON object)", "-"))
            continue
        table.append((name, str(value.get("version", "?")), str(value.get("at", "?"))))
    if len(table) == 1:
        return
    out.write("\n")
    write_table(table, out)
    _instance_lines(standby, "standby", out)


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
            address(entry),
            str(entry.get("version", "-")), str(entry.get("node", "-")),
            _age(entry.get("registered_at"), now),
        ))
    write_table(table, out)


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    from registrar.adapters.etcd_store import EtcdStore
    from registrar.commands.oneshot import OneShot, read_prefixes

    ls = settings.ls
    assert ls is not None
    layout = Layout(settings.prefix, settings.control_prefix)
    store = EtcdStore(settings.etcd)
    etcd = OneShot(store, ls.timeout, f"cannot read {settings.prefix}/ from etcd")
    try:
        stored, control = read_prefixes(etcd, [settings.prefix, settings.control_prefix])
    finally:
        store.close()
    promoted = {k: v for k, v in control.items() if k.startswith(layout.promoted + "/")}
    standby = {k: v for k, v in control.items() if k.startswith(layout.standby + "/")}
    state = parse_control(control, layout)
    held = {k: v for k, v in standby.items()
            if (p := parse_key(layout.standby, k)) is not None and state.in_maintenance(*p)}
    drained = {k: v for k, v in standby.items()
               if (p := parse_key(layout.standby, k)) is not None and state.drained(p[1])}
    promotions = parse_promotions(promoted, layout)
    entries = rows(settings.prefix, stored, ls.service, promotions)
    if ls.json:
        out_rows = [{**row, **({"maintenance": True} if row["key"] in held else {}),
                     **({"draining": True} if row["key"] in drained else {})}
                    for row in rows(layout.standby, {**held, **drained}, ls.service,
                                    promotions)]
        render([*entries, *out_rows], settings.prefix, True, out)
        return 0
    render(entries, settings.prefix, False, out)
    standby_rows = rows(layout.standby, {k: v for k, v in standby.items()
                                         if k not in held and k not in drained},
                        ls.service)
    render_promotions(promoted, standby_rows, settings.control_prefix, ls.service, out)
    render_maintenance(control, rows(layout.standby, held, ls.service), layout,
                       ls.service, out)
    render_drains(control, rows(layout.standby, drained, ls.service), layout, out)
    render_canaries(control, layout, ls.service, out)
    return 0


def render_drains(control: dict[str, StoredKey], drained: list[dict[str, Any]], layout: Layout,
                  out: TextIO) -> None:
    """After the table: the drains in force (`registrar drain`), and the instances they hold."""
    table = [("DRAINING", "NODE", "SINCE")]
    for key in sorted(control):
        parsed = layout.parse_drain(key)
        if parsed is not None:
            value = json_object(control[key].value) or {}
            table.append((parsed[1], parsed[0], str(value.get("at", "?"))))
    if len(table) == 1 and not drained:
        return
    out.write("\n")
    write_table(table, out)
    _instance_lines(drained, "held out (draining)", out)


def _instance_lines(entries: list[dict[str, Any]], label: str, out: TextIO) -> None:
    """One line per instance under a table (on standby, held out by maintenance or a drain)."""
    for entry in entries:
        if "invalid" not in entry:
            say(f"  {label}: {entry.get('service', '?')} {entry['key'].rsplit('/', 1)[-1]} "
                f"{address(entry)} {entry.get('version', '-')}",
                out)


def render_maintenance(control: dict[str, StoredKey], held: list[dict[str, Any]],
                       layout: Layout, service: str | None, out: TextIO) -> None:
    """After the table: the maintenance entries in force, and the instances they hold out."""
    found = entries(control, layout)
    shown = [t for t in sorted(found, key=str)
             if service is None or t.service in (None, service)]
    if not shown and not held:
        return
    out.write("\n")
    table = [("MAINTENANCE", "REASON", "SINCE")]
    table += [(str(t), found[t]["reason"] or "-", found[t]["at"]) for t in shown]
    write_table(table, out)
    _instance_lines(held, "held out (maintenance)", out)


def render_canaries(control: dict[str, StoredKey], layout: Layout, service: str | None,
                    out: TextIO) -> None:
    """After the table: a canary in progress (its weights key) per service, `paused` in STATE
    while `promote SERVICE --pause` holds it."""
    table = [("CANARY", "VERSION", "PERCENT", "SINCE", "STATE")]
    for key in sorted(control):
        name = child_name(layout.weights, key)
        value = json_object(control[key].value)
        if name is None or value is None or service not in (None, name):
            continue
        table.append((name, str(value.get("version", "?")), f"{value.get('percent', '?')}%",
                      str(value.get("at", "?")),
                      "paused" if value.get("paused") is True else "running"))
    if len(table) > 1:
        out.write("\n")
        write_table(table, out)
