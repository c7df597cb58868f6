"""The router's loop: registrations and canary weights in, HAProxy in step.

- `Registrations`: what was read of `{prefix}/` and `{control_prefix}/weights/` (kept by two
  `PrefixFollower` threads), with a change counter the loop waits on.
- `Gather`: reloads are gathered (changes within QUIET of each other go together, none waits
  longer than MAX_DELAY); runtime-API changes are not: they are applied at once.
- `Router`: renders, asks `runtime.decide` what to do and does it: the runtime API (then the
  file follows, checked), or a checked install and a reload (SIGUSR2 to the master we run, or
  --reload-cmd). Every second it also reads the master's `show proc` (a reload someone else
  made: the servers are read again from HAProxy and put right) and `show stat` (the traffic by
  version), and restarts a dead HAProxy with backoff.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from registrar.core.control import Canary, parse_canaries
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, StoredKey
from registrar.haproxy.config import (
    Backend,
    Rejected,
    RenderContext,
    Routed,
    TemplateError,
    build_backends,
    load_template,
    parse_registration,
    render,
)
from registrar.haproxy.process import (
    ConfigRejected,
    HAProxyError,
    HAProxyMaster,
    check_config,
    install_config,
)
from registrar.haproxy.runtime import (
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
    parse_servers_state,
    parse_stat,
    plan_runtime,
)
from registrar.haproxy.traffic import UNVERSIONED, Owner, Slot, Traffic
from registrar.retry import Backoff
from registrar.settings import HAProxySettings

log = logging.getLogger(__name__)

QUIET = 0.1  # changes that need a reload, this close together, are applied together ...
MAX_DELAY = 1.0  # ... and none later than this after it arrived
POLL_EVERY = 1.0  # show proc (reloads from outside) and show stat (traffic)
RELOAD_CMD_TIMEOUT = 60.0


class RoutingMetrics:
    """The metrics of `registrar haproxy`, on the agent's registry (next to etcd_up, build_info)."""

    def __init__(self, registry: CollectorRegistry) -> None:
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

    def replace_all(self, values: Mapping[str, str]) -> None:
        """Everything under the prefix, read anew (at start, after a compaction)."""
        with self._cond:
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

    def wait_change(self, seen: int, stop: threading.Event, timeout: float) -> int:
        """The version once it differs from `seen`, or after `timeout`."""
        with self._cond:
            if self.version == seen and not stop.is_set():
                self._cond.wait(max(0.0, timeout))
            return self.version


@dataclass
class Gather:
    """When to reload: a reload is due QUIET after the last change that needs one, or
    MAX_DELAY after the first, whichever comes first (plain data, a clock given)."""

    quiet: float = QUIET
    max_delay: float = MAX_DELAY
    first: float | None = None
    last: float = 0.0

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def clear(self) -> None:
        self.first = None

    def due_at(self) -> float | None:
        if self.first is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)


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
    ) -> None:
        self.hp = hp
        self.metrics = metrics
        self.haproxy = haproxy
        self.builtin = hp.template is None
        self.template = load_template(hp.template)
        self.context = RenderContext(mode=hp.mode, prefix=prefix, stats_socket=stats_socket)
        self.installed_text: str | None = None  # what we last wrote to --config
        self.installed_backends: tuple[Backend, ...] | None = None
        self.running_text: str | None = None  # what HAProxy runs (None: unknown)
        self.live: Live | None = None  # its server slots (None: unknown)
        self.backends: tuple[Backend, ...] = ()  # what is wanted now
        self.can_run = False  # a config exists that HAProxy may be started with
        self.retry_at: float | None = None
        self._backoff = Backoff()  # failed reloads in a row, for the retry
        self.traffic = Traffic(hp.mode)
        self.traffic_lock = threading.Lock()  # the reporter reads the totals from its thread
        self._workers: tuple[int, ...] | None = None  # the workers we know of
        self._next_poll = 0.0

    # --- applying ------------------------------------------------------------------------

    def _render(self, routed: Sequence[Routed], canaries: Mapping[str, Canary]
                ) -> tuple[tuple[Backend, ...], str] | None:
        backends = build_backends(self.hp.binds, routed, canaries)
        try:
            return backends, render(self.template, backends, routed, self.context)
        except TemplateError as exc:
            log.error("template %s failed to render: %s; keeping the current config",
                      self.template.name, exc, extra={"event": "template_error"})
            self.metrics.reload_failures.inc()
            return None

    def apply(self, routed: Sequence[Routed], canaries: Mapping[str, Canary]) -> Action:
        """Applies what the runtime API can carry at once; RELOAD: a reload is needed (the
        caller gathers, then calls `reload`)."""
        self.retry_at = None
        started = time.monotonic()
        rendered = self._render(routed, canaries)
        if rendered is None:
            return Action.NOTHING
        backends, text = rendered
        self.backends = backends
        running = self.haproxy.running() if self.haproxy is not None else True
        decision = decide(backends, text, running=running,
                          runtime_api=self.builtin and self.haproxy is not None,
                          live=self.live if self.haproxy is not None else None,
                          running_text=self.running_text)
        if decision.action is Action.INSTALL:
            self._install(text, backends)  # the supervisor starts HAProxy on it
        elif decision.action is Action.NOTHING:
            if self.haproxy is not None:
                self._install(text, backends)
            self._routed(backends)
        elif decision.action is Action.RUNTIME:
            assert decision.plan is not None
            if not self._runtime_update(decision.plan, backends, started):
                return Action.RELOAD
            if not self._install(text, backends) and self.installed_backends is not None:
                self._roll_back(self.installed_backends)
        return decision.action

    def reload(self, routed: Sequence[Routed], canaries: Mapping[str, Canary]) -> None:
        """Renders, installs (checked) and reloads: SIGUSR2 to the master, or --reload-cmd."""
        started = time.monotonic()
        rendered = self._render(routed, canaries)
        if rendered is None:
            return
        backends, text = rendered
        self.backends = backends
        if self.haproxy is None:
            if self.running_text != text and self._install(text, backends):
                self._run_reload_cmd(text, backends, started)
            return
        if not self.haproxy.running():
            self._install(text, backends)
            return
        if self._install(text, backends):
            self._reload(text, backends, started)

    def _install(self, text: str, backends: Sequence[Backend]) -> bool:
        """Writes the config unless it is already there; False when it was refused."""
        if text == self.installed_text:
            return True
        try:
            install_config(self.hp.haproxy_bin, self.hp.config, text)
        except ConfigRejected as exc:
            log.error("new config refused by haproxy -c, not installed; the current one "
                      "keeps serving:\n%s", exc, extra={"event": "config_rejected"})
            self.metrics.reload_failures.inc()
            return False
        except OSError as exc:
            log.error("cannot write %s: %s", self.hp.config, exc,
                      extra={"event": "config_write_failed"})
            self.metrics.reload_failures.inc()
            self._schedule_retry()
            return False
        self.installed_text, self.installed_backends = text, tuple(backends)
        self.can_run = True
        return True

    def _runtime_update(self, plan: RuntimePlan, backends: Sequence[Backend],
                        started: float) -> bool:
        assert self.haproxy is not None and self.live is not None
        before = live_model(self.live)
        if self._reassigns(plan):
            self.poll_traffic()  # what the slots served so far goes to who served it
        if not self._run_plan(plan):
            return False
        self._describe("runtime API", before, backends, started)
        self.live = plan.live
        self.metrics.runtime_updates.inc()
        self._routed(backends)
        return True

    def _reassigns(self, plan: RuntimePlan) -> bool:
        assert self.live is not None
        owners = self._owners()
        return any(self._owner_in(plan.live, slot) != owners.get(slot)
                   for slot in plan.touched() if slot in owners)

    def _run_plan(self, plan: RuntimePlan) -> bool:
        assert self.haproxy is not None
        try:
            self.haproxy.runtime(plan.commands)
            problems = check_slots(self.haproxy.servers_state(), plan.expect)
        except HAProxyError as exc:
            problems = [str(exc)]
        if problems:
            log.warning("runtime API update incomplete (%s): reloading instead",
                        "; ".join(problems[:5]), extra={"event": "runtime_failed"})
            self.live = None  # unknown now: the next step is a reload
        return not problems

    def _roll_back(self, backends: Sequence[Backend]) -> None:
        """The file for the new servers was refused: HAProxy goes back to the installed ones."""
        assert self.live is not None
        plan = plan_runtime(self.live, backends)
        if plan is not None and self._run_plan(plan):
            self.live = plan.live
            self._routed(backends)
            log.warning("runtime change rolled back to the installed config",
                        extra={"event": "rolled_back"})
            return
        self.live = None
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
            self.live, self.running_text = None, None
            self._schedule_retry()
            return
        self._backoff.reset()
        self.running_text = text
        self.live = fresh_layout(backends) if self.builtin else None
        self._new_worker()
        self._describe("reload", before, backends, started)
        self._routed(backends)

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
        self._backoff.reset()
        self.running_text = text
        self._describe("--reload-cmd", None, backends, started)
        self._routed(backends)

    def _schedule_retry(self) -> None:
        self.retry_at = time.monotonic() + self._backoff.next()

    def retry_due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at

    def _routed(self, backends: Sequence[Backend]) -> None:
        for b in backends:
            self.metrics.backend_servers.labels(service=b.service).set(len(b.servers))

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

    def _owners(self) -> dict[Slot, Owner]:
        return self._owners_of(self.live)

    def _owners_of(self, live: Live | None) -> dict[Slot, Owner]:
        """Which service and version each slot serves (for counting its traffic)."""
        owners: dict[Slot, Owner] = {}
        if live is not None:
            for service, lb in live.items():
                for slot, server in lb.slots.items():
                    if server is not None:
                        owners[(lb.backend, slot)] = (service, server.version or UNVERSIONED)
            return owners
        for b in self.backends:  # an operator's template: servers named as rendered
            for server in b.servers:
                owners[(b.backend, server.name)] = (b.service, server.version or UNVERSIONED)
        return owners

    def _owner_in(self, live: Live, slot: Slot) -> Owner | None:
        return self._owners_of(live).get(slot)

    def poll_traffic(self) -> None:
        """Reads `show stat` and adds what each slot served since the last reading."""
        if self.haproxy is None or not self.haproxy.running():
            return
        try:
            counters = parse_stat(self.haproxy.stat())
        except HAProxyError as exc:
            log.debug("show stat failed: %s", exc)
            return
        with self.traffic_lock:
            added = self.traffic.observe(counters, self._owners())
        for (service, version), counts in added.items():
            for code, value in counts.items():
                if code == "connection_errors":
                    self.metrics.connection_errors.labels(service, version).inc(value)
                else:
                    self.metrics.responses.labels(service, version, code).inc(value)

    def _new_worker(self) -> None:
        assert self.haproxy is not None
        info = self.haproxy.show_proc()
        self._workers = info.workers if info is not None else None
        with self.traffic_lock:
            self.traffic.new_worker()

    def poll(self, now: float) -> bool:
        """Every POLL_EVERY: traffic, and reloads made by someone else. True when HAProxy's
        servers were read again (the caller applies the wanted state against them)."""
        if self.haproxy is None or now < self._next_poll or not self.haproxy.running():
            return False
        self._next_poll = now + POLL_EVERY
        info = self.haproxy.show_proc()
        if info is not None and self._workers is not None and info.workers != self._workers:
            return self._reloaded_by_someone_else(info.workers)
        if info is not None and self._workers is None:
            self._workers = info.workers
        self.poll_traffic()
        return False

    def _reloaded_by_someone_else(self, workers: tuple[int, ...]) -> bool:
        """A new worker we did not start: it loaded the file; learn its servers from it."""
        assert self.haproxy is not None
        log.warning("haproxy was reloaded from outside (workers %s): reading its servers "
                    "again", ",".join(map(str, workers)), extra={"event": "outside_reload"})
        self.metrics.outside_reloads.inc()
        self._workers = workers
        with self.traffic_lock:
            self.traffic.new_worker()
        self.running_text = self.installed_text
        if not self.builtin:
            return True
        try:
            state = parse_servers_state(self.haproxy.servers_state())
        except HAProxyError:
            self.live = None
            return True
        self.live = live_from_state(state, self.backends)
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
            self.running_text = self.installed_text
            self.live = (
                fresh_layout(self.installed_backends)
                if self.builtin and self.installed_backends is not None else None
            )
            self._new_worker()
            if self.haproxy.restarts:
                self.metrics.restarts.inc()
            if self.installed_backends is not None:
                self._routed(self.installed_backends)
            self.retry_at = now  # catch up with anything that changed meanwhile
