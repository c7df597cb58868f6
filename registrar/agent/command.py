"""Runs `watch` (every container of the host) and `register` (one container): one code path.

The shutdown path, top to bottom: stop taking events, revoke the lease (every key goes in one
request), wait --drain, stop the metrics server, exit 0. Bounded even when etcd is unreachable.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from registrar.adapters.docker_source import DockerSource, DockerUnavailable
from registrar.adapters.etcd_store import EtcdStore
from registrar.agent.control_follower import promotion_follower
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.agent.watcher import ContainerWatcher
from registrar.core.containers import ContainerInfo
from registrar.core.naming import NamingContext, owned_by
from registrar.errors import FatalError
from registrar.hostip import primary_ipv4
from registrar.http_server import serve_metrics
from registrar.metrics import Metrics
from registrar.settings import Settings
from registrar.shutdown import install_stop_signals

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0
STALL_LIMIT = 15.0  # /healthz turns 503 when a loop has not moved for this long



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
        stop.wait(0.1)
    return None


class Loop(Protocol):
    last_progress: float

    def alive(self) -> bool: ...


def health_problem(keeper: Loop, watcher: Loop, now: float, limit: float) -> str | None:
    """None while both loops are alive and moving; else what is wrong (for /healthz)."""
    for name, loop in (("lease keeper", keeper), ("event loop", watcher)):
        if not loop.alive():
            return f"{name} stopped"
        if now - loop.last_progress > limit:
            return f"{name} stalled for {now - loop.last_progress:.0f}s"
    return None


def run(settings: Settings) -> int:
    stop = threading.Event()
    install_stop_signals(stop)
    metrics = Metrics()
    metrics.etcd_up.set(0)
    metrics.docker_up.set(0)
    store = EtcdStore(settings.etcd, metrics)
    docker = DockerSource(settings.docker_url)
    sidecar = settings.command == "register"

    container_id = None
    def owns(instance: str) -> bool:
        """This node's keys, less those of containers whose own sidecar registers them."""
        return owned_by(settings.node, instance) and (
            instance.split(":")[1] not in watcher.sidecar_names
        )

    if sidecar:
        assert settings.container is not None
        found = wait_for_container(docker, settings.container, settings.wait, stop)
        if found is None:
            return 0  # SIGTERM while waiting: nothing was registered
        container_id, name = found.id, found.name
        owns = lambda instance: instance.startswith(f"{settings.node}:{name}:")  # noqa: E731

    keeper = LeaseKeeper(
        store, ttl=settings.ttl, prefix=settings.prefix, owns=owns, metrics=metrics,
        control_prefix=settings.control_prefix,
        fast_heartbeat=settings.metrics_addr is not None,
    )
    follower = promotion_follower(store, keeper, settings.control_prefix)
    naming = NamingContext(
        prefix=settings.prefix,
        node=settings.node,
        host_ip=settings.host_ip,
        default_ip=primary_ipv4(),
        explicit=settings.explicit,
        sidecar=sidecar,
    )
    watcher = ContainerWatcher(
        docker, DockerSource(settings.docker_url), keeper, naming, metrics,
        resync=settings.resync, only=container_id, finished=stop,
    )

    def health() -> str | None:
        return health_problem(keeper, watcher, time.monotonic(), STALL_LIMIT)

    server = serve_metrics(settings.metrics_addr, metrics.registry, health)

    log.info(
        "registrar %s: node %s, prefix %s, etcd %s, ttl %ds%s",
        settings.command, settings.node, settings.prefix,
        ",".join(str(ep) for ep in settings.etcd.endpoints), settings.ttl,
        f", container {settings.container}" if sidecar else "",
        extra={"event": "start"},
    )
    keeper.start()
    follower.start()
    watcher.start()

    stop.wait()

    # --- shutdown: stop intake, deregister, drain, stop metrics, exit -------------------
    signalled = not (sidecar and watcher.finished_reason)
    watcher.stop()
    follower.stop()
    keeper.shutdown(SHUTDOWN_TIMEOUT)
    if settings.drain and signalled:
        log.info("draining for %gs", settings.drain, extra={"event": "drain"})
        time.sleep(settings.drain)
    if server is not None:
        server.stop()
    store.close()
    docker.close()
    log.info("stopped", extra={"event": "stop"})
    return 0
