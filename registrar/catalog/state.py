"""What the catalog holds in memory: the keys of both prefixes as the followers deliver them, and
the catalog built from them (by `core.catalog`) once per revision, with its JSON kept encoded.

The two followers call in from their threads, the HTTP handlers from theirs; one condition
guards it all, and wakes the blocking queries (`wait_past`) at every new revision. Building is
lazy: a burst of changes costs one build, at the next request. Router reports are looked at
(for the traffic share) as they arrive, on the clock given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from registrar.core.catalog import (
    Catalog,
    Entry,
    Look,
    build,
    encode_targets,
    entry,
    remember,
    reports_of,
)
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, StoredKey

STALE_WAIT = 1.0


@dataclass(frozen=True)
class View:
    """One answer's worth: the catalog, and how long etcd has been away (None: it answers)."""

    catalog: Catalog
    stale_seconds: float | None
    json: bytes  # /v1/catalog's body


class CatalogState:
    def __init__(self, layout: Layout, clock: Callable[[], float] = time.monotonic,
                 on_build: Callable[[float], None] = lambda seconds: None) -> None:
        """`on_build(seconds)`: told how long each build took (for a histogram)."""
        self._layout = layout
        self._on_build = on_build
        self._clock = clock
        self._cond = threading.Condition()
        self._instances: dict[str, Entry] = {}
        self._control: dict[str, str] = {}
        self._revision = 0
        # Bumped at every change: the cache's key. Not the revision: the two prefixes are read
        # apart, and both reads can answer at one revision with different keys.
        self._generation = 0
        self._loaded: set[str] = set()  # which of the two prefixes were read once
        self._history: tuple[Look, ...] = ()
        self._down_since: float | None = clock()  # stale until both are read
        self._built: tuple[int, Catalog] | None = None
        self._encoded: tuple[int, bytes] | None = None  # the last JSON while etcd answered
        self._closed = False
        self._flips = 0  # how often the catalog turned stale or fresh
        self._targets: dict[tuple[int, str | None, bool], bytes] = {}
        self.builds = 0

    # --- fed by the followers ----------------------------------------------------------

    def replace(self, which: str, stored: dict[str, StoredKey], revision: int) -> None:
        """A full read of `which` ("prefix" or "control") at `revision`."""
        with self._cond:
            self._drop(which)
            for key, item in stored.items():
                self._set(key, item.value)
            self._loaded.add(which)
            self._advance(revision, reports=which == "control")

    def apply(self, events: list[KeyEvent]) -> None:
        with self._cond:
            reports = False
            for event in events:
                self._set(event.key, event.value)
                reports = reports or event.key.startswith(self._layout.routers + "/")
            self._advance(max(e.revision for e in events), reports)

    def etcd_up(self, up: bool) -> None:
        """From the store's listener: etcd answers again, or stopped answering."""
        with self._cond:
            before = self._down_since
            if up and self._loaded == {"prefix", "control"}:
                self._down_since = None
            elif not up and self._down_since is None:
                self._down_since = self._clock()
            if (before is None) != (self._down_since is None):
                self._flips += 1  # a blocking query answers: the page must say "stale" now
            self._cond.notify_all()

    def _drop(self, which: str) -> None:
        prefix = self._layout.prefix + "/"
        if which == "prefix":
            self._instances = {k: e for k, e in self._instances.items()
                               if not k.startswith(prefix)}
        else:
            self._control.clear()
            self._instances = {k: e for k, e in self._instances.items() if k.startswith(prefix)}

    def _set(self, key: str, value: str | None) -> None:
        if value is None:
            self._instances.pop(key, None)
            self._control.pop(key, None)
            return
        parsed = entry(self._layout, key, value)
        if parsed is not None:
            self._instances[key] = parsed
        else:
            self._instances.pop(key, None)
        if not key.startswith(self._layout.prefix + "/") and not key.startswith(
                self._layout.standby + "/"):
            self._control[key] = value

    def _advance(self, revision: int, reports: bool) -> None:
        self._revision = max(self._revision, revision)
        self._generation += 1
        if reports:
            self._history = remember(self._history, self._clock(),
                                     reports_of(self._layout, self._control))
        if self._loaded == {"prefix", "control"} and self._down_since is not None:
            self._down_since = None  # a read or an event: etcd answers
            self._flips += 1
        self._cond.notify_all()

    # --- read by the server ------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def loaded(self) -> bool:
        return self._loaded == {"prefix", "control"}

    def stale_seconds(self) -> float | None:
        down = self._down_since
        return None if down is None else max(0.0, self._clock() - down)

    def wait_past(self, revision: int, timeout: float) -> None:
        """Blocks until the revision is past `revision`, the catalog turns stale or fresh, or
        `timeout` seconds; while it is stale, at most STALE_WAIT (its age goes up, and a
        client that began waiting after etcd went away must hear so without spinning)."""
        with self._cond:
            if self._down_since is not None:
                timeout = min(timeout, STALE_WAIT)
            deadline = self._clock() + timeout
            flips = self._flips
            while self._revision <= revision and not self._closed and self._flips == flips:
                left = deadline - self._clock()
                if left <= 0:
                    return
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        """Wakes every blocking query: the server is stopping."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def targets(self, service: str | None, metrics_only: bool) -> bytes:
        """`/v1/sd/prometheus`'s body, kept per revision (Prometheus asks every few seconds;
        at 10,000 instances one answer takes tens of milliseconds to make)."""
        view, generation = self._view()
        ask = (generation, service, metrics_only)
        with self._cond:
            cached = self._targets.get(ask)
        if cached is not None:
            return cached
        body = encode_targets(view.catalog, service, metrics_only)
        with self._cond:
            if any(key[0] != ask[0] for key in self._targets) or len(self._targets) > 64:
                self._targets.clear()
            self._targets[ask] = body
        return body

    def view(self) -> View:
        return self._view()[0]

    def _view(self) -> tuple[View, int]:
        """The view, and the generation it was built at."""
        with self._cond:
            built = self._built
            if built is None or built[0] != self._generation:
                started = time.perf_counter()
                catalog = build(self._layout, self._instances, self._control, self._revision,
                                self._history, self._clock())
                self._on_build(time.perf_counter() - started)
                self.builds += 1
                self._built = built = (self._generation, catalog)
            stale = self.stale_seconds()
            encoded = self._encoded
            if stale is None and encoded is not None and encoded[0] == built[0]:
                return View(built[1], None, encoded[1]), built[0]
        body = built[1].encode(stale)
        if stale is None:
            with self._cond:
                self._encoded = (built[0], body)
        return View(built[1], stale, body), built[0]
