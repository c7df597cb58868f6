"""The one retry policy: exponential backoff with full jitter, one poll, interruptible waits.

- `Backoff`: the delays (a random wait up to min(max, 0.1 s * 2^attempt)).
- `RetryClock`: when a loop that keeps its own clock tries again (the lease keeper's steps,
  the router's reloads, HAProxy's restarts).
- `retry_forever`: calls a function until it succeeds or `stop` is set (the long-running loops).
- `retry_within`: the same within a deadline, for one-shot commands (`ls`, `promote`, `maint`).
- `poll_until`: waits for a condition, checked every `interval`.
- `patience`: how long an attempt waits for etcd's answer after `failures` that timed out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from registrar.typing_shim import TypeVar

T = TypeVar("T")

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
POLL_INTERVAL = 0.1
# The longest one attempt waits for an answer of etcd's (`patience`).
PATIENCE = 16.0


def patience(usual: float, failures: int, most: float = PATIENCE) -> float:
    """How long to wait for one answer after `failures` attempts in a row that failed: twice
    as long each time (`usual`, 2x, 4x, ...), up to `most` (never below `usual`). An etcd that
    answers in 3 s under load is slow, not gone: giving up on every request after 2 s and
    asking again would never see an answer, and would add a request for each one abandoned."""
    return max(usual, min(usual * 2.0 ** failures, most))


class Backoff:
    """Full jitter: attempt n waits a random time up to min(maximum, initial * 2^n)."""

    def __init__(
        self,
        initial: float = INITIAL_BACKOFF,
        maximum: float = MAX_BACKOFF,
        rng: Callable[[], float] | None = None,
    ) -> None:
        """`rng`: uniform in [0, 1) (default `random.random`, imported at the first failure:
        most processes never back off, and a sidecar starts 1 ms sooner without it)."""
        self.initial = initial
        self.maximum = maximum
        self._rng = rng
        self.attempts = 0

    def next(self, maximum: float | None = None) -> float:
        """The wait before the next attempt (and counts this failure); `maximum`: a ceiling
        for this one (a refused request is tried again sooner than an unreachable etcd)."""
        top = self.maximum if maximum is None else min(maximum, self.maximum)
        ceiling = min(top, self.initial * 2 ** min(self.attempts, 20))
        self.attempts += 1
        if self._rng is None:
            import random

            self._rng = random.random
        return float(max(self.initial / 10, ceiling * self._rng()))

    def reset(self) -> None:
        self.attempts = 0


class RetryClock:
    """For a loop that keeps its own clock: after a failure, the next attempt is due a
    `Backoff` delay later (`at`); after a success, at once (`at` None)."""

    def __init__(self, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backoff = backoff or Backoff()
        self._clock = clock
        self.at: float | None = None

    @property
    def failures(self) -> int:
        """Failures in a row so far."""
        return self._backoff.attempts

    def failed(self, maximum: float | None = None) -> float:
        delay = self._backoff.next(maximum)
        self.at = self._clock() + delay
        return delay

    def succeeded(self) -> None:
        self.reset()
        self.cancel()

    def reset(self) -> None:
        """The failures in a row start again from 0 (the next delay is the shortest)."""
        self._backoff.reset()

    def cancel(self) -> None:
        """No attempt pending (the failures in a row still count)."""
        self.at = None

    def after(self, seconds: float) -> None:
        """Not before `seconds` from now, whatever the backoff (a bug's fixed pause)."""
        self.at = self._clock() + seconds


def _log_attempt(log: logging.Logger, what: str, attempt: int, delay: float,
                 error: BaseException, quiet: bool = False) -> None:
    # the first failure, the tenth, then every fiftieth: visible, never a flood
    loud = not quiet and (attempt in (1, 10) or attempt % 50 == 0)
    level = logging.WARNING if loud else logging.DEBUG
    log.log(level, "%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, error,
            extra={"event": "retry", "what": what})


def retry_forever(
    fn: Callable[[], T],
    *,
    what: str,
    errors: tuple[type[BaseException], ...],
    stop: threading.Event,
    log: logging.Logger,
    on_failure: Callable[[BaseException], None] | None = None,
    backoff: Backoff | None = None,
) -> T:
    """`fn()` until it returns; `errors` are retried with backoff until `stop` is set, when the
    last one is raised again (so callers see why they gave up). Other exceptions propagate."""
    policy = backoff or Backoff()
    while True:
        try:
            result = fn()
        except errors as exc:
            if stop.is_set():
                raise
            if on_failure is not None:
                on_failure(exc)
            delay = policy.next()
            _log_attempt(log, what, policy.attempts, delay, exc)
            if stop.wait(delay):
                raise
            continue
        policy.reset()
        return result


class GaveUp(Exception):
    """`retry_within` ran out of time; the message says how often it tried and the last error."""

    def __init__(self, what: str, attempts: int, seconds: float, last: BaseException) -> None:
        super().__init__(f"{what}: gave up after {attempts} attempt(s) over {seconds:.1f}s: "
                         f"{last}")
        self.last = last


def retry_within(
    fn: Callable[[], T],
    *,
    what: str,
    errors: tuple[type[BaseException], ...],
    timeout: float,
    log: logging.Logger,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    quiet: bool = True,
    backoff: Backoff | None = None,
) -> T:
    """`fn()`, with `errors` retried with backoff until `timeout` seconds have passed; then
    GaveUp (carrying the last error). A timeout of 0 tries once. `quiet`: the retries are
    logged at debug level only (a one-shot command prints one line: the last)."""
    started = clock()
    policy = backoff or Backoff()
    while True:
        try:
            return fn()
        except errors as exc:
            left = started + timeout - clock()
            delay = policy.next()
            if left <= 0:
                raise GaveUp(what, policy.attempts, clock() - started, exc) from None
            _log_attempt(log, what, policy.attempts, min(delay, left), exc, quiet)
            sleep(min(delay, left))


def poll_until(
    condition: Callable[[], T],
    timeout: float,
    *,
    interval: float = POLL_INTERVAL,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """The first truthy `condition()` within `timeout` (checked every `interval`), else its last
    value; returns early (with that value) once `stop` is set."""
    deadline = clock() + timeout
    waiter = stop or threading.Event()
    while True:
        value = condition()
        if value or clock() >= deadline or waiter.is_set():
            return value
        waiter.wait(min(interval, max(0.0, deadline - clock())))
