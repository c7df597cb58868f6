"""Placing instances in rotation or on standby by promotion (pure)."""

from __future__ import annotations

import json

from registrar.core.planner import StoredKey, parse_promotions, place, plan_changes


def value(version: str) -> str:
    return json.dumps({"service": "web", "version": version})


DESIRED = {
    "/s/web/n1:a:8080": value("v1"),
    "/s/web/n1:b:8080": value("v2"),
    "/s/api/n1:c:8080": value("v1"),
}


def test_no_promotion_keeps_everything_in_rotation() -> None:
    assert place(DESIRED, {}, "/s", "/ctl") == DESIRED


def test_other_versions_of_a_promoted_service_go_to_standby_with_the_same_value() -> None:
    placed = place(DESIRED, {"web": "v2"}, "/s", "/ctl")
    assert placed == {
        "/ctl/standby/web/n1:a:8080": value("v1"),
        "/s/web/n1:b:8080": value("v2"),
        "/s/api/n1:c:8080": value("v1"),  # another service: untouched
    }


def test_a_value_without_a_version_is_not_the_promoted_one() -> None:
    placed = place({"/s/web/n1:a:8080": "not json"}, {"web": "v2"}, "/s", "/ctl")
    assert placed == {"/ctl/standby/web/n1:a:8080": "not json"}


def test_moving_to_standby_is_one_delete_and_one_put() -> None:
    written = {key: StoredKey(v, 7) for key, v in DESIRED.items()}
    changes = plan_changes(place(DESIRED, {"web": "v2"}, "/s", "/ctl"), written, 7)
    assert changes.deletes == ("/s/web/n1:a:8080",)
    assert dict(changes.puts) == {"/ctl/standby/web/n1:a:8080": value("v1")}


def test_parse_promotions_skips_what_is_not_a_promotion() -> None:
    stored = {
        "/ctl/promoted/web": StoredKey('{"version": "v2", "at": "x"}', 0),
        "/ctl/promoted/api": StoredKey("garbage", 0),
        "/ctl/promoted/db": StoredKey('{"version": 3}', 0),
        "/ctl/promoted/a/b": StoredKey('{"version": "v1"}', 0),
        "/ctl/promoted/list": StoredKey("[1, 2]", 0),
    }
    assert parse_promotions(stored, "/ctl") == {"web": "v2"}
