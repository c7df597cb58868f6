"""Draining one container: the entry, who holds it, and when the routers are done (pure).

`{control}/draining/{node}/{container}` = {"at": RFC3339} holds every instance of that container
out of rotation, the way maintenance does. The `drain` command writes it on a lease of its own;
the owner of the container's keys (agent or sidecar) takes it over: it puts it again under its
own lease with the run it holds (`container_id`, `started_at`), so the entry stands exactly
while the hold does, and a restarted owner that finds the entry knows whether the container it
sees is still that run (a new `start`, same name or not, ends the hold).

The routers' side: each live router's report (`{control}/routers/{node}`) says up to which
revision it serves every change under the prefix (`applied`) and what is still open on
instances that left rotation (`in_flight`). A drain is over when every router that reports
`applied` has applied the instances' removal and lists none of them in flight.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

from registrar.core.layout import child_name
from registrar.core.planner import json_object
from registrar.core.store import StoredKey
from registrar.typing_shim import NamedTuple

DRAIN_TTL = 60  # the command's own lease: an entry nobody takes over is gone within a minute


class Run(NamedTuple):
    """One run of a container: a restart (same id) or a new container (same name) is another."""

    name: str
    container_id: str
    started_at: str

    def same(self, other: Run) -> bool:
        return (self.container_id, self.started_at) == (other.container_id, other.started_at)


class Drain(NamedTuple):
    """One drain entry as stored; `run` is None until an owner took it over."""

    at: str
    run: Run | None
    stored: StoredKey

    def holds(self, run: Run) -> bool:
        """Whether this entry holds `run` out: a fresh entry holds whatever runs now."""
        return self.run is None or self.run.same(run)


def parse_drain(container: str, stored: StoredKey) -> Drain:
    value = json_object(stored.value) or {}
    cid, started = value.get("container_id"), value.get("started_at")
    run = None
    if isinstance(cid, str) and cid and isinstance(started, str) and started:
        run = Run(container, cid, started)
    return Drain(str(value.get("at", "?")), run, stored)


def entry_value(at: str, run: Run | None = None) -> str:
    """The entry's value: {"at": ...} as `registrar drain` writes it (README, "Draining"),
    plus the run once an owner holds it."""
    value: dict[str, str] = {"at": at}
    if run is not None:
        value.update(container_id=run.container_id, started_at=run.started_at)
    return json.dumps(value, sort_keys=True)


class Holding(NamedTuple):
    """What an owner does with the drain entries of its containers."""

    held: frozenset[tuple[str, str]]  # (node, container) whose instances stay out
    entries: Mapping[str, str] = {}  # drain key -> value to hold


def hold(
    drains: Mapping[tuple[str, str], Drain],
    runs: Mapping[str, Run],
    owns: Callable[[str, str], bool],
    key_of: Callable[[str, str], str],
) -> Holding:
    """The entries an owner keeps (under its lease, with the run) and the containers they hold
    out. `runs`: container name -> the run of each of its containers running now (not
    stopping). An entry of one of its containers that is not running, or whose run has ended,
    is not kept (the owner deletes it)."""
    held, entries = set(), {}
    for (node, container), drain in drains.items():
        run = runs.get(container)
        if not owns(node, container) or run is None or not drain.holds(run):
            continue
        held.add((node, container))
        entries[key_of(node, container)] = entry_value(drain.at, run)
    return Holding(frozenset(held), entries)


# --- the routers --------------------------------------------------------------------------


class Report(NamedTuple):
    """What a router's report says of its progress (None: an older release that does not)."""

    node: str
    applied: int | None
    in_flight: Mapping[str, Mapping[str, int]] = {}


def parse_report(node: str, raw: str) -> Report:
    value = json_object(raw) or {}
    applied = value.get("applied")
    if isinstance(applied, str) and applied.isdigit():
        applied = int(applied)  # etcd's JSON gives revisions as strings: accept both
    if not isinstance(applied, int) or isinstance(applied, bool):
        applied = None
    in_flight: dict[str, dict[str, int]] = {}
    flights = value.get("in_flight")
    for service, instances in (flights.items() if isinstance(flights, dict) else ()):
        if not isinstance(instances, dict):
            continue
        counts = {str(i): n for i, n in instances.items()
                  if isinstance(n, int) and not isinstance(n, bool) and n > 0}
        if counts:
            in_flight[str(service)] = counts
    return Report(node, applied, in_flight)


def reports(stored: Mapping[str, StoredKey], routers_base: str) -> list[Report]:
    """Every live router's report (the keys under `{control}/routers/`, each on its lease)."""
    found = []
    for key, item in sorted(stored.items()):
        node = child_name(routers_base, key)
        if node is not None:
            found.append(parse_report(node, item.value))
    return found


def in_flight_on(report: Report, instances: Iterable[tuple[str, str]]) -> int:
    return sum(report.in_flight.get(service, {}).get(instance, 0)
               for service, instance in instances)


def waiting_for(report: Report, revision: int | None, instances: Iterable[tuple[str, str]]
                ) -> str | None:
    """Why a drain still waits for this router (None: it is done, or it cannot say).
    `revision`: the one at which the last of `instances` left the prefix (None: none left it
    now, as on a stop where all were already held out: only what is in flight counts)."""
    if report.applied is None:
        return None
    if revision is not None and report.applied < revision:
        return f"applied {report.applied} < {revision}"
    busy = in_flight_on(report, instances)
    if busy:
        return f"{busy} in flight"
    return None


def still_waiting(found: Iterable[Report], revision: int | None,
                  instances: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Router node -> why the drain waits for it, for every router not done yet."""
    pairs = list(instances)
    return {r.node: why for r in found if (why := waiting_for(r, revision, pairs)) is not None}


def unversioned(found: Iterable[Report]) -> list[str]:
    """The routers whose report has no `applied` (older releases): not waited for."""
    return sorted(r.node for r in found if r.applied is None)
