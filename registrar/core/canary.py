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
- Response times (`Histogram`, `judge_latency`): a report's `latency` holds cumulative `le`
  bucket counts by service and version; a step's histogram is their increase, summed over
  routers by the same rules as the counts (a bucket going down is a restart too). Its p99 is
  read as Prometheus' `histogram_quantile` reads buckets. `--max-p99` and `--max-latency-ratio`
  are judged once `min_requests` are in; before the interval's end they fail only beyond
  doubt: when even the lower bound of the bucket holding the p99 is above the limit (for the
  ratio, above R times the upper bound of the bucket holding the others' p99). The ratio is
  judged only when the other versions answered `min_requests` too; else it passes, and says so.
- Steering (`pause`, `resume`, `abort`) and rollbacks found outside the reports (`stopped`: a
  gate, the weights key deleted): a paused step is not judged and has no deadline; a resumed
  one starts again, counted from the reports read at the resume.
Times are seconds on the caller's clock (a monotonic one); nothing here reads a clock.
"""

from __future__ import annotations

import enum
import itertools
import json
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


# The routers' response-time buckets (seconds), in the order of a report's `latency` lists;
# the last is +Inf. Prometheus' buckets: each count is of the responses at or below its bound.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)


@dataclass(frozen=True)
class Histogram:
    """Response times as cumulative bucket counts (`le` counts: N_i = responses <= BUCKETS[i],
    the last all of them), in a report or as an increase."""

    counts: tuple[int, ...] = (0,) * len(BUCKETS)

    @classmethod
    def from_json(cls, value: object) -> Histogram | None:
        """A report's `[N1, ..., N12]`; None unless 12 counts that never decrease."""
        if not isinstance(value, list) or len(value) != len(BUCKETS):
            return None
        if not all(_is_count(n) for n in value):
            return None
        if any(b < a for a, b in itertools.pairwise(value)):
            return None
        return cls(tuple(value))

    @property
    def total(self) -> int:
        return self.counts[-1]

    def minus(self, earlier: Histogram) -> Histogram:
        """The increase since `earlier`, each bucket never below 0 nor below the one before."""
        grown = [max(0, a - b) for a, b in zip(self.counts, earlier.counts, strict=True)]
        return Histogram(tuple(itertools.accumulate(grown, max)))

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)))

    def _bucket(self, q: float) -> tuple[int, float]:
        """The index of the bucket holding the q-quantile and the rank within it, as
        Prometheus' `histogram_quantile` finds them (total > 0)."""
        rank = q * self.total
        for index, count in enumerate(self.counts[:-1]):
            if count >= rank:
                below = self.counts[index - 1] if index else 0
                return index, rank - below
        return len(BUCKETS) - 1, 0.0

    def quantile(self, q: float) -> float | None:
        """Seconds, as `histogram_quantile(q, ...)` reads these buckets: linear within the
        bucket holding the rank (the first from 0), the highest finite bound when the rank is
        in +Inf; None with no response."""
        if self.total == 0:
            return None
        index, rank = self._bucket(q)
        if index == len(BUCKETS) - 1:
            return BUCKETS[-2]
        lower = BUCKETS[index - 1] if index else 0.0
        below = self.counts[index - 1] if index else 0
        in_bucket = self.counts[index] - below
        return lower + (BUCKETS[index] - lower) * (rank / in_bucket if in_bucket else 1.0)

    def bounds(self, q: float) -> tuple[float, float] | None:
        """(lower, upper) bound of the bucket holding the q-quantile, seconds: whatever the
        spread inside the bucket, the quantile lies between them (+Inf: from the highest
        finite bound up)."""
        if self.total == 0:
            return None
        index, _rank = self._bucket(q)
        return (BUCKETS[index - 1] if index else 0.0), BUCKETS[index]


@dataclass(frozen=True)
class Report:
    """One router's report: when it was written (None if unreadable), its counters, its
    response-time histograms (none from a router without them) and its mode if it says."""

    at: datetime | None = None
    services: Mapping[str, Mapping[str, Counts]] = field(default_factory=dict)
    latency: Mapping[str, Mapping[str, Histogram]] = field(default_factory=dict)
    mode: Mode | None = None

    def counts(self, service: str, version: str) -> Counts | None:
        return self.services.get(service, {}).get(version)

    def histogram(self, service: str, version: str) -> Histogram | None:
        return self.latency.get(service, {}).get(version)

    def http(self, service: str) -> bool:
        """Whether this router serves `service` in http mode, as far as its report tells: its
        `mode`, else response times or HTTP answers counted for the service."""
        if service not in self.services and service not in self.latency:
            return False
        if self.mode is not None:
            return self.mode == "http"
        return service in self.latency or any(
            c.http_responses for c in self.services.get(service, {}).values())


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
    mode = value.get("mode")
    return Report(_parse_time(value.get("at")), parsed, _parse_latency(value.get("latency")),
                  mode if mode in ("http", "tcp") else None)


def _parse_latency(latency: object) -> dict[str, dict[str, Histogram]]:
    """A report's `latency` (absent in a report of a router without it: {}); a version whose
    entry is not 12 non-decreasing counts is skipped."""
    if not isinstance(latency, dict):
        return {}
    parsed: dict[str, dict[str, Histogram]] = {}
    for service, versions in latency.items():
        if not isinstance(versions, dict):
            continue
        by_version = {
            version: histogram for version, entry in versions.items()
            if (histogram := Histogram.from_json(entry)) is not None
        }
        if by_version:
            parsed[service] = by_version
    return parsed


def http_router_for(reports: Mapping[str, Report], service: str) -> bool:
    """Whether a router serves SERVICE in http mode (what the latency rules, --header and
    --sticky need). The routers whose report mentions SERVICE tell; when none does yet (no
    request served since they started: a report lists only what was counted), any router
    that says it runs in http mode does."""
    mentioning = [r for r in reports.values()
                  if service in r.services or service in r.latency]
    if mentioning:
        return any(r.http(service) for r in mentioning)
    return any(r.mode == "http" for r in reports.values())


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


def _fell(before: Mapping[str, Mapping[str, Counts | Histogram]],
          after: Mapping[str, Mapping[str, Counts | Histogram]]) -> bool:
    for service, versions in before.items():
        later = after.get(service)
        if later is None:
            continue
        for version, counts in versions.items():
            now = later.get(version)
            if now is not None and any(b > a for b, a in zip(_numbers(counts), _numbers(now),
                                                             strict=True)):
                return True
    return False


def _numbers(counts: Counts | Histogram) -> tuple[int, ...]:
    return counts.counts if isinstance(counts, Histogram) else counts.as_tuple()


def restarted(before: Report, after: Report) -> bool:
    """Whether a router's counters started again between two of its reports: some counter
    present in both (a response count or a histogram bucket) is lower in the later one."""
    return _fell(before.services, after.services) or _fell(before.latency, after.latency)


def increase(before: Report | None, after: Report | None, service: str, version: str) -> Counts:
    """What one router counted for VERSION between two of its reports (see the module's rules:
    no earlier or no later report is nothing; a restart makes the later values the increase)."""
    if before is None or after is None:
        return Counts()
    now = after.counts(service, version) or Counts()
    if restarted(before, after):
        return now
    return now.minus(before.counts(service, version) or Counts())


def latency_increase(before: Report | None, after: Report | None, service: str,
                     version: str) -> Histogram:
    """What one router's histogram of VERSION grew by between two of its reports, by the
    rules of `increase` (a restart: the later histogram is the increase)."""
    if before is None or after is None:
        return Histogram()
    now = after.histogram(service, version) or Histogram()
    if restarted(before, after):
        return now
    return now.minus(before.histogram(service, version) or Histogram())


@dataclass(frozen=True)
class Traffic:
    """VERSION's traffic over a span in the terms of the error rate (5xx and connection
    errors over responses and connection errors; README, "Canary")."""

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


# --- response times --------------------------------------------------------------------


def latency(start: Mapping[str, Report], end: Mapping[str, Report], service: str,
            version: str) -> Histogram:
    """VERSION's response times from `start` to `end` ({router: Report}), summed over routers."""
    total = Histogram()
    for router in sorted(set(start) | set(end)):
        total += latency_increase(start.get(router), end.get(router), service, version)
    return total


def other_versions(*reports: Report | None, service: str, version: str) -> set[str]:
    """The versions of SERVICE other than VERSION that some of `reports` counted."""
    found: set[str] = set()
    for report in reports:
        if report is not None:
            found |= set(report.services.get(service, {})) | set(report.latency.get(service, {}))
    found.discard(version)
    return found


def ms(seconds: float) -> str:
    """Milliseconds as a step's line shows them: whole ones, a tenth below 10 ms."""
    value = seconds * 1000
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


@dataclass(frozen=True)
class LatencyRules:
    """`--max-p99 MS` and `--max-latency-ratio R` (None: not asked)."""

    max_p99_ms: float | None = None
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_p99_ms is not None and not 0 < self.max_p99_ms < math.inf:
            raise ValueError(f"max p99 must be a number of milliseconds > 0: {self.max_p99_ms}")
        if self.max_ratio is not None and not 1 < self.max_ratio < math.inf:
            raise ValueError(f"max latency ratio must be > 1: {self.max_ratio}")

    @property
    def any(self) -> bool:
        return self.max_p99_ms is not None or self.max_ratio is not None


@dataclass(frozen=True)
class LatencyVerdict:
    """The latency rules over a step so far. `judged`: enough was seen to judge (else the step
    cannot pass yet); `failed`: why a rule failed (None: none did); `clear`: it failed beyond
    doubt (even the lower bound of the bucket holding VERSION's p99 is above the limit), enough
    to fail before the interval ends; `notes`: the step's line, one phrase a rule."""

    judged: bool
    p99: float | None  # VERSION's p99 over the step so far, seconds
    failed: str | None = None
    clear: bool = False
    notes: tuple[str, ...] = ()


def judge_latency(mine: Histogram, others: Histogram, *, requests: int, others_requests: int,
                  rules: LatencyRules, min_requests: int) -> LatencyVerdict:
    """The latency rules (--max-p99, --max-latency-ratio; README, "Canary") over one step:
    VERSION's histogram and requests (counted as for the error rate), the other versions'
    summed. Judged once `min_requests` are in; the
    ratio rule only when the others answered as many, else it passes and a note says so."""
    p99 = mine.quantile(0.99)
    needed = max(min_requests, 1)
    if not rules.any:
        return LatencyVerdict(True, p99)
    if requests < needed:
        return LatencyVerdict(False, p99)
    bounds = mine.bounds(0.99)
    if p99 is None or bounds is None:
        return LatencyVerdict(False, None, notes=("no response times in the routers' reports",))
    lower = bounds[0]
    notes: list[str] = []
    failures: list[tuple[str, bool]] = []
    if rules.max_p99_ms is not None:
        limit = rules.max_p99_ms / 1000
        phrase = f"p99 {ms(p99)} ms over {mine.total} responses (max {_plain(rules.max_p99_ms)} ms)"
        notes.append(phrase)
        if p99 > limit:
            failures.append((phrase, lower > limit))
    if rules.max_ratio is not None:
        theirs, their_bounds = others.quantile(0.99), others.bounds(0.99)
        if others_requests < needed or theirs is None or their_bounds is None:
            notes.append(f"p99 ratio not judged: the other versions answered {others_requests}"
                         f" of the {needed} requests needed")
        else:
            ratio = p99 / theirs if theirs > 0 else math.inf
            phrase = (f"p99 {ms(p99)} ms is {ratio:.2f} times the other versions' {ms(theirs)} ms"
                      f" (max {_plain(rules.max_ratio)})")
            notes.append(phrase)
            if p99 > rules.max_ratio * theirs:
                # beyond doubt: above R times even the most the others' p99 can be
                failures.append((phrase, lower > rules.max_ratio * their_bounds[1]))
    if not failures:
        return LatencyVerdict(True, p99, notes=tuple(notes))
    clear = [phrase for phrase, beyond_doubt in failures if beyond_doubt]
    return LatencyVerdict(True, p99, (clear or [failures[0][0]])[0], bool(clear), tuple(notes))


STEERING_ACTIONS = ("pause", "resume", "abort")


@dataclass(frozen=True)
class SteeringRequest:
    """`{control}/canary/{service}/request`: what `promote SERVICE --pause|--resume|--abort`
    asks the running canary; `id` tells one request from the next."""

    action: str
    id: str

    def value(self, at: str) -> str:
        return json.dumps({"action": self.action, "id": self.id, "at": at})

    @classmethod
    def parse(cls, raw: str) -> SteeringRequest | None:
        value = json_object(raw)
        if value is None:
            return None
        action, ident = value.get("action"), value.get("id")
        if action not in STEERING_ACTIONS or not isinstance(ident, str) or not ident:
            return None
        return cls(str(action), ident[:64])


def gate_payload(service: str, version: str, step: int, result: StepResult | None
                 ) -> dict[str, object]:
    """What `--gate URL` is POSTed before step `step + 1` (or before the promotion): the last
    step's figures; step 0 (before the first) with percent 0, requests 0 and nulls."""
    if result is None:
        return {"service": service, "version": version, "step": 0, "percent": 0,
                "requests": 0, "error_rate": None, "p99_ms": None}
    return {"service": service, "version": version, "step": step, "percent": result.percent,
            "requests": result.requests, "error_rate": result.rate,
            "p99_ms": None if result.p99 is None else round(result.p99 * 1000, 3)}


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
    ABORTED = "aborted"  # `promote SERVICE --abort`
    GATE = "gate"  # --gate did not answer 2xx
    GONE = "gone"  # the weights key was deleted by someone else


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
    latency: LatencyRules = field(default_factory=LatencyRules)

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
    p99: float | None = None  # VERSION's p99 over the step, seconds (None: no response times)


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
        self._others = Traffic()  # ... and the other versions' of the service
        self._latency = Histogram()  # VERSION's response times in the step so far
        self._others_latency = Histogram()
        self.paused = False  # `--pause`: no judging, no deadline until resumed
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
        if self.paused:  # nothing is judged and no deadline runs: the reports wait for resume
            return Wait(math.inf, self.percent, self._seen.requests, self._seen.errors,
                        f"{self._head} paused at {self.percent}%")
        self._look(reports)
        plan = self.plan
        judged = verdict(self._seen, max_error_rate=plan.max_error_rate,
                         min_requests=plan.min_requests)
        slow = self._judge_latency()
        ends = self._started + plan.interval
        if isinstance(judged, Failed) and (judged.clear or now >= ends):
            return self._finish(self._roll_back(Reason.FAILED, f"error rate {self._rate()}"
                                                f" over {judged.requests} requests"
                                                f" (max {_plain(plan.max_error_rate)})"))
        if slow.failed is not None and (slow.clear or now >= ends):
            return self._finish(self._roll_back(Reason.FAILED, slow.failed))
        if now < ends:
            return self._wait(ends)
        if isinstance(judged, Passed) and slow.judged:
            return self._pass(now, judged, slow)
        if now >= ends + plan.timeout:
            needed = max(plan.min_requests, 1)
            reason = (f"too little traffic: {judged.requests} of the {needed} requests needed"
                      f" in {now - self._started:.0f}s")
            if isinstance(judged, Passed):  # enough requests, but no response times
                reason = (f"no response times of {plan.version} in the routers' reports over"
                          f" {judged.requests} requests in {now - self._started:.0f}s")
            elif judged.requests:
                reason += f" (error rate {self._rate()}, max {_plain(plan.max_error_rate)})"
            return self._finish(self._roll_back(Reason.TIMEOUT, reason))
        return self._wait(ends + plan.timeout)

    def pause(self) -> bool:
        """`--pause`: hold the current step (False: paused already, or over)."""
        if self.phase is not Phase.STEP or self.paused:
            return False
        self.paused = True
        return True

    def resume(self, now: float, reports: Mapping[str, Report]) -> bool:
        """`--resume`: the current step starts again, a whole new interval from `now`, counted
        from `reports` (what was served while paused is not judged). False: not paused."""
        if self.phase is not Phase.STEP or not self.paused:
            return False
        self.paused = False
        self._look(reports)
        self._new_step(now)
        return True

    def abort(self, now: float, reports: Mapping[str, Report] | None = None
              ) -> Promote | RollBack:
        """`--abort`: roll back at once (after the end: the decision already made)."""
        if self._final is not None:
            return self._final
        if reports is not None and self.phase is Phase.STEP and not self.paused:
            self._look(reports)
        seconds = now - self._started if self.phase is Phase.STEP else 0.0
        return self._finish(RollBack(
            Reason.ABORTED, self.percent, self._seen.requests, self._seen.errors,
            f"{self._head} aborted at {self.percent}% after {seconds:.0f}s"
            f"{' (paused)' if self.paused else ''}: rolled back ({self._figures()})"))

    def stopped(self, reason: Reason, percent: int, why: str) -> RollBack:
        """Rolled back for a reason found outside the reports (a gate, the weights key gone),
        at `percent` (the weights in force), even after every step passed."""
        return self._finish(RollBack(reason, percent, self._seen.requests, self._seen.errors,
                                     f"{self._head} rolled back at {percent}%: {why}"))

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

    def _figures(self) -> str:
        seen = self._seen
        if not seen.requests:
            return "0 requests"
        return (f"error rate {self._rate()} over {seen.requests} requests"
                f" (max {_plain(self.plan.max_error_rate)})")

    def _look(self, reports: Mapping[str, Report]) -> None:
        plan = self.plan
        service, version = plan.service, plan.version
        for router, report in reports.items():
            last = self._last.get(router)
            counted = increase(last, report, service, version)
            self._seen += Traffic.of(counted, plan.mode)
            if plan.latency.any:
                self._latency += latency_increase(last, report, service, version)
                for other in other_versions(last, report, service=service, version=version):
                    self._others += Traffic.of(increase(last, report, service, other),
                                               plan.mode)
                    self._others_latency += latency_increase(last, report, service, other)
            self._last[router] = report

    def _judge_latency(self) -> LatencyVerdict:
        return judge_latency(self._latency, self._others_latency, requests=self._seen.requests,
                             others_requests=self._others.requests, rules=self.plan.latency,
                             min_requests=self.plan.min_requests)

    def _new_step(self, now: float) -> None:
        self._started, self._seen, self._others = now, Traffic(), Traffic()
        self._latency, self._others_latency = Histogram(), Histogram()

    def _wait(self, until: float) -> Wait:
        seen, plan = self._seen, self.plan
        if seen.requests >= max(plan.min_requests, 1):
            progress = f"error rate {self._rate()} over {seen.requests} requests so far"
        else:
            progress = f"{seen.requests} of the {max(plan.min_requests, 1)} requests needed"
        return Wait(until, self.percent, seen.requests, seen.errors,
                    f"{self._head} at {self.percent}%: {progress}")

    def _pass(self, now: float, judged: Passed, slow: LatencyVerdict) -> SetPercent | Promote:
        result = StepResult(self.percent, judged.rate, judged.requests, judged.errors,
                            now - self._started, slow.p99)
        line = (f"{self._head} passed {self.percent}%: error rate {self._rate()} over"
                f" {judged.requests} requests (max {_plain(self.plan.max_error_rate)})")
        line += "".join(f"; {note}" for note in slow.notes)
        self._passed.append(result)
        self._lines.append(line)
        if self._index + 1 == len(self.plan.steps):
            return self._finish(Promote(self.passed, tuple(self._lines), f"{line}; promoting"))
        self._index += 1
        self._new_step(now)
        return SetPercent(self.percent, result, f"{line}; now at {self.percent}%")

    def _roll_back(self, reason: Reason, why: str) -> RollBack:
        return RollBack(reason, self.percent, self._seen.requests, self._seen.errors,
                        f"{self._head} rolled back at {self.percent}%: {why}")

    def _finish(self, final: _Final) -> _Final:
        self.phase, self._final = Phase.DONE, final
        return final
