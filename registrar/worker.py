"""The one shape of every long-lived thread: start, request_stop, join with a deadline, alive,
health. A worker's `run()` loops until `stopping`; `wake()` (a subclass's) makes a loop that
waits on something else notice the stop at once.

The thread starts with SIGTERM and SIGINT blocked (`shutdown.start_thread`): only the main
thread handles them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from registrar.health import LoopHealth
from registrar.shutdown import start_thread


class Worker:
    def __init__(self, name: str, on_internal_error: Callable[[str], None] | None = None,
                 target: Callable[[], None] | None = None) -> None:
        """`target`: what the thread runs, for a worker that is not a subclass (else `run`)."""
        self.name = name
        self._target = target
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.health = LoopHealth(name, self.alive, on_internal_error)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        start_thread(self._thread)

    def run(self) -> None:
        if self._target is None:
            raise NotImplementedError
        self._target()

    def wake(self) -> None:
        """Makes a waiting `run()` look at `stopping` now (a subclass's own wait)."""

    def request_stop(self) -> None:
        self._stopping.set()
        self.wake()

    def join(self, deadline: float) -> None:
        """Waits for the thread until `deadline` (time.monotonic())."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def stop(self, deadline: float) -> None:
        self.request_stop()
        self.join(deadline)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Sleeps `seconds` unless a stop is asked first; True when stopping."""
        return self._stopping.wait(seconds)
