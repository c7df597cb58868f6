"""The canary's judgement: routers' traffic reports in, pass / fail / wait out, step by step (pure).

Every `registrar haproxy` writes its cumulative counters by service and version to
`{control}/routers/{node}` (bound to its lease). A step's traffic is the increase of VERSION's
counters over the step, summed over routers; its error rate is (5xx + connection errors) /
(responses + connection errors), or in tcp mode connection errors / (sessions + connection
errors). The rules this module decides, one place each:

- Tcp or http (`Traffic.of`): a router in http mode counts responses by class, one in tcp mode
  only sessions (`"tcp"`). Unless a mode is forced, each router's increase is read as http when
  any HTTP class moved, as tcp otherwise, so routers of both modes can judge one version and an
  HTTP router that also counts sessions is not counted twice.
- A router that restarts (`restarted`): some counter found in both of its reports is lower in
  the later one. Its counters started again after the earlier report, so the later values are all
  traffic of the span. The whole report is compared, every service and version, so a restart is
  seen even when VERSION's own new counters already passed the old ones. A series missing from
  the later report is no evidence (a fresh router has not served it yet). Lease ids are no help:
  a router whose lease expired in a partition grants a new one and keeps counting.
- A router with no earlier report (`increase`) contributes nothing until it has one. Its later
  values might be counters started during the span (a new router), or its whole history (a
  report that was merely missing: a lease re-granted after a partition, a first report not yet
  written); nothing in a report tells which, and counting a history would judge the step by
  traffic that was not in it, maybe at another weight or before the canary. The `CanaryRun` looks
  often and remembers the last report of every router it saw, so this costs at most one look of
  a new router's traffic, and a router that vanishes and comes back is compared with its last.
- A router whose report vanished (its lease expired): what it counted up to its last report
  seen stays counted; nothing is divided by what is missing.
- The verdict (`verdict`): no requests, or fewer than `min_requests` (connection errors count as
  requests: a version refusing every connection is judged too), is NotEnough; else Failed when
  the rate is above `max_error_rate`, Passed otherwise. Failed carries `clear`: the rate is above
  the maximum beyond reasonable doubt (the lower bound of a one-sided 99 % Wilson interval), so
  that one unlucky error among the first requests does not fail a good version early.
- The steps (`CanaryRun`): a step lasts `interval`. Before its end it can only fail, and only
  clearly (all 500s fail as soon as `min_requests` are in); at its end it passes or fails on its
  rate; with fewer than `min_requests` it is prolonged, judged again at every look, until
  `timeout` after its interval (the timeout bounds each step's prolongation, so a step lasts at
  most interval + timeout and a canary of k steps at most k x (interval + timeout), before the
  promotion's own wait).
Times are seconds on the caller's clock (a monotonic one); nothing here reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

from registrar.core.layout import Layout, child_name
from registrar.core.planner import json_object
from registrar.core.store import StoredKey

Mode = Literal["http", "tcp"]
_Final = TypeVar("_Final", "Promote", "RollBack")

MAX_COUNT = 2**64 - 1  # HAProxy's counters are 64-bit: a larger number is no count
Z = 2.326  # one-sided 99 %: the doubt a step's rate must clear to fail before its interval ends

# report field -> Counts attribute
_FIELDS = {
    "2xx": "http_2xx", "3xx": "http_3xx", "4xx": "http_4xx", "5xx": "http_5xx",
    "other": "other", "tcp": "tcp", "connection_errors": "connection_errors",
}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


@dataclass(frozen=True)
class Counts:
    """One version's counters on one router (cumulative in a report, an increase elsewhere)."""

    http_2xx: int = 0
    http_3xx: int = 0
    http_4xx: int = 0
    http_5xx: int = 0
    other: int = 0
    tcp: int = 0
    connection_errors: int = 0

    @classmethod
    def from_json(cls, value: object) -> Counts | None:
        """A report's `{"2xx": N, ...}`; a missing field is 0; None if any is not a count."""
        if not isinstance(value, dict):
            return None
        counts: dict[str, int] = {}
        for key, name in _FIELDS.items():
            number = value.get(key, 0)
            if not _is_count(number):
                return None
            counts[name] = number
        return cls(**counts)

    def as_tuple(self) -> tuple[int, ...]:
        return (self.http_2xx, self.http_3xx, self.http_4xx, self.http_5xx, self.other,
                self.tcp, self.connection_errors)

    @property
    def http_responses(self) -> int:
        return self.http_2xx + self.http_3xx + self.http_4xx + self.http_5xx + self.other

    def minus(self, earlier: Counts) -> Counts:
        """The increase since `earlier`, never below 0."""
        return Counts(*(max(0, a - b) for a, b in zip(self.as_tuple(), earlier.as_tuple(),
                                                        strict=True)))


@dataclass(frozen=True)
class Report:
    """One router's report: when it was written (None if unreadable) and its counters."""

    at: datetime | None = None
    services: Mapping[str, Mapping[str, Counts]] = field(default_factory=dict)

    def counts(self, service: str, version: str) -> Counts | None:
        return self.services.get(service, {}).get(version)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_report(raw_value: str) -> Report | None:
    """One `{control}/routers/{node}` value, or None when it is no report (not JSON, not an
    object, `services` not an object). Values are anyone's input: a service or version whose
    entry is not an object of counts is skipped, an unreadable `at` is None."""
    value = json_object(raw_value)
    if value is None:
        return None
    services = value.get("services", {})
    if not isinstance(services, dict):
        return None
    parsed: dict[str, dict[str, Counts]] = {}
    for service, versions in services.items():
        if not isinstance(versions, dict):
            continue
        by_version = {
            version: counts for version, entry in versions.items()
            if (counts := Counts.from_json(entry)) is not None
        }
        if by_version:
            parsed[service] = by_version
    return Report(_parse_time(value.get("at")), parsed)


def parse_reports(stored: Mapping[str, StoredKey], layout: Layout) -> dict[str, Report]:
    """A read of `{control}/routers/` -> {router: Report}; other keys and bad values are skipped.
    The lease is not used: it changes when a living router re-grants one after a partition."""
    reports = {}
    for key, item in stored.items():
        router = child_name(layout.routers, key)
        report = parse_report(item.value) if router else None
        if router and report is not None:
            reports[router] = report
    return reports


def restarted(before: Report, after: Report) -> bool:
    """Whether a router's counters started again between two of its reports: some counter
    present in both is lower in the later one."""
    for service, versions in before.services.items():
        later = after.services.get(service)
        if later is None:
            continue
        for version, counts in versions.items():
            now = later.get(version)
            if now is not None and any(
                b > a for b, a in zip(counts.as_tuple(), now.as_tuple(), strict=True)
            ):
                return True
    return False


def increase(before: Report | None, after: Report | None, service: str, version: str) -> Counts:
    """What one router counted for VERSION between two of its reports (see the module's rules:
    no earlier or no later report is nothing; a restart makes the later values the increase)."""
    if before is None or after is None:
        return Counts()
    now = after.counts(service, version) or Counts()
    if restarted(before, after):
        return now
    return now.minus(before.counts(service, version) or Counts())


@dataclass(frozen=True)
class Traffic:
    """VERSION's traffic over a span in the terms of the SPEC's error rate."""

    answered: int = 0  # HTTP responses of any class, or TCP sessions
    server_errors: int = 0  # 5xx responses
    connection_errors: int = 0

    @classmethod
    def of(cls, counts: Counts, mode: Mode | None = None) -> Traffic:
        """One router's increase; without a mode, http when any HTTP class moved."""
        http = mode == "http" or (mode is None and counts.http_responses > 0)
        if http:
            return cls(counts.http_responses, counts.http_5xx, counts.connection_errors)
        return cls(counts.tcp, 0, counts.connection_errors)

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.answered + other.answered, self.server_errors + other.server_errors,
                       self.connection_errors + other.connection_errors)

    @property
    def requests(self) -> int:
        return self.answered + self.connection_errors

    @property
    def errors(self) -> int:
        return self.server_errors + self.connection_errors


def traffic(start: Mapping[str, Report], end: Mapping[str, Report], service: str, version: str,
            mode: Mode | None = None) -> Traffic:
    """VERSION's traffic from `start` to `end` ({router: Report}), summed over routers."""
    total = Traffic()
    for router in sorted(set(start) | set(end)):
        total += Traffic.of(increase(start.get(router), end.get(router), service, version), mode)
    return total


@dataclass(frozen=True)
class Passed:
    rate: float
    requests: int
    errors: int


@dataclass(frozen=True)
class Failed:
    rate: float
    requests: int
    errors: int
    clear: bool  # above the maximum beyond reasonable doubt: enough to fail before the end


@dataclass(frozen=True)
class NotEnough:
    requests: int  # so far (connection errors included)
    errors: int

    @property
    def rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


Verdict = Passed | Failed | NotEnough


def _lower_bound(errors: int, requests: int) -> float:
    """The lower end of the one-sided 99 % Wilson interval of the error rate (requests > 0)."""
    p = errors / requests  # exact for any ints, and <= 1
    n = float(requests) if requests < 2**1000 else math.inf
    z2 = Z * Z
    centre = p + z2 / (2 * n)
    margin = Z * math.sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n)))
    return (centre - margin) / (1 + z2 / n)


def verdict(seen: Traffic, *, max_error_rate: float, min_requests: int) -> Verdict:
    """The judgement of a step's traffic so far. 0 requests is never enough (no division)."""
    requests, errors = seen.requests, seen.errors
    if requests == 0 or requests < min_requests:
        return NotEnough(requests, errors)
    rate = errors / requests
    if rate > max_error_rate:
        return Failed(rate, requests, errors, _lower_bound(errors, requests) > max_error_rate)
    return Passed(rate, requests, errors)


def judge(start: Mapping[str, Report], end: Mapping[str, Report], service: str, version: str,
          *, max_error_rate: float, min_requests: int, mode: Mode | None = None) -> Verdict:
    """The judgement of one step from the routers' reports at its start and at its end."""
    return verdict(traffic(start, end, service, version, mode),
                   max_error_rate=max_error_rate, min_requests=min_requests)


# --- the canary, step by step -------------------------------------------------------------


def _plain(number: float) -> str:
    return f"{number:.6f}".rstrip("0").rstrip(".") or "0"


def format_rate(rate: float, max_error_rate: float) -> str:
    """A rate with as many decimals as the maximum has (at least 2), and more when it would
    otherwise read as equal to the maximum without being it."""
    digits = max(2, len(_plain(max_error_rate).partition(".")[2]))
    while digits < 6 and rate != max_error_rate and round(rate, digits) == round(
            max_error_rate, digits):
        digits += 1
    return f"{rate:.{digits}f}"


class Phase(enum.Enum):
    READY = "ready"  # built; start() not called yet
    STEP = "step"  # a step is running
    DONE = "done"  # promoted or rolled back: every later call returns that decision again


class Reason(enum.Enum):
    FAILED = "failed"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class CanaryPlan:
    """What `promote --canary` was asked (validated by the settings; checked again here)."""

    service: str
    version: str
    steps: tuple[int, ...]  # percentages, increasing, each 1..99
    interval: float = 30.0
    timeout: float = 30.0  # each step's prolongation beyond its interval
    max_error_rate: float = 0.01
    min_requests: int = 20
    mode: Mode | None = None  # None: each router's increase tells

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(not 1 <= p <= 99 for p in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"canary steps must increase within 1..99: {steps}")
        if not self.interval > 0 or not self.timeout >= 0 or self.min_requests < 0:
            raise ValueError("canary interval must be > 0, timeout and min_requests >= 0")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"max error rate must be within 0..1: {self.max_error_rate}")


@dataclass(frozen=True)
class StepResult:
    percent: int
    rate: float
    requests: int
    errors: int
    seconds: float  # how long the step lasted


@dataclass(frozen=True)
class Wait:
    """Look again: nothing decided. `until` is when time alone decides something (the step's
    interval ends, or its prolongation times out); a failure can come at any look before."""

    until: float
    percent: int
    requests: int
    errors: int
    message: str


@dataclass(frozen=True)
class SetPercent:
    """Write the weights key at `percent`: the first step, or the next after `passed`."""

    percent: int
    passed: StepResult | None
    message: str


@dataclass(frozen=True)
class Promote:
    """Every step passed: write the promotion, wait for it, delete the weights key."""

    steps: tuple[StepResult, ...]
    lines: tuple[str, ...]  # one per step: its percent, rate and request count
    message: str


@dataclass(frozen=True)
class RollBack:
    """Delete the weights key, write no promotion, exit 1 with `message`."""

    reason: Reason
    percent: int
    requests: int
    errors: int
    message: str

    @property
    def rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


Decision = Wait | SetPercent | Promote | RollBack


class CanaryRun:
    """The canary of one version as a small state machine: `start(now)` -> the first step, then
    at each look `decide(now, reports)` with every router's report ({router: Report}) ->
    what to do; `interrupt(now, signal)` on SIGINT/SIGTERM. Plain data in, decisions out."""

    def __init__(self, plan: CanaryPlan) -> None:
        self.plan = plan
        self.phase = Phase.READY
        self._index = 0  # into plan.steps
        self._started = 0.0  # when the current step began
        self._seen = Traffic()  # the current step's traffic so far
        self._last: dict[str, Report] = {}  # every router's last report seen, kept if it vanishes
        self._passed: list[StepResult] = []
        self._lines: list[str] = []
        self._final: Promote | RollBack | None = None

    @property
    def percent(self) -> int:
        return self.plan.steps[self._index]

    @property
    def passed(self) -> tuple[StepResult, ...]:
        return tuple(self._passed)

    def start(self, now: float) -> SetPercent:
        if self.phase is not Phase.READY:
            raise RuntimeError("the canary has started already")
        self.phase, self._started = Phase.STEP, now
        return SetPercent(self.percent, None, f"{self._head} at {self.percent}%")

    def decide(self, now: float, reports: Mapping[str, Report]) -> Decision:
        if self._final is not None:
            return self._final
        if self.phase is not Phase.STEP:
            raise RuntimeError("decide() before start()")
        self._look(reports)
        plan = self.plan
        judged = verdict(self._seen, max_error_rate=plan.max_error_rate,
                         min_requests=plan.min_requests)
        ends = self._started + plan.interval
        if isinstance(judged, Failed) and (judged.clear or now >= ends):
            return self._finish(self._roll_back(Reason.FAILED, f"error rate {self._rate()}"
                                                f" over {judged.requests} requests"
                                                f" (max {_plain(plan.max_error_rate)})"))
        if now < ends:
            return self._wait(ends)
        if isinstance(judged, Passed):
            return self._pass(now, judged)
        if now >= ends + plan.timeout:
            needed = max(plan.min_requests, 1)
            reason = (f"too little traffic: {judged.requests} of the {needed} requests needed"
                      f" in {now - self._started:.0f}s")
            if judged.requests:
                reason += f" (error rate {self._rate()}, max {_plain(plan.max_error_rate)})"
            return self._finish(self._roll_back(Reason.TIMEOUT, reason))
        return self._wait(ends + plan.timeout)

    def interrupt(self, now: float, signal: str,
                  reports: Mapping[str, Report] | None = None) -> Promote | RollBack:
        """SIGINT/SIGTERM: roll back, saying what the step saw so far (with `reports` if the
        caller could still read them). After the end, the decision already made."""
        if self._final is not None:
            return self._final
        if reports is not None and self.phase is Phase.STEP:
            self._look(reports)
        seconds = now - self._started if self.phase is Phase.STEP else 0.0
        reason = f"interrupted by {signal} after {seconds:.0f}s: "
        if self._seen.requests:
            reason += (f"error rate {self._rate()} over {self._seen.requests} requests"
                       f" (max {_plain(self.plan.max_error_rate)})")
        else:
            reason += "0 requests"
        return self._finish(self._roll_back(Reason.INTERRUPTED, reason))

    # --- inside ---------------------------------------------------------------------------

    @property
    def _head(self) -> str:
        return f"canary of {self.plan.service} {self.plan.version}"

    def _rate(self) -> str:
        seen = self._seen
        rate = seen.errors / seen.requests if seen.requests else 0.0
        return format_rate(rate, self.plan.max_error_rate)

    def _look(self, reports: Mapping[str, Report]) -> None:
        plan = self.plan
        for router, report in reports.items():
            counted = increase(self._last.get(router), report, plan.service, plan.version)
            self._seen += Traffic.of(counted, plan.mode)
            self._last[router] = report

    def _wait(self, until: float) -> Wait:
        seen, plan = self._seen, self.plan
        if seen.requests >= max(plan.min_requests, 1):
            progress = f"error rate {self._rate()} over {seen.requests} requests so far"
        else:
            progress = f"{seen.requests} of the {max(plan.min_requests, 1)} requests needed"
        return Wait(until, self.percent, seen.requests, seen.errors,
                    f"{self._head} at {self.percent}%: {progress}")

    def _pass(self, now: float, judged: Passed) -> SetPercent | Promote:
        result = StepResult(self.percent, judged.rate, judged.requests, judged.errors,
                            now - self._started)
        line = (f"{self._head} passed {self.percent}%: error rate {self._rate()} over"
                f" {judged.requests} requests (max {_plain(self.plan.max_error_rate)})")
        self._passed.append(result)
        self._lines.append(line)
        if self._index + 1 == len(self.plan.steps):
            return self._finish(Promote(self.passed, tuple(self._lines), f"{line}; promoting"))
        self._index += 1
        self._started, self._seen = now, Traffic()
        return SetPercent(self.percent, result, f"{line}; now at {self.percent}%")

    def _roll_back(self, reason: Reason, why: str) -> RollBack:
        return RollBack(reason, self.percent, self._seen.requests, self._seen.errors,
                        f"{self._head} rolled back at {self.percent}%: {why}")

    def _finish(self, final: _Final) -> _Final:
        self.phase, self._final = Phase.DONE, final
        return final
