"""Waiting on the routers: until every live router has applied a removal and has nothing in
flight on the instances removed (the decision is core.drain's; this is the loop around it).

Used by `registrar drain`, `registrar maint enable` and the agents' SIGTERM drain. The revision
to wait for is the one at which the last instance left `{prefix}/`, read from a watch of the
prefix replayed from a revision before the removal: a later read's header revision would count
writes under the control prefix too (the routers' own reports), which a router following only
`{prefix}/` never sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from registrar.core.drain import Report, reports, still_waiting, unversioned
from registrar.core.layout import Layout
from registrar.core.store import Store
from registrar.retry import poll_until

POLL = 0.05  # between two reads of the reports: small beside a router's 0.5 s to report


def removal_revision(store: Store, prefix: str, keys: Collection[str], after: int,
                     deadline: float) -> int | None:
    """The revision at which the last of `keys` was deleted under `prefix/`, from a watch
    replayed from `after` + 1 (None when not all were seen deleted by `deadline`, or none was
    asked for)."""
    if not keys:
        return None
    left, last = set(keys), 0
    watch = store.watch_prefix(prefix, after + 1)
    try:
        while left and time.monotonic() < deadline:
            for event in watch.get(min(0.2, max(0.0, deadline - time.monotonic()))):
                if event.key in left and event.value is None:
                    left.discard(event.key)
                    last = max(last, event.revision)
    finally:
        watch.cancel()
    return None if left else last


@dataclass
class Waited:
    """How a wait on the routers ended."""

    done: bool  # every router that reports `applied` is done (and at least one does)
    seconds: float
    waiting: dict[str, str] = field(default_factory=dict)  # router -> why, when not done
    unversioned: list[str] = field(default_factory=list)  # reports without `applied`
    routers: list[str] = field(default_factory=list)  # every live router seen last


def read_reports(store: Store, layout: Layout) -> list[Report]:
    stored, _revision = store.list_prefix(layout.routers)
    return reports(stored, layout.routers)


def wait_for_routers(
    read: Callable[[], list[Report]],
    revision: int | None,
    instances: Collection[tuple[str, str]],
    deadline: float,
    stopped: Callable[[], bool] = lambda: False,
    vacuous: bool = False,
) -> Waited:
    """Reads the reports (`read`) until every router that says what it applied is done with
    `instances` (removed at `revision`), or `deadline` (time.monotonic()) passed, or `stopped`.
    With no router saying what it applied, nothing confirms the removal: `done` only when
    `vacuous` (the commands: no router, nothing to wait for; an agent's drain waits instead)."""
    started = time.monotonic()
    last: list[Waited] = []

    def look() -> bool:
        found = read()
        waiting = still_waiting(found, revision, instances)
        versioned = any(r.applied is not None for r in found)
        last[:] = [Waited((versioned or vacuous) and not waiting, time.monotonic() - started,
                          waiting, unversioned(found), [r.node for r in found])]
        return last[0].done or stopped()

    poll_until(look, max(0.0, deadline - started), interval=POLL)
    return last[0]
