"""LeaseKeeper: owns one lease and every key bound to it, on one thread.

Callers say what should be registered (per container); the keeper's thread makes etcd match:
it grants the lease, writes only differences (`plan_changes`), heartbeats, and when the lease is
lost (expired during a partition) grants a new one and puts every key again. While etcd is
unreachable it keeps the desired state and retries with backoff; nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from registrar.adapters.etcd_store import EtcdStore, EtcdUnavailable, LeaseNotFound
from registrar.core.naming import parse_key
from registrar.core.planner import (
    Changes,
    StoredKey,
    parse_promotions,
    place,
    plan_changes,
    promoted_prefix,
    standby_prefix,
)
from registrar.metrics import Metrics
from registrar.retry import retrying

log = logging.getLogger(__name__)

# registrar_etcd_up must turn 0 within 2 s of losing etcd: where it is scraped, heartbeat at
# least this often (else every TTL/3).
WATCHED_HEARTBEAT_INTERVAL = 1.0


class LeaseLost(Exception):
    pass


class LeaseKeeper:
    def __init__(
        self,
        store: EtcdStore,
        *,
        ttl: int,
        prefix: str,
        owns: Callable[[str], bool],
        metrics: Metrics,
        control_prefix: str | None = None,
        fast_heartbeat: bool = True,
    ) -> None:
        """`owns(instance)` says which keys are this keeper's to reconcile.

        `fast_heartbeat`: heartbeat at least every second, so that `registrar_etcd_up` turns 0
        within 2 s of losing etcd (only worth it where metrics are served).
        With `control_prefix`, promotions under `{control_prefix}/promoted/` are followed:
        instances of a demoted version are kept at `{control_prefix}/standby/...` instead.
        """
        self._store = store
        self._ttl = ttl
        self._owns = owns
        self._prefix = prefix
        self._control = control_prefix
        self._standby = standby_prefix(control_prefix) if control_prefix else None
        self._promotions: dict[str, str] = {}
        self._metrics = metrics
        self.heartbeat_interval = ttl / 3
        if fast_heartbeat:
            self.heartbeat_interval = min(self.heartbeat_interval, WATCHED_HEARTBEAT_INTERVAL)

        self._cond = threading.Condition()
        self._desired: dict[str, dict[str, str]] = {}  # container id -> key -> value
        self._since: dict[str, float] = {}  # key -> Docker event time, for the latency metric
        self._reread = True  # read this node's keys from etcd before the next write
        # Nothing is written before the first full picture of what runs (`replace_all`):
        # otherwise a restarted agent would delete every key of its node, then put it back.
        self._ready = False
        self._dirty = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        # Only the keeper's thread touches these (and shutdown, after joining it).
        self._lease: int | None = None
        self._had_lease = False
        self._written: dict[str, StoredKey] = {}
        # "service/instance" of every registration made and not withdrawn since: keys put again
        # after a lost lease are not new registrations.
        self._known: set[str] = set()
        self._next_heartbeat = 0.0
        self._etcd_ok: bool | None = None
        self.last_progress = time.monotonic()
        self.synced = threading.Event()

    # --- what callers use ---------------------------------------------------------------

    def set_container(
        self, container_id: str, keys: Mapping[str, str], event_time: float | None = None
    ) -> None:
        with self._cond:
            old = self._desired.get(container_id, {})
            if old == keys:
                return
            if event_time is not None:
                for key, value in keys.items():
                    if old.get(key) != value:
                        self._since[key] = event_time
            if keys:
                self._desired[container_id] = dict(keys)
            else:
                self._desired.pop(container_id, None)
            self._mark_dirty()

    def drop_container(self, container_id: str) -> None:
        self.set_container(container_id, {})

    def replace_all(self, desired: Mapping[str, Mapping[str, str]]) -> None:
        """A full reconcile: this is everything that should exist; re-read etcd and diff."""
        with self._cond:
            self._desired = {cid: dict(keys) for cid, keys in desired.items() if keys}
            self._ready = True
            self._reread = True
            self._mark_dirty()

    def request_reread(self) -> None:
        """Re-read this node's keys and the promotions from etcd before the next write."""
        with self._cond:
            self._reread = True
            self._mark_dirty()

    @property
    def promotions(self) -> dict[str, str]:
        return dict(self._promotions)

    def desired_keys(self) -> dict[str, str]:
        with self._cond:
            return self._flat()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def lease(self) -> int | None:
        return self._lease

    def shutdown(self, timeout: float) -> bool:
        """Stops the thread and revokes the lease (every key at once). False if etcd refused."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        lease, count = self._lease, len(self._written)
        if lease is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._store.revoke(lease)
                break
            except EtcdUnavailable as exc:
                if time.monotonic() + 0.2 >= deadline:
                    log.warning(
                        "could not revoke lease %x: %s; its %d keys expire within %ds",
                        lease, exc, count, self._ttl, extra={"event": "revoke_failed"},
                    )
                    return False
                time.sleep(0.2)
        self._metrics.deregistrations.inc(count)
        self._metrics.registered.set(0)
        self._metrics.standby.set(0)
        self._written = {}
        self._known = set()
        self._lease = None
        log.info("revoked lease %x: %d keys removed", lease, count,
                 extra={"event": "deregister_all", "keys": count})
        return True

    # --- the thread ---------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        self._dirty = True
        self.synced.clear()
        self._cond.notify_all()

    def _flat(self) -> dict[str, str]:
        return {key: value for keys in self._desired.values() for key, value in keys.items()}

    def _run(self) -> None:
        policy = retrying(
            "etcd", (EtcdUnavailable,), self._stop, log, on_failure=self._etcd_failed
        )
        while not self._stop.is_set():
            with self._cond:
                wait = self._next_heartbeat - time.monotonic()
                if not self._dirty and wait > 0:
                    self._cond.wait(wait)
                self.last_progress = time.monotonic()
                if self._stop.is_set():
                    return
            try:
                policy(self._step)
            except EtcdUnavailable:
                return  # only raised once stopping
            except Exception:  # a bug must not silently stop heartbeats: log, back off, go on
                log.exception("lease keeper step failed")
                self._stop.wait(1.0)

    def _etcd_failed(self, error: BaseException) -> None:
        self.last_progress = time.monotonic()
        if self._etcd_ok is not False:
            log.warning("etcd unreachable or refusing requests: %s", error,
                        extra={"event": "etcd_down"})
        self._etcd_ok = False
        self._metrics.etcd_up.set(0)
        with self._cond:
            # Whatever changed meanwhile (promotions first of all) is read before writing.
            self._reread = True

    def _step(self) -> None:
        self.last_progress = time.monotonic()
        try:
            self._ensure_lease()
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
            self._write()
        except (LeaseLost, LeaseNotFound) as exc:
            self._lease_lost(str(exc))
            self._ensure_lease()
            self._write()
        if self._etcd_ok is False:
            log.info("etcd reachable again", extra={"event": "etcd_up"})
        self._etcd_ok = True
        self._metrics.etcd_up.set(1)

    def _ensure_lease(self) -> None:
        if self._lease is not None:
            return
        self._lease = self._store.grant(self._ttl)
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        if self._had_lease:
            self._metrics.lease_regrants.inc()
            log.warning("lease lost; granted a new one (%x), putting every key again",
                        self._lease, extra={"event": "lease_regrant"})
        else:
            log.info("granted lease %x (ttl %ds)", self._lease, self._ttl,
                     extra={"event": "lease_grant"})
        self._had_lease = True

    def _heartbeat(self) -> None:
        assert self._lease is not None
        try:
            ttl = self._store.keepalive(self._lease)
        except EtcdUnavailable:
            self._metrics.keepalive_failures.inc()
            raise
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        if ttl <= 0:
            self._metrics.keepalive_failures.inc()
            raise LeaseLost("keepalive answered TTL 0")

    def _lease_lost(self, why: str) -> None:
        log.warning("lease %x lost (%s)", self._lease or 0, why, extra={"event": "lease_lost"})
        self._lease = None
        self._written = {}
        self._metrics.registered.set(0)
        self._metrics.standby.set(0)
        with self._cond:
            self._dirty = True
            self._reread = True

    def _read(self) -> None:
        """This node's keys (in rotation and on standby) and the promotions, from etcd."""
        stored, _revision = self._store.list_prefix(self._prefix)
        written = {key: value for key, value in stored.items() if self._is_mine(key)}
        if self._control and self._standby:
            standby, _revision = self._store.list_prefix(self._standby)
            written.update(
                (key, value) for key, value in standby.items() if self._is_mine(key)
            )
            promoted, _revision = self._store.list_prefix(promoted_prefix(self._control))
            promotions = parse_promotions(promoted, self._control)
            if promotions != self._promotions:
                log.info("promotions: %s", ", ".join(
                    f"{service}={version}" for service, version in sorted(promotions.items())
                ) or "none", extra={"event": "promotions"})
            self._promotions = promotions
        self._written = written

    def _write(self) -> None:
        assert self._lease is not None
        with self._cond:
            if not self._ready:
                self._dirty = False
                return
            desired = self._flat()
            since = {key: self._since.pop(key) for key in list(self._since)}
            reread = self._reread
            self._dirty = False
            self._reread = False
        try:
            if reread:
                self._read()
            placed = desired
            if self._control:
                placed = place(desired, self._promotions, self._prefix, self._control)
            changes = plan_changes(placed, self._written, self._lease)
            if changes:
                self._store.apply(changes.puts, changes.deletes, self._lease)
        except BaseException:
            with self._cond:
                self._dirty = True
                self._reread = self._reread or reread
                self._since = {**since, **self._since}
            raise
        self._account(changes, since)
        with self._cond:
            if not self._dirty:
                self.synced.set()

    def _account(self, changes: Changes, since: dict[str, float]) -> None:
        """Updates what we hold, the metrics and the log after a write etcd acknowledged."""
        assert self._lease is not None
        acked = time.time()
        previous = set(self._written)
        for key in changes.deletes:
            self._written.pop(key, None)
        for key, value in changes.puts.items():
            self._written[key] = StoredKey(value, self._lease)

        def twin(key: str) -> str:
            """The same instance's key on the other side (rotation <-> standby)."""
            if self._standby and key.startswith(self._standby + "/"):
                return self._prefix + key[len(self._standby) :]
            if self._standby:
                return self._standby + key[len(self._prefix) :]
            return key

        for key in changes.puts:
            if key in previous:
                continue
            in_rotation = key.startswith(self._prefix + "/")
            service, instance = self._describe(key)
            extra = {"service": service, "instance": instance}
            identity = f"{service}/{instance}"
            if identity in self._known and twin(key) not in previous:
                log.info("put %s %s again under the new lease", service, instance,
                         extra={"event": "reput", **extra})
            elif twin(key) in previous:
                event = "rotation_in" if in_rotation else "standby"
                what = "back in rotation" if in_rotation else "left rotation, on standby"
                log.info("%s %s %s", what, service, instance, extra={"event": event, **extra})
            elif in_rotation:
                self._metrics.registrations.inc()
                log.info("registered %s %s", service, instance,
                         extra={"event": "register", **extra})
            else:
                self._metrics.registrations.inc()
                log.info("registered %s %s on standby (version not promoted)", service,
                         instance, extra={"event": "register_standby", **extra})
            self._known.add(identity)
            event_time = since.get(key)
            if event_time is not None and in_rotation:
                self._metrics.registration_latency.observe(max(0.0, acked - event_time))
        for key in changes.deletes:
            if twin(key) in changes.puts:
                continue  # moved, logged above
            service, instance = self._describe(key)
            self._known.discard(f"{service}/{instance}")
            self._metrics.deregistrations.inc()
            log.info("deregistered %s %s", service, instance,
                     extra={"event": "deregister", "service": service, "instance": instance})
        standby = sum(1 for key in self._written if not key.startswith(self._prefix + "/"))
        self._metrics.registered.set(len(self._written) - standby)
        self._metrics.standby.set(standby)

    def _parse(self, key: str) -> tuple[str, str] | None:
        """(service, instance) of a key in rotation or on standby."""
        parsed = parse_key(self._prefix, key)
        if parsed is None and self._standby:
            parsed = parse_key(self._standby, key)
        return parsed

    def _describe(self, key: str) -> tuple[str, str]:
        return self._parse(key) or ("?", key)

    def _is_mine(self, key: str) -> bool:
        parsed = self._parse(key)
        return parsed is not None and self._owns(parsed[1])
