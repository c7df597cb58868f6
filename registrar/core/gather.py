"""When a gathered step is due: QUIET after the last change that asks for it, or MAX_DELAY
after the first, whichever comes first (plain data, a clock given). The router gathers its
reloads and its config-file installs so."""

from __future__ import annotations


class Gather:
    __slots__ = ("first", "last", "max_delay", "quiet")

    def __init__(self, quiet: float, max_delay: float) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self.first: float | None = None  # the first change not yet taken
        self.last = 0.0

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def clear(self) -> None:
        self.first = None

    def due_at(self) -> float | None:
        if self.first is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)
