"""Response times by version from HAProxy's per-request log: lines parsed, bucketed and
counted by whoever owned the slot in that worker (pure, plain lines)."""

from __future__ import annotations

from registrar.haproxy.latency import BUCKETS, Latency, LogRecord, bucket_of, cumulative, parse_line
from registrar.haproxy.runtime import parse_dropped_logs
from registrar.haproxy.traffic import Owner


def test_a_line_is_pid_backend_server_tr_and_status() -> None:
    assert parse_line(b"4242 be_web n1:web-1:8080 12 200\n") == LogRecord(
        4242, "be_web", "n1:web-1:8080", 0.012, 200)
    assert parse_line(b"4242 be_web _spare3 0 503") == LogRecord(4242, "be_web", "_spare3", 0, 503)
    # no response headers (Tr -1), no server at all, HAProxy's own messages: not counted
    assert parse_line(b"4242 be_web n1:web-1:8080 -1 504") is None
    assert parse_line(b"4242 be_web <NOSRV> -1 503") is None
    assert parse_line(b"Server be_web/_spare1 is DOWN, reason: Layer4 timeout") is None
    assert parse_line(b"") is None


def test_buckets_hold_their_upper_bound_and_the_last_is_inf() -> None:
    assert len(BUCKETS) == 11
    assert bucket_of(0.0) == 0 and bucket_of(0.005) == 0 and bucket_of(0.006) == 1
    assert bucket_of(0.1) == 4 and bucket_of(10.0) == 10 and bucket_of(10.001) == 11
    assert cumulative([1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 3]) == [1, 1, 3, 3, 3, 3, 3, 3, 3, 3,
                                                                 3, 6]


def test_counts_go_to_the_slot_owner_of_that_worker_and_wait_for_a_new_one() -> None:
    counted: list[tuple[Owner, float]] = []
    latency = Latency(lambda owner, seconds: counted.append((owner, seconds)))
    old = {("be_web", "_spare1"): ("web", "v1")}
    latency.set_owners(100, old, {})
    latency.observe(LogRecord(100, "be_web", "_spare1", 0.003, 200))
    # a reload nobody told the router of yet: worker 200's lines wait for its slots
    assert latency.observe(LogRecord(200, "be_web", "n:b:80", 0.2, 200)) is None
    assert latency.report() == {"web": {"v1": [1] * 12}}
    latency.set_owners(200, {("be_web", "n:b:80"): ("web", "v2")}, {100: old})
    latency.observe(LogRecord(100, "be_web", "_spare1", 20.0, 200))  # the old worker's last
    latency.observe(LogRecord(200, "be_web", "nobody", 0.2, 200))  # a slot nobody owns
    report = latency.report()
    assert report["web"]["v1"] == [1] * 11 + [2]
    assert report["web"]["v2"] == [0] * 5 + [1] * 7  # 0.2 s: the 0.25 bucket and above
    assert counted == [(("web", "v1"), 0.003), (("web", "v2"), 0.2), (("web", "v1"), 20.0)]


def test_show_info_says_the_log_lines_haproxy_dropped() -> None:
    assert parse_dropped_logs("Name: HAProxy\nDroppedLogs: 17\nBusyPolling: 0\n") == 17
    assert parse_dropped_logs("Unknown command\n") is None
