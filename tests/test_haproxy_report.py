"""The router's report against a fake etcd: what it writes, at once when woken, and a refused
write that shows (logged once, counted, /healthz's problem) until a report is written again."""

from __future__ import annotations

import json
import logging
import time
from typing import cast

import pytest

from registrar.adapters.etcd_store import EtcdStore
from registrar.haproxy.report import Reporter
from registrar.metrics import Metrics
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
