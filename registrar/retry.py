"""The one retry policy: exponential backoff with jitter, interruptible by shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0


def _interruptible(stop: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def retrying(
    what: str,
    errors: tuple[type[BaseException], ...],
    stop: threading.Event,
    log: logging.Logger,
    on_failure: Callable[[BaseException], None] | None = None,
    max_backoff: float = MAX_BACKOFF,
) -> Retrying:
    """Retries `errors` forever until `stop` is set; sleeping wakes up at once on `stop`.

    When `stop` is set the last error is re-raised, so callers see why they gave up.
    """

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if error is not None and on_failure is not None:
            on_failure(error)
        level = logging.WARNING if state.attempt_number in (1, 10) or (
            state.attempt_number % 50 == 0
        ) else logging.DEBUG
        log.log(level, "%s failed (attempt %d), retrying in %.1fs: %s", what,
                state.attempt_number, state.upcoming_sleep, error,
                extra={"event": "retry", "what": what})

    return Retrying(
        retry=retry_if_exception_type(errors),
        # "Full jitter": a random wait up to min(max, 0.1 s * 2^attempt).
        wait=wait_random_exponential(multiplier=INITIAL_BACKOFF, max=max_backoff),
        stop=lambda _state: stop.is_set(),
        sleep=_interruptible(stop),
        before_sleep=before_sleep,
        reraise=True,
    )
