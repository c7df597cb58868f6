"""`registrar catalog`: a read-only view of the whole prefix, served from memory.

Threads: two followers (`{prefix}/` and `{control_prefix}/`, each read once and then watched,
resumed after outages, read again after a compaction; while etcd is away the last catalog
stays, marked stale), the HTTP server's, and the main thread, which only waits for a signal.

The shutdown path: stop the server (blocking queries woken first), stop watching, exit 0.
"""

from __future__ import annotations

import logging
import threading
import time

from registrar.adapters.etcd_store import EtcdStore
from registrar.catalog.metrics import CatalogMetrics
from registrar.catalog.server import Auth, CatalogServer
from registrar.catalog.state import CatalogState
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, Store, StoredKey
from registrar.errors import FatalError
from registrar.health import health_problem
from registrar.prefix_follower import PrefixFollower
from registrar.settings import Settings
from registrar.shutdown import install_stop_signals

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 3.0


def _follower(store: Store, base: str, which: str, state: CatalogState,
              metrics: CatalogMetrics) -> PrefixFollower:
    def snapshot(stored: dict[str, StoredKey]) -> None:
        state.replace(which, stored, follower.revision)

    def events(batch: list[KeyEvent]) -> None:
        state.apply(batch)

    follower = PrefixFollower(
        store, base, name=f"{which} watcher", on_snapshot=snapshot, on_events=events,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc())
    return follower


def run(settings: Settings) -> int:
    cs = settings.catalog
    assert cs is not None
    stop = threading.Event()
    say_signal = install_stop_signals(stop)
    metrics = CatalogMetrics()
    metrics.etcd_up.set(0)
    layout = Layout(settings.prefix, settings.control_prefix)
    state = CatalogState(layout, on_build=metrics.build_seconds.observe)
    store = EtcdStore(settings.etcd, log_health=True)

    def etcd_up(up: bool) -> None:
        metrics.etcd_up.set(1 if up else 0)
        state.etcd_up(up)

    store.add_listener(etcd_up)
    followers = (_follower(store, layout.prefix, "prefix", state, metrics),
                 _follower(store, layout.control, "control", state, metrics))

    def healthy() -> str | None:
        return health_problem([f.health for f in followers], time.monotonic())

    auth = Auth(cs.user, cs.password or "") if cs.user is not None else None
    tls = (cs.cert, cs.key) if cs.cert is not None and cs.key is not None else None
    try:
        server = CatalogServer(cs.listen, state, metrics, healthy, auth, tls)
    except OSError as exc:
        raise FatalError(f"--listen: cannot listen on {cs.listen[0]}:{cs.listen[1]}: "
                         f"{exc.strerror or exc}") from None
    for follower in followers:
        follower.start()
    server.start()
    scheme = "https" if tls else "http"
    host = f"[{cs.listen[0]}]" if ":" in cs.listen[0] else cs.listen[0]
    log.info("registrar catalog on %s://%s:%d/ (prefix %s, control prefix %s, etcd %s%s)",
             scheme, host, server.port, settings.prefix, settings.control_prefix,
             ",".join(str(ep) for ep in settings.etcd.endpoints),
             ", basic auth" if auth else "", extra={"event": "start"})
    try:
        # In slices: a bare wait() would hold off the signal handler until it returned.
        while not stop.wait(0.2):
            pass
    finally:
        say_signal()
        deadline = time.monotonic() + SHUTDOWN_BUDGET
        state.close()
        server.stop()
        for follower in followers:
            follower.request_stop()
        for follower in followers:
            follower.join(deadline)
        store.close()
    log.info("stopped", extra={"event": "stop"})
    return 0
