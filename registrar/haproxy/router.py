"""The router's loop: registrations and canary weights in, HAProxy in step.

- `Registrations`: what was read of `{prefix}/` and `{control_prefix}/weights/` (kept by two
  `PrefixFollower` threads), with a change counter the loop waits on.
- Reloads are gathered (`core.gather`: changes within QUIET of each other go together, none
  waits longer than MAX_DELAY); runtime-API changes are not: they are applied at once.
- `Router`: renders, asks `runtime.decide` what to do and does it: the runtime API (then the
  file follows, checked), or a checked install and a reload (SIGUSR2 to the master we run, or
  --reload-cmd). Every second it also reads the master's `show proc` (a reload someone else
  made: the servers are read again from HAProxy and put right) and `show stat` (the traffic by
  version), and restarts a dead HAProxy with backoff.
- For the report, what it has done: `applied` (the etcd revision HAProxy serves everything up
  to) and `in_flight` (what is still open on instances that left rotation, in the current
  worker and a reload's old ones, each slot mapped to the instance it served in that worker);
  and, for the access log reader, which service and version each slot serves per worker.
"""

from __future__ import annotations

import enum
import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from registrar.core.control import Canary, parse_canaries
from registrar.core.gather import Gather
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, StoredKey
from registrar.exposition import Counter, Gauge, Registry
from registrar.haproxy.config import (
    Backend,
    BackendCache,
    Rejected,
    RenderContext,
    Routed,
    TemplateError,
    load_template,
    parse_registration,
    render,
)
from registrar.haproxy.latency import Latency
from registrar.haproxy.process import (
    ConfigRejected,
    HAProxyError,
    HAProxyMaster,
    check_config,
    install_config,
)
from registrar.haproxy.runtime import (
    COUNTERS,
    OPEN_SESSIONS,
    Action,
    Live,
    Model,
    RuntimePlan,
    check_slots,
    decide,
    fresh_layout,
    live_from_state,
    live_model,
    model_of,
    parse_dropped_logs,
    parse_servers_state,
    parse_stat,
    plan_runtime,
)
from registrar.haproxy.traffic import (
    UNVERSIONED,
    Holder,
    InFlight,
    Owner,
    Slot,
    Traffic,
    fell,
    in_flight,
    merge_in_flight,
)
from registrar.retry import RetryClock
from registrar.settings import HAProxySettings
from registrar.worker import Worker

log = logging.getLogger(__name__)

QUIET = 0.1  # changes that need a reload, this close together, are applied together ...
MAX_DELAY = 1.0  # ... and none later than this after it arrived
FILE_QUIET = 0.5  # the file of runtime-API changes: written once they are this quiet ...
FILE_MAX_DELAY = 2.0  # ... and at most this long after the first
FEW_BACKENDS = 20  # a change touching at most these is checked and counted backend by backend
POLL_EVERY = 1.0  # show proc (reloads from outside) and show stat (traffic) ...
POLL_SHARE = 0.05  # ... or less often, so that reading every backend takes at most this share
POLL_MAX = 10.0  # ... of the time (14,000 servers: ~3.5 MB, 80 ms), but at least this often
POLL_IN_FLIGHT = 0.2  # the backends with requests open on instances that left rotation: this often
RELOAD_CMD_TIMEOUT = 60.0


class RoutingMetrics:
    """The metrics of `registrar haproxy`, on the agent's registry (next to etcd_up, build_info)."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.reloads = Counter(
            "registrar_haproxy_reloads_total",
            "HAProxy reloads: SIGUSR2 to the master and --reload-cmd runs (not runtime-API "
            "updates, not the first start).", registry=r,
        )
        self.reload_failures = Counter(
            "registrar_haproxy_reload_failures_total",
            "Configs not applied: template errors, configs refused by haproxy -c, failed "
            "reloads or --reload-cmd runs.", registry=r,
        )
        self.backend_servers = Gauge(
            "registrar_haproxy_backend_servers", "Servers in rotation per backend.", ["service"],
            registry=r,
        )
        self.runtime_updates = Counter(
            "registrar_haproxy_runtime_updates_total",
            "Server changes applied through HAProxy's runtime API, without a reload.", registry=r,
        )
        self.invalid = Counter(
            "registrar_haproxy_invalid_registrations_total",
            "Keys skipped: a value that is not JSON, lacks host or port, ...", ["reason"],
            registry=r,
        )
        self.restarts = Counter(
            "registrar_haproxy_restarts_total", "HAProxy started again after it died.",
            registry=r,
        )
        self.outside_reloads = Counter(
            "registrar_haproxy_outside_reloads_total",
            "Reloads someone else made (SIGUSR2, systemctl reload): servers read again.",
            registry=r,
        )
        self.responses = Counter(
            "registrar_haproxy_responses",
            "Responses by service, version and class (tcp mode: sessions, code=tcp), from "
            "HAProxy's per-server counters, cumulative across reloads.",
            ["service", "version", "code"], registry=r,
        )
        self.connection_errors = Counter(
            "registrar_haproxy_connection_errors",
            "Connections to a server that failed, by service and version.",
            ["service", "version"], registry=r,
        )


# --- what was read ------------------------------------------------------------------------


class Registrations:
    """The registrations and canary weights as last read; `version` counts the changes."""

    def __init__(
        self,
        layout: Layout,
        on_rejected: Callable[[str, Rejected], None] = lambda key, rejected: None,
    ) -> None:
        self._layout = layout
        self._on_rejected = on_rejected
        self._cond = threading.Condition()
        self._raw: dict[str, str] = {}
        self._valid: dict[str, Routed] = {}
        self._weights: dict[str, StoredKey] = {}
        self.version = 0
        self.revision = 0  # the etcd revision of `{prefix}/` read up to (snapshot or events)
        self.loaded = False  # read from etcd at least once

    def _set(self, key: str, value: str | None) -> bool:
        """Records one key; True when the registrations changed."""
        if value is None:
            self._raw.pop(key, None)
            return self._valid.pop(key, None) is not None
        if self._raw.get(key) == value:
            return False
        self._raw[key] = value
        parsed = parse_registration(self._layout.prefix, key, value)
        if isinstance(parsed, Rejected):
            self._on_rejected(key, parsed)
            return self._valid.pop(key, None) is not None
        changed = self._valid.get(key) != parsed
        self._valid[key] = parsed
        return changed

    def _changed(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def replace_all(self, values: Mapping[str, str], revision: int = 0) -> None:
        """Everything under the prefix, read anew (at start, after a compaction), as of
        `revision`."""
        with self._cond:
            self.revision = max(self.revision, revision)
            changed = not self.loaded
            for key in [k for k in self._raw if k not in values]:
                changed |= self._set(key, None)
            for key, value in values.items():
                changed |= self._set(key, value)
            self.loaded = True
            if changed:
                self._changed()

    def apply(self, events: Iterable[KeyEvent]) -> None:
        with self._cond:
            changed = False
            for event in events:
                changed |= self._set(event.key, event.value)
                self.revision = max(self.revision, event.revision)
            if changed:
                self._changed()

    def replace_weights(self, stored: Mapping[str, StoredKey]) -> None:
        with self._cond:
            if stored != self._weights:
                self._weights = dict(stored)
                self._changed()

    def apply_weights(self, events: Iterable[KeyEvent]) -> None:
        with self._cond:
            weights = dict(self._weights)
            for event in events:
                if event.value is None:
                    weights.pop(event.key, None)
                else:
                    weights[event.key] = StoredKey(event.value, 0)
            if weights != self._weights:
                self._weights = weights
                self._changed()

    def snapshot(self) -> tuple[list[Routed], dict[str, Canary]]:
        with self._cond:
            return list(self._valid.values()), parse_canaries(self._weights, self._layout)

    def state(self) -> tuple[list[Routed], dict[str, Canary], int]:
        """`snapshot()` and the revision it holds everything up to, read together."""
        with self._cond:
            return (list(self._valid.values()), parse_canaries(self._weights, self._layout),
                    self.revision)

    def settled(self, seen: int) -> int | None:
        """The revision read up to when nothing changed since version `seen` (events that
        changed no registration, e.g. a service nobody binds, still move it); else None."""
        with self._cond:
            return self.revision if self.version == seen else None

    def wait_change(self, seen: int, stop: threading.Event, timeout: float) -> int:
        """The version once it differs from `seen`, or after `timeout`."""
        with self._cond:
            if self.version == seen and not stop.is_set():
                self._cond.wait(max(0.0, timeout))
            return self.version


class Installed(enum.Enum):
    """What came of installing a config file."""

    YES = "yes"  # it is the file now (or one newer than it is)
    REFUSED = "refused"  # haproxy -c refused it
    FAILED = "failed"  # it could not be written (retried)


def few_backends(backends: Collection[str] | None) -> list[str] | None:
    """`backends` (HAProxy's names), sorted, when they are few enough to ask HAProxy about one
    by one (a change among a thousand); None: ask about every backend at once."""
    if backends is None or len(backends) > FEW_BACKENDS:
        return None
    return sorted(backends)


def poll_period(took: float) -> float:
    """The time until the next reading of every backend's counters, from how long the last
    one took: POLL_EVERY, or longer where reading is dear (POLL_SHARE), at most POLL_MAX."""
    return min(POLL_MAX, max(POLL_EVERY, took / POLL_SHARE))


@dataclass(frozen=True)
class FileWanted:
    """A config file to install: the backends it renders, the revision they hold, and its text
    (None: rendered from `routed` by whoever installs it)."""

    text: str | None
    backends: tuple[Backend, ...]
    revision: int
    routed: tuple[Routed, ...] = ()
    order: int = 0  # later wanted files have higher numbers: an older one is never installed


class FileFollower(Worker):
    """Renders and installs the config file of runtime-API changes on a thread of its own:
    HAProxy already serves them, and rendering a thousand backends (~50 ms) and `haproxy -c`
    of them (up to a second on a busy machine) must not make the router's loop keep the next
    change waiting. The file is written once the changes have been quiet for FILE_QUIET, at
    most FILE_MAX_DELAY after the first: a deploy of a hundred instances renders it a few
    times, not a hundred (at 1,000 backends each render took the CPU the loop needed,
    docs/scale.md). Only the latest file waits; one overtaken by a newer one is never
    rendered."""

    def __init__(self, install: Callable[[FileWanted], None],
                 on_internal_error: Callable[[str], None] | None = None) -> None:
        super().__init__("config file", on_internal_error)
        self._install = install
        self._cond = threading.Condition()
        self._wanted: FileWanted | None = None
        self._gather = Gather(FILE_QUIET, FILE_MAX_DELAY)

    def submit(self, wanted: FileWanted) -> None:
        with self._cond:
            self._wanted = wanted
            self._gather.note(time.monotonic())
            self._cond.notify_all()
        if self._thread is None:
            self.start()

    def cancel(self) -> None:
        """A newer file is being installed by the caller itself."""
        with self._cond:
            self._wanted = None
            self._gather.clear()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        while not self.stopping:
            self.health.progressed()
            with self._cond:
                due = self._gather.due_at() if self._wanted is not None else None
                now = time.monotonic()
                if due is None or now < due:
                    self._cond.wait(0.5 if due is None else min(0.5, due - now))
                    continue
                wanted, self._wanted = self._wanted, None
                self._gather.clear()
            if wanted is not None and not self.stopping:
                try:
                    self._install(wanted)
                except Exception:  # a bug: it must show, and must not stop the installs
                    log.exception("installing the config file failed")
                    self.health.internal_error()


# --- bringing HAProxy in step ------------------------------------------------------------


class Router:
    """Brings the config file and HAProxy in step (one thread: the command's main loop)."""

    def __init__(
        self,
        hp: HAProxySettings,
        prefix: str,
        metrics: RoutingMetrics,
        haproxy: HAProxyMaster | None,
        stats_socket: str | None,
        log_socket: str | None = None,
        latency: Latency | None = None,
        dropped_logs: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.hp = hp
        self.metrics = metrics
        self.haproxy = haproxy
        self.builtin = hp.template is None
        self.template = load_template(hp.template)
        self.context = RenderContext(mode=hp.mode, prefix=prefix, stats_socket=stats_socket,
                                     response_timeout=hp.response_timeout,
                                     check_interval=hp.check_interval, log_socket=log_socket)
        self.installed_text: str | None = None  # what we last wrote to --config
        self.installed_backends: tuple[Backend, ...] | None = None
        self.running_text: str | None = None  # what HAProxy runs (None: unknown)
        self.live: Live | None = None  # its server slots (None: unknown)
        self._live_for: dict[str, Backend] = {}  # the backends `live` serves, by service
        self._cache = BackendCache(hp.spare_slots)
        self._install_lock = threading.Lock()  # one install at a time (the loop's, the file's)
        self._file_order = itertools.count(1)
        self._installed_order = 0
        self.files = FileFollower(self._install_wanted)
        self._file_rejected = False  # the file of a runtime change was refused: roll it back
        self.backends: tuple[Backend, ...] = ()  # what is wanted now
        self.can_run = False  # a config exists that HAProxy may be started with
        self._retry = RetryClock()  # failed reloads in a row, and when to try again
        self.traffic = Traffic(hp.mode)
        self.traffic_lock = threading.Lock()  # the reporter reads the totals from its thread
        self._workers: tuple[int, ...] | None = None  # the workers we know of
        self._next_poll = 0.0  # the next reading of every backend
        self._next_in_flight = 0.0  # ... of the backends with something in flight
        # What the report says the router has done (read by the reporter, under traffic_lock):
        self.applied = 0  # every change under the prefix up to this revision is served
        self.in_step = False  # what HAProxy serves is the last state applied (none pending)
        self._revision = 0  # the revision of the state being applied now
        self._installed_revision = 0  # ... of the config file installed last
        self.serving: dict[str, frozenset[str]] = {}  # service -> its instances in rotation
        self._removed: set[str] = set()  # backends the change being applied took servers from
        self.holders: dict[Slot, Holder] = {}  # current worker: slot -> instance it served
        self.old_holders: dict[int, dict[Slot, Holder]] = {}  # a reload's old workers' slots
        self._current_open: dict[Slot, int] = {}  # current worker's scur, as last read
        self.in_flight: InFlight = {}
        self._in_flight_of: dict[int | None, InFlight] = {}  # by worker (None: the current)
        self.report_now: Callable[[], None] = lambda: None  # the reporter writes at once
        # Response times (http mode, from HAProxy's per-request log, counted on the log
        # reader's thread): which slot is whose, per worker, published to it.
        self.latency = latency if latency is not None else Latency()
        self._published: dict[Slot, Owner] = {}
        self.old_owners: dict[int, dict[Slot, Owner]] = {}
        self._dropped_logs = dropped_logs
        self._dropped_seen: dict[int, int] = {}  # worker pid -> its DroppedLogs, last read

    # --- applying ------------------------------------------------------------------------

    def _render(self, routed: Sequence[Routed], canaries: Mapping[str, Canary]
                ) -> tuple[tuple[Backend, ...], str] | None:
        backends = self._cache.build(self.hp.binds, routed, canaries)
        text = self._text(backends, routed)
        return None if text is None else (backends, text)

    def _text(self, backends: Sequence[Backend], routed: Sequence[Routed]) -> str | None:
        try:
            return render(self.template, backends, routed, self.context)
        except TemplateError as exc:
            log.error("template %s failed to render: %s; keeping the current config",
                      self.template.name, exc, extra={"event": "template_error"})
            self.metrics.reload_failures.inc()
            return None

    def _set_live(self, live: Live | None, backends: Sequence[Backend] = ()) -> None:
        """What HAProxy's slots serve now, and the backends that was planned from (none: read
        from HAProxy, or unknown): a later change is planned for the backends that differ."""
        self.live = live
        self._live_for = {b.service: b for b in backends} if live is not None else {}

    def apply(self, routed: Sequence[Routed], canaries: Mapping[str, Canary],
              revision: int = 0) -> Action:
        """Applies what the runtime API can carry at once; RELOAD: a reload is needed (the
        caller gathers, then calls `reload`). `revision`: the etcd revision `routed` holds
        everything up to (`applied` once HAProxy serves it)."""
        self._retry.cancel()
        self.in_step = False
        self._revision = revision
        started = time.monotonic()
        backends = self._cache.build(self.hp.binds, routed, canaries)
        rendered: list[str | None] = []

        def text() -> str | None:  # rendered once, and only when needed
            if not rendered:
                rendered.append(self._text(backends, routed))
            return rendered[0]

        if not self.builtin and text() is None:
            return Action.NOTHING  # the operator's template failed: logged and counted
        self.backends = backends
        running = self.haproxy.running() if self.haproxy is not None else True
        changed = {b.service for b in backends if self._live_for.get(b.service) is not b}
        decision = decide(backends, lambda: text() or "", running=running,
                          runtime_api=self.builtin and self.haproxy is not None,
                          live=self.live if self.haproxy is not None else None,
                          running_text=self.running_text, changed=changed)
        if decision.action is Action.RUNTIME:
            # HAProxy first (the new servers take traffic now), then the file follows
            assert decision.plan is not None
            if not self._runtime_update(decision.plan, backends, started, changed):
                return Action.RELOAD
            self._served()
            self.files.submit(FileWanted(None, tuple(backends), revision, tuple(routed),
                                         next(self._file_order)))
            return decision.action
        new_text = text()
        if new_text is None:
            return Action.NOTHING  # the template failed: logged and counted
        if decision.action is Action.INSTALL:
            self._install(new_text, backends)  # the supervisor starts HAProxy on it
        elif decision.action is Action.NOTHING:
            if self.haproxy is not None:
                self._install(new_text, backends)
            self._routed(backends)
            self._served()
        return decision.action

    def check_files(self) -> None:
        """(the loop) The file of a runtime change was refused by haproxy -c: HAProxy goes
        back to the servers of the file installed last."""
        if self._file_rejected:
            self._file_rejected = False
            if self.installed_backends is not None and self.live is not None:
                self._roll_back(self.installed_backends)

    def _served(self) -> None:
        """HAProxy serves the state of `_revision`: it counts as applied; when it took an
        instance out of rotation, what is still open on it is read and reported at once."""
        with self.traffic_lock:
            self.applied = max(self.applied, self._revision)
        self.in_step = True
        if self._removed:
            removed, self._removed = self._removed, set()
            self.poll_traffic(backends=removed)
            self._refresh_in_flight()
            self.report_now()

    def settled(self, revision: int) -> None:
        """Nothing was left to apply up to `revision` (the loop saw no change since)."""
        if self.in_step and revision > self.applied:
            with self.traffic_lock:
                self.applied = revision

    def reload(self, routed: Sequence[Routed], canaries: Mapping[str, Canary],
               revision: int = 0) -> None:
        """Renders, installs (checked) and reloads: SIGUSR2 to the master, or --reload-cmd."""
        self.in_step = False
        self._revision = revision
        started = time.monotonic()
        rendered = self._render(routed, canaries)
        if rendered is None:
            return
        backends, text = rendered
        self.backends = backends
        if self.haproxy is None:
            if self.running_text == text:
                self._served()
            elif self._install(text, backends):
                self._run_reload_cmd(text, backends, started)
            return
        if not self.haproxy.running():
            self._install(text, backends)
            return
        if self._install(text, backends):
            self._reload(text, backends, started)

    def _install(self, text: str, backends: Sequence[Backend]) -> bool:
        """Writes the config unless it is already there; False when it was refused. (Now, on
        the loop's thread: a waiting file of a runtime change is overtaken by this one.)"""
        self.files.cancel()
        wanted = FileWanted(text, tuple(backends), self._revision, order=next(self._file_order))
        with self._install_lock:
            return self._install_now(wanted) is Installed.YES

    def _install_wanted(self, wanted: FileWanted) -> None:
        """(the file thread) Renders and installs a runtime change's file; a refusal is rolled
        back by the loop (`check_files`)."""
        if wanted.text is None:
            text = self._text(wanted.backends, wanted.routed)
            if text is None:
                return  # the template failed: logged and counted
            wanted = FileWanted(text, wanted.backends, wanted.revision, order=wanted.order)
        with self._install_lock:
            if self._install_now(wanted) is Installed.REFUSED:
                self._file_rejected = True

    def _install_now(self, wanted: FileWanted) -> Installed:
        text, backends = wanted.text, wanted.backends
        assert text is not None
        if wanted.order < self._installed_order:
            return Installed.YES  # overtaken by a newer file, installed meanwhile
        self._installed_order = wanted.order
        if text == self.installed_text:
            return Installed.YES
        try:
            install_config(self.hp.haproxy_bin, self.hp.config, text)
        except ConfigRejected as exc:
            log.error("new config refused by haproxy -c, not installed; the current one "
                      "keeps serving:\n%s", exc, extra={"event": "config_rejected"})
            self.metrics.reload_failures.inc()
            return Installed.REFUSED
        except OSError as exc:
            log.error("cannot write %s: %s", self.hp.config, exc,
                      extra={"event": "config_write_failed"})
            self.metrics.reload_failures.inc()
            self._schedule_retry()
            return Installed.FAILED
        self.installed_text, self.installed_backends = text, tuple(backends)
        self._installed_revision = wanted.revision
        self.can_run = True
        return Installed.YES

    def _runtime_update(self, plan: RuntimePlan, backends: Sequence[Backend],
                        started: float, changed: Collection[str] | None = None) -> bool:
        assert self.haproxy is not None and self.live is not None
        before = live_model({s: lb for s, lb in self.live.items()
                             if changed is None or s in changed})
        if self._reassigns(plan):  # what the slots served so far goes to who served it
            self.poll_traffic(backends={backend for backend, _slot in plan.touched()})
        if not self._run_plan(plan):
            return False
        self._describe("runtime API", before,
                       [b for b in backends if changed is None or b.service in changed], started)
        self._set_live(plan.live, backends)
        self.holders.update(self._holders_of(plan.live, changed))
        self.metrics.runtime_updates.inc()
        self._routed(backends, changed)
        return True

    def _reassigns(self, plan: RuntimePlan) -> bool:
        assert self.live is not None
        touched = plan.touched()
        backends = {backend for backend, _slot in touched}
        owners, after = self._owners(backends), self._owners_of(plan.live, backends)
        return any(after.get(slot) != owners.get(slot)
                   for slot in touched if slot in owners)

    def _run_plan(self, plan: RuntimePlan) -> bool:
        assert self.haproxy is not None
        few = few_backends({want.backend for want in plan.expect})
        try:
            self.haproxy.runtime(plan.commands)
            if few is not None:  # those backends' slots only, not thousands
                state = "".join(self.haproxy.servers_state(b) for b in few)
            else:
                state = self.haproxy.servers_state()
            problems = check_slots(state, plan.expect)
        except HAProxyError as exc:
            problems = [str(exc)]
        if problems:
            log.warning("runtime API update incomplete (%s): reloading instead",
                        "; ".join(problems[:5]), extra={"event": "runtime_failed"})
            self._set_live(None)  # unknown now: the next step is a reload
        return not problems

    def _roll_back(self, backends: Sequence[Backend]) -> None:
        """The file for the new servers was refused: HAProxy goes back to the installed ones."""
        assert self.live is not None
        plan = plan_runtime(self.live, backends)
        if plan is not None and self._run_plan(plan):
            self._set_live(plan.live, backends)
            self._routed(backends)
            log.warning("runtime change rolled back to the installed config",
                        extra={"event": "rolled_back"})
            return
        self._set_live(None)
        self._schedule_retry()

    def _reload(self, text: str, backends: Sequence[Backend], started: float) -> None:
        assert self.haproxy is not None
        before = live_model(self.live) if self.live is not None else None
        self.poll_traffic()  # the old worker's counters, before a new one starts at 0
        self.metrics.reloads.inc()
        try:
            self.haproxy.reload()
        except HAProxyError as exc:
            log.error("reload failed: %s", exc, extra={"event": "reload_failed"})
            self.metrics.reload_failures.inc()
            self._set_live(None)
            self.running_text = None
            self._schedule_retry()
            return
        self._retry.reset()
        self.running_text = text
        self._set_live(fresh_layout(backends) if self.builtin else None, backends)
        self._new_worker()
        self._describe("reload", before, backends, started)
        self._routed(backends)
        self._served()

    def _run_reload_cmd(self, text: str, backends: Sequence[Backend], started: float) -> None:
        assert self.hp.reload_cmd is not None
        self.metrics.reloads.inc()
        try:
            proc = subprocess.run(
                self.hp.reload_cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=RELOAD_CMD_TIMEOUT,
            )
            error = None if proc.returncode == 0 else (
                f"exit status {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
        if error is not None:
            log.error("--reload-cmd failed (%s)", error, extra={"event": "reload_failed"})
            self.metrics.reload_failures.inc()
            self._schedule_retry()
            return
        self._retry.reset()
        self.running_text = text
        self._describe("--reload-cmd", None, backends, started)
        self._routed(backends)
        self._served()

    def _schedule_retry(self) -> None:
        self._retry.failed()

    def retry_due(self, now: float) -> bool:
        return self._retry.at is not None and now >= self._retry.at

    def _routed(self, backends: Sequence[Backend], changed: Collection[str] | None = None
                ) -> None:
        """HAProxy serves `backends` now; `changed`: the only services whose backend may
        differ from the last ones (None: any). At 1,000 backends, each step over all of them
        costs milliseconds for every new instance: only the changed ones are gone through."""
        touched = [b for b in backends if changed is None or b.service in changed]
        self._publish_owners(changed)
        serving = {} if changed is None else dict(self.serving)
        for b in touched:
            self.metrics.backend_servers.labels(service=b.service).set(len(b.servers))
            serving[b.service] = frozenset(s.instance for s in b.servers)
            if self.serving.get(b.service, frozenset()) - serving[b.service]:
                self._removed.add(b.backend)
        self.serving = serving

    def _describe(self, how: str, before: Model | None, backends: Sequence[Backend],
                  started: float) -> None:
        parts = []
        for service, now in model_of(backends).items():
            old = before.get(service, frozenset()) if before is not None else None
            if old is None:
                parts.append(f"{service}: {len(now)} servers")
            elif old != now:
                instances = {i[0] for i in now}
                gone = {i[0] for i in old} - instances
                new = instances - {i[0] for i in old}
                changed = len(now - old) - len(new)
                parts.append(f"{service}: +{len(new)} -{len(gone)}"
                             + (f" ~{changed}" if changed else "") + f" = {len(now)}")
        log.info("%s in %.0f ms: %s", how, (time.monotonic() - started) * 1000,
                 ", ".join(parts) or "no server change",
                 extra={"event": "applied", "how": how})

    # --- what HAProxy does meanwhile -----------------------------------------------------

    def _owners(self, backends: Collection[str] | None = None) -> dict[Slot, Owner]:
        return self._owners_of(self.live, backends)

    def _owners_of(self, live: Live | None, backends: Collection[str] | None = None
                   ) -> dict[Slot, Owner]:
        """Which service and version each slot serves (for counting its traffic), of every
        backend or of `backends` (HAProxy's names)."""
        owners: dict[Slot, Owner] = {}
        for b in self.backends:  # a canary's --header backends: what testers get is counted
            if b.header is not None:
                for side, servers in (("always", b.canary_servers), ("never", b.other_servers)):
                    for member in servers:
                        owners[(f"{b.backend}_{side}", member.name)] = (
                            b.service, member.version or UNVERSIONED)
        if live is not None:
            for service, lb in live.items():
                if backends is not None and lb.backend not in backends:
                    continue
                for slot, server in lb.slots.items():
                    if server is not None:
                        owners[(lb.backend, slot)] = (service, server.version or UNVERSIONED)
            return owners
        for b in self.backends:  # an operator's template: servers named as rendered
            for server in b.servers:
                owners[(b.backend, server.name)] = (b.service, server.version or UNVERSIONED)
        return owners

    def _holders_of(self, live: Live | None, services: Collection[str] | None = None
                    ) -> dict[Slot, Holder]:
        """Which instance each slot serves (for what is still open on it once it left); of
        `services`' backends only, when given."""
        holders: dict[Slot, Holder] = {}
        if live is not None:
            for service, lb in live.items():
                if services is not None and service not in services:
                    continue
                for slot, server in lb.slots.items():
                    if server is not None:
                        holders[(lb.backend, slot)] = (service, server.instance)
            return holders
        for b in self.installed_backends or self.backends:  # an operator's template
            for server in b.servers:
                holders[(b.backend, server.name)] = (b.service, server.instance)
        return holders

    def _publish_owners(self, changed: Collection[str] | None = None) -> None:
        """Tells the log reader whose each slot is now (old workers keep theirs); `changed`:
        the only services whose slots may have changed hands (None: any)."""
        live = self.live
        if (changed is None or live is None or any(s not in live for s in changed)
                or any(b.header is not None for b in self.backends if b.service in changed)):
            self._published = self._owners()
        else:  # a new mapping (the log reader holds the last one), the others' slots kept
            published = dict(self._published)
            for service in changed:
                lb = live[service]
                for slot in lb.slots:
                    published.pop((lb.backend, slot), None)
            published.update(self._owners({live[service].backend for service in changed}))
            self._published = published
        self.old_owners = {pid: owners for pid, owners in self.old_owners.items()
                           if pid in self.old_holders}
        self.latency.set_owners(self._workers[0] if self._workers else None, self._published,
                                dict(self.old_owners))

    def _retire_worker(self) -> None:
        """A reload replaces the current worker: it keeps serving what it has open, so its
        slots are remembered under its pid until it has gone."""
        if self._workers:
            self._in_flight_of[self._workers[0]] = self._in_flight_of.pop(None, {})
            self.old_holders[self._workers[0]] = dict(self.holders)
            self.old_owners[self._workers[0]] = self._published
            with self.traffic_lock:
                self.traffic.retire(self._workers[0])
        self.holders = {}
        self._current_open = {}

    def _refresh_in_flight(self, old_workers: tuple[int, ...] | None = None,
                           busy_only: bool = False) -> None:
        """`in_flight` from the current worker's last `show stat` and every old worker's
        (asked now; one that has gone, or that `show proc` no longer lists, is forgotten).
        `busy_only`: an old worker is asked only about the backends where it had something in
        flight (none: not asked). The report is written at once when an entry fell to 0."""
        if self.haproxy is None:
            return
        parts: dict[int | None, InFlight] = {
            None: in_flight(self._current_open, self.holders, self.serving)}
        for pid, holders in list(self.old_holders.items()):
            backends = self._busy_backends(pid) if busy_only else None
            if backends is not None and not backends:
                continue  # nothing in flight on it: asked at the next reading of everything
            counters = (self._read_stat(pid, few_backends(backends))
                        if old_workers is None or pid in old_workers else None)
            if counters is None:  # gone: the master no longer knows the pid (or not now:
                del self.old_holders[pid]  # as if gone)
                with self.traffic_lock:
                    self.traffic.forget(pid)
                continue
            open_now = {slot: v.pop("scur") for slot, v in counters.items()}
            # what it answered since (a request open across the reload) is counted too
            with self.traffic_lock:
                added = self.traffic.observe(counters, self.old_owners.get(pid, {}),
                                             worker=pid)
            self._count(added)
            parts[pid] = in_flight(open_now, holders, self.serving)
        self._in_flight_of = parts
        now = merge_in_flight(parts.values())
        with self.traffic_lock:
            before, self.in_flight = self.in_flight, now
        if fell(before, now):
            self.report_now()

    def _busy_backends(self, worker: int | None) -> set[str] | None:
        """HAProxy's names of the backends where `worker` (None: the current one) had
        something in flight at the last reading; None: one of them is no longer known."""
        names = {b.service: b.backend for b in self.backends}
        busy = self._in_flight_of.get(worker, {})
        if any(service not in names for service in busy):
            return None
        return {names[service] for service in busy}

    def poll_traffic(self, worker: int | None = None,
                     backends: Collection[str] | None = None) -> None:
        """Reads `show stat` (of `worker`; None: the one we know runs, else the current one),
        of every backend or of a few (`backends`, HAProxy's names: those a change touches, so
        that a change among a thousand backends does not read them all), and adds what each
        slot served since the last reading."""
        if self.haproxy is None or not self.haproxy.running():
            return
        if worker is None and self._workers:
            worker = self._workers[0]
        few = few_backends(backends)
        counters = self._read_stat(worker, few)
        if counters is None:
            return
        if not self._workers or worker == self._workers[0]:
            current = {slot: v.pop("scur") for slot, v in counters.items()}
            if few is not None:
                self._current_open.update(current)
            else:
                self._current_open = current
        else:
            for v in counters.values():
                v.pop("scur")
        with self.traffic_lock:
            added = self.traffic.observe(counters, self._owners(few))
        self._count(added)

    def _read_stat(self, worker: int | None, few: list[str] | None
                   ) -> dict[Slot, dict[str, int]] | None:
        """`show stat` of `worker`, of every backend or of `few` (`few_backends`): the counters
        and open sessions (`scur`) of each slot that has any; None when the CLI failed or the
        worker answered nothing (it has gone meanwhile)."""
        assert self.haproxy is not None
        try:
            texts = ([self.haproxy.stat(worker, b) for b in few] if few is not None
                     else [self.haproxy.stat(worker)])
        except HAProxyError as exc:
            log.debug("show stat failed: %s", exc)
            return None
        if not any(text.startswith("# ") for text in texts):
            return None
        counters: dict[Slot, dict[str, int]] = {}
        for text in texts:
            counters.update(parse_stat(text, (*COUNTERS, *OPEN_SESSIONS), skip_idle=True))
        return counters

    def _count(self, added: Mapping[Owner, Mapping[str, int]]) -> None:
        for (service, version), counts in added.items():
            for code, value in counts.items():
                if code == "connection_errors":
                    self.metrics.connection_errors.labels(service, version).inc(value)
                else:
                    self.metrics.responses.labels(service, version, code).inc(value)

    def _poll_dropped_logs(self) -> None:
        """The log lines the current worker could not send (HAProxy's DroppedLogs)."""
        if self.haproxy is None or not self._workers or self.context.log_socket is None:
            return
        pid = self._workers[0]
        try:
            dropped = parse_dropped_logs(self.haproxy.info(pid))
        except HAProxyError:
            return
        if dropped is None:
            return
        grown = dropped - self._dropped_seen.get(pid, 0)
        self._dropped_seen = {pid: dropped}  # only the current worker's is read
        if grown > 0:
            self._dropped_logs(grown)

    def _new_worker(self) -> None:
        assert self.haproxy is not None
        self._retire_worker()
        info = self.haproxy.show_proc()
        self._workers = info.workers if info is not None else None
        self.holders = self._holders_of(self.live)
        with self.traffic_lock:
            self.traffic.new_worker()

    def poll(self, now: float) -> bool:
        """Every POLL_EVERY or less often (`poll_period`): traffic, and reloads made by
        someone else; True when HAProxy's servers were read again (the caller applies the
        wanted state against them). Meanwhile, every POLL_IN_FLIGHT while something is in
        flight on instances that left rotation: those backends only."""
        if self.haproxy is None or not self.haproxy.running():
            return False
        if now < self._next_poll:
            if self.in_flight and now >= self._next_in_flight:
                self._next_in_flight = now + POLL_IN_FLIGHT
                self._poll_in_flight()
            return False
        started = time.monotonic()
        try:
            return self._poll_all()
        finally:
            self._next_poll = now + poll_period(time.monotonic() - started)
            self._next_in_flight = now + POLL_IN_FLIGHT

    def _poll_all(self) -> bool:
        assert self.haproxy is not None
        info = self.haproxy.show_proc()
        if info is not None and self._workers is not None and info.workers != self._workers:
            # what the old worker served since the last reading, while it still answers
            self.poll_traffic(self._workers[0] if self._workers else None)
            return self._reloaded_by_someone_else(info.workers)
        if info is not None and self._workers is None:
            self._workers = info.workers
        self.poll_traffic()
        self._poll_dropped_logs()
        self._refresh_in_flight(info.old_workers if info is not None else None)
        return False

    def _poll_in_flight(self) -> None:
        """What is still open where something was in flight: those backends of each worker
        (a drain waits on it; a thousand backends read every 0.2 s would be most of the
        router's work). A reload meanwhile waits for the next reading of everything."""
        assert self.haproxy is not None
        info = self.haproxy.show_proc()
        if info is not None and self._workers is not None and info.workers != self._workers:
            self._next_poll = 0.0
            return
        busy = self._busy_backends(None)
        if busy is None or busy:
            self.poll_traffic(backends=busy)
        self._refresh_in_flight(info.old_workers if info is not None else None,
                                busy_only=True)

    def _reloaded_by_someone_else(self, workers: tuple[int, ...]) -> bool:
        """A new worker we did not start: it loaded the file; learn its servers from it."""
        assert self.haproxy is not None
        log.warning("haproxy was reloaded from outside (workers %s): reading its servers "
                    "again", ",".join(map(str, workers)), extra={"event": "outside_reload"})
        self.metrics.outside_reloads.inc()
        self._retire_worker()
        self._workers = workers
        with self.traffic_lock:
            self.traffic.new_worker()
        self.running_text = self.installed_text
        if not self.builtin:
            self.holders = self._holders_of(None)
            return True
        try:
            state = parse_servers_state(self.haproxy.servers_state())
        except HAProxyError:
            self._set_live(None)
            return True
        self._set_live(live_from_state(state, self.backends))  # planned anew: none known
        self.holders = self._holders_of(self.live)
        self._publish_owners()
        return True

    # --- the HAProxy process -------------------------------------------------------------

    def adopt_existing_config(self) -> bool:
        """etcd unreadable at start: may HAProxy start from the config already there?"""
        import os

        if not os.path.exists(self.hp.config):
            log.warning("etcd unreachable and no config at %s yet: HAProxy starts once the "
                        "registrations are read", self.hp.config, extra={"event": "waiting"})
            return False
        try:
            check_config(self.hp.haproxy_bin, self.hp.config)
        except ConfigRejected as exc:
            log.error("etcd unreachable and the existing %s fails haproxy -c; HAProxy starts "
                      "once the registrations are read:\n%s", self.hp.config, exc,
                      extra={"event": "waiting"})
            return False
        log.warning("etcd unreachable: starting HAProxy from the existing %s", self.hp.config,
                    extra={"event": "existing_config"})
        self.can_run = True
        return True

    def supervise(self, now: float) -> None:
        if self.haproxy is None or not self.can_run:
            return
        if self.haproxy.supervise(now):
            # It loaded the config file: the last one we installed, or the one found at start.
            # A new master: the old one's workers are gone with it.
            with self.traffic_lock:
                for pid in self.old_holders:
                    self.traffic.forget(pid)
            self._workers, self.old_holders = None, {}
            with self.traffic_lock:
                self.applied = max(self.applied, self._installed_revision)
            self.running_text = self.installed_text
            installed = self.installed_backends
            self._set_live(fresh_layout(installed) if self.builtin and installed is not None
                           else None, installed or ())
            self._new_worker()
            if self.haproxy.restarts:
                self.metrics.restarts.inc()
            if self.installed_backends is not None:
                self._routed(self.installed_backends)
            self._retry.after(0.0)  # catch up with anything that changed meanwhile
