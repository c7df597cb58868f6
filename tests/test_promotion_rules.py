"""Placing instances in rotation or on standby: promotions, canary weights, maintenance (pure)."""

from __future__ import annotations

import json

import pytest

from registrar.core.control import (
    Canary,
    Control,
    describe_changes,
    parse_control,
    parse_promotions,
    place,
    subject,
)
from registrar.core.layout import Layout
from registrar.core.planner import plan_changes
from registrar.core.store import StoredKey

LAYOUT = Layout("/s", "/ctl")


def value(version: str) -> str:
    return json.dumps({"service": "web", "version": version})


DESIRED = {
    "/s/web/n1:a:8080": value("v1"),
    "/s/web/n1:b:8080": value("v2"),
    "/s/api/n1:c:8080": value("v1"),
}


def test_no_promotion_keeps_everything_in_rotation() -> None:
    assert place(DESIRED, Control(), LAYOUT) == DESIRED


def test_other_versions_of_a_promoted_service_go_to_standby_with_the_same_value() -> None:
    placed = place(DESIRED, Control(promotions={"web": "v2"}), LAYOUT)
    assert placed == {
        "/ctl/standby/web/n1:a:8080": value("v1"),
        "/s/web/n1:b:8080": value("v2"),
        "/s/api/n1:c:8080": value("v1"),  # another service: untouched
    }


def test_a_value_without_a_version_is_not_the_promoted_one() -> None:
    placed = place({"/s/web/n1:a:8080": "not json"}, Control(promotions={"web": "v2"}), LAYOUT)
    assert placed == {"/ctl/standby/web/n1:a:8080": "not json"}


def test_moving_to_standby_is_one_delete_and_one_put() -> None:
    written = {key: StoredKey(v, 7) for key, v in DESIRED.items()}
    changes = plan_changes(place(DESIRED, Control(promotions={"web": "v2"}), LAYOUT), written, 7)
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
    assert parse_promotions(stored, LAYOUT) == {"web": "v2"}


def test_a_canary_keeps_its_version_in_rotation_beside_the_promoted_one() -> None:
    control = Control(promotions={"web": "v1"}, canaries={"web": Canary("v3", 10)})
    assert control.in_rotation("web", "n1:a:8080", "v1")
    assert control.in_rotation("web", "n1:b:8080", "v3")
    assert not control.in_rotation("web", "n1:c:8080", "v2")  # where the promotion puts it
    assert Control(canaries={"web": Canary("v3", 10)}).in_rotation("web", "n1:c:8080", "v2")


@pytest.mark.parametrize("control", [
    Control(held_services=frozenset({"web"})),
    Control(held_instances=frozenset({("web", "n1:a:8080")})),
    Control(held_nodes=frozenset({"n1"})),
])
def test_maintenance_holds_out_whatever_else_says(control: Control) -> None:
    both = Control(promotions={"web": "v1"}, canaries={"web": Canary("v1", 50)},
                   held_services=control.held_services, held_instances=control.held_instances,
                   held_nodes=control.held_nodes)
    assert not both.in_rotation("web", "n1:a:8080", "v1")
    assert both.in_rotation("api", "n2:a:8080", "v1")
    assert not control.in_rotation("web", "n1:a:8080", None)


def test_an_instance_held_by_a_promotion_and_maintenance_comes_back_when_neither_holds() -> None:
    held = Control(promotions={"web": "v2"}, held_nodes=frozenset({"n1"}))
    assert not held.in_rotation("web", "n1:a:8080", "v1")
    assert not Control(promotions={"web": "v2"}).in_rotation("web", "n1:a:8080", "v1")
    assert not Control(held_nodes=frozenset({"n1"})).in_rotation("web", "n1:a:8080", "v1")
    assert Control().in_rotation("web", "n1:a:8080", "v1")


def test_parse_control_reads_every_kind_and_nothing_else() -> None:
    stored = {
        "/ctl/promoted/web": StoredKey('{"version": "v2"}', 0),
        "/ctl/weights/web": StoredKey('{"version": "v3", "percent": 10, "at": "x"}', 0),
        "/ctl/weights/api": StoredKey('{"version": "v3", "percent": "10"}', 0),
        "/ctl/weights/db": StoredKey('{"version": "v3", "percent": 101}', 0),
        "/ctl/maintenance/service/db": StoredKey('{"reason": "x"}', 0),
        "/ctl/maintenance/node/core-02": StoredKey("", 0),
        "/ctl/maintenance/instance/web/core-01:web-1:8080": StoredKey("{}", 0),
        "/ctl/maintenance/instance/web/a/b": StoredKey("{}", 0),
        "/ctl/maintenance/node/bad name": StoredKey("{}", 0),
        "/ctl/standby/web/core-01:web-1:8080": StoredKey(value("v1"), 3),
        "/ctl/routers/r1": StoredKey("{}", 3),
    }
    control = parse_control(stored, LAYOUT)
    assert control.promotions == {"web": "v2"}
    assert control.canaries == {"web": Canary("v3", 10)}
    assert control.held_services == {"db"}
    assert control.held_nodes == {"core-02"}
    assert control.held_instances == {("web", "core-01:web-1:8080")}


def test_describe_changes_says_what_changed_only() -> None:
    before = Control(promotions={f"s{i}": "v1" for i in range(70)})
    after = Control(promotions={**before.promotions, "s3": "v2"},
                    held_nodes=frozenset({"core-02"}), canaries={"s4": Canary("v2", 10)})
    assert describe_changes(before, after) == [
        "s3 promoted v2", "s4 canary v2 at 10%", "maintenance on node core-02"]
    assert describe_changes(after, before) == [
        "s3 promoted v1", "s4 canary ended", "maintenance on node core-02 lifted"]
    assert describe_changes(before, before) == []


@pytest.mark.parametrize(("key", "about"), [
    ("/ctl/promoted/web", ("web", None)),
    ("/ctl/weights/web", ("web", None)),
    ("/ctl/maintenance/service/web", ("web", None)),
    ("/ctl/maintenance/instance/web/n1:a:8080", ("web", None)),
    ("/ctl/maintenance/node/n1", (None, "n1")),
    ("/ctl/standby/web/n1:a:8080", None),  # the keeper's own, not a control entry
    ("/ctl/routers/r1", None),
    ("/ctl/promoted/web/deeper", None),  # what parse_control ignores, this ignores too
    ("/ctl/maintenance/node/", None),
    ("/s/web/n1:a:8080", None),
])
def test_subject_names_what_a_control_entry_is_about(
    key: str, about: tuple[str | None, str | None] | None
) -> None:
    assert subject(key, LAYOUT) == about

