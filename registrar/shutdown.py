"""SIGTERM and SIGINT: how a stop reaches the main thread, wherever the signal lands.

CPython runs a Python signal handler only in the main thread, and only when that thread runs
bytecode. The kernel may deliver a process-directed signal to any thread that does not block
it (it skips a main thread that already has a signal pending), and then nothing interrupts
the main thread's wait on a lock: an agent waiting on `stop.wait()` with no timeout slept
through SIGTERM (it happened once in CI). So, both ways at once:
- every worker thread starts with SIGTERM and SIGINT blocked (`start_thread`), which
  leaves the main thread the only one the kernel can hand them to;
- the main thread never waits without a timeout: `wait_for_stop` wakes every WAKE_EVERY
  seconds, and each wake-up runs any handler that is due.

The handler itself only records the signal and sets the Event: it runs between two bytecodes
of the main thread, wherever that is, so it must not log (logging takes locks and writes to a
buffered stream the main thread may be in the middle of). The main thread says which signal
came once it is woken, with the function `install_stop_signals` returns.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
WAKE_EVERY = 0.2  # the main thread's longest sleep: how late a handler can run at worst


def install_stop_signals(stop: threading.Event) -> Callable[[], None]:
    received: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    def announce() -> None:
        if received:
            log.info("received %s: shutting down", received[0], extra={"event": "signal"})

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return announce


def wait_for_stop(stop: threading.Event, timeout: float | None = None) -> bool:
    """Waits until `stop` is set (True) or `timeout` passed (False), in slices, so that the
    main thread runs a pending signal handler within WAKE_EVERY whichever thread the kernel
    gave the signal to."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop.is_set():
        left = WAKE_EVERY if deadline is None else min(WAKE_EVERY, deadline - time.monotonic())
        if left <= 0:
            return False
        stop.wait(left)
    return True


def start_thread(thread: threading.Thread) -> None:
    """Starts a worker thread with SIGTERM and SIGINT blocked in it (a new thread inherits the
    mask of the thread that starts it, and so do the threads it starts in turn): the kernel
    then hands them to the main thread, which handles them."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


# --- the agent's shutdown budget: one owner ------------------------------------------------

SHUTDOWN_BUDGET = 5.0  # from the signal to the lease revoked (or given up on)
LAST_REQUEST_RESERVE = 2.0  # of the time left, kept for the last request (the lease's revoke)


class StopReason(enum.Enum):
    """Why an agent or a sidecar stops: the two end differently (only a signal drains)."""

    SIGNAL = "signal"  # SIGTERM or SIGINT
    CONTAINER_GONE = "container gone"  # a sidecar's container stopped, died or was removed


def stop_threads_by(deadline: float, now: float) -> float:
    """When the threads must have stopped (a step in flight may take its request's timeout)
    for the last request to keep its reserve before `deadline`."""
    return deadline - min(LAST_REQUEST_RESERVE, (deadline - now) / 2)
