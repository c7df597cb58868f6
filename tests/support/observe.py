"""Watching etcd keys and Docker events from a test or the bench, with the time each arrived.

Every time is the wall clock of this host (Docker's `timeNano` is the same clock), in seconds
since the epoch.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registrar.adapters import http1
from tests.support.etcd_reader import parse_url


@dataclass(frozen=True)
class KeyEvent:
    at: float  # when the watch delivered it here
    kind: str  # "put" or "delete"
    key: str
    revision: int


class KeyLog:
    """Every PUT and DELETE under `prefix`, in the order an etcd watch delivers them."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = parse_url(url)
        self.prefix = prefix
        self._cond = threading.Condition()
        self.events: list[KeyEvent] = []
        self.first_put: dict[str, float] = {}
        self.deleted: dict[str, float] = {}  # key -> last delete
        self.live: set[str] = set()
        self.errors: list[str] = []
        start = prefix.encode()
        request = {"create_request": {
            "key": base64.b64encode(start).decode(),
            "range_end": base64.b64encode(start[:-1] + bytes([start[-1] + 1])).decode(),
        }}
        # etcd's JSON gateway: one connection, one JSON object a line; closed to cancel.
        self._stream = http1.open_stream(
            http1.Address(host=host, port=port), "POST", "/v3/watch", timeout=5.0,
            body=json.dumps(request).encode(), headers={"Content-Type": "application/json"})
        created = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(created,), name="keylog",
                                        daemon=True)
        self._thread.start()
        created.wait(5.0)  # events from now on, as the watch starts at the current revision

    def _read(self, created: threading.Event) -> None:
        try:
            for line in self._stream.lines():
                message = json.loads(line)
                created.set()
                self._on_response(message)
        except (OSError, ValueError) as exc:
            with self._cond:
                self.errors.append(repr(exc))
                self._cond.notify_all()
        finally:
            created.set()

    def _on_response(self, message: dict[str, Any]) -> None:
        at = time.time()
        result = message.get("result")
        if not isinstance(result, dict) or result.get("canceled"):
            with self._cond:
                self.errors.append(repr(message))
                self._cond.notify_all()
            return
        with self._cond:
            for event in result.get("events") or ():
                kv = event.get("kv", {})
                key = base64.b64decode(kv.get("key") or "").decode()
                kind = "delete" if event.get("type") == "DELETE" else "put"
                self.events.append(KeyEvent(at, kind, key, int(kv.get("mod_revision") or 0)))
                if kind == "put":
                    self.first_put.setdefault(key, at)
                    self.live.add(key)
                else:
                    self.deleted[key] = at
                    self.live.discard(key)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[KeyLog], bool], timeout: float) -> bool:
        """Waits until `predicate(self)` holds (checked under the lock, after each response)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def live_matching(self, tag: str) -> set[str]:
        with self._cond:
            return {key for key in self.live if tag in key}

    def since(self, start: float) -> list[KeyEvent]:
        with self._cond:
            return [e for e in self.events if e.at >= start]

    def close(self) -> None:
        self._stream.close()
        self._thread.join(5.0)


class DockerEvents:
    """Container events from the engine's stream: per container name, the first time of each
    action (`kill` events only with a signal that ends the process); and every event, counted,
    with how many arrived stamped earlier than one delivered before them."""

    ENDING = frozenset({"2", "3", "9", "15"})

    def __init__(self, base_url: str | None = None) -> None:
        from registrar.adapters.docker_source import DockerSource

        # registrar's own client (no SDK in the project); "" is the default socket
        self._api = DockerSource(base_url or "", timeout=30)
        self._stream = self._api.open_events(None)
        self._cond = threading.Condition()
        self.times: dict[str, dict[str, float]] = {}
        self.total = 0  # every container event delivered
        self.out_of_order = 0  # ... stamped earlier than one delivered before it
        self._newest = 0
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from registrar.core.source import DockerUnavailable

        with contextlib.suppress(DockerUnavailable):  # a bad line: the end, as a dropped stream
            for event in self._stream:
                action = str(event.get("Action") or "")
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                name = str(attributes.get("name") or "")
                nano = int(event.get("timeNano") or 0)
                with self._cond:
                    self.total += 1
                    self.out_of_order += nano < self._newest
                    self._newest = max(self._newest, nano)
                    self._cond.notify_all()
                if action == "kill" and str(attributes.get("signal")) not in self.ENDING:
                    continue
                at = int(event.get("timeNano") or 0) / 1e9 or time.time()
                with self._cond:
                    self.times.setdefault(name, {}).setdefault(action, at)
                    self._cond.notify_all()

    def time_of(self, name: str, action: str, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while action not in self.times.get(name, {}):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.times[name][action]

    def close(self) -> None:
        self._api.close()  # ends the stream too


