"""Runs `watch` (every container of the host) and `register` (one container): one code path.

The shutdown path, top to bottom, under one deadline (SHUTDOWN_BUDGET after the signal, so
that it ends well within the units' `docker stop -t 20` even when etcd and Docker are both
unreachable): stop taking events, revoke the lease (every key goes in one request), wait
--drain, stop the metrics server, exit 0.
"""

from __future__ import annotations

import logging
import threading
import time

from registrar.adapters.docker_source import DockerSource, DockerUnavailable
from registrar.adapters.etcd_store import EtcdStore
from registrar.agent.control_follower import control_follower, keys_follower
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.agent.watcher import ContainerWatcher
from registrar.core.containers import ContainerInfo
from registrar.core.layout import Layout
from registrar.core.naming import NamingContext
from registrar.core.ownership import Ownership
from registrar.errors import FatalError
from registrar.health import health_problem
from registrar.hostip import primary_ipv4
from registrar.http_server import serve_metrics
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower
from registrar.retry import POLL_INTERVAL
from registrar.settings import Settings
from registrar.shutdown import install_stop_signals

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 5.0  # from the signal to the lease revoked (or given up on)


def wait_for_container(
    docker: DockerSource, name: str, wait: float, stop: threading.Event
) -> ContainerInfo | None:
    """Container `name` once it runs (None: stopped while waiting); FatalError when it did not
    run within `wait`."""
    deadline = time.monotonic() + wait
    announced = False
    state = "does not exist"
    while not stop.is_set():
        try:
            info = docker.inspect(name)
        except DockerUnavailable as exc:
            info, state = None, f"docker unreachable ({exc})"
        if info is not None and info.running:
            return info
        if info is not None:
            state = "exists but is not running"
        if time.monotonic() >= deadline:
            raise FatalError(f"container {name!r} {state} after waiting {wait:g}s (--wait)")
        if not announced:
            log.info("waiting up to %gs for container %s (%s)", wait, name, state,
                     extra={"event": "wait", "container": name})
            announced = True
        stop.wait(POLL_INTERVAL)
    return None


def run(settings: Settings) -> int:
    stop = threading.Event()
    say_signal = install_stop_signals(stop)
    metrics = Metrics()
    metrics.etcd_up.set(0)
    metrics.docker_up.set(0)
    store = EtcdStore(settings.etcd, metrics, log_health=True)
    docker = DockerSource(settings.docker_url)
    sidecar = settings.command == "register"

    container_id = None
    ownership = Ownership(settings.node)
    if sidecar:
        assert settings.container is not None
        found = wait_for_container(docker, settings.container, settings.wait, stop)
        if found is None:
            say_signal()
            return 0  # SIGTERM while waiting: nothing was registered
        container_id = found.id
        ownership = Ownership(settings.node, container=found.name)

    layout = Layout(settings.prefix, settings.control_prefix)
    keeper = LeaseKeeper(store, ttl=settings.ttl, layout=layout, ownership=ownership,
                         metrics=metrics)
    follower = control_follower(store, keeper, layout, metrics)
    keys = keys_follower(store, keeper, layout, metrics)
    naming = NamingContext(
        prefix=settings.prefix,
        node=settings.node,
        host_ip=settings.host_ip,
        default_ip=primary_ipv4(),
        explicit=settings.explicit,
        sidecar=sidecar,
        network=settings.network,
    )
    watcher = ContainerWatcher(docker, keeper, naming, metrics, resync=settings.resync,
                               only=container_id, finished=stop)
    loops = (keeper.health, keeper.heartbeat.health, watcher.health, watcher.checker.health,
             follower.health, keys.health)
    server = serve_metrics(settings.metrics_addr, metrics.registry,
                           lambda: health_problem(loops, time.monotonic()))

    _announce(settings, sidecar)
    keeper.start()
    follower.start()
    keys.start()
    watcher.start()

    stop.wait()
    say_signal()
    _shutdown(settings, signalled=not (sidecar and watcher.finished_reason),
              watcher=watcher, followers=(follower, keys), keeper=keeper)
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
        f", container {settings.container}" if sidecar else "",
        extra={"event": "start"},
    )


def _shutdown(settings: Settings, *, signalled: bool, watcher: ContainerWatcher,
              followers: tuple[PrefixFollower, ...], keeper: LeaseKeeper) -> None:
    """Stop intake, deregister (revoke the lease), drain: all within one deadline."""
    deadline = time.monotonic() + SHUTDOWN_BUDGET
    watcher.request_stop()
    for follower in followers:
        follower.request_stop()
    keeper.shutdown(deadline)
    watcher.join(deadline)
    for follower in followers:
        follower.join(deadline)
    if settings.drain and signalled:
        log.info("draining for %gs", settings.drain, extra={"event": "drain"})
        time.sleep(settings.drain)
