"""Runs `watch` (every container of the host) and `register` (one container): one code path.

The shutdown path, top to bottom, under one deadline (SHUTDOWN_BUDGET after the signal, so
that it ends well within the units' `docker stop -t` even when etcd and Docker are both
unreachable): stop taking events, revoke the lease (every key goes in one request), drain,
stop the metrics server, exit 0. The drain waits at most --drain, and ends as soon as every
live router has applied the revoke and has nothing in flight on the instances it removed
(router_wait); with no router saying what it applied, it waits the whole --drain.
"""

from __future__ import annotations

import logging
import threading
import time

from registrar.adapters.docker_source import DockerSource
from registrar.adapters.etcd_store import EtcdStore
from registrar.agent.control_follower import follower as etcd_follower
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.agent.watcher import ContainerWatcher
from registrar.core.containers import ContainerInfo
from registrar.core.layout import Layout
from registrar.core.naming import NamingContext
from registrar.core.ownership import Ownership
from registrar.core.source import ContainerSource, DockerUnavailable
from registrar.core.store import EtcdError, Store, WatchCompacted
from registrar.errors import FatalError
from registrar.health import health_problem
from registrar.hostip import primary_ipv4
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower
from registrar.retry import POLL_INTERVAL, poll_until
from registrar.settings import Settings
from registrar.shutdown import (
    SHUTDOWN_BUDGET,
    StopReason,
    install_stop_signals,
    wait_for_stop,
)

log = logging.getLogger(__name__)


def wait_for_container(
    docker: ContainerSource, name: str, wait: float, stop: threading.Event
) -> ContainerInfo | None:
    """Container `name` once it runs (None: stopped while waiting); FatalError when it did not
    run within `wait`."""
    deadline = time.monotonic() + wait
    seen = {"state": "does not exist", "announced": False}  # why not yet, as last seen

    def running() -> ContainerInfo | None:
        try:
            info = docker.inspect(name)
        except DockerUnavailable as exc:
            info, seen["state"] = None, f"docker unreachable ({exc})"
        if info is not None and info.running:
            return info
        if info is not None:
            seen["state"] = "exists but is not running"
        if not seen["announced"] and time.monotonic() < deadline:
            log.info("waiting up to %gs for container %s (%s)", wait, name, seen["state"],
                     extra={"event": "wait", "container": name})
            seen["announced"] = True
        return None

    found = poll_until(running, wait, interval=POLL_INTERVAL, stop=stop)
    if found is not None or stop.is_set():
        return found
    raise FatalError(f"container {name!r} {seen['state']} after waiting {wait:g}s (--wait)")


def run(settings: Settings) -> int:
    stop = threading.Event()
    say_signal = install_stop_signals(stop)
    metrics = Metrics()
    metrics.etcd_up.set(0)
    metrics.docker_up.set(0)
    store = EtcdStore(settings.etcd, metrics, log_health=True)
    docker = DockerSource(settings.docker_url)
    sidecar = settings.command == "register"
    agent = settings.agent
    assert agent is not None

    container_id = found = None
    ownership = Ownership(settings.node)
    if sidecar:
        assert agent.container is not None
        found = wait_for_container(docker, agent.container, agent.wait, stop)
        if found is None:
            say_signal()
            return 0  # SIGTERM while waiting: nothing was registered
        container_id = found.id
        ownership = Ownership(settings.node, container=found.name)

    layout = Layout(settings.prefix, settings.control_prefix)
    keeper = LeaseKeeper(store, ttl=settings.ttl, layout=layout, ownership=ownership,
                         metrics=metrics)
    follower = etcd_follower(store, keeper, layout, metrics)
    naming = NamingContext(
        prefix=settings.prefix,
        node=settings.node,
        host_ip=settings.host_ip,
        default_ip=primary_ipv4(),
        explicit=agent.explicit,
        sidecar=sidecar,
        network=agent.network,
    )
    watcher = ContainerWatcher(docker, keeper, naming, metrics, resync=settings.resync,
                               only=container_id, finished=stop, first=found)
    loops = (keeper.health, keeper.heartbeat.health, watcher.health, follower.health)
    server = None
    if settings.metrics_addr is not None:
        from registrar.http_server import serve_metrics

        server = serve_metrics(settings.metrics_addr, metrics.registry,
                               lambda: health_problem((*loops, *watcher.checker_loops()),
                                                     time.monotonic()))

    _announce(settings, sidecar)
    keeper.start()
    follower.start()
    watcher.start()

    wait_for_stop(stop)
    say_signal()
    reason = (StopReason.CONTAINER_GONE if sidecar and watcher.finished_reason
              else StopReason.SIGNAL)
    _shutdown(settings, reason,
              watcher=watcher, follower=follower, keeper=keeper, store=store)
    if server is not None:
        server.stop()
    store.close()
    docker.close()
    log.info("stopped", extra={"event": "stop"})
    return 0


def _announce(settings: Settings, sidecar: bool) -> None:
    log.info(
        "registrar %s: node %s, prefix %s, etcd %s, ttl %ds%s",
        settings.command, settings.node, settings.prefix,
        ",".join(str(ep) for ep in settings.etcd.endpoints), settings.ttl,
        f", container {settings.agent.container}" if sidecar and settings.agent else "",
        extra={"event": "start"},
    )


def _shutdown(settings: Settings, reason: StopReason, *, watcher: ContainerWatcher,
              follower: PrefixFollower, keeper: LeaseKeeper, store: Store) -> None:
    """Stop intake, deregister (revoke the lease), drain: all but the drain within one
    deadline (`registrar.shutdown` owns the budget and its split). Only a signal drains: a
    sidecar whose container is gone has nothing left in flight to wait for."""
    deadline = time.monotonic() + SHUTDOWN_BUDGET
    watcher.request_stop()
    follower.request_stop()
    # A revision before the revoke, for a watch that replays its deletes: the latest the
    # follower saw or the keeper read (it reads again at each resync, so it is not compacted
    # away on a cluster that compacts while the prefix itself is quiet).
    seen = max(follower.revision, keeper.read_revision)
    revoked = keeper.shutdown(deadline)
    watcher.join(deadline)
    follower.join(deadline)
    if settings.drain and reason is StopReason.SIGNAL:
        _drain(settings, store, keeper, seen if revoked else None)


def _drain(settings: Settings, store: Store, keeper: LeaseKeeper, seen: int | None) -> None:
    """Waits at most --drain until every live router has applied the revoke and has nothing in
    flight on the instances it removed. `seen`: a revision before the revoke (None: the revoke
    was not confirmed, so nothing can be: the whole --drain)."""
    from registrar.router_wait import read_reports, removal_revision, wait_for_routers

    started = time.monotonic()
    until = started + settings.drain
    layout = Layout(settings.prefix, settings.control_prefix)
    removed = [k for k in keeper.revoked if layout.in_rotation(k)]
    instances = [(p[0], p[1]) for k in keeper.revoked if (p := layout.parse(k)) is not None]
    log.info("draining: up to %gs, until the routers have applied the deregistration of %d "
             "instances", settings.drain, len(instances), extra={"event": "drain"})
    try:
        if seen is None:
            raise EtcdError("the revoke was not confirmed")
        revision = None
        if removed:
            revision = removal_revision(store, layout.prefix, removed, seen,
                                        min(until, started + 2.0))
            if revision is None:
                raise EtcdError("the deregistration was not seen in the watch")
        waited = wait_for_routers(lambda: read_reports(store, layout), revision, instances,
                                  until)
    except (EtcdError, WatchCompacted) as exc:
        log.info("drain: cannot ask the routers (%s): waiting the whole --drain", exc,
                 extra={"event": "drain_blind"})
        _sleep_until(until)
        return
    if waited.unversioned:
        log.info("routers that do not report what they applied (not waited for): %s",
                 ", ".join(waited.unversioned), extra={"event": "drain_unversioned"})
    if waited.done:
        log.info("drained in %.2fs: %d routers applied the deregistration, nothing in flight",
                 time.monotonic() - started, len(waited.routers), extra={"event": "drained"})
    elif waited.waiting:
        log.warning("drain: --drain %gs over, still waiting for %s", settings.drain,
                    "; ".join(f"{n} ({why})" for n, why in sorted(waited.waiting.items())),
                    extra={"event": "drain_timeout"})
    _sleep_until(until if not waited.done else started)


def _sleep_until(until: float) -> None:
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
