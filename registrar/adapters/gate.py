"""`promote --canary --gate URL`: one POST of a step's figures to an outside system, which lets
the canary go on (any 2xx within 10 s) or not (any other answer, a redirect included, or none).

The POST runs on a thread of its own and the caller waits in slices, so a signal to the
command is acted on at once, not after the gate's 10 s.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GATE_TIMEOUT = 10.0  # --gate: a gate that has not answered by then has refused (README, Canary)
SLICE = 0.2
INTERRUPTED = "interrupted"  # what ask_gate returns when the command was told to stop


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: it is not followed (urllib would turn the POST
    into a GET and judge the canary by whatever answered that)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class _Answer:
    status: int | None = None
    error: str | None = None


def _post(url: str, body: bytes, answer: _Answer) -> None:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(request, timeout=GATE_TIMEOUT) as response:
            answer.status = response.status
    except urllib.error.HTTPError as exc:
        answer.status = exc.code
    except (OSError, ValueError) as exc:  # refused, reset, timed out, a bad URL
        answer.error = str(getattr(exc, "reason", exc)) or type(exc).__name__


def ask_gate(url: str, payload: dict[str, object], stopped: Callable[[float], bool],
             timeout: float = GATE_TIMEOUT) -> str | None:
    """POSTs `payload` to the gate: None when it answered 2xx in time, else why not (a phrase
    naming the gate). `stopped(seconds)` waits at most that long and says whether the command
    was told to stop meanwhile; then this returns INTERRUPTED at once."""
    answer = _Answer()
    body = json.dumps(payload).encode()
    thread = threading.Thread(target=_post, args=(url, body, answer), name="gate", daemon=True)
    deadline = time.monotonic() + timeout
    thread.start()
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            return f"gate {url} did not answer within {timeout:g}s"
        if stopped(min(SLICE, left)):
            return INTERRUPTED
    if answer.status is not None:
        if 200 <= answer.status < 300:
            return None
        return f"gate {url} answered HTTP {answer.status}"
    return f"gate {url} could not be reached: {answer.error}"
