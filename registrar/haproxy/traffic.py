"""Traffic by version, from HAProxy's per-server counters, kept cumulative (pure).

HAProxy counts per server slot, and a slot changes hands (the runtime API gives a freed slot
to the next instance) and its counters start again at 0 with every new worker (a reload, a
restart). So the router reads `show stat` now and then, and before a slot changes hands; each
time `Traffic.observe` takes the growth of each slot's counters since the last reading and
adds it to the service and version the slot served meanwhile. A counter lower than last time
means a new worker: all of it is new.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

# `show stat` counter -> the report's name (docs/routing.md: 2xx 3xx 4xx 5xx other tcp
# connection_errors)
HTTP_CODES = {"hrsp_2xx": "2xx", "hrsp_3xx": "3xx", "hrsp_4xx": "4xx", "hrsp_5xx": "5xx",
              "hrsp_1xx": "other", "hrsp_other": "other"}
CODES = ("2xx", "3xx", "4xx", "5xx", "other", "tcp")

Slot = tuple[str, str]  # (backend, server slot)
Owner = tuple[str, str]  # (service, version)


@dataclass
class Traffic:
    """Cumulative totals by service and version; `mode` "http" counts responses by class,
    "tcp" sessions (as code "tcp")."""

    mode: str
    responses: dict[Owner, dict[str, int]] = field(default_factory=dict)
    connection_errors: dict[Owner, int] = field(default_factory=dict)
    _last: dict[Slot, dict[str, int]] = field(default_factory=dict)
    _old_last: dict[int, dict[Slot, dict[str, int]]] = field(default_factory=dict)

    def observe(self, counters: Mapping[Slot, Mapping[str, int]],
                owners: Mapping[Slot, Owner], worker: int | None = None
                ) -> dict[Owner, dict[str, int]]:
        """Adds the growth since the last reading to whoever owned each slot meanwhile
        (`owners`, as it was until now); returns what was added. `worker`: the pid of a
        reload's old worker (its own readings; it still answers what it had open), None for
        the current one."""
        last = self._last if worker is None else self._old_last.setdefault(worker, {})
        added: dict[Owner, dict[str, int]] = {}
        for slot, now in counters.items():
            before = last.get(slot, {})
            grown = {name: value - before.get(name, 0) for name, value in now.items()}
            if any(v < 0 for v in grown.values()):  # a new worker: its counters start at 0
                grown = dict(now)
            last[slot] = dict(now)
            owner = owners.get(slot)
            if owner is None or not any(grown.values()):
                continue
            delta = self._add(owner, grown)
            if delta:
                into = added.setdefault(owner, {})
                for name, value in delta.items():
                    into[name] = into.get(name, 0) + value
        return added

    def new_worker(self) -> None:
        """A new worker runs (a reload, a restart): its counters start at 0."""
        self._last = {}

    def retire(self, worker: int) -> None:
        """The current worker (`worker`) is replaced by a reload: its readings go on under its
        pid (what it had open is answered, and counted, after the reload); the new one's start
        at 0."""
        self._old_last[worker] = self._last
        self._last = {}

    def forget(self, worker: int) -> None:
        """An old worker has gone."""
        self._old_last.pop(worker, None)

    def _add(self, owner: Owner, grown: Mapping[str, int]) -> dict[str, int]:
        delta: dict[str, int] = {}
        if self.mode == "http":
            for counter, code in HTTP_CODES.items():
                if grown.get(counter):
                    delta[code] = delta.get(code, 0) + grown[counter]
        elif grown.get("stot"):
            delta["tcp"] = grown["stot"]
        totals = self.responses.setdefault(owner, dict.fromkeys(CODES, 0))
        for code, value in delta.items():
            totals[code] += value
        errors = grown.get("econ", 0)
        if errors:
            self.connection_errors[owner] = self.connection_errors.get(owner, 0) + errors
            delta["connection_errors"] = errors
        return delta

    def report(self) -> dict[str, dict[str, dict[str, int]]]:
        """`services` of the router's report: {SERVICE: {VERSION: {code: N, ...}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for owner in sorted(set(self.responses) | set(self.connection_errors)):
            service, version = owner
            counts = dict(self.responses.get(owner, dict.fromkeys(CODES, 0)))
            counts["connection_errors"] = self.connection_errors.get(owner, 0)
            out.setdefault(service, {})[version] = counts
        return out


UNVERSIONED = "-"  # the version of a registration whose value says none


# --- what is still open on instances that left rotation ------------------------------------

Holder = tuple[str, str]  # (service, instance) a server slot routes (or last routed) to
InFlight = dict[str, dict[str, int]]  # service -> instance -> requests/sessions still open


def in_flight(current: Mapping[Slot, int], holders: Mapping[Slot, Holder],
              in_rotation: Mapping[str, Collection[str]]) -> InFlight:
    """The report's `in_flight` for one worker: its open sessions (`show stat` `scur`, by
    slot) on slots whose instance is no longer in rotation. `holders`: which instance each
    slot served in that worker (a slot set to maint keeps its last instance: HAProxy finishes
    what was open on it); `in_rotation`: service -> its instances in rotation. Only entries
    with N > 0."""
    out: InFlight = {}
    for slot, n in current.items():
        holder = holders.get(slot)
        if n <= 0 or holder is None or holder[1] in in_rotation.get(holder[0], ()):
            continue
        service, instance = holder
        by_instance = out.setdefault(service, {})
        by_instance[instance] = by_instance.get(instance, 0) + n
    return out


def merge_in_flight(parts: Iterable[InFlight]) -> InFlight:
    """Several workers' `in_flight` (the current one and a reload's old ones) summed."""
    out: InFlight = {}
    for part in parts:
        for service, by_instance in part.items():
            into = out.setdefault(service, {})
            for instance, n in by_instance.items():
                into[instance] = into.get(instance, 0) + n
    return out


def fell(before: InFlight, after: InFlight) -> bool:
    """True when an entry of `before` is gone from `after` (its requests were all answered):
    the moment a drain waits for, so the report is written at once."""
    return any(instance not in after.get(service, {})
               for service, by_instance in before.items() for instance in by_instance)
