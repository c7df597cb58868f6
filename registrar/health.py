"""Whether a command's loops are alive, moving and not failing: one rule for /healthz.

Every long-running loop (the lease keeper, its heartbeat, the events consumer, a prefix
follower, the router) carries a `LoopHealth`: it notes progress, and counts unexpected errors
(a bug, not an outage: those are retried and are progress) in
`registrar_internal_errors_total{loop}`. `/healthz` answers 503 when a loop has stopped, has
not moved for STALL_LIMIT seconds, or failed FAILING_AFTER times in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from registrar.typing_shim import Protocol

STALL_LIMIT = 15.0
FAILING_AFTER = 3


class Loop(Protocol):
    name: str
    last_progress: float
    failures_in_row: int

    def alive(self) -> bool: ...


class LoopHealth:
    """Progress and unexpected errors of one loop (thread-safe enough: plain assignments)."""

    def __init__(self, name: str, alive: Callable[[], bool],
                 on_error: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._alive = alive
        self._on_error = on_error
        self.last_progress = time.monotonic()
        self.failures_in_row = 0

    def alive(self) -> bool:
        return self._alive()

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def succeeded(self) -> None:
        self.failures_in_row = 0
        self.progressed()

    def internal_error(self) -> None:
        self.failures_in_row += 1
        self.progressed()
        if self._on_error is not None:
            self._on_error(self.name)


def health_problem(loops: Iterable[Loop], now: float, limit: float = STALL_LIMIT) -> str | None:
    """None while every loop is alive, moving and not failing; else what is wrong."""
    for loop in loops:
        if not loop.alive():
            return f"{loop.name} stopped"
        if now - loop.last_progress > limit:
            return f"{loop.name} stalled for {now - loop.last_progress:.0f}s"
        if loop.failures_in_row >= FAILING_AFTER:
            return f"{loop.name} failed {loop.failures_in_row} times in a row (see the log)"
    return None
