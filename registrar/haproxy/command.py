"""`registrar haproxy`: keeps an HAProxy in step with the registrations under the prefix.

Threads: two followers (`{prefix}/` and `{control_prefix}/weights/`, each read once and then
watched, resumed after outages, read again after a compaction; while etcd is unreachable the
last known state stays), the reporter (traffic totals, `applied`, `in_flight` and `latency`
every 2 s, or at once when woken, under its own lease), in http mode the access log reader
(HAProxy's per-request log: response times by version), and the main loop here, which
applies every change the runtime API can carry at once and gathers those that need a reload.

The shutdown path: stop watching, stop reporting (the report's lease revoked), soft-stop
HAProxy, stop metrics, exit 0.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time

from registrar.adapters.etcd_store import EtcdStore
from registrar.core.gather import Gather
from registrar.core.layout import Layout
from registrar.core.names import host_port
from registrar.core.store import EtcdError, Store, StoredKey
from registrar.haproxy.access_log import AccessLogReader, LatencyMetrics
from registrar.haproxy.config import Rejected, TemplateError, load_template
from registrar.haproxy.latency import Latency
from registrar.haproxy.process import HAProxyMaster, log_socket_path, runtime_dir, socket_paths
from registrar.haproxy.report import Reporter
from registrar.haproxy.router import MAX_DELAY, QUIET, Registrations, Router, RoutingMetrics
from registrar.haproxy.runtime import Action
from registrar.health import LoopHealth, health_problem
from registrar.http_server import serve_metrics
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower
from registrar.settings import HAProxySettings, Settings
from registrar.shutdown import install_stop_signals

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # SIGTERM: open connections get this long before HAProxy is hard-stopped
SHUTDOWN_BUDGET = 3.0  # for the followers and the report's lease


def _refused(hp: HAProxySettings) -> str | None:
    """What is wrong with the HAProxy flags that only the file system can tell."""
    if shutil.which(hp.haproxy_bin) is None:
        return f"--haproxy-bin: {hp.haproxy_bin!r} not found or not executable"
    if hp.template is not None:
        try:
            load_template(hp.template)
        except TemplateError as exc:
            return f"--template: {hp.template}: {exc}"
    return None


def _first_read(store: Store, prefix: str, registrations: Registrations,
                router: Router) -> int:
    """The first read, once: when etcd cannot be read now, HAProxy may start from the config
    already installed (if it passes haproxy -c) while the watcher keeps trying. The revision
    read (0: none)."""
    try:
        stored, revision = store.list_prefix(prefix)
    except EtcdError as exc:
        log.warning("etcd unreachable at start: %s", exc, extra={"event": "etcd_down"})
        router.adopt_existing_config()
        return 0
    registrations.replace_all({key: s.value for key, s in stored.items()}, revision)
    log.info("read %d keys under %s/ (revision %d)", len(stored), prefix, revision,
             extra={"event": "read", "revision": revision})
    return revision


def _rejected(routing: RoutingMetrics, key: str, why: Rejected) -> None:
    routing.invalid.labels(reason=why.reason).inc()
    log.warning("skipping %s: %s", key, why.detail,
                extra={"event": "invalid_registration", "key": key, "reason": why.reason})


def _announce(settings: Settings, hp: HAProxySettings) -> None:
    log.info(
        "registrar haproxy: node %s, prefix %s, etcd %s, %s mode, %s, config %s, %s",
        settings.node, settings.prefix, ",".join(str(ep) for ep in settings.etcd.endpoints),
        hp.mode, ", ".join(f"{b.service}={host_port(b.host, b.port)}" for b in hp.binds), hp.config,
        f"--reload-cmd {hp.reload_cmd!r}" if hp.reload_cmd else f"running {hp.haproxy_bin}",
        extra={"event": "start"},
    )


def _usage_error(message: str) -> int:
    print(f"registrar: error: {message}", file=sys.stderr)
    return 2


def _followers(store: Store, layout: Layout, registrations: Registrations,
               metrics: Metrics, revision: int) -> tuple[PrefixFollower, PrefixFollower]:
    def counted(loop: str) -> None:
        metrics.internal_errors.labels(loop=loop).inc()

    def snapshot(stored: dict[str, StoredKey]) -> None:
        # a full read (after a compaction): everything as of the revision it was read at
        registrations.replace_all({key: s.value for key, s in stored.items()},
                                  watcher.revision)

    watcher = PrefixFollower(
        store, layout.prefix, name="etcd watcher", revision=revision,
        on_snapshot=snapshot, on_events=registrations.apply, on_internal_error=counted,
    )
    return (
        watcher,
        PrefixFollower(
            store, layout.weights, name="weights watcher",
            on_snapshot=registrations.replace_weights, on_events=registrations.apply_weights,
            on_internal_error=counted,
        ),
    )


def _loop(router: Router, registrations: Registrations, stop: threading.Event,
          main_loop: LoopHealth) -> None:
    seen = 0
    gather = Gather(QUIET, MAX_DELAY)
    while not stop.is_set():
        now = time.monotonic()
        due = gather.due_at()
        timeout = 0.2 if due is None else max(0.0, min(0.2, due - now))
        version = registrations.wait_change(seen, stop, timeout)
        if stop.is_set():
            break
        now = time.monotonic()
        if version != seen and registrations.loaded:
            seen = version
            if router.apply(*registrations.state()) is Action.RELOAD:
                gather.note(now)
            else:
                gather.clear()
        due = gather.due_at()
        if due is not None and now >= due:
            gather.clear()
            router.reload(*registrations.state())
        elif (registrations.loaded and router.retry_due(now)
              and router.apply(*registrations.state()) is Action.RELOAD):
            gather.note(now)
        router.check_files()
        if router.poll(now) and registrations.loaded:
            router.apply(*registrations.state())  # put right what the reload undid
        router.supervise(time.monotonic())
        settled = registrations.settled(seen)
        if settled is not None and gather.due_at() is None:
            router.settled(settled)  # events that changed nothing HAProxy serves
        main_loop.progressed()


def run(settings: Settings) -> int:
    hp = settings.haproxy
    assert hp is not None
    refused = _refused(hp)
    if refused is not None:
        return _usage_error(refused)

    stop = threading.Event()
    say_signal = install_stop_signals(stop)
    metrics = Metrics()
    metrics.etcd_up.set(0)
    routing = RoutingMetrics(metrics.registry)
    store = EtcdStore(settings.etcd, metrics, log_health=True)
    layout = Layout(settings.prefix, settings.control_prefix)

    sock_dir, temporary_dir = runtime_dir(hp.config)
    master_socket, stats_socket = socket_paths(sock_dir, hp.config)
    haproxy = None if hp.reload_cmd else HAProxyMaster(hp.haproxy_bin, hp.config, master_socket)
    latency_metrics = LatencyMetrics(metrics.registry)
    # response times: HAProxy's per-request log, http mode, an HAProxy of our own
    latency, reader = Latency(latency_metrics.observe), None
    if haproxy is not None and hp.mode == "http":
        reader = AccessLogReader(log_socket_path(sock_dir, hp.config), latency,
                                 latency_metrics)
    router = Router(hp, settings.prefix, routing, haproxy,
                    stats_socket if haproxy is not None else None,
                    log_socket=reader.path if reader is not None else None,
                    latency=latency, dropped_logs=latency_metrics.log_dropped.inc)

    registrations = Registrations(layout, lambda key, why: _rejected(routing, key, why))
    main_loop = LoopHealth("router", lambda: True,
                           lambda loop: metrics.internal_errors.labels(loop=loop).inc())
    revision = _first_read(store, settings.prefix, registrations, router)
    watchers = _followers(store, layout, registrations, metrics, revision)

    reporter = _reporter(store, settings, layout, metrics, router)
    loops = (*(w.health for w in watchers), main_loop, reporter.health)

    def health() -> str | None:
        problem = health_problem(loops, time.monotonic())
        if problem is None and haproxy is not None:
            problem = haproxy.problem()
        if problem is None and reader is not None and not reader.alive():
            problem = "the access log reader stopped"
        return problem or reporter.problem()

    server = serve_metrics(settings.metrics_addr, metrics.registry, health)
    _announce(settings, hp)
    for watcher in watchers:
        watcher.start()
    reporter.start()
    if reader is not None:
        reader.start()
    try:
        _loop(router, registrations, stop, main_loop)
    finally:
        say_signal()
        router.files.request_stop()  # a file not yet installed: the next start renders anew
        _shutdown(watchers, reporter, haproxy)
        if reader is not None:
            reader.stop()
        if server is not None:
            server.stop()
        store.close()
        if temporary_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)
    log.info("stopped", extra={"event": "stop"})
    return 0


def _reporter(store: Store, settings: Settings, layout: Layout, metrics: Metrics,
              router: Router) -> Reporter:
    """The router's report under `{control_prefix}/routers/{node}`: its traffic by version,
    what it applied, what is in flight, response times and its mode."""
    hp = settings.haproxy
    assert hp is not None

    def totals() -> dict[str, dict[str, dict[str, int]]]:
        with router.traffic_lock:
            return router.traffic.report()

    def more() -> dict[str, object]:
        with router.traffic_lock:
            done: dict[str, object] = {
                "applied": router.applied,
                "in_flight": {service: dict(by_instance)
                              for service, by_instance in router.in_flight.items()}}
        done["latency"] = router.latency.report()
        # a canary with latency rules, --header or --sticky needs a router in http mode, and a
        # router that has served nothing yet shows its mode nowhere else
        done["mode"] = hp.mode
        return done

    reporter = Reporter(store, f"{layout.routers}/{settings.node}", settings.ttl, metrics,
                        totals, more)
    router.report_now = reporter.wake
    return reporter


def _shutdown(watchers: tuple[PrefixFollower, ...], reporter: Reporter,
              haproxy: HAProxyMaster | None) -> None:
    """Stop watching, stop reporting (the report's lease revoked), soft-stop HAProxy."""
    deadline = time.monotonic() + SHUTDOWN_BUDGET
    for watcher in watchers:
        watcher.request_stop()
    reporter.stop(deadline)
    for watcher in watchers:
        watcher.join(deadline)
    if haproxy is not None:
        haproxy.stop(STOP_GRACE)
