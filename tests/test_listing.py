"""`registrar ls`: rows and rendering of whatever is stored under the prefix (pure)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from registrar.commands.listing import render, rows
from registrar.core.store import StoredKey

PREFIX = "/services"


def value(service: str, container: str, port: int, **extra: Any) -> str:
    return json.dumps({
        "service": service, "host": "10.0.0.5", "port": port, "node": "core-01",
        "container_id": "3984b4c68fd0", "container_name": container, "private_port": 8080,
        "protocol": "tcp", "image": f"example/{service}:abc123", "version": "abc123",
        "tags": [], "registered_at": "2015-07-20T12:00:00Z", **extra,
    })


STORED = {
    f"{PREFIX}/web/core-01:web-1:8080": StoredKey(value("web", "web-1", 32768), 7),
    f"{PREFIX}/web/core-02:web-2:8080": StoredKey(value("web", "web-2", 32769), 8),
    f"{PREFIX}/api/core-01:api-1:9090": StoredKey(value("api", "api-1", 32770), 7),
    f"{PREFIX}/web/core-03:broken:8080": StoredKey("this is {not json", 9),
    f"{PREFIX}/web/core-03:list:8080": StoredKey('["a", "list"]', 9),
    f"{PREFIX}/web/core-03:number:8080": StoredKey("42", 9),
    f"{PREFIX}/web/core-03:empty:8080": StoredKey("", 9),
    f"{PREFIX}/api/core-03:odd:9090": StoredKey(
        json.dumps({"service": None, "port": {"x": 1}, "registered_at": [1], "key": "forged"}), 9
    ),
    f"{PREFIX}/stray": StoredKey("{}", 0),  # not {prefix}/{service}/{instance}
    f"{PREFIX}/web/core-03:binary:8080": StoredKey("\ufffd\x00\x1b[2J", 9),
}


def render_text(entries: list[dict[str, Any]], as_json: bool) -> str:
    out = io.StringIO()
    render(entries, PREFIX, as_json, out)
    return out.getvalue()


def test_rows_carry_the_value_and_the_key() -> None:
    entries = rows(PREFIX, STORED, None)
    assert [e["key"] for e in entries] == sorted(STORED)
    by_key = {e["key"]: e for e in entries}
    good = by_key[f"{PREFIX}/web/core-01:web-1:8080"]
    assert good["service"] == "web" and good["port"] == 32768 and good["host"] == "10.0.0.5"
    assert "invalid" not in good
    for name in ("broken", "list", "number", "empty", "binary"):
        entry = by_key[f"{PREFIX}/web/core-03:{name}:8080"]
        assert entry["invalid"]
    # the stored key wins over a "key" field inside the value
    assert by_key[f"{PREFIX}/api/core-03:odd:9090"]["key"] == f"{PREFIX}/api/core-03:odd:9090"


@pytest.mark.parametrize("as_json", [False, True])
def test_render_never_crashes(as_json: bool) -> None:
    text = render_text(rows(PREFIX, STORED, None), as_json)
    assert text


def test_json_lines_parse_and_carry_key() -> None:
    text = render_text(rows(PREFIX, STORED, None), True)
    lines = text.splitlines()
    assert len(lines) == len(STORED)
    objects = [json.loads(line) for line in lines]
    assert [o["key"] for o in objects] == sorted(STORED)
    web1 = objects[[o["key"] for o in objects].index(f"{PREFIX}/web/core-01:web-1:8080")]
    assert web1 == {**json.loads(STORED[web1["key"]].value), "key": web1["key"]}


def test_table_has_a_header_and_a_row_per_key() -> None:
    text = render_text(rows(PREFIX, STORED, None), False)
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "INSTANCE", "ADDRESS", "VERSION", "NODE", "AGE"]
    body = "\n".join(lines[1:])
    assert "core-01:web-1:8080" in body and "10.0.0.5:32768" in body and "abc123" in body
    assert "core-03:broken:8080" in body  # listed, marked invalid


def test_empty_table() -> None:
    assert render_text([], False).splitlines() == ["SERVICE  INSTANCE  ADDRESS  VERSION  NODE  AGE"]
    assert render_text([], True) == ""


def test_service_filter() -> None:
    entries = rows(PREFIX, STORED, "api")
    assert [e["key"] for e in entries] == [f"{PREFIX}/api/core-01:api-1:9090",
                                           f"{PREFIX}/api/core-03:odd:9090"]
    assert rows(PREFIX, STORED, "nothing") == []
    text = render_text(rows(PREFIX, STORED, "web"), True)
    assert all(json.loads(line)["key"].startswith(f"{PREFIX}/web/") for line in text.splitlines())


def test_promoted_version_is_added() -> None:
    entries = rows(PREFIX, STORED, None, {"web": "v2"})
    by_key = {e["key"]: e for e in entries}
    assert by_key[f"{PREFIX}/web/core-01:web-1:8080"]["promoted"] == "v2"
    assert "promoted" not in by_key[f"{PREFIX}/api/core-01:api-1:9090"]


def test_age_column() -> None:
    now = datetime.now(UTC)
    stored = {
        f"{PREFIX}/web/n:a:1": StoredKey(value(
            "web", "a", 1, registered_at=(now - timedelta(minutes=5)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")), 1),
        f"{PREFIX}/web/n:b:1": StoredKey(value("web", "b", 1, registered_at="yesterday"), 1),
    }
    lines = render_text(rows(PREFIX, stored, None), False).splitlines()
    assert lines[1].split()[-1] in ("5m", "4m")
    assert lines[2].split()[-1] == "?"


def test_a_canary_in_progress_shows_its_state_paused_or_running() -> None:
    from registrar.commands.listing import render_canaries
    from registrar.core.layout import Layout

    layout = Layout(PREFIX, "/registrar")
    control = {
        "/registrar/weights/web": StoredKey(json.dumps(
            {"version": "v2", "percent": 10, "at": "2015-07-20T12:00:00Z", "paused": True}), 0),
        "/registrar/weights/api": StoredKey(json.dumps(
            {"version": "v7", "percent": 50, "at": "2015-07-20T12:01:00Z"}), 0),
    }
    out = io.StringIO()
    render_canaries(control, layout, None, out)
    lines = out.getvalue().splitlines()
    assert lines[1].split() == ["CANARY", "VERSION", "PERCENT", "SINCE", "STATE"]
    assert lines[2].split() == ["api", "v7", "50%", "2015-07-20T12:01:00Z", "running"]
    assert lines[3].split() == ["web", "v2", "10%", "2015-07-20T12:00:00Z", "paused"]
