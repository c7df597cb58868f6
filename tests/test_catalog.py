"""The catalog's model, driven by plain data: stored keys and values in, the JSON out (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from registrar.core.catalog import (
    Catalog,
    Look,
    build,
    encode_targets,
    entries,
    prometheus_targets,
    remember,
    reports_of,
)
from registrar.core.layout import Layout
from registrar.core.naming import valid_metrics_path

LAYOUT = Layout("/services", "/registrar")
AT = "2015-07-20T12:00:00Z"


def value(service: str, host: str = "10.0.0.5", port: int = 32768, version: str = "v1",
          **extra: Any) -> str:
    return json.dumps({"service": service, "host": host, "port": port, "version": version,
                       "node": "core-01", "tags": [], "registered_at": AT, **extra})


def router(services: Mapping[str, Mapping[str, Mapping[str, int]]], **extra: Any) -> str:
    return json.dumps({"at": AT, "services": services, **extra})


def catalog(keys: Mapping[str, str], control: Mapping[str, str] | None = None,
            history: tuple[Look, ...] = (), now: float = 0.0) -> Catalog:
    control = dict(control or {})
    stored = {**keys, **{k: v for k, v in control.items()
                         if k.startswith("/registrar/standby/")}}
    return build(LAYOUT, entries(LAYOUT, stored), control, revision=7, history=history, now=now)


def states(result: dict[str, Any], service: str) -> dict[str, str]:
    return {i["instance"]: i["state"] for i in result["services"][service]["instances"]}


def test_an_empty_cluster() -> None:
    assert catalog({}).as_json() == {"revision": 7, "stale": False, "services": {},
                                     "routers": {}, "maintenance": []}
    assert prometheus_targets(catalog({})) == []


def test_one_instance_in_rotation_as_the_spec_shows_it() -> None:
    result = catalog({"/services/web/core-01:web-1:8080": value("web", tags=["blue"])}).as_json()
    assert result["services"] == {"web": {
        "promoted": None, "canary": None,
        "instances": [{"instance": "core-01:web-1:8080", "host": "10.0.0.5", "port": 32768,
                       "version": "v1", "node": "core-01", "state": "rotation",
                       "tags": ["blue"], "registered_at": AT, "in_flight": 0}],
        "traffic": {}, "share": {},
    }}


def test_states_first_that_applies_draining_maintenance_standby_rotation() -> None:
    keys = {
        "/services/web/core-01:web-1:8080": value("web"),
        "/services/web/core-01:web-2:8080": value("web"),
        "/services/web/core-02:web-3:8080": value("web"),
        "/services/api/core-03:api-1:80": value("api"),
    }
    control = {
        "/registrar/standby/web/core-01:web-4:8080": value("web", version="v0"),
        "/registrar/promoted/web": json.dumps({"version": "v1", "at": AT}),
        "/registrar/draining/core-01/web-1": json.dumps({"at": AT}),
        "/registrar/maintenance/node/core-02": json.dumps({"reason": "reboot", "at": AT}),
        "/registrar/maintenance/instance/web/core-01:web-1:8080": json.dumps({"at": AT}),
    }
    result = catalog(keys, control).as_json()
    assert states(result, "web") == {
        "core-01:web-1:8080": "draining",  # drained and in maintenance: draining first
        "core-01:web-2:8080": "rotation",
        "core-02:web-3:8080": "maintenance",
        "core-01:web-4:8080": "standby",
    }
    assert states(result, "api") == {"core-03:api-1:80": "rotation"}
    assert result["services"]["web"]["promoted"] == "v1"
    assert result["maintenance"] == [
        {"kind": "instance", "name": "web/core-01:web-1:8080", "reason": "", "at": AT},
        {"kind": "node", "name": "core-02", "reason": "reboot", "at": AT},
    ]


def test_a_service_in_maintenance_and_a_udp_instance_drained() -> None:
    keys = {"/services/dns/core-01:dns-1:53:udp": value("dns"),
            "/services/web/core-01:web-1:80": value("web")}
    control = {"/registrar/maintenance/service/web": json.dumps({"reason": "shed", "at": AT}),
               "/registrar/draining/core-01/dns-1": json.dumps({"at": AT})}
    result = catalog(keys, control).as_json()
    assert states(result, "dns") == {"core-01:dns-1:53:udp": "draining"}
    assert states(result, "web") == {"core-01:web-1:80": "maintenance"}
    assert result["maintenance"] == [{"kind": "service", "name": "web", "reason": "shed",
                                      "at": AT}]


def test_an_instance_both_in_rotation_and_on_standby_counts_once_in_rotation() -> None:
    keys = {"/services/web/core-01:web-1:80": value("web")}
    control = {"/registrar/standby/web/core-01:web-1:80": value("web")}
    assert states(catalog(keys, control).as_json(), "web") == {"core-01:web-1:80": "rotation"}


def test_the_canary_with_its_time_and_pause() -> None:
    control = {"/registrar/weights/web": json.dumps(
        {"version": "v2", "percent": 10, "at": AT, "paused": True}),
        "/registrar/weights/api": json.dumps({"version": "v3", "percent": 50}),
        "/registrar/weights/bad": json.dumps({"version": "v3", "percent": "50"})}
    result = catalog({}, control).as_json()["services"]
    assert result["web"]["canary"] == {"version": "v2", "percent": 10, "at": AT, "paused": True}
    assert result["api"]["canary"] == {"version": "v3", "percent": 50, "at": None,
                                       "paused": False}
    assert "bad" not in result


def test_traffic_and_in_flight_are_summed_over_routers() -> None:
    keys = {"/services/web/core-01:web-1:80": value("web"),
            "/services/web/core-01:web-2:80": value("web", version="v2")}
    control = {
        "/registrar/routers/lb-1": router(
            {"web": {"v1": {"2xx": 10, "5xx": 1}, "v2": {"2xx": 3}}}, applied=41,
            in_flight={"web": {"core-01:web-1:80": 2}}),
        "/registrar/routers/lb-2": router(
            {"web": {"v1": {"2xx": 5, "connection_errors": 2}}},
            in_flight={"web": {"core-01:web-1:80": 1, "core-01:web-2:80": 4}}),
    }
    result = catalog(keys, control).as_json()
    web = result["services"]["web"]
    assert web["traffic"] == {
        "v1": {"2xx": 15, "3xx": 0, "4xx": 0, "5xx": 1, "other": 0, "tcp": 0,
               "connection_errors": 2},
        "v2": {"2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0, "other": 0, "tcp": 0,
               "connection_errors": 0},
    }
    assert {i["instance"]: i["in_flight"] for i in web["instances"]} == {
        "core-01:web-1:80": 3, "core-01:web-2:80": 4}
    # an older router's report has no `applied`: null, as the drain reads it
    assert result["routers"] == {"lb-1": {"at": AT, "applied": 41},
                                 "lb-2": {"at": AT, "applied": None}}


def looks(*points: tuple[float, dict[str, dict[str, dict[str, int]]]]) -> tuple[Look, ...]:
    history: tuple[Look, ...] = ()
    for t, services in points:
        control = {"/registrar/routers/lb-1": router(services)}
        history = remember(history, t, reports_of(LAYOUT, control))
    return history


def test_share_is_each_versions_percent_over_the_last_30_seconds() -> None:
    history = looks(
        (0.0, {"web": {"v1": {"2xx": 1000}}}),  # before the window: all v1, not counted
        (10.0, {"web": {"v1": {"2xx": 1000}}}),
        (40.0, {"web": {"v1": {"2xx": 1090}, "v2": {"2xx": 10}}}),
    )
    keys = {"/services/web/core-01:web-1:80": value("web")}
    control = {"/registrar/routers/lb-1": router(
        {"web": {"v1": {"2xx": 1090}, "v2": {"2xx": 10}}})}
    web = catalog(keys, control, history, now=40.0).as_json()["services"]["web"]
    assert web["share"] == {"v1": 90.0, "v2": 10.0}
    assert web["traffic"]["v1"]["2xx"] == 1090


def test_share_survives_a_router_restart_and_is_empty_without_traffic() -> None:
    history = looks(
        (0.0, {"web": {"v1": {"2xx": 500}, "v2": {"2xx": 500}}}),
        (20.0, {"web": {"v1": {"2xx": 30}, "v2": {"2xx": 10}}}),  # restarted: counts anew
    )
    assert catalog({}, {}, history, now=20.0).as_json()["services"] == {}  # no keys now
    assert remember((), 0.0, {}) == ((0.0, {}),)
    control = {"/registrar/routers/lb-1": router({"web": {"v1": {"2xx": 30}}})}
    web = catalog({}, control, history, now=20.0).as_json()["services"]["web"]
    assert web["share"] == {"v1": 75.0, "v2": 25.0}
    idle = looks((0.0, {"web": {"v1": {"2xx": 5}}}), (40.0, {"web": {"v1": {"2xx": 5}}}))
    assert catalog({}, control, idle, now=40.0).as_json()["services"]["web"]["share"] == {}


def test_remember_keeps_one_look_older_than_the_window() -> None:
    history = looks(*((float(t), {}) for t in range(0, 100, 2)))
    assert history[0][0] == 68.0  # the newest at or before 98 - 30
    assert len(history) == 16


def test_stale_says_since_when() -> None:
    result = catalog({}).as_json(stale_seconds=12.34)
    assert result["stale"] is True and result["stale_seconds"] == 12.3


def test_values_are_anyones_input() -> None:
    keys = {
        "/services/web/core-01:web-1:80": "not json",
        "/services/web/core-01:web-2:80": json.dumps([1, 2]),
        "/services/web/core-01:web-3:80": json.dumps(
            {"host": 5, "port": "80", "version": None, "tags": "a,b", "metrics_path": "x"}),
        "/services/bad key/core-01:x:80": value("web"),
        "/services/web/deep/er": value("web"),
    }
    control = {"/registrar/routers/lb-1": "{",
               "/registrar/routers/lb-2": router({"web": {"v1": {"2xx": -1}}}, applied="7",
                                                 in_flight={"web": {"x": "many"}}),
               "/registrar/maintenance/node/bad node": "{}",
               "/registrar/draining/core-01/web-3/extra": "{}"}
    result = catalog(keys, control).as_json()
    assert result["services"]["web"]["instances"] == [{
        "instance": "core-01:web-3:80", "host": None, "port": None, "version": None,
        "node": None, "state": "rotation", "tags": [], "registered_at": None,
        "in_flight": 0}]
    assert result["routers"] == {"lb-2": {"at": AT, "applied": None}}
    assert result["maintenance"] == []
    assert prometheus_targets(catalog(keys, control)) == []  # no address: no target


def test_prometheus_targets_with_labels_paths_and_filters() -> None:
    keys = {
        "/services/web/core-01:web-1:8080": value("web", tags=["a", "b"],
                                                   metrics_path="/metrics"),
        "/services/web/core-02:web-2:8080": value("web", host="fd00::5", port=32769,
                                                   node="core-02"),
        "/services/api/core-01:api-1:80": value("api", port=32770),
    }
    control = {"/registrar/maintenance/service/api": json.dumps({"at": AT})}
    cat = catalog(keys, control)
    assert prometheus_targets(cat) == [
        {"targets": ["10.0.0.5:32770"], "labels": {
            "__meta_registrar_service": "api", "__meta_registrar_version": "v1",
            "__meta_registrar_node": "core-01",
            "__meta_registrar_instance": "core-01:api-1:80",
            "__meta_registrar_state": "maintenance", "__meta_registrar_tags": ",,"}},
        {"targets": ["10.0.0.5:32768"], "labels": {
            "__meta_registrar_service": "web", "__meta_registrar_version": "v1",
            "__meta_registrar_node": "core-01",
            "__meta_registrar_instance": "core-01:web-1:8080",
            "__meta_registrar_state": "rotation", "__meta_registrar_tags": ",a,b,",
            "__metrics_path__": "/metrics"}},
        {"targets": ["[fd00::5]:32769"], "labels": {
            "__meta_registrar_service": "web", "__meta_registrar_version": "v1",
            "__meta_registrar_node": "core-02",
            "__meta_registrar_instance": "core-02:web-2:8080",
            "__meta_registrar_state": "rotation", "__meta_registrar_tags": ",,"}},
    ]
    assert [g["targets"] for g in prometheus_targets(cat, service="api")] == [
        ["10.0.0.5:32770"]]
    assert [g["targets"] for g in prometheus_targets(cat, metrics_only=True)] == [
        ["10.0.0.5:32768"]]
    assert prometheus_targets(cat, service="nope") == []


def test_metrics_paths() -> None:
    assert valid_metrics_path("/metrics")
    assert valid_metrics_path("/a/b-c_d.e~f/%20")
    assert valid_metrics_path("/prometheus/metrics;x=1")
    for bad in ("", "metrics", "/a?b", "/a#b", "/a b", "/a\nb", "/" + "a" * 1024, "/é", 5, None):
        assert not valid_metrics_path(bad)


def test_the_encoded_json_is_the_models_json() -> None:
    keys = {"/services/web/core-01:web-1:8080": value("web", tags=["a", "b\"<"]),
            "/services/web/core-02:web-2:8080": value("web", version="v2", node="core-02"),
            "/services/api/core-01:api-1:80": json.dumps({"host": "::1", "port": 80}),
            "/services/dns/core-01:dns-1:53:udp": value("dns", host="é\u2028", version="\0\"",
                                                         metrics_path="/m")}
    control = {
        "/registrar/weights/web": json.dumps({"version": "v2", "percent": 10, "at": AT}),
        "/registrar/maintenance/node/core-02": json.dumps({"reason": "r", "at": AT}),
        "/registrar/routers/lb-1": router({"web": {"v1": {"2xx": 3}}}, applied=4,
                                          in_flight={"web": {"core-01:web-1:8080": 2}}),
    }
    for cat in (catalog({}), catalog(keys), catalog(keys, control)):
        for stale in (None, 3.21):
            assert json.loads(cat.encode(stale)) == cat.as_json(stale)
            assert cat.encode(stale) == json.dumps(cat.as_json(stale),
                                                   separators=(",", ":")).encode()
        for service, metrics_only in ((None, False), ("web", False), (None, True)):
            assert encode_targets(cat, service, metrics_only) == json.dumps(
                prometheus_targets(cat, service, metrics_only), separators=(",", ":")).encode()
