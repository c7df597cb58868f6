"""`registrar haproxy`: keeps an HAProxy in step with the registrations under the prefix.

Three parts, two threads:
- the registration watcher (a `PrefixFollower`, its own thread): reads `{prefix}/` once, then
  watches it from the next revision; when the watch dies with etcd it resumes from the last
  revision seen, and re-reads everything when that revision was compacted. While etcd is
  unreachable nothing changes: the last known registrations stay.
- `Registrations`: what was read, and the debounce: changes within 100 ms of each other are
  applied together, none later than 1 s after it arrived.
- `Router` (the main thread): renders the config, checks it with `haproxy -c`, installs it
  atomically and brings HAProxy in step: the runtime API when only servers of existing backends
  changed and free slots remain, else a reload (SIGUSR2 to the master we run, or --reload-cmd).
  It also restarts a dead HAProxy with backoff.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from registrar.adapters.etcd_store import EtcdError, EtcdStore, KeyEvent
from registrar.haproxy.config import (
    Backend,
    LiveBackend,
    Registration,
    Rejected,
    RenderContext,
    RuntimePlan,
    TemplateError,
    build_backends,
    check_slots,
    fresh_layout,
    live_model,
    load_template,
    model_of,
    parse_registration,
    plan_runtime,
    render,
)
from registrar.haproxy.process import (
    ConfigRejected,
    HAProxyError,
    HAProxyMaster,
    check_config,
    install_config,
    runtime_dir,
    socket_paths,
)
from registrar.health import LoopHealth, health_problem
from registrar.http_server import serve_metrics
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower
from registrar.retry import Backoff
from registrar.settings import HAProxySettings, Settings
from registrar.shutdown import install_stop_signals

log = logging.getLogger(__name__)

QUIET = 0.1  # changes this close together are applied together ...
MAX_DELAY = 1.0  # ... and none later than this after it arrived
STOP_GRACE = 10.0  # SIGTERM: open connections get this long before HAProxy is hard-stopped
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


# --- what was read, and the debounce ------------------------------------------------------


class Registrations:
    """The registrations under the prefix as last read, and the batching of changes."""

    def __init__(
        self,
        prefix: str,
        on_rejected: Callable[[str, Rejected], None] = lambda key, rejected: None,
        quiet: float = QUIET,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._on_rejected = on_rejected
        self._quiet = quiet
        self._max_delay = max_delay
        self._clock = clock
        self._cond = threading.Condition()
        self._raw: dict[str, str] = {}
        self._valid: dict[str, Registration] = {}
        self._first_pending: float | None = None
        self._last_change = 0.0
        self.loaded = False  # read from etcd at least once

    def _set(self, key: str, value: str | None) -> bool:
        """Records one key; True when the registrations changed."""
        if value is None:
            self._raw.pop(key, None)
            return self._valid.pop(key, None) is not None
        if self._raw.get(key) == value:
            return False
        self._raw[key] = value
        parsed = parse_registration(self._prefix, key, value)
        if isinstance(parsed, Rejected):
            self._on_rejected(key, parsed)
            return self._valid.pop(key, None) is not None
        changed = self._valid.get(key) != parsed
        self._valid[key] = parsed
        return changed

    def _changed(self) -> None:
        now = self._clock()
        if self._first_pending is None:
            self._first_pending = now
        self._last_change = now
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

    def snapshot(self) -> list[Registration]:
        with self._cond:
            return list(self._valid.values())

    def wait_batch(self, stop: threading.Event, timeout: float) -> list[Registration] | None:
        """Waits up to `timeout` for a change, then until the changes settle (QUIET without a
        new one) or the first of them is MAX_DELAY old; the registrations then (None: none)."""
        with self._cond:
            deadline = self._clock() + timeout
            while self._first_pending is None:
                remaining = deadline - self._clock()
                if remaining <= 0 or stop.is_set():
                    return None
                self._cond.wait(min(remaining, 0.2))
            while not stop.is_set():
                due = min(self._last_change + self._quiet, self._first_pending + self._max_delay)
                remaining = due - self._clock()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.2))
            self._first_pending = None
            return list(self._valid.values())


# --- the etcd side ------------------------------------------------------------------------


def registration_watcher(
    store: EtcdStore, prefix: str, registrations: Registrations, metrics: Metrics,
    revision: int = 0,
) -> PrefixFollower:
    """Keeps `Registrations` in step with `{prefix}/` in etcd, on its own thread."""
    return PrefixFollower(
        store, prefix, name="etcd watcher", revision=revision,
        on_snapshot=lambda stored: registrations.replace_all(
            {key: s.value for key, s in stored.items()}
        ),
        on_events=registrations.apply,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc(),
    )


# --- the HAProxy side ---------------------------------------------------------------------


class Router:
    """Brings the config file and HAProxy in step with the registrations (one thread)."""

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
        self.live: dict[str, LiveBackend] | None = None  # its server slots (None: unknown)
        self.can_run = False  # a config exists that HAProxy may be started with
        self.retry_at: float | None = None
        self._backoff = Backoff()  # failed reloads in a row, for the retry

    # --- applying ------------------------------------------------------------------------

    def apply(self, registrations: Sequence[Registration]) -> None:
        """Brings the config file and HAProxy in step with `registrations`."""
        self.retry_at = None
        started = time.monotonic()
        backends = build_backends(self.hp.binds, registrations)
        try:
            text = render(self.template, backends, registrations, self.context)
        except TemplateError as exc:
            log.error("template %s failed to render: %s; keeping the current config",
                      self.template.name, exc, extra={"event": "template_error"})
            self.metrics.reload_failures.inc()
            return

        if self.haproxy is None:  # --reload-cmd
            if self.running_text != text and self._install(text, backends):
                self._run_reload_cmd(text, backends, started)
            return
        if not self.haproxy.running():
            self._install(text, backends)  # the supervisor starts HAProxy on it
            return
        if self.builtin and self.live is not None:
            if live_model(self.live) == model_of(backends):
                self._install(text, backends)
                self._routed(backends)
                return
            # Only servers changed: the runtime API first (no check or disk on that path),
            # then the file follows, checked, so that a reload or restart loads the same.
            if self._runtime_update(backends, started):
                if not self._install(text, backends) and self.installed_backends is not None:
                    self._roll_back(self.installed_backends)
                return
        elif self.running_text == text:
            self._routed(backends)
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

    def _runtime_update(self, backends: Sequence[Backend], started: float) -> bool:
        assert self.haproxy is not None and self.live is not None
        plan = plan_runtime(self.live, backends)
        if plan is None:
            log.info("not enough free server slots: reloading", extra={"event": "slots_full"})
            return False
        if not self._run_plan(plan):
            return False
        self._describe("runtime API", live_model(self.live), backends, started)
        self.live = plan.live
        self.metrics.runtime_updates.inc()
        self._routed(backends)
        return True

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

    def _describe(
        self,
        how: str,
        before: Mapping[str, frozenset[tuple[str, str, int]]] | None,
        backends: Sequence[Backend],
        started: float,
    ) -> None:
        parts = []
        for service, now in model_of(backends).items():
            old = before.get(service, frozenset()) if before is not None else None
            if old is None:
                parts.append(f"{service}: {len(now)} servers")
            elif old != now:
                parts.append(f"{service}: +{len(now - old)} -{len(old - now)} = {len(now)}")
        log.info("%s in %.0f ms: %s", how, (time.monotonic() - started) * 1000,
                 ", ".join(parts) or "no server change",
                 extra={"event": "applied", "how": how})

    # --- the HAProxy process -------------------------------------------------------------

    def adopt_existing_config(self) -> bool:
        """etcd unreadable at start: may HAProxy start from the config already there?"""
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
            if self.haproxy.restarts:
                self.metrics.restarts.inc()
            if self.installed_backends is not None:
                self._routed(self.installed_backends)
            self.retry_at = now  # catch up with anything that changed meanwhile


# --- the command --------------------------------------------------------------------------



def _usage_error(message: str) -> int:
    print(f"registrar: error: {message}", file=sys.stderr)
    return 2


def run(settings: Settings) -> int:

    hp = settings.haproxy
    assert hp is not None
    if shutil.which(hp.haproxy_bin) is None:
        return _usage_error(f"--haproxy-bin: {hp.haproxy_bin!r} not found or not executable")
    if hp.template is not None:
        try:
            load_template(hp.template)
        except TemplateError as exc:
            return _usage_error(f"--template: {hp.template}: {exc}")

    stop = threading.Event()
    install_stop_signals(stop)
    metrics = Metrics()
    metrics.etcd_up.set(0)
    routing = RoutingMetrics(metrics.registry)
    store = EtcdStore(settings.etcd, metrics, log_health=True)

    sock_dir, temporary_dir = runtime_dir(hp.config)
    master_socket, stats_socket = socket_paths(sock_dir, hp.config)
    haproxy = None if hp.reload_cmd else HAProxyMaster(hp.haproxy_bin, hp.config, master_socket)
    router = Router(hp, settings.prefix, routing, haproxy,
                    stats_socket if haproxy is not None else None)

    def rejected(key: str, why: Rejected) -> None:
        routing.invalid.labels(reason=why.reason).inc()
        log.warning("skipping %s: %s", key, why.detail,
                    extra={"event": "invalid_registration", "key": key, "reason": why.reason})

    registrations = Registrations(settings.prefix, rejected)
    main_loop = LoopHealth("router", lambda: True,
                           lambda loop: metrics.internal_errors.labels(loop=loop).inc())
    # The first read, once: when etcd cannot be read now, HAProxy may start from the config
    # already installed (if it passes haproxy -c) while the watcher keeps trying.
    revision = 0
    try:
        stored, revision = store.list_prefix(settings.prefix)
    except EtcdError as exc:
        log.warning("etcd unreachable at start: %s", exc, extra={"event": "etcd_down"})
        router.adopt_existing_config()
    else:
        registrations.replace_all({key: s.value for key, s in stored.items()})
        log.info("read %d keys under %s/ (revision %d)", len(stored), settings.prefix, revision,
                 extra={"event": "read", "revision": revision})
    watcher = registration_watcher(store, settings.prefix, registrations, metrics, revision)

    def health() -> str | None:
        problem = health_problem((watcher.health, main_loop), time.monotonic())
        if problem is None and haproxy is not None:
            problem = haproxy.problem()
        return problem

    server = serve_metrics(settings.metrics_addr, metrics.registry, health)

    log.info(
        "registrar haproxy: prefix %s, etcd %s, %s mode, %s, config %s, %s",
        settings.prefix, ",".join(str(ep) for ep in settings.etcd.endpoints), hp.mode,
        ", ".join(f"{b.service}={b.host}:{b.port}" for b in hp.binds), hp.config,
        f"--reload-cmd {hp.reload_cmd!r}" if hp.reload_cmd else f"running {hp.haproxy_bin}",
        extra={"event": "start"},
    )

    watcher.start()

    try:
        while not stop.is_set():
            batch = registrations.wait_batch(stop, timeout=0.2)
            if stop.is_set():
                break
            if batch is not None:
                router.apply(batch)
            elif registrations.loaded and router.retry_due(time.monotonic()):
                router.apply(registrations.snapshot())
            router.supervise(time.monotonic())
            main_loop.progressed()
    finally:
        # --- shutdown: stop watching, soft-stop HAProxy, stop metrics, exit -------------
        watcher.stop(time.monotonic() + 2.0)
        if haproxy is not None:
            haproxy.stop(STOP_GRACE)
        if server is not None:
            server.stop()
        store.close()
        if temporary_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)
    log.info("stopped", extra={"event": "stop"})
    return 0
