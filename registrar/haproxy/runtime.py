"""A running HAProxy as data, and how to change it without a reload. Pure.

- `Live`: the server slots of each backend and what each one serves (address, weight).
- `plan_runtime`: the runtime-API commands that turn `Live` into new backends (server slots:
  `set server ... addr / state / weight`), or None when that needs a reload.
- `decide`: given what HAProxy runs and what is wanted: nothing, a runtime update (applied at
  once), or a reload (gathered).
- The parsers of what HAProxy says: `show servers state` (to check a plan, and to learn the
  slots again after a reload someone else made), `show proc` (the master's reloads and its
  workers) and `show stat` (per-server counters: the traffic by version).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from registrar.core.names import host_port
from registrar.haproxy.config import SPARE_PREFIX, Backend, Server, ip_of

Model = dict[str, frozenset[tuple[str, str, int, int]]]  # service -> (instance, host, port, w)


@dataclass(frozen=True)
class LiveBackend:
    """The server slots a running HAProxy has in one backend, and what each one serves.

    `slots` maps a server name to the server it routes to (None: in maintenance, free).
    `free` lists the free slots in the order they are to be reused: never-used spares first,
    then the slots freed longest ago (an instance that just left may still be draining).
    """

    backend: str
    slots: Mapping[str, Server | None]
    free: tuple[str, ...]
    routing: tuple[object, ...] = ()  # Backend.routing as loaded: a change needs a reload

    def model(self) -> frozenset[tuple[str, str, int, int]]:
        return frozenset(
            (s.instance, s.host, s.port, s.weight) for s in self.slots.values() if s is not None
        )


Live = Mapping[str, LiveBackend]  # service -> its live backend


def fresh_layout(backends: Sequence[Backend]) -> dict[str, LiveBackend]:
    """The slots a config rendered from `backends` by the built-in template starts with."""
    layout = {}
    for b in backends:
        slots: dict[str, Server | None] = {s.name: s for s in b.servers}
        spares = [f"{SPARE_PREFIX}{i}" for i in range(1, b.spares + 1)]
        slots.update(dict.fromkeys(spares))
        layout[b.service] = LiveBackend(b.backend, slots, tuple(spares), b.routing)
    return layout


def model_of(backends: Sequence[Backend]) -> Model:
    return {b.service: frozenset((s.instance, s.host, s.port, s.weight) for s in b.servers)
            for b in backends}


def live_model(live: Live) -> Model:
    return {service: lb.model() for service, lb in live.items()}


@dataclass(frozen=True)
class SlotState:
    """What `show servers state` must say about a slot after the commands ran."""

    backend: str
    slot: str
    server: Server | None  # None: in maintenance


@dataclass(frozen=True)
class RuntimePlan:
    commands: tuple[str, ...]  # runtime API commands, in order (adds first, then removals)
    expect: tuple[SlotState, ...]
    live: dict[str, LiveBackend]  # the slots once the commands ran

    @property
    def empty(self) -> bool:
        return not self.commands

    def touched(self) -> set[tuple[str, str]]:
        """(backend, slot) of every slot the plan changes."""
        return {(e.backend, e.slot) for e in self.expect}


def _plan_backend(current: LiveBackend, wanted: Backend
                  ) -> tuple[list[str], list[str], list[SlotState], LiveBackend] | None:
    if current.routing != wanted.routing:
        return None  # a canary's --header or --sticky came or went: a reload
    slots = dict(current.slots)
    free = list(current.free)
    where = {s.instance: name for name, s in slots.items() if s is not None}
    servers = {s.instance: s for s in wanted.servers}
    be = current.backend
    adds: list[str] = []
    removals: list[str] = []
    expect: list[SlotState] = []
    freed: list[str] = []
    for instance, name in sorted(where.items()):
        if instance not in servers:
            removals.append(f"set server {be}/{name} state maint")
            expect.append(SlotState(be, name, None))
            slots[name] = None
            freed.append(name)
    for instance, server in sorted(servers.items()):
        held = where.get(instance)
        if held is None:
            if not free:
                return None
            held = free.pop(0)
            adds.append(f"set server {be}/{held} addr {server.host} port {server.port}")
            adds.append(f"set server {be}/{held} weight {server.weight}")
            adds.append(f"set server {be}/{held} state ready")
        else:
            old = slots[held]
            assert old is not None
            if (old.host, old.port) != (server.host, server.port):
                adds.append(f"set server {be}/{held} addr {server.host} port {server.port}")
            if old.weight != server.weight:
                adds.append(f"set server {be}/{held} weight {server.weight}")
            if (old.host, old.port, old.weight) == (server.host, server.port, server.weight):
                slots[held] = server  # the same slot and state (a new version label at most)
                continue
        expect.append(SlotState(be, held, server))
        slots[held] = server
    return adds, removals, expect, LiveBackend(be, slots, tuple(free + freed), current.routing)


def plan_runtime(live: Live, backends: Sequence[Backend],
                 changed: Collection[str] | None = None) -> RuntimePlan | None:
    """Commands that turn `live` into `backends` without a reload; None when a reload is needed
    (a backend added or removed, or not enough free slots). `changed`: the only services
    whose backend may differ from what `live` serves (None: any)."""
    if len(live) != len(backends) or any(b.service not in live for b in backends):
        return None
    adds: list[str] = []
    removals: list[str] = []
    expect: list[SlotState] = []
    new_live: dict[str, LiveBackend] = dict(live)
    for b in backends:
        if changed is not None and b.service not in changed:
            continue
        planned = _plan_backend(live[b.service], b)
        if planned is None:
            return None
        more_adds, more_removals, more_expect, new_live[b.service] = planned
        adds += more_adds
        removals += more_removals
        expect += more_expect
    return RuntimePlan(tuple(adds + removals), tuple(expect), new_live)


# --- deciding ----------------------------------------------------------------------------


class Action(enum.Enum):
    NOTHING = "nothing"  # HAProxy serves what is wanted (the file may still need writing)
    RUNTIME = "runtime"  # a runtime-API update, applied at once
    RELOAD = "reload"  # a new config and a reload (or --reload-cmd), gathered
    INSTALL = "install"  # HAProxy is not running: write the file, it starts on it


@dataclass(frozen=True)
class Decision:
    action: Action
    plan: RuntimePlan | None = None


def decide(
    backends: Sequence[Backend],
    text: Callable[[], str],
    *,
    running: bool,
    runtime_api: bool,
    live: Live | None,
    running_text: str | None,
    changed: Collection[str] | None = None,
) -> Decision:
    """What to do to make HAProxy serve `backends` (rendered by `text()`, called only when the
    runtime API cannot say). `runtime_api`: the built-in template with its spare slots, driven
    through the master CLI; `live`: its slots (None: unknown); `running_text`: the config it
    runs (None: unknown); `changed`: the services whose backends may differ from `live`."""
    if not running:
        return Decision(Action.INSTALL)
    if runtime_api and live is not None:
        plan = plan_runtime(live, backends, changed)
        if plan is not None:
            return Decision(Action.NOTHING if plan.empty else Action.RUNTIME, plan)
        return Decision(Action.RELOAD)
    return Decision(Action.NOTHING if running_text == text() else Action.RELOAD)


# --- what HAProxy says --------------------------------------------------------------------


@dataclass(frozen=True)
class SlotInfo:
    """One line of `show servers state`."""

    backend: str
    slot: str
    host: str | None  # normalised, None when not an IP
    port: int
    in_maintenance: bool
    weight: int
    up: bool


def parse_servers_state(text: str) -> list[SlotInfo]:
    """`show servers state`: be_id be_name srv_id srv_name srv_addr srv_op_state
    srv_admin_state srv_uweight srv_iweight ... srv_port (field 18)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 19 or line.startswith("#") or not fields[0].isdigit():
            continue
        try:
            found.append(SlotInfo(fields[1], fields[3], ip_of(fields[4]), int(fields[18]),
                                  bool(int(fields[6]) & 0x01), int(fields[7]),
                                  fields[5] == "2"))
        except ValueError:
            continue
    return found


def check_slots(state_lines: str, expect: Iterable[SlotState]) -> list[str]:
    """Mismatches between `show servers state` output and what the plan expects ([] if none)."""
    seen = {(i.backend, i.slot): i for i in parse_servers_state(state_lines)}
    problems = []
    for want in expect:
        got = seen.get((want.backend, want.slot))
        name = f"{want.backend}/{want.slot}"
        if got is None:
            problems.append(f"{name}: no such server")
        elif want.server is None:
            if not got.in_maintenance:
                problems.append(f"{name}: not in maintenance")
        else:
            if got.in_maintenance:
                problems.append(f"{name}: still in maintenance")
            if got.host != want.server.host or got.port != want.server.port:
                problems.append(f"{name}: at {host_port(got.host or '', got.port)}, "
                                f"not {want.server.address}")
            if got.weight != want.server.weight:
                problems.append(f"{name}: weight {got.weight}, not {want.server.weight}")
    return problems


def live_from_state(state: Iterable[SlotInfo], backends: Sequence[Backend]
                    ) -> dict[str, LiveBackend]:
    """The slots as HAProxy has them now (after a reload someone else made, say), matched to
    the wanted servers by address: a slot serving an address nobody wants holds a stranger,
    which the next plan takes out of rotation."""
    by_backend: dict[str, list[SlotInfo]] = {}
    for info in state:
        by_backend.setdefault(info.backend, []).append(info)
    live = {}
    for b in backends:
        wanted = {(s.host, s.port): s for s in b.servers}
        slots: dict[str, Server | None] = {}
        free: list[str] = []
        for info in by_backend.get(b.backend, []):
            if info.in_maintenance:
                slots[info.slot] = None
                free.append(info.slot)
                continue
            known = wanted.get((info.host or "", info.port))
            slots[info.slot] = Server(info.slot, info.host or "?", info.port,
                                      known.instance if known else f"?{info.slot}",
                                      known.version if known else None, info.weight)
        # never-used spares first, then the rest (those freed longest ago are unknown here)
        free.sort(key=lambda name: (not name.startswith(SPARE_PREFIX), name))
        live[b.service] = LiveBackend(b.backend, slots, tuple(free), b.routing)
    return live


@dataclass(frozen=True)
class ProcInfo:
    reloads: int
    failed: int
    workers: tuple[int, ...]
    old_workers: tuple[int, ...] = ()  # a reload's former workers, finishing their connections


_MASTER_LINE = re.compile(r"^(\d+)\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", re.MULTILINE)


def parse_show_proc(text: str) -> ProcInfo | None:
    """The master's reload counters and current workers from `show proc` (None: unreadable)."""
    match = _MASTER_LINE.search(text)
    if match is None:
        return None
    workers = []
    old = []
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit() or fields[1] != "worker":
            continue
        if section.startswith("# workers"):
            workers.append(int(fields[0]))
        elif section.startswith("# old workers"):
            old.append(int(fields[0]))
    return ProcInfo(int(match.group(2)), int(match.group(3)), tuple(workers), tuple(old))


OPEN_SESSIONS = ("scur",)  # open sessions now: a gauge, kept apart from the growing counters
COUNTERS = ("stot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other",
            "econ")


def parse_stat(text: str, names: Sequence[str] = COUNTERS, *, skip_idle: bool = False
               ) -> dict[tuple[str, str], dict[str, int]]:
    """`show stat` (CSV): the counters `names` of every server, by (backend, server);
    `skip_idle`: without the servers whose counters are all 0 (the empty slots of a thousand
    backends: a reading of them adds nothing)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    index = {name: i for i, name in enumerate(header)}
    if "pxname" not in index or "svname" not in index or any(c not in index for c in names):
        return {}
    px, sv = index["pxname"], index["svname"]
    wanted = [index[name] for name in names]
    # only the fields up to the last one read are split (a line has ~150)
    last = max(px, sv, *wanted) + 1
    out = {}
    for line in lines[1:]:
        fields = line.split(",", last)
        if len(fields) < last or fields[sv] in ("FRONTEND", "BACKEND"):
            continue
        raw = [fields[i] for i in wanted]
        if skip_idle and all(value in ("0", "") for value in raw):
            continue
        out[(fields[px], fields[sv])] = {
            name: int(value) if value.isdigit() else 0 for name, value in zip(names, raw,
                                                                              strict=True)}
    return out


def parse_dropped_logs(text: str) -> int | None:
    """`show info`'s DroppedLogs: log lines the worker could not send (None: not there)."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "DroppedLogs" and value.strip().isdigit():
            return int(value.strip())
    return None
