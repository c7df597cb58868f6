"""The canary's judgement, driven by plain data: routers' report values in, decisions out (pure)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.core.canary import (
    CanaryPlan,
    CanaryRun,
    Counts,
    Failed,
    Histogram,
    LatencyRules,
    LatencyVerdict,
    NotEnough,
    Passed,
    Phase,
    Promote,
    Reason,
    Report,
    RollBack,
    SetPercent,
    StepResult,
    Traffic,
    Verdict,
    Wait,
    format_rate,
    gate_payload,
    http_router_for,
    increase,
    judge,
    judge_latency,
    latency,
    latency_increase,
    parse_report,
    parse_reports,
    restarted,
    traffic,
    verdict,
)
from registrar.core.layout import Layout
from registrar.core.store import StoredKey
from tests.hypothesis_profiles import examples

AT = "2015-07-20T12:00:00Z"


def value(services: Mapping[str, Mapping[str, Mapping[str, int]]], at: str = AT) -> str:
    return json.dumps({"at": at, "services": services})


def report(v2: Mapping[str, int] | None = None, *, old: Mapping[str, int] | None = None,
           api: Mapping[str, int] | None = None) -> Report:
    """A router's report as it reaches the canary: written as JSON, then parsed."""
    web = {name: counts for name, counts in (("v2", v2), ("v1", old)) if counts is not None}
    services: dict[str, dict[str, Mapping[str, int]]] = {"web": web} if web else {}
    if api is not None:
        services["api"] = {"v1": api}
    parsed = parse_report(value(services))
    assert parsed is not None
    return parsed


def ok(n: int) -> dict[str, int]:
    return {"2xx": n}


def http(good: int, bad: int = 0, refused: int = 0) -> dict[str, int]:
    return {"2xx": good, "5xx": bad, "connection_errors": refused}


def plan(**changes: Any) -> CanaryPlan:
    fields: dict[str, Any] = {"service": "web", "version": "v2", "steps": (10, 50),
                              "interval": 30.0, "timeout": 30.0, "max_error_rate": 0.01,
                              "min_requests": 20}
    fields.update(changes)
    return CanaryPlan(**fields)


Look = tuple[float, Mapping[str, Report]]


def run(canary: CanaryRun, looks: Sequence[Look]) -> list[Any]:
    """Start the canary at 0 and feed it the looks; every decision, the start's first."""
    decisions: list[Any] = [canary.start(0.0)]
    for now, reports in looks:
        decisions.append(canary.decide(now, reports))
    return decisions


def judged(start: Mapping[str, Report], end: Mapping[str, Report]) -> Verdict:
    """The judgement of web v2 with the SPEC's defaults (max 0.01, 20 requests)."""
    return judge(start, end, "web", "v2", max_error_rate=0.01, min_requests=20)


def verdict_of(seen: Traffic) -> Verdict:
    return verdict(seen, max_error_rate=0.01, min_requests=20)


# --- parsing ------------------------------------------------------------------------------


def test_a_report_as_the_spec_writes_it() -> None:
    raw = value({"web": {"v2": {"2xx": 5, "3xx": 1, "4xx": 2, "5xx": 3, "other": 4, "tcp": 0,
                                "connection_errors": 6}}})
    assert parse_report(raw) == Report(
        datetime(2015, 7, 20, 12, tzinfo=UTC),
        {"web": {"v2": Counts(http_2xx=5, http_3xx=1, http_4xx=2, http_5xx=3, other=4,
                              connection_errors=6)}},
    )


@pytest.mark.parametrize("raw", [
    "", "not json", "[]", "3", "null", '"x"', '{"services": []}', '{"services": "web"}',
    "[" * 100_000, '{"a": ' * 50_000, "1" * 5000,
])
def test_what_is_no_report_is_none(raw: str) -> None:
    assert parse_report(raw) is None


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, True, False, None, "3", [1], {"n": 1},
                                 2**64, 10**30, 1e400])
def test_a_version_with_a_bad_count_is_skipped_and_the_rest_kept(bad: object) -> None:
    raw = json.dumps({"at": AT, "services": {"web": {"v2": {"2xx": 1, "5xx": bad},
                                                     "v1": {"2xx": 7}}}})
    parsed = parse_report(raw)
    assert parsed is not None
    assert parsed.services == {"web": {"v1": Counts(http_2xx=7)}}


def test_entries_that_are_not_objects_are_skipped_and_missing_fields_are_zero() -> None:
    raw = json.dumps({"services": {"web": [1, 2], "api": {"v1": "many", "v2": {"tcp": 9}},
                                   "db": {}}})
    parsed = parse_report(raw)
    assert parsed == Report(None, {"api": {"v2": Counts(tcp=9)}})


@pytest.mark.parametrize("at", [None, 12, "yesterday", "2015-13-45T00:00:00Z", "x" * 10_000])
def test_an_unreadable_time_is_none_and_the_counts_still_count(at: object) -> None:
    parsed = parse_report(json.dumps({"at": at, "services": {"web": {"v2": {"2xx": 1}}}}))
    assert parsed is not None and parsed.at is None
    assert parsed.counts("web", "v2") == Counts(http_2xx=1)


def test_a_time_without_a_zone_is_utc() -> None:
    parsed = parse_report(json.dumps({"at": "2015-07-20T12:00:00"}))
    assert parsed is not None and parsed.at == datetime(2015, 7, 20, 12, tzinfo=UTC)


def test_parse_reports_reads_the_routers_keys_only() -> None:
    layout = Layout("/s", "/ctl")
    good = value({"web": {"v2": ok(3)}})
    stored = {
        "/ctl/routers/r1": StoredKey(good, 7),
        "/ctl/routers/r2": StoredKey("garbage", 8),
        "/ctl/routers/a/b": StoredKey(good, 9),  # not one segment
        "/ctl/routers/..": StoredKey(good, 9),
        "/ctl/weights/web": StoredKey(good, 0),
        "/s/web/n1:a:80": StoredKey(good, 7),
    }
    assert parse_reports(stored, layout) == {"r1": report(ok(3))}


# --- one router, two reports ------------------------------------------------------------


def test_the_increase_between_two_reports() -> None:
    assert increase(report(http(10, 1)), report(http(25, 3, 2)), "web", "v2") == Counts(
        http_2xx=15, http_5xx=2, connection_errors=2)


def test_a_version_first_seen_in_the_later_report_counts_in_full() -> None:
    assert increase(report(old=ok(50)), report(ok(4), old=ok(60)), "web", "v2") == Counts(
        http_2xx=4)


def test_a_counter_going_down_is_a_restart_and_the_later_values_are_the_increase() -> None:
    before, after = report(ok(500)), report(ok(30))
    assert restarted(before, after)
    assert increase(before, after, "web", "v2") == Counts(http_2xx=30)


def test_a_restart_is_seen_in_another_service_even_when_the_version_grew() -> None:
    before = report(ok(10), api=ok(9000))
    after = report(ok(40), api=ok(3))  # a new process, busy with v2 already
    assert restarted(before, after)
    assert increase(before, after, "web", "v2") == Counts(http_2xx=40)


def test_a_series_missing_later_is_no_restart() -> None:
    before, after = report(ok(10), api=ok(50)), report(ok(15))
    assert not restarted(before, after)
    assert increase(before, after, "web", "v2") == Counts(http_2xx=5)


def test_no_earlier_or_no_later_report_counts_nothing() -> None:
    assert increase(None, report(ok(1000)), "web", "v2") == Counts()
    assert increase(report(ok(1000)), None, "web", "v2") == Counts()


# --- judging a step from its start and its end --------------------------------------------


def test_two_routers_are_summed() -> None:
    start = {"r1": report(http(100)), "r2": report(http(50, 1))}
    end = {"r1": report(http(200, 1)), "r2": report(http(150, 2))}
    assert traffic(start, end, "web", "v2") == Traffic(answered=202, server_errors=2)
    assert judged(start, end) == Passed(2 / 202, 202, 2)


def test_all_500_fails_clearly() -> None:
    start, end = {"r1": report(http(0))}, {"r1": report(http(0, 25))}
    assert judged(start, end) == Failed(1.0, 25, 25, clear=True)


def test_one_error_among_the_first_requests_fails_but_not_clearly() -> None:
    start, end = {"r1": report(http(0))}, {"r1": report(http(19, 1))}
    result = judged(start, end)
    assert isinstance(result, Failed) and not result.clear


def test_connection_errors_are_errors_and_requests_even_without_a_response() -> None:
    start, end = {"r1": report(http(0))}, {"r1": report(http(0, 0, 30))}
    assert judged(start, end) == Failed(1.0, 30, 30, clear=True)
    end = {"r1": report(http(90, 5, 5))}
    assert judged(start, end) == Failed(0.1, 100, 10, clear=True)


def test_tcp_mode_counts_sessions_and_connection_errors() -> None:
    start = {"r1": report({"tcp": 100})}
    end = {"r1": report({"tcp": 300, "connection_errors": 1})}
    assert judged(start, end) == Passed(1 / 201, 201, 1)
    end = {"r1": report({"tcp": 200, "connection_errors": 20})}
    assert judged(start, end) == Failed(20 / 120, 120, 20, clear=True)


def test_each_router_is_read_in_its_own_mode_and_a_forced_mode_wins() -> None:
    start = {"tcp": report({"tcp": 0}), "http": report({"2xx": 0})}
    end = {"tcp": report({"tcp": 40}), "http": report({"2xx": 30, "5xx": 1, "tcp": 31})}
    assert traffic(start, end, "web", "v2") == Traffic(answered=71, server_errors=1)
    assert traffic(start, end, "web", "v2", mode="http") == Traffic(31, 1)
    assert traffic(start, end, "web", "v2", mode="tcp") == Traffic(71, 0)


def test_no_requests_is_not_enough_and_divides_nothing() -> None:
    assert judged({}, {}) == NotEnough(0, 0)
    assert NotEnough(0, 0).rate is None
    same = {"r1": report(ok(5))}
    assert judge(same, same, "web", "v2", max_error_rate=0.01, min_requests=0) == NotEnough(0, 0)


def test_fewer_than_min_requests_is_not_enough_even_all_errors() -> None:
    start, end = {"r1": report(http(0))}, {"r1": report(http(0, 19))}
    assert judged(start, end) == NotEnough(19, 19)


def test_a_router_that_appears_counts_nothing_in_a_two_report_judgement() -> None:
    start = {"r1": report(ok(0))}
    end = {"r1": report(ok(30)), "r2": report(http(5000, 900))}  # r2's history, maybe
    assert judged(start, end) == Passed(0.0, 30, 0)


def test_a_router_that_vanishes_leaves_the_others_to_judge() -> None:
    start = {"r1": report(ok(0)), "r2": report(ok(100))}
    end = {"r1": report(ok(30))}
    assert judged(start, end) == Passed(0.0, 30, 0)
    assert judged(start, {}) == NotEnough(0, 0)


def test_a_router_that_restarts_counts_its_new_values() -> None:
    start = {"r1": report(ok(0)), "r2": report(http(700, 2))}
    end = {"r1": report(ok(10)), "r2": report(http(15, 5))}
    assert judged(start, end) == Failed(5 / 30, 30, 5, clear=True)


def test_rate_exactly_at_the_maximum_passes() -> None:
    assert verdict_of(Traffic(100, 1)) == Passed(0.01, 100, 1)
    assert isinstance(verdict_of(Traffic(99, 1)), Failed)


# --- the canary, step by step -----------------------------------------------------------


def two_routers(v2_each: int, bad_each: int = 0) -> dict[str, Report]:
    return {"r1": report(http(v2_each, bad_each), old=ok(9 * v2_each)),
            "r2": report(http(v2_each, bad_each), old=ok(9 * v2_each))}


def test_a_good_version_goes_10_then_50_then_promoted() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [
        (0.5, two_routers(0)), (10.0, two_routers(20)), (30.0, two_routers(60)),
        (45.0, two_routers(200)), (60.0, two_routers(400)),
    ])
    assert decisions[0] == SetPercent(10, None, "canary of web v2 at 10%")
    assert [type(d) for d in decisions[1:]] == [Wait, Wait, SetPercent, Wait, Promote]
    assert decisions[1].until == 30.0 and decisions[4].until == 60.0
    step = decisions[3]
    assert step.percent == 50 and step.passed.percent == 10 and step.passed.requests == 120
    assert step.message == ("canary of web v2 passed 10%: error rate 0.00 over 120 requests"
                            " (max 0.01); now at 50%")
    promote = decisions[5]
    assert [(s.percent, s.requests, s.errors, s.seconds) for s in promote.steps] == [
        (10, 120, 0, 30.0), (50, 680, 0, 30.0)]
    assert promote.lines == (
        "canary of web v2 passed 10%: error rate 0.00 over 120 requests (max 0.01)",
        "canary of web v2 passed 50%: error rate 0.00 over 680 requests (max 0.01)",
    )
    assert promote.message.endswith("; promoting")
    assert canary.phase is Phase.DONE
    assert canary.decide(90.0, two_routers(0)) is promote  # the end stays the end


def test_a_version_answering_500_to_everything_is_rolled_back_once_min_requests_are_in() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [(0.5, two_routers(0)), (1.5, two_routers(0, 8)),
                             (2.5, two_routers(0, 11))])
    assert type(decisions[2]) is Wait  # 16 requests: not judged yet
    final = decisions[3]
    assert isinstance(final, RollBack) and final.reason is Reason.FAILED
    assert final.message == ("canary of web v2 rolled back at 10%: error rate 1.00 over 22"
                             " requests (max 0.01)")


def test_five_percent_of_500s_is_rolled_back_at_the_first_step() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [(0.5, {"r1": report(http(0))}), (2.0, {"r1": report(http(21, 1))}),
                             (10.0, {"r1": report(http(97, 3))}),
                             (20.0, {"r1": report(http(190, 10))})])
    # 1 error in 22, 3 in 100: above 0.01 but maybe bad luck; 10 in 200 is clear
    assert [type(d) for d in decisions[1:]] == [Wait, Wait, Wait, RollBack]
    assert decisions[3].message == ("canary of web v2 at 10%: error rate 0.03 over 100 requests"
                                    " so far")
    final = decisions[4]
    assert final.percent == 10 and (final.requests, final.errors) == (200, 10)
    assert final.message == ("canary of web v2 rolled back at 10%: error rate 0.05 over 200"
                             " requests (max 0.01)")


def test_a_rate_above_the_maximum_at_the_interval_s_end_fails_even_if_not_clearly() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [(0.0, two_routers(0)), (29.0, two_routers(98, 1)),
                             (30.0, two_routers(98, 1))])
    assert type(decisions[2]) is Wait
    assert isinstance(decisions[3], RollBack) and decisions[3].reason is Reason.FAILED


def test_the_spec_s_example_line() -> None:
    def at(counts: Mapping[str, int]) -> dict[str, Report]:
        parsed = parse_report(value({"web": {"abc123": counts}}))
        assert parsed is not None
        return {"r1": parsed}

    canary = CanaryRun(plan(version="abc123"))
    final = run(canary, [(0.0, at(http(0))), (30.0, at(http(140, 72)))])[2]
    assert isinstance(final, RollBack)
    assert final.message == ("canary of web abc123 rolled back at 10%: error rate 0.34 over 212"
                             " requests (max 0.01)")


def test_refused_connections_roll_back_with_no_response_at_all() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [(0.0, {"r1": report(http(0))}),
                             (3.0, {"r1": report(http(0, 0, 25))})])
    final = decisions[2]
    assert isinstance(final, RollBack) and final.reason is Reason.FAILED
    assert final.message == ("canary of web v2 rolled back at 10%: error rate 1.00 over 25"
                             " requests (max 0.01)")


def test_too_little_traffic_is_prolonged_then_times_out() -> None:
    canary = CanaryRun(plan())
    r = {"r1": report(ok(0))}
    decisions = run(canary, [(0.0, r), (30.0, {"r1": report(ok(5))}),
                             (45.0, {"r1": report(ok(10))}), (60.0, {"r1": report(ok(12))})])
    assert [type(d) for d in decisions[1:]] == [Wait, Wait, Wait, RollBack]
    assert decisions[2].until == 60.0  # prolonged: the deadline is interval + timeout
    assert decisions[3].message == "canary of web v2 at 10%: 10 of the 20 requests needed"
    final = decisions[4]
    assert final.reason is Reason.TIMEOUT
    assert final.message == ("canary of web v2 rolled back at 10%: too little traffic: 12 of the"
                             " 20 requests needed in 60s (error rate 0.00, max 0.01)")


def test_no_traffic_at_all_times_out_without_a_rate() -> None:
    canary = CanaryRun(plan(timeout=0.0))
    final = run(canary, [(0.0, {}), (30.0, {})])[2]
    assert final.message == ("canary of web v2 rolled back at 10%: too little traffic: 0 of the"
                             " 20 requests needed in 30s")
    assert final.rate is None


def test_a_prolonged_step_passes_as_soon_as_enough_requests_are_in() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    decisions = run(canary, [(0.0, {"r1": report(ok(0))}), (30.0, {"r1": report(ok(5))}),
                             (41.0, {"r1": report(ok(20))})])
    assert isinstance(decisions[3], Promote) and decisions[3].steps[0].seconds == 41.0


def test_a_router_appearing_mid_step_counts_from_its_first_report_seen() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    decisions = run(canary, [
        (0.0, {"r1": report(ok(0))}),
        (10.0, {"r1": report(ok(5)), "r2": report(http(4000, 900))}),  # history: not counted
        (30.0, {"r1": report(ok(10)), "r2": report(http(4020, 900))}),
    ])
    assert decisions[3].steps[0].requests == 30


def test_a_router_vanishing_mid_step_keeps_what_it_counted() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    decisions = run(canary, [
        (0.0, {"r1": report(ok(0)), "r2": report(ok(0))}),
        (10.0, {"r1": report(ok(5)), "r2": report(ok(15))}),
        (20.0, {"r1": report(ok(8))}),  # r2's lease expired
        (30.0, {"r1": report(ok(10))}),
    ])
    assert [type(d) for d in decisions[1:]] == [Wait, Wait, Wait, Promote]
    assert decisions[4].steps[0].requests == 25


def test_a_router_restarting_mid_step_counts_its_new_counters() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    decisions = run(canary, [
        (0.0, {"r1": report(ok(900), api=ok(50))}),
        (10.0, {"r1": report(ok(910), api=ok(60))}),  # +10
        (15.0, {}),  # revoked its lease on the way down
        (20.0, {"r1": report(ok(4), api=ok(1))}),  # a new process: +4
        (30.0, {"r1": report(ok(12), api=ok(2))}),  # +8
    ])
    assert decisions[5].steps[0].requests == 22


def test_the_next_step_starts_from_the_reports_that_passed_the_last() -> None:
    canary = CanaryRun(plan())
    decisions = run(canary, [(0.0, two_routers(0)), (30.0, two_routers(50)),
                             (40.0, two_routers(50, 25))])
    assert isinstance(decisions[2], SetPercent)
    final = decisions[3]
    assert final.percent == 50 and (final.requests, final.errors) == (50, 50)


def test_a_signal_rolls_back_saying_what_the_step_saw() -> None:
    canary = CanaryRun(plan())
    run(canary, [(0.0, two_routers(0)), (5.0, two_routers(10))])
    final = canary.interrupt(12.4, "SIGTERM", two_routers(30))
    assert isinstance(final, RollBack)
    assert final.reason is Reason.INTERRUPTED and final.percent == 10
    assert final.message == ("canary of web v2 rolled back at 10%: interrupted by SIGTERM after"
                             " 12s: error rate 0.00 over 60 requests (max 0.01)")
    assert canary.decide(20.0, two_routers(40)) is final


def test_a_signal_before_any_request() -> None:
    canary = CanaryRun(plan())
    canary.start(0.0)
    assert canary.interrupt(3.0, "SIGINT").message == (
        "canary of web v2 rolled back at 10%: interrupted by SIGINT after 3s: 0 requests")


def test_a_signal_after_the_end_changes_nothing() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    promote = run(canary, [(0.0, two_routers(0)), (30.0, two_routers(20))])[2]
    assert isinstance(promote, Promote)
    assert canary.interrupt(31.0, "SIGTERM") is promote


def test_the_machine_refuses_to_be_misused() -> None:
    canary = CanaryRun(plan())
    with pytest.raises(RuntimeError):
        canary.decide(0.0, {})
    canary.start(0.0)
    with pytest.raises(RuntimeError):
        canary.start(1.0)


@pytest.mark.parametrize("changes", [
    {"steps": ()}, {"steps": (50, 10)}, {"steps": (10, 10)}, {"steps": (0,)}, {"steps": (100,)},
    {"interval": 0.0}, {"timeout": -1.0}, {"max_error_rate": 1.5}, {"max_error_rate": -0.1},
    {"max_error_rate": float("nan")}, {"min_requests": -1},
])
def test_a_bad_plan_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan(**changes)


@pytest.mark.parametrize(("rate", "maximum", "shown"), [
    (72 / 212, 0.01, "0.34"), (0.0, 0.01, "0.00"), (0.0104, 0.01, "0.0104"),
    (0.0099, 0.01, "0.0099"), (0.01, 0.01, "0.01"), (0.02, 0.005, "0.020"), (1.0, 1.0, "1.00"),
])
def test_a_rate_never_reads_as_the_maximum_unless_it_is(rate: float, maximum: float,
                                                         shown: str) -> None:
    assert format_rate(rate, maximum) == shown


# --- hostile values -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=30,
)
count_fields = st.sampled_from(["2xx", "3xx", "4xx", "5xx", "other", "tcp", "connection_errors"])
counts_objects = st.dictionaries(count_fields, st.integers(min_value=0, max_value=2**64 - 1)
                                 | json_values, max_size=7)
report_values = st.fixed_dictionaries(
    {"services": st.dictionaries(st.sampled_from(["web", "api"]), st.dictionaries(
        st.sampled_from(["v1", "v2"]), counts_objects, max_size=2) | json_values, max_size=2)},
    optional={"at": st.text(max_size=30) | json_values,
              "mode": st.sampled_from(["http", "tcp", "udp"]) | json_values,
              "latency": st.dictionaries(st.sampled_from(["web", "api"]), st.dictionaries(
                  st.sampled_from(["v1", "v2"]),
                  st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=12,
                           max_size=12).map(sorted) | json_values, max_size=2),
                  max_size=2) | json_values},
)
raw_reports = st.one_of(st.text(max_size=50), json_values.map(json.dumps),
                        report_values.map(json.dumps))


@settings(max_examples=examples(300))
@given(raw_reports)
def test_parse_never_raises(raw: str) -> None:
    parsed = parse_report(raw)
    assert parsed is None or isinstance(parsed, Report)


routers_reads = st.dictionaries(st.sampled_from(["r1", "r2", "r3"]), raw_reports, max_size=3)


def parsed_all(raw: Mapping[str, str]) -> dict[str, Report]:
    return {k: r for k, v in raw.items() if (r := parse_report(v)) is not None}


@settings(max_examples=examples(300))
@given(routers_reads, routers_reads, st.sampled_from([None, "http", "tcp"]),
       st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=50))
def test_judge_never_raises_nor_divides_by_zero(start: dict[str, str], end: dict[str, str],
                                                mode: Any, max_rate: float, min_req: int) -> None:
    judged = judge(parsed_all(start), parsed_all(end), "web", "v2", max_error_rate=max_rate,
                   min_requests=min_req, mode=mode)
    if isinstance(judged, NotEnough):
        assert judged.requests < max(min_req, 1)
    else:
        assert 0.0 <= judged.rate <= 1.0 and judged.requests >= max(min_req, 1)


@settings(max_examples=examples(100))
@given(st.lists(routers_reads, max_size=12), st.floats(min_value=0.01, max_value=1))
def test_the_canary_never_raises_on_hostile_reports(looks: list[dict[str, str]],
                                                    max_rate: float) -> None:
    canary = CanaryRun(plan(max_error_rate=max_rate, interval=2.0, timeout=3.0,
                            latency=LatencyRules(max_p99_ms=100, max_ratio=2)))
    canary.start(0.0)
    for second, raw in enumerate(looks):
        decision = canary.decide(float(second), parsed_all(raw))
        assert decision.message.startswith("canary of web v2 ")
        if second >= 10:  # 2 steps of at most 2 + 3 s each
            assert canary.phase is Phase.DONE
    final = canary.interrupt(99.0, "SIGTERM", parsed_all(looks[-1]) if looks else None)
    assert isinstance(final, Promote | RollBack)


@given(st.integers(min_value=0, max_value=2**80), st.integers(min_value=0, max_value=2**80),
       st.integers(min_value=0, max_value=2**80))
def test_verdict_handles_any_size_of_counts(answered: int, bad: int, refused: int) -> None:
    result = verdict_of(Traffic(answered, min(bad, answered), refused))
    assert isinstance(result, Passed | Failed | NotEnough)


# --- response times -----------------------------------------------------------------------


def hist(**in_buckets: int) -> list[int]:
    """Cumulative `le` counts from responses per bucket, named by their bound in ms
    (`b5=10` is 10 responses in (0, 5 ms], `inf=1` one above 10 s)."""
    names = ["b5", "b10", "b25", "b50", "b100", "b250", "b500", "b1000", "b2500", "b5000",
             "b10000", "inf"]
    assert set(in_buckets) <= set(names)
    return list(itertools.accumulate(in_buckets.get(name, 0) for name in names))


def timed(counts: Mapping[str, int], *, v2: list[int] | None = None,
          v1: list[int] | None = None, v1_counts: Mapping[str, int] | None = None,
          mode: str | None = "http") -> Report:
    """A router's report with response times (latency) for web v2 and v1."""
    services: dict[str, dict[str, Mapping[str, int]]] = {"web": {"v2": counts}}
    latency: dict[str, dict[str, list[int]]] = {"web": {}}
    if v2 is not None:
        latency["web"]["v2"] = v2
    if v1 is not None:
        latency["web"]["v1"] = v1
        services["web"]["v1"] = v1_counts or ok(v1[-1])
    body: dict[str, Any] = {"at": AT, "services": services, "latency": latency}
    if mode is not None:
        body["mode"] = mode
    parsed = parse_report(json.dumps(body))
    assert parsed is not None
    return parsed


def test_a_report_s_latency_and_mode_are_read() -> None:
    parsed = timed(ok(3), v2=hist(b5=1, b100=2))
    assert parsed.histogram("web", "v2") == Histogram((1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3))
    assert parsed.mode == "http" and parsed.http("web") and not parsed.http("api")


@pytest.mark.parametrize("bad", [[1] * 11, [1] * 13, [2, 1, *[1] * 10], [-1, *[0] * 11],
                                 [0.5] * 12, "many", {"a": 1}, [True] * 12, [2**64] * 12])
def test_a_bad_histogram_is_skipped_and_the_counts_kept(bad: object) -> None:
    raw = json.dumps({"services": {"web": {"v2": ok(4)}},
                      "latency": {"web": {"v2": bad, "v1": [0] * 11 + [5]}}})
    parsed = parse_report(raw)
    assert parsed is not None and parsed.counts("web", "v2") == Counts(http_2xx=4)
    assert parsed.histogram("web", "v2") is None
    assert parsed.histogram("web", "v1") == Histogram((0,) * 11 + (5,))


def test_a_report_without_latency_or_mode_still_parses() -> None:
    parsed = parse_report(value({"web": {"v2": ok(3)}}))
    assert parsed is not None and parsed.latency == {} and parsed.mode is None
    assert parsed.http("web")  # answered HTTP: an http router of an older release
    tcp = parse_report(value({"web": {"v2": {"tcp": 3}}}))
    assert tcp is not None and not tcp.http("web")
    said = parse_report(json.dumps({"services": {"web": {"v2": ok(3)}}, "mode": "tcp"}))
    assert said is not None and not said.http("web")


@pytest.mark.parametrize(("counts", "expected"), [
    # all in (50, 100] ms: rank 99 of 100 -> 50 + 50 * 99/100
    (hist(b100=100), 0.0995),
    # 98 fast, 2 in (250, 500]: rank 99 -> the second half of the bucket's two
    (hist(b5=98, b500=2), 0.375),
    # rank exactly at a bucket's top stays in it
    (hist(b5=99, b500=1), 0.005),
    # the first bucket reads from 0
    (hist(b5=10), 0.00495),
    # in +Inf: the highest finite bound
    (hist(b5=1, inf=99), 10.0),
])
def test_p99_is_read_as_prometheus_histogram_quantile_reads_it(counts: list[int],
                                                               expected: float) -> None:
    assert Histogram(tuple(counts)).quantile(0.99) == pytest.approx(expected)


def test_an_http_router_for_a_service() -> None:
    tcp = parse_report(json.dumps({"mode": "tcp", "services": {"web": {"v1": {"tcp": 5}}}}))
    http_other = parse_report(json.dumps({"mode": "http", "services": {"api": {"v1": ok(1)}}}))
    idle_http = parse_report(json.dumps({"mode": "http", "services": {}}))
    assert tcp is not None and http_other is not None and idle_http is not None
    assert not http_router_for({"a": tcp, "b": http_other}, "web")  # web's router is tcp
    assert http_router_for({"a": tcp, "b": timed(ok(3))}, "web")
    assert http_router_for({"b": idle_http}, "web")  # nothing served yet: its mode tells
    assert not http_router_for({"a": tcp}, "api") and not http_router_for({}, "web")


def test_no_response_has_no_p99() -> None:
    assert Histogram().quantile(0.99) is None and Histogram().bounds(0.99) is None


def prometheus_quantile(q: float, counts: Sequence[int]) -> float:
    """Prometheus' bucketQuantile (promql/quantile.go), written out for comparison."""
    bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, math.inf]
    observations = counts[-1]
    rank = q * observations
    b = next((i for i in range(len(counts) - 1) if counts[i] >= rank), len(counts) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    start, end = (0.0, bounds[0]) if b == 0 else (bounds[b - 1], bounds[b])
    count = counts[b] - (counts[b - 1] if b else 0)
    rank -= counts[b - 1] if b else 0
    return start + (end - start) * (rank / count)


in_buckets = st.lists(st.integers(min_value=0, max_value=10**6), min_size=12, max_size=12)


@settings(max_examples=examples(300))
@given(in_buckets)
def test_p99_matches_prometheus_and_lies_within_its_bucket(spread: list[int]) -> None:
    counts = list(itertools.accumulate(spread))
    h = Histogram(tuple(counts))
    if counts[-1] == 0:
        assert h.quantile(0.99) is None
        return
    p99, bounds = h.quantile(0.99), h.bounds(0.99)
    assert p99 is not None and bounds is not None
    assert p99 == pytest.approx(prometheus_quantile(0.99, counts))
    assert bounds[0] <= p99 <= bounds[1]


def test_latency_is_summed_over_routers_with_their_restarts_and_arrivals() -> None:
    start = {"r1": timed(ok(10), v2=hist(b5=10)), "r2": timed(ok(900), v2=hist(b100=900))}
    end = {
        "r1": timed(ok(30), v2=hist(b5=10, b250=20)),  # +20 in (100, 250]
        "r2": timed(ok(5), v2=hist(b500=5)),  # restarted: all 5 new
        "r3": timed(ok(70), v2=hist(inf=70)),  # appeared: nothing yet
    }
    assert latency(start, end, "web", "v2") == Histogram(tuple(hist(b250=20, b500=5)))
    assert latency(start, {"r1": end["r1"]}, "web", "v2").total == 20  # r2 vanished


def test_a_restart_is_seen_in_the_histogram_alone() -> None:
    before = timed(ok(10), v2=hist(b5=10, b100=5))
    after = timed(ok(12), v2=hist(b5=3))
    assert restarted(before, after)
    assert latency_increase(before, after, "web", "v2") == Histogram(tuple(hist(b5=3)))


P99 = LatencyRules(max_p99_ms=300)
RATIO = LatencyRules(max_ratio=2)


def latency_of(mine: list[int], others: list[int] | None = None, *, rules: LatencyRules = P99,
               requests: int | None = None, others_requests: int | None = None,
               min_requests: int = 20) -> LatencyVerdict:
    theirs = Histogram(tuple(others)) if others is not None else Histogram()
    return judge_latency(
        Histogram(tuple(mine)), theirs,
        requests=mine[-1] if requests is None else requests,
        others_requests=theirs.total if others_requests is None else others_requests,
        rules=rules, min_requests=min_requests)


def test_max_p99_passes_below_and_fails_above() -> None:
    good = latency_of(hist(b100=100))
    assert good.judged and good.failed is None
    assert good.notes == ("p99 100 ms over 100 responses (max 300 ms)",)
    slow = latency_of(hist(b100=90, b500=10))  # p99 in (250, 500]: 475 ms
    assert slow.failed == "p99 475 ms over 100 responses (max 300 ms)"


def test_a_p99_fails_clearly_only_when_its_bucket_s_lower_bound_is_above_the_limit() -> None:
    # p99 475 ms in (250, 500]: above 300, but the bucket starts below it -> not beyond doubt
    assert not latency_of(hist(b100=90, b500=10)).clear
    # p99 in (500, 1000]: even 500 ms is above 300
    assert latency_of(hist(b100=90, b1000=10)).clear


def test_latency_is_not_judged_before_min_requests() -> None:
    assert not latency_of(hist(inf=19)).judged
    assert latency_of(hist(inf=20)).clear


def test_requests_without_response_times_cannot_pass_a_latency_rule() -> None:
    verdict_ = latency_of([0] * 12, requests=50)
    assert not verdict_.judged and verdict_.failed is None


def test_the_ratio_rule_compares_with_the_other_versions() -> None:
    fast = hist(b50=95, b100=5)  # p99 90 ms
    same = latency_of(hist(b50=95, b100=5), fast, rules=RATIO)
    assert same.failed is None and same.notes == (
        "p99 90 ms is 1.00 times the other versions' 90 ms (max 2)",)
    slower = latency_of(hist(b100=5, b250=95), fast, rules=RATIO)  # 100 + 150 x 94/95 ms
    assert slower.failed == "p99 248 ms is 2.76 times the other versions' 90 ms (max 2)"
    # 242 ms in (100, 250]: 100 ms is not above 2 x the others' upper bound (100 ms)
    assert not slower.clear
    three_x = latency_of(hist(b500=100), fast, rules=RATIO)  # in (250, 500]: 250 > 2 x 100
    assert three_x.clear


def test_the_ratio_rule_passes_when_the_others_answered_too_little_and_says_so() -> None:
    result = latency_of(hist(b500=100), hist(b50=5), rules=RATIO)
    assert result.judged and result.failed is None
    assert result.notes == (
        "p99 ratio not judged: the other versions answered 5 of the 20 requests needed",)


def test_others_in_the_inf_bucket_never_make_a_ratio_clear() -> None:
    result = latency_of(hist(inf=100), hist(b5=1, inf=99), rules=RATIO)
    assert result.failed is None  # 10 s against 10 s


@pytest.mark.parametrize("rules", [{"max_p99_ms": 0}, {"max_p99_ms": -1},
                                   {"max_p99_ms": math.inf}, {"max_ratio": 1},
                                   {"max_ratio": 0.5}, {"max_ratio": math.nan}])
def test_bad_latency_rules_are_refused(rules: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LatencyRules(**rules)


@settings(max_examples=examples(300))
@given(in_buckets, in_buckets, st.floats(min_value=1, max_value=20_000),
       st.floats(min_value=1.01, max_value=20))
def test_a_clear_latency_failure_is_beyond_the_doubt_of_the_buckets(
        mine: list[int], theirs: list[int], max_p99: float, ratio: float) -> None:
    """Clear means: wherever in their buckets the responses really lie, the rule fails (the
    bucket holding VERSION's p99 starts above the limit at its most generous)."""
    h, others = Histogram(tuple(itertools.accumulate(mine))), Histogram(
        tuple(itertools.accumulate(theirs)))
    for rules in (LatencyRules(max_p99_ms=max_p99), LatencyRules(max_ratio=ratio)):
        result = latency_of(list(h.counts), list(others.counts), rules=rules)
        assert not result.clear or result.failed is not None
        if not result.clear:
            continue
        lower = h.bounds(0.99)
        assert lower is not None
        if rules.max_p99_ms is not None:
            assert lower[0] * 1000 > rules.max_p99_ms
        else:
            upper = others.bounds(0.99)
            assert upper is not None and lower[0] > ratio * upper[1]


def slow_routers(v2_each: int, v2_hist: list[int], v1_each: int = 0,
                 v1_hist: list[int] | None = None) -> dict[str, Report]:
    return {"r1": timed(ok(v2_each), v2=v2_hist, v1=v1_hist, v1_counts=ok(v1_each))}


def test_a_slow_version_is_rolled_back_by_max_p99_once_beyond_doubt() -> None:
    canary = CanaryRun(plan(latency=P99))
    decisions = run(canary, [
        (0.0, slow_routers(0, hist())),
        (2.0, slow_routers(10, hist(b1000=10))),  # 10: not judged yet
        (4.0, slow_routers(30, hist(b1000=30))),  # in (500, 1000]: beyond doubt
    ])
    assert type(decisions[2]) is Wait
    final = decisions[3]
    assert isinstance(final, RollBack) and final.reason is Reason.FAILED
    assert final.message == ("canary of web v2 rolled back at 10%: p99 995 ms over 30 responses"
                             " (max 300 ms)")


def test_a_p99_just_above_the_limit_fails_at_the_interval_s_end_only() -> None:
    canary = CanaryRun(plan(latency=P99))
    decisions = run(canary, [
        (0.0, slow_routers(0, hist())),
        (10.0, slow_routers(100, hist(b250=90, b500=10))),
        (30.0, slow_routers(100, hist(b250=90, b500=10))),
    ])
    assert type(decisions[2]) is Wait
    final = decisions[3]
    assert isinstance(final, RollBack)
    assert final.message == ("canary of web v2 rolled back at 10%: p99 475 ms over 100"
                             " responses (max 300 ms)")


def test_a_fast_version_passes_and_its_line_says_the_p99_and_the_ratio() -> None:
    canary = CanaryRun(plan(steps=(10,), latency=LatencyRules(max_p99_ms=300, max_ratio=2)))
    decisions = run(canary, [
        (0.0, slow_routers(0, hist(), 0, hist())),
        (30.0, slow_routers(40, hist(b50=40), 400, hist(b50=400))),
    ])
    promote = decisions[2]
    assert isinstance(promote, Promote)
    assert promote.lines == (
        "canary of web v2 passed 10%: error rate 0.00 over 40 requests (max 0.01); p99 50 ms"
        " over 40 responses (max 300 ms); p99 50 ms is 1.00 times the other versions'"
        " 50 ms (max 2)",)
    assert promote.steps[0].p99 == pytest.approx(0.04975)


def test_a_ratio_against_too_few_others_passes_the_step_saying_so() -> None:
    canary = CanaryRun(plan(steps=(10,), latency=RATIO))
    promote = run(canary, [(0.0, slow_routers(0, hist(), 0, hist())),
                           (30.0, slow_routers(40, hist(b500=40), 3, hist(b50=3)))])[2]
    assert isinstance(promote, Promote)
    assert promote.lines[0].endswith(
        "; p99 ratio not judged: the other versions answered 3 of the 20 requests needed")


def test_enough_requests_without_response_times_time_out_saying_so() -> None:
    canary = CanaryRun(plan(steps=(10,), timeout=5.0, latency=P99))
    decisions = run(canary, [(0.0, {"r1": report(ok(0))}), (30.0, {"r1": report(ok(50))}),
                             (35.0, {"r1": report(ok(60))})])
    assert type(decisions[2]) is Wait
    final = decisions[3]
    assert isinstance(final, RollBack) and final.reason is Reason.TIMEOUT
    assert final.message == ("canary of web v2 rolled back at 10%: no response times of v2 in"
                             " the routers' reports over 60 requests in 35s")


# --- pause, resume, abort -----------------------------------------------------------------


def test_a_paused_step_is_not_judged_and_has_no_deadline() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    run(canary, [(0.0, {"r1": report(ok(0))}), (5.0, {"r1": report(ok(5))})])
    assert canary.pause() and not canary.pause()
    waiting = canary.decide(500.0, {"r1": report(http(5, 500))})  # 500s of 500s, unjudged
    assert isinstance(waiting, Wait) and waiting.until == math.inf
    assert waiting.message == "canary of web v2 paused at 10%"
    assert canary.resume(600.0, {"r1": report(http(5, 500))}) and not canary.resume(601.0, {})
    # a whole new interval from the resume, counted from the reports read then
    assert isinstance(canary.decide(620.0, {"r1": report(http(15, 500))}), Wait)
    promote = canary.decide(630.0, {"r1": report(http(25, 500))})
    assert isinstance(promote, Promote) and promote.steps[0].requests == 20
    assert promote.steps[0].seconds == 30.0


def test_abort_rolls_back_at_once_saying_so() -> None:
    canary = CanaryRun(plan())
    run(canary, [(0.0, two_routers(0)), (5.0, two_routers(10))])
    final = canary.abort(7.2, two_routers(12))
    assert isinstance(final, RollBack) and final.reason is Reason.ABORTED
    assert final.message == ("canary of web v2 aborted at 10% after 7s: rolled back (error rate"
                             " 0.00 over 24 requests (max 0.01))")
    assert canary.decide(8.0, two_routers(20)) is final


def test_abort_of_a_paused_canary() -> None:
    canary = CanaryRun(plan())
    canary.start(0.0)
    canary.pause()
    assert canary.abort(3.0).message == (
        "canary of web v2 aborted at 10% after 3s (paused): rolled back (0 requests)")


def test_a_gate_refusal_rolls_back_even_after_every_step_passed() -> None:
    canary = CanaryRun(plan(steps=(10,)))
    promote = run(canary, [(0.0, two_routers(0)), (30.0, two_routers(20))])[2]
    assert isinstance(promote, Promote)
    final = canary.stopped(Reason.GATE, 10, "gate http://g/ answered HTTP 500")
    assert final.message == "canary of web v2 rolled back at 10%: gate http://g/ answered HTTP 500"
    assert canary.decide(40.0, {}) is final


def test_the_gate_payloads() -> None:
    assert gate_payload("web", "v2", 0, None) == {
        "service": "web", "version": "v2", "step": 0, "percent": 0, "requests": 0,
        "error_rate": None, "p99_ms": None}
    result = StepResult(10, 0.01, 200, 2, 30.0, 0.2425)
    assert gate_payload("web", "v2", 1, result) == {
        "service": "web", "version": "v2", "step": 1, "percent": 10, "requests": 200,
        "error_rate": 0.01, "p99_ms": 242.5}
    assert gate_payload("web", "v2", 2, StepResult(50, 0.0, 9, 0, 1.0))["p99_ms"] is None
