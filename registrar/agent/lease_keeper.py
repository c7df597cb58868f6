"""LeaseKeeper: owns one lease and every key bound to it.

Callers say what should be registered (per container); the keeper's thread asks the pure
`core.keeper.next_step` what to do next (wait, forget a lost lease, grant, read, write: one
request each, retried through `retry.RetryClock`), gathers the inputs (what should run, what
etcd holds, what `{control_prefix}/` says), asks the pure decision (`core.reconcile.plan`)
what to write, applies it, and records what etcd acknowledged. What `{control_prefix}/`
says is read with the node's keys, then kept up to date from the control follower's events
(`control_changed`). The lease is kept alive by a `Heartbeat` on its own thread and clock;
when it is lost (expired during a partition) the keeper grants a new one and puts every key
again.

While etcd is unreachable, writes are retried with backoff and the desired state is kept:
nothing is dropped. A write etcd refuses (its quota full, a permission missing) is retried
with a shorter backoff, logged once with its cause and counted; meanwhile deletes that can go
alone still go, and the heartbeats never stop.

Drain entries of its containers (core.drain) are keys it holds like the others: taken over
under its lease while the run they hold lasts. They outlive the lease on purpose in two
cases: a lease lost during a partition (the keeper remembers them and puts them again with
its keys), and a shutdown (handed over to a lease of DRAIN_TTL, so a restarted agent finds
them and keeps holding the same run; nobody taking them over, they are gone within a minute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from registrar.core.control import Control, describe_changes, parse_control, subject
from registrar.core.drain import DRAIN_TTL, Run
from registrar.core.keeper import (
    Forget,
    Grant,
    Idle,
    KeeperView,
    Read,
    Stop,
    Wait,
    Write,
    next_step,
)
from registrar.core.layout import Layout
from registrar.core.ownership import Ownership
from registrar.core.planner import Changes
from registrar.core.reconcile import (
    Happened,
    Plan,
    instance_keys,
    mine,
    plan,
    split_deletes,
)
from registrar.core.store import (
    EtcdError,
    EtcdRefused,
    KeyEvent,
    LeaseNotFound,
    Store,
    StoredKey,
)
from registrar.heartbeat import Heartbeat
from registrar.metrics import Metrics
from registrar.retry import Backoff, GaveUp, RetryClock, retry_within
from registrar.shutdown import LAST_REQUEST_RESERVE, stop_threads_by
from registrar.worker import Worker

log = logging.getLogger(__name__)


REFUSED_MAX_BACKOFF = 2.0  # a refused write is tried again at least this often
AFTER_A_BUG = 1.0  # seconds before a step that raised something unexpected is tried again
_MESSAGES = {
    Happened.REGISTER: "registered %s %s",
    Happened.REGISTER_STANDBY: "registered %s %s on standby (held out of rotation)",
    Happened.STANDBY: "left rotation, on standby: %s %s",
    Happened.ROTATION_IN: "back in rotation: %s %s",
    Happened.REPUT: "put %s %s again under the new lease",
    Happened.DEREGISTER: "deregistered %s %s",
    Happened.DRAIN_HOLD: "drain of %s/%s held: its instances stay out while this run lasts",
    Happened.DRAIN_END: "drain of %s/%s ended: the container stopped or started again",
}


# A read this recent stands for the first write's (`replace_all`); an older one (Docker was long
# in answering) is made again, for what others changed of this node's keys meanwhile.
READ_FRESH = 2.0


class _Inputs:
    """What callers told the keeper (guarded by the keeper's condition)."""

    def __init__(self) -> None:
        self.desired: dict[str, dict[str, str]] = {}  # cid -> keys
        self.runs: dict[str, Run] = {}  # cid -> running, not stopping
        self.since: dict[str, float] = {}  # key -> event time
        self.ready = False  # the first full picture of what runs arrived: writing may begin
        self.dirty = True  # something changed since the last write
        self.reread = True  # read this node's keys and the control state before writing
        self.reading = False  # a read is under way (`_read`)
        # the newest revision a `request_reread` asked for while a read was under way: read
        # again after it only if it ended at an older one
        self.asked_revision = 0
        # service -> the revision its control entries last changed at, as the follower saw
        # them while a read was under way (`control_changed`): not applied to the control
        # state held, which that read may or may not hold
        self.changed_at: dict[str, int] = {}

    def flat(self) -> dict[str, str]:
        return {key: value for keys in self.desired.values() for key, value in keys.items()}

    def runs_by_name(self) -> dict[str, Run]:
        return {run.name: run for run in self.runs.values()}


class LeaseKeeper(Worker):
    def __init__(
        self,
        store: Store,
        *,
        ttl: int,
        layout: Layout,
        ownership: Ownership,
        metrics: Metrics,
        heartbeat_interval: float | None = None,
    ) -> None:
        """`ownership` says which keys are this keeper's to reconcile; heartbeats every
        `heartbeat_interval` (default TTL/3)."""
        super().__init__("lease keeper",
                         lambda loop: metrics.internal_errors.labels(loop=loop).inc())
        self._store = store
        self._ttl = ttl
        self._layout = layout
        self._ownership = ownership
        self._metrics = metrics
        self._cond = threading.Condition()
        self._inputs = _Inputs()
        self._retry = RetryClock()
        self.heartbeat = Heartbeat(store, heartbeat_interval or ttl / 3, metrics, self._lost)
        # Only the keeper's thread touches these (and shutdown, after joining it).
        self._lease: int | None = None
        self._lost_lease: int | None = None  # set by the heartbeat's thread (under _cond)
        self._held: dict[str, StoredKey] = {}
        self._known: frozenset[str] = frozenset()
        self._kept_drains: dict[str, str] = {}  # drain entries held when the lease was lost
        # The control entries as of the last read, with the follower's events since (under
        # the lock: `control_changed` applies events on the follower's thread), and what they say.
        self._rules: dict[str, StoredKey] = {}
        self._control = Control()
        self._control_stale = False  # `_rules` changed for other services only: parsed later
        self._refused: str | None = None  # why etcd refuses our writes, while it does
        self._grants = 0
        # the revision of the last read (0: none yet, the first reads every key; the shutdown's
        # drain watches from it)
        self.read_revision = 0
        self._read_at: float | None = None  # when (time.monotonic()) the last read was made
        self._etcd_back = False  # etcd answered again: retry at once, not after the backoff
        store.add_listener(self._etcd_answers)
        self.synced = threading.Event()  # everything told so far is written
        self.revoked: dict[str, StoredKey] = {}  # the instances the shutdown's revoke removed
        self.steps = 0  # steps taken (written or not): what tests wait for, not sleep

    # --- what callers use ---------------------------------------------------------------

    def set_container(
        self, container_id: str, keys: Mapping[str, str], event_time: float | None = None,
        run: Run | None = None,
    ) -> None:
        """`keys`: what the container should have registered now; `run`: the container's run
        while it runs and is not stopping (None: it does not), which drains hold."""
        with self._cond:
            old = self._inputs.desired.get(container_id, {})
            if old == keys and self._inputs.runs.get(container_id) == run:
                return
            if run is None:
                self._inputs.runs.pop(container_id, None)
            else:
                self._inputs.runs[container_id] = run
            if event_time is not None:
                for key, value in keys.items():
                    if old.get(key) != value:
                        self._inputs.since[key] = event_time
            if keys and self._new_service(keys):
                self._inputs.reread = True
            if keys:
                self._inputs.desired[container_id] = dict(keys)
            else:
                self._inputs.desired.pop(container_id, None)
            self._changed()

    def drop_container(self, container_id: str) -> None:
        self.set_container(container_id, {})

    def replace_all(self, desired: Mapping[str, Mapping[str, str]],
                    sidecars: frozenset[str] | None = None, reread: bool = True,
                    runs: Mapping[str, Run] | None = None) -> None:
        """A full reconcile: this is everything that should exist; diff it with what etcd
        holds (read again when `reread`: at start, after Docker came back and at each periodic
        resync: this node's keys only, see `_read`).
        `sidecars`: the containers whose own sidecar owns their keys (watch); `runs`: cid ->
        run of every container running and not stopping (None: as before)."""
        with self._cond:
            desired_now = {cid: dict(keys) for cid, keys in desired.items() if keys}
            runs_now = dict(self._inputs.runs if runs is None else runs)
            if (not reread and self._inputs.ready and desired_now == self._inputs.desired
                    and runs_now == self._inputs.runs
                    and sidecars in (None, self._ownership.sidecars)):
                return  # nothing changed: not even a wake-up
            if not self._inputs.ready and (self._inputs.reading or self._read_fresh()):
                # The first picture, and etcd's side was read (or is being read) meanwhile
                # (`next_step`; a read that fails is made again): every
                # key of the node and every control entry, a control event since made it read
                # again (`concerns`). Reading once more would only delay the first write.
                reread = False
            else:
                reread = reread or self._new_service(
                    k for keys in desired_now.values() for k in keys)
            self._inputs.desired = desired_now
            self._inputs.runs = runs_now
            if sidecars is not None:
                self._ownership = self._ownership._replace(sidecars=sidecars)
            self._inputs.ready = True
            self._inputs.reread = self._inputs.reread or reread
            self._changed()

    def concerns(self, service: str | None = None, node: str | None = None) -> bool:
        """Whether a control entry for `service` (or `node`) can move one of this keeper's
        instances: a sidecar needs no re-read when another service is promoted. Before the
        first picture of what runs, any can (the read made meanwhile stands for the first
        write: `replace_all`)."""
        if node is not None:
            return node == self._ownership.node
        with self._cond:
            return not self._inputs.ready or service in self._services()

    def _read_fresh(self) -> bool:
        """(under the lock) whether the last read was made within READ_FRESH."""
        return self._read_at is not None and time.monotonic() - self._read_at < READ_FRESH

    def _services(self) -> set[str]:
        """(under the lock) the services this keeper has instances of, wanted or held: the
        control entries of any other service were not followed (see `concerns`)."""
        wanted = (key for keys in self._inputs.desired.values() for key in keys)
        held = self._held  # the keeper thread's; replaced whole, read as a snapshot
        return self._services_of(wanted) | self._services_of(held)

    def _services_of(self, keys: Iterable[str]) -> set[str]:
        return {parsed[0] for key in keys if (parsed := self._layout.parse(key))}

    def _new_service(self, keys: Iterable[str]) -> bool:
        """(under the lock) whether `keys` bring a service this keeper had no instance of and
        whose control entries changed while a read was under way (`control_changed`): the
        control state held may be stale for it, so it is read again before the write. Every
        read takes every service's entries and every later event is applied to them, so any
        other new service needs no read (in a rolling deploy at 1,000 hosts, a thousand
        agents read at once for nothing)."""
        new = self._services_of(keys) - self._services()
        return bool(new) and (not self.read_revision or any(
            self._inputs.changed_at.get(service, 0) > self.read_revision for service in new))

    def control_changed(self, events: Iterable[KeyEvent]) -> None:
        """Control entries changed (the follower's events, in order). An entry about a
        service (a promotion, canary weights, a service or an instance held out) past the
        last read is applied to the control state held, and a change that concerns this
        keeper's instances is written: no read of etcd (a promotion at 1,000 hosts was a read
        by every agent of the service, each ~20 ranges). While a read is under way, which
        may or may not hold it, one that concerns the keeper is read for again after it, and
        another service's is remembered (`_new_service`). An entry about this node (held
        out, a drain) makes it read again: its drains are keys it holds too."""
        with self._cond:
            reread, rules, moved = 0, dict(self._rules), False
            for event in events:
                about = subject(event.key, self._layout)
                if about is None or event.revision <= self.read_revision:
                    continue  # not a control entry, or the last read holds it
                service, node = about
                if service is not None and self.read_revision and not self._inputs.reading:
                    if event.value is None:
                        rules.pop(event.key, None)
                    else:
                        rules[event.key] = StoredKey(event.value, 0)
                    moved = moved or self.concerns(service)
                    continue
                if service is not None:
                    changed = self._inputs.changed_at
                    changed[service] = max(event.revision, changed.get(service, 0))
                if self.concerns(service, node):
                    reread = max(reread, event.revision)
            if rules != self._rules:
                self._rules = rules
                if moved:
                    self._take_control(parse_control(rules, self._layout))
                    self._changed()
                else:  # parsed at the next write: a thousand agents need not parse them all
                    self._control_stale = True  # for each promotion of a service they lack
            if reread:
                self.request_reread(reread)

    def _take_control(self, control: Control) -> None:
        """(under the lock) The control state from now on; what changed is logged."""
        self._control_stale = False
        changes = describe_changes(self._control, control)
        if changes:
            log.info("control: %s", "; ".join(changes[:20]) + (
                f"; and {len(changes) - 20} more" if len(changes) > 20 else ""),
                extra={"event": "control"})
        self._control = control

    def set_sidecars(self, sidecars: frozenset[str]) -> None:
        with self._cond:
            if sidecars != self._ownership.sidecars:
                self._ownership = self._ownership._replace(sidecars=sidecars)
                self._changed()

    def request_reread(self, revision: int | None = None) -> None:
        """Re-read this node's keys and the control state from etcd before the next write;
        `revision`: of what changed (a follower's read or event), which a read that reached
        it already holds (a follower's first read while the keeper reads is no second read)."""
        with self._cond:
            if revision is not None:
                if revision <= self.read_revision:
                    return
                if self._inputs.reading:
                    self._inputs.asked_revision = max(self._inputs.asked_revision, revision)
                    return
            self._inputs.reread = True
            self._changed()

    def desired_keys(self) -> dict[str, str]:
        with self._cond:
            return self._inputs.flat()

    @property
    def lease(self) -> int | None:
        return self._lease

    def start(self) -> None:
        super().start()
        self.heartbeat.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def shutdown(self, deadline: float) -> bool:
        """Stops both threads and revokes the lease (every key at once), giving up at
        `deadline` (time.monotonic()), whose split is `registrar.shutdown`'s. False when etcd
        could not be told."""
        self.request_stop()
        self.heartbeat.request_stop()  # both told at once, each joined within the deadline
        # what a step in flight may take (its request's timeout), leaving time to revoke
        joined_by = stop_threads_by(deadline, time.monotonic())
        self.heartbeat.join(joined_by)
        self.join(joined_by)
        lease, count = self._lease, len(instance_keys(self._held, self._layout))
        if lease is None:
            return True
        self._hand_over_drains(deadline)
        try:
            retry_within(
                lambda: self._store.revoke(lease, timeout=max(0.1, deadline - time.monotonic())),
                what=f"revoking lease {lease:x}", errors=(EtcdError,),
                timeout=max(0.0, deadline - time.monotonic()), log=log,
                backoff=Backoff(maximum=0.5))
        except GaveUp as exc:
            log.warning("could not revoke lease %x: %s; its %d keys expire within %ds",
                        lease, exc.last, count, self._ttl, extra={"event": "revoke_failed"})
            return False
        self.revoked = instance_keys(self._held, self._layout)
        self._metrics.deregistrations.inc(count)
        self._metrics.registered.set(0)
        self._metrics.standby.set(0)
        self._held, self._known, self._lease = {}, frozenset(), None
        log.info("revoked lease %x: %d keys removed", lease, count,
                 extra={"event": "deregister_all", "keys": count})
        return True

    def _hand_over_drains(self, deadline: float) -> None:
        """Puts the drain entries this keeper holds on a lease of their own (DRAIN_TTL) before
        the revoke would delete them: the hold survives a restart of the agent (the next one
        finds the entry and the same run), and an entry nobody takes over goes within a
        minute. Best effort within the deadline: without it the instances come back at the
        next start instead of staying out."""
        entries = {k: v.value for k, v in self._held.items() if self._layout.parse_drain(k)}
        if not entries or deadline - time.monotonic() < LAST_REQUEST_RESERVE:
            return
        try:
            lease = self._store.grant(DRAIN_TTL)
            self._store.apply(entries, (), lease)
        except EtcdError as exc:
            log.warning("could not keep %d drain entries beyond this process: %s",
                        len(entries), exc, extra={"event": "drain_handover_failed"})
            return
        log.info("%d drain entries kept for %ds on lease %x for the next owner", len(entries),
                 DRAIN_TTL, lease, extra={"event": "drain_handover"})

    # --- the thread ---------------------------------------------------------------------

    def _changed(self) -> None:
        self._inputs.dirty = True
        self.synced.clear()
        self._cond.notify_all()

    def _lost(self, lease: int, why: str) -> None:
        """From the heartbeat: `lease` is gone."""
        with self._cond:
            self._lost_lease = lease
            self._cond.notify_all()
        log.warning("lease %x lost (%s)", lease, why, extra={"event": "lease_lost"})

    def _etcd_answers(self, up: bool) -> None:
        if up:
            with self._cond:
                self._etcd_back = True
                self._cond.notify_all()

    def _view(self) -> KeeperView:
        """(under the lock) what the next step depends on."""
        return KeeperView(lease=self._lease, lost_lease=self._lost_lease,
                          ready=self._inputs.ready, dirty=self._inputs.dirty,
                          reread=self._inputs.reread, retry_at=self._retry.at,
                          etcd_back=self._etcd_back, stopping=self.stopping)

    def run(self) -> None:
        while True:
            with self._cond:
                self.health.progressed()
                now = time.monotonic()
                step = next_step(self._view(), now)
                if isinstance(step, Stop):
                    return
                if isinstance(step, Wait):
                    self._cond.wait(1.0 if step.until is None
                                    else min(1.0, max(0.0, step.until - now)))
                    continue
                self._etcd_back = False
                if isinstance(step, Forget):
                    if step.lease == self._lease:
                        self._drop_lease()
                        self._inputs.dirty = True  # every key put again under a new lease
                    self._lost_lease = None
                    continue
                if isinstance(step, Idle):
                    self._inputs.dirty = False
            try:
                if isinstance(step, Grant):
                    self._grant()
                elif isinstance(step, Read):
                    self._read()
                elif isinstance(step, Write):
                    self._write()
            except EtcdRefused as exc:
                self._retry.failed(REFUSED_MAX_BACKOFF)
                self._writes_refused(exc)
            except EtcdError:
                self._retry.failed()
            except Exception:  # a bug: it must show, and must not stop the keeper
                log.exception("lease keeper step failed")
                self.health.internal_error()
                self._retry.after(AFTER_A_BUG)
            else:
                self._retry.succeeded()
                self.health.succeeded()
            finally:
                self.steps += 1

    def _take(self) -> tuple[dict[str, str], dict[str, float], Ownership, dict[str, Run],
                             Control]:
        """The inputs of one write."""
        with self._cond:
            if self._control_stale:
                self._take_control(parse_control(self._rules, self._layout))
            taken = (self._inputs.flat(), self._inputs.since, self._ownership,
                     self._inputs.runs_by_name(), self._control)
            self._inputs.since, self._inputs.dirty = {}, False
            return taken

    def _give_back(self, since: dict[str, float], reread: bool) -> None:
        with self._cond:
            self._inputs.since = {**since, **self._inputs.since}
            self._inputs.reread = self._inputs.reread or reread
            self._inputs.dirty = True

    def _write(self) -> None:
        """Plans the writes from what runs, what etcd holds and the control state, and makes
        them: one request."""
        desired, since, ownership, runs, control = self._take()
        assert self._lease is not None
        try:
            decided = plan(desired, self._held, control, self._layout, ownership,
                           self._lease, self._known, runs)
            if decided.changes:
                self._apply(decided)
        except LeaseNotFound as exc:
            self._give_back(since, True)
            log.warning("lease %x lost (%s)", self._lease or 0, exc,
                        extra={"event": "lease_lost"})
            with self._cond:
                self._drop_lease()
            return  # dirty again: the next steps grant a new lease and put every key
        except EtcdError:
            self._give_back(since, True)  # whatever changed meanwhile is read before writing
            raise
        except BaseException:
            self._give_back(since, False)
            raise
        self._account(decided, since)
        if self._refused is not None:
            log.info("etcd accepts writes again", extra={"event": "writes_accepted"})
            self._refused = None
            self._metrics.writes_refused.set(0)
        with self._cond:
            if not self._inputs.dirty:
                self.synced.set()

    def _grant(self) -> None:
        """A new lease; what etcd holds is read again before the first write under it."""
        regrant = self._grants > 0
        lease = self._store.grant(self._ttl)
        with self._cond:
            self._lease = lease
            self._inputs.reread = True
        self._grants += 1
        self.heartbeat.follow(self._lease)
        if regrant:
            self._metrics.lease_regrants.inc()
            log.warning("lease lost; granted a new one (%x), putting every key again",
                        self._lease, extra={"event": "lease_regrant"})
        else:
            log.info("granted lease %x (ttl %ds)", self._lease, self._ttl,
                     extra={"event": "lease_grant"})

    def _drop_lease(self) -> None:
        # the drain entries went with the lease, but their holds did not end: put them again
        self._kept_drains.update(
            (k, v.value) for k, v in self._held.items() if self._layout.parse_drain(k))
        self._lease = None
        self.heartbeat.follow(None)
        self._held = {}
        self._metrics.registered.set(0)
        self._metrics.standby.set(0)

    def _read(self) -> None:
        """This node's keys (in rotation and on standby) and the control entries, from etcd in
        one request (`_read_keys`)."""
        with self._cond:
            self._inputs.reread = False  # a change from now on is read again
            self._inputs.reading = True
            ownership, services = self._ownership, self._services()
        done = False
        try:
            self._read_keys(ownership, services)
            done = True
        finally:
            with self._cond:
                self._inputs.reading = False
                if not done or self._inputs.asked_revision > self.read_revision:
                    self._inputs.reread = True
                self._inputs.asked_revision = 0
                self._inputs.changed_at = {  # what the read took is no longer news
                    service: revision for service, revision in self._inputs.changed_at.items()
                    if revision > self.read_revision}

    def _read_keys(self, ownership: Ownership, services: Iterable[str]) -> None:
        """The first read takes every key under the prefix and standby, to find what a run
        before this one left (its keys of services no container runs any more); later ones
        only this node's keys of the services it holds or wants."""
        layout = self._layout
        rules = [rule + "/" for rule in layout.rules]
        if not self.read_revision:
            starts = [layout.prefix + "/", layout.standby + "/", *rules]
        else:
            starts = [*layout.own_starts(ownership.node, services), *rules]
        found, self.read_revision = self._store.list_starting(starts)
        self._read_at = time.monotonic()
        stored = {k: v for k, v in found.items() if layout.in_rotation(k)}
        control_keys = {k: v for k, v in found.items() if not layout.in_rotation(k)}
        for key, value in self._kept_drains.items():
            control_keys.setdefault(key, StoredKey(value, 0))  # bound to no lease: put again
        held = {**stored, **{k: v for k, v in control_keys.items()
                             if k.startswith(self._layout.standby + "/")
                             or k.startswith(self._layout.draining + "/")}}
        with self._cond:  # events wait while reading (`control_changed`); not other nodes'
            self._rules = {k: v for k, v in control_keys.items()  # standby keys
                           if k.startswith(tuple(rules))}
            self._take_control(parse_control(self._rules, self._layout))
        self._held = mine(held, self._layout, ownership)

    def _apply(self, decided: Plan) -> None:
        assert self._lease is not None
        try:
            self._store.apply(decided.changes.puts, decided.changes.deletes, self._lease)
        except EtcdRefused:
            alone = split_deletes(decided.changes, self._layout)
            if alone.deletes and alone != decided.changes:
                self._apply_deletes(alone)
            raise

    def _apply_deletes(self, alone: Changes) -> None:
        """Refused as a whole: deregistrations go on their own (they free space, never use it)."""
        assert self._lease is not None
        try:
            self._store.apply({}, alone.deletes, self._lease)
        except EtcdError:
            return
        for key in alone.deletes:
            self._held.pop(key, None)
        self._metrics.deregistrations.inc(len(alone.deletes))
        log.info("deregistered %d keys while etcd refuses puts", len(alone.deletes),
                 extra={"event": "deregister", "keys": len(alone.deletes)})

    def _writes_refused(self, exc: EtcdRefused) -> None:
        self._metrics.write_refusals.labels(code=exc.code).inc()
        self._metrics.writes_refused.set(1)
        if self._refused != str(exc):
            log.error("etcd refuses writes: %s; retrying every %gs at most, heartbeats go on",
                      exc, REFUSED_MAX_BACKOFF, extra={"event": "writes_refused"})
        self._refused = str(exc)

    def _account(self, decided: Plan, since: Mapping[str, float]) -> None:
        """Records, counts and logs what etcd acknowledged."""
        acked = time.time()
        self._held = dict(decided.held)
        self._known = decided.known
        self._kept_drains = {}  # put again (or ended): held like the others from now on
        ended = {d for key in decided.changes.deletes if (d := self._layout.parse_drain(key))}
        if ended:  # not read again before the next write: a stale entry must not hold
            with self._cond:
                self._rules = {k: v for k, v in self._rules.items()
                               if self._layout.parse_drain(k) not in ended}
                self._control = self._control._replace(draining={
                    d: v for d, v in self._control.draining.items() if d not in ended})
        registered, deregistered = decided.counts()
        self._metrics.registrations.inc(registered)
        self._metrics.deregistrations.inc(deregistered)
        for note in decided.notes:
            log.info(_MESSAGES[note.happened], note.service, note.instance,
                     extra={"event": note.happened.value, "service": note.service,
                            "instance": note.instance})
            event_time = since.get(note.key)
            if event_time is not None and self._layout.in_rotation(note.key):
                self._metrics.registration_latency.observe(max(0.0, acked - event_time))
        instances = instance_keys(self._held, self._layout)
        standby = sum(1 for key in instances if not self._layout.in_rotation(key))
        self._metrics.registered.set(len(instances) - standby)
        self._metrics.standby.set(standby)
