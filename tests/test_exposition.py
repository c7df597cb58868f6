"""registrar's own instruments and text exposition, read back with prometheus_client's parser
and compared with what prometheus_client itself writes for the same instruments."""

from __future__ import annotations

import math
import socket
import threading
import urllib.error
import urllib.request
from types import ModuleType
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registrar import exposition
from registrar.exposition import Counter, Gauge, Histogram, Registry
from registrar.http_server import MetricsServer, request_target

BUCKETS = (0.001, 0.01, 0.1, 1, 2.5)


def fill(module: ModuleType, registry: Any) -> None:
    """The same instruments and updates, on registrar's module or on prometheus_client."""
    counter = module.Counter("t_events_total", "Events, by kind.", ["kind"],
                             registry=registry)
    counter.labels(kind="start").inc()
    counter.labels("die").inc(2)
    counter.labels(kind='a "quoted"\\back\nslash').inc()
    plain = module.Counter("t_plain", "A counter named without _total.", registry=registry)
    plain.inc(0.5)
    gauge = module.Gauge("t_up", "Up (0/1).\nSecond line \\ backslash.", registry=registry)
    gauge.set(1)
    gauge.inc(2)
    gauge.dec(0.25)
    inf = module.Gauge("t_inf", "Infinite.", ["side"], registry=registry)
    inf.labels(side="plus").set(math.inf)
    inf.labels(side="minus").set(-math.inf)
    hist = module.Histogram("t_seconds", "Durations.", ["op"], buckets=BUCKETS,
                            registry=registry)
    for value in (0.0005, 0.001, 0.05, 0.7, 3.0, 100.0):
        hist.labels(op="put").observe(value)
    hist.labels(op="get")  # a series at zero
    alone = module.Histogram("t_alone_seconds", "No labels.", buckets=BUCKETS, registry=registry)
    alone.observe(0.2)


def families(text: str) -> dict[str, tuple[str, str, list[tuple[str, dict[str, str], float]]]]:
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus_client's, which registrar leaves out
            continue
        samples = [(s.name, dict(s.labels), s.value) for s in family.samples
                   if not s.name.endswith("_created")]
        found[family.name] = (family.type, family.documentation, samples)
    return found


def test_the_text_reads_back_as_what_prometheus_client_writes_for_the_same_instruments() -> None:
    ours, theirs = Registry(), prometheus_client.CollectorRegistry()
    fill(exposition, ours)
    fill(prometheus_client, theirs)
    text = ours.render().decode()
    assert families(text) == families(prometheus_client.generate_latest(theirs).decode())
    assert "_created" not in text
    assert 't_events_total{kind="start"} 1.0' in text.splitlines()
    assert 't_seconds_bucket{le="+Inf",op="put"} 6.0' in text.splitlines()
    assert 't_inf{side="plus"} +Inf' in text.splitlines()


def test_sample_values_are_read_by_name_and_labels() -> None:
    registry = Registry()
    fill(exposition, registry)
    assert registry.get_sample_value("t_events_total", {"kind": "die"}) == 2
    assert registry.get_sample_value("t_plain_total") == 0.5
    assert registry.get_sample_value("t_up") == 2.75
    assert registry.get_sample_value("t_seconds_bucket", {"op": "put", "le": "0.01"}) == 2
    assert registry.get_sample_value("t_seconds_count", {"op": "get"}) == 0
    assert registry.get_sample_value("t_seconds_sum", {"op": "put"}) == pytest.approx(103.7515)
    assert registry.get_sample_value("t_events_total", {"kind": "never"}) is None
    assert {f.name for f in registry.collect()} >= {"t_events", "t_plain", "t_seconds"}


def test_misuse_is_an_error_that_names_the_metric() -> None:
    registry = Registry()
    counter = Counter("t_x_total", "x", ["a"], registry=registry)
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels(a="1").inc(-1)
    with pytest.raises(ValueError, match="t_x"):
        counter.labels(b="1")
    with pytest.raises(ValueError, match="t_x"):
        counter.labels("1", "2")
    with pytest.raises(ValueError, match=r"use \.labels"):
        counter.inc()
    with pytest.raises(ValueError, match="duplicate metric: t_x"):
        Counter("t_x", "again", registry=registry)
    Gauge("t_g", "g", registry=Registry())  # another registry is another namespace


def test_updates_from_many_threads_are_all_counted() -> None:
    registry = Registry()
    counter = Counter("t_n_total", "n", registry=registry)
    hist = Histogram("t_h", "h", buckets=(1,), registry=registry)

    def work() -> None:
        for _ in range(5000):
            counter.inc()
            hist.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("t_n_total") == 20000
    assert registry.get_sample_value("t_h_bucket", {"le": "1.0"}) == 20000
    assert registry.get_sample_value("t_h_sum") == 10000


def test_request_lines_are_read_or_refused() -> None:
    assert request_target(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/metrics")
    assert request_target(b"HEAD /healthz HTTP/1.0\n\n") == ("HEAD", "/healthz")
    assert request_target(b"hello\r\n\r\n") is None
    assert request_target(b"GET / SPDY/3\r\n\r\n") is None


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_server_answers_metrics_health_and_errors_while_a_client_stalls() -> None:
    registry = Registry()
    Gauge("t_up", "Up.", registry=registry).set(1)
    problem: list[str | None] = [None]
    server = MetricsServer(("127.0.0.1", 0), registry, lambda: problem[0])
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    stalled = socket.create_connection(("127.0.0.1", server.port))  # sends nothing
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "t_up 1.0" in answer.read().decode()
        with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
            assert answer.status == 200 and answer.read() == b"ok\n"
        problem[0] = "lease keeper stalled"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/healthz", timeout=5)
        assert refused.value.code == 503
        assert refused.value.read() == b"unhealthy: lease keeper stalled\n"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "/nope", timeout=5)
        assert missing.value.code == 404
        assert raw(server.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(server.port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        head = raw(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    finally:
        stalled.close()
        server.stop()
