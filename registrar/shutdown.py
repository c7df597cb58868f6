"""SIGTERM and SIGINT set an Event that the main thread waits on (signals reach only it).

The handler itself only records the signal and sets the Event: it runs between two bytecodes
of the main thread, wherever that is, so it must not log (logging takes locks and writes to a
buffered stream the main thread may be in the middle of). The main thread says which signal
came once it is woken, with the function `install_stop_signals` returns.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def install_stop_signals(stop: threading.Event) -> Callable[[], None]:
    received: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    def announce() -> None:
        if received:
            log.info("received %s: shutting down", received[0], extra={"event": "signal"})

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return announce
