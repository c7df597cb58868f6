"""The router's report against a fake etcd: what it writes, at once when woken, and a refused
write that shows (logged once, counted, /healthz's problem) until a report is written again;
and when the router counts a change as applied."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import cast

import pytest

from registrar.adapters.etcd_store import EtcdStore
from registrar.exposition import Registry
from registrar.haproxy.config import Routed, parse_registration
from registrar.haproxy.report import Reporter
from registrar.haproxy.router import Router, RoutingMetrics
from registrar.haproxy.runtime import Action
from registrar.metrics import Metrics
from registrar.settings import Bind, HAProxySettings
from tests.fakes import FakeEtcd
from tests.support.proc import wait_until

KEY = "/ctl/routers/r1"


def reporter(fake: FakeEtcd, metrics: Metrics, applied: list[int]) -> Reporter:
    return Reporter(cast(EtcdStore, fake), KEY, 3, metrics, lambda: {},
                    lambda: {"applied": applied[-1], "in_flight": {}})


def test_the_report_carries_applied_and_in_flight_and_is_written_at_once_when_woken() -> None:
    fake, metrics, applied = FakeEtcd(), Metrics(), [5]
    r = reporter(fake, metrics, applied)
    r.start()
    try:
        wait_until(lambda: KEY in fake.stored("/ctl/routers"), timeout=2)
        assert json.loads(fake.stored("/ctl/routers")[KEY])["applied"] == 5
        applied.append(9)
        woken = time.monotonic()
        r.wake()
        wait_until(lambda: json.loads(fake.stored("/ctl/routers")[KEY])["applied"] == 9,
                   timeout=1, interval=0.01)
        assert time.monotonic() - woken < 0.5  # not the 2 s of the regular reports
        assert json.loads(fake.stored("/ctl/routers")[KEY])["in_flight"] == {}
    finally:
        r.stop(time.monotonic() + 2)


def test_an_unchanged_report_is_not_written_again_until_its_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only "at" would change: no new revision for etcd to keep (a report of a thousand
    services is hundreds of KB), except once every REFRESH_EVERY."""
    fake, metrics, applied = FakeEtcd(), Metrics(), [5]
    r = reporter(fake, metrics, applied)
    r.start()
    try:
        wait_until(lambda: r.reports == 1, timeout=2)
        r.wake()
        wait_until(lambda: r.unchanged >= 1, timeout=1, interval=0.01)
        r.wake()
        wait_until(lambda: r.unchanged >= 2, timeout=1, interval=0.01)
        assert r.reports == 1 and fake.puts_of(KEY) == 1
        applied.append(6)  # a change is written at once when woken
        r.wake()
        wait_until(lambda: r.reports == 2, timeout=2, interval=0.01)
        monkeypatch.setattr("registrar.haproxy.report.REFRESH_EVERY", 0.0)
        r.wake()  # unchanged, but its refresh is due
        wait_until(lambda: r.reports == 3, timeout=2, interval=0.01)
        assert fake.puts_of(KEY) == 3
    finally:
        r.stop(time.monotonic() + 2)


def test_a_refused_report_is_logged_once_counted_and_unhealthy_until_written_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, metrics = FakeEtcd(), Metrics()
    fake.refuse_puts = "etcdserver: permission denied"
    r = reporter(fake, metrics, [1])
    caplog.set_level(logging.INFO, logger="registrar.haproxy.report")
    r.start()
    try:
        wait_until(lambda: r.problem() is not None, timeout=2)
        r.wake()
        wait_until(lambda: (metrics.registry.get_sample_value(
            "registrar_etcd_write_refusals_total", {"code": "RESOURCE_EXHAUSTED"}) or 0) >= 2,
            timeout=2)
        assert "permission denied" in str(r.problem())
        assert metrics.registry.get_sample_value("registrar_etcd_writes_refused") == 1
        warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
        assert len(warnings) == 1 and "permission denied" in warnings[0].getMessage()
        fake.refuse_puts = None
        r.wake()
        wait_until(lambda: r.problem() is None, timeout=2)
        assert KEY in fake.stored("/ctl/routers")
        assert metrics.registry.get_sample_value("registrar_etcd_writes_refused") == 0
    finally:
        r.stop(time.monotonic() + 2)


# --- `applied`: what the router counts as served ----------------------------------------------


def test_applied_moves_only_once_haproxy_serves_the_change(tmp_path: Path) -> None:
    """With --reload-cmd (no HAProxy of our own; `haproxy -c` still checks each config): a
    change that needs a reload is applied once the command ran, not before; one that failed
    leaves `applied` where it was; events that changed nothing count once seen."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        pytest.fail("haproxy missing: run `make setup`", pytrace=False)
    marker = tmp_path / "fail"
    hp = HAProxySettings(binds=(Bind("web", "127.0.0.1", 8080),), mode="http",
                         config=str(tmp_path / "haproxy.cfg"), haproxy_bin=haproxy,
                         reload_cmd=f"test ! -e {marker}")
    router = Router(hp, "/services", RoutingMetrics(Registry()), None, None)
    written: list[int] = []
    router.report_now = lambda: written.append(router.applied)
    a, b = routed("n:a:80", 1), routed("n:b:80", 2)
    assert router.apply([a, b], {}, 5) is Action.RELOAD  # gathered: not served yet
    assert router.applied == 0
    router.reload([a, b], {}, 5)
    assert router.applied == 5 and router.in_step
    router.settled(6)  # an event that changed nothing
    assert router.applied == 6
    marker.touch()  # the next reload fails
    assert router.apply([a], {}, 8) is Action.RELOAD
    router.reload([a], {}, 8)
    assert router.applied == 6 and not router.in_step
    router.settled(9)  # nothing is settled while a change is not served
    assert router.applied == 6 and written == []
    marker.unlink()
    router.reload([a], {}, 9)
    assert router.applied == 9
    assert written == [9]  # b left rotation: the report is written at once


def routed(instance: str, port: int) -> Routed:
    parsed = parse_registration("/services", f"/services/web/{instance}",
                                json.dumps({"host": "10.0.0.5", "port": port, "version": "v1"}))
    assert isinstance(parsed, Routed)
    return parsed
