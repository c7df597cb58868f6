"""ContainerWatcher: follows Docker's events and tells the LeaseKeeper what should be registered.

Two threads: a reader that only moves events from Docker's stream into a queue (and reconnects
with backoff when the stream ends), and one consumer that applies them in order. The reader
subscribes before the consumer lists the running containers, so nothing starting in between is
missed; after every (re)connect the consumer reconciles in full, since Docker keeps only its last
256 events. A `register` sidecar is the same watcher limited to one container; it starts from
the inspect that found its container running (`first`) without waiting for the stream, which it
opens from the container's start (State.StartedAt as `since`, at most REPLAY_SPAN back), so
that whatever happened to it after that inspect comes as events (a sidecar's start to its key
is one inspect and one subscription shorter).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core import timestamps
from registrar.core.containers import ContainerInfo
from registrar.core.drain import Run
from registrar.core.lifecycle import Effect, effect_of, network_effect
from registrar.core.naming import NamingContext, Outcome, has_sidecar, registrations_for
from registrar.core.planner import json_object
from registrar.core.replay import ReplayFilter, event_time_nano
from registrar.core.source import ContainerSource, DockerUnavailable
from registrar.health import LoopHealth
from registrar.metrics import Metrics
from registrar.retry import INITIAL_BACKOFF, retry_forever
from registrar.typing_shim import TYPE_CHECKING, Any
from registrar.worker import Worker

if TYPE_CHECKING:
    from registrar.agent.checker import Checker

log = logging.getLogger(__name__)

QUEUE_POLL = 0.5
# How far back a sidecar's first events stream begins at most: the inspect it registers from
# was made a few milliseconds before, and a minute is far beyond any skew between this host's
# clock and the engine's; a container started longer ago would only have its older events
# replayed (each health check's), each an inspect.
REPLAY_SPAN = 60.0


# The consumer's messages besides Docker's events (plain classes: a dataclass costs ~0.5 ms to
# build at import, and these are only ever told apart by their type).
class _StreamOpened:
    """The events stream is open: what runs may be listed now."""


class _Known:
    """What a sidecar's container was found to be before the stream opened (`first`)."""

    __slots__ = ("info",)

    def __init__(self, info: ContainerInfo) -> None:
        self.info = info


class _StreamLost:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Recheck:
    """A port of this container entered or left rotation by registrar's own check."""

    __slots__ = ("container_id",)

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id


class _Tracked:
    """What the consumer knows of one container."""

    def __init__(self, info: ContainerInfo) -> None:
        self.info = info
        self.stopping = False  # a kill/stop was seen: out of rotation until it starts again
        self.rejected: str | None = None
        self.values: dict[str, str] = {}  # key -> encoded value

    def run(self) -> Run | None:
        """This run of the container while it runs and is not stopping: what a drain holds
        (a pause or a failing check does not end it; a stop, a death or a new start does)."""
        if not self.info.running or self.stopping:
            return None
        return Run(self.info.name, self.info.id, self.info.started_at)


def event_label(action: str, attributes: dict[str, Any] | None = None) -> str:
    """A bounded label for the events counter ('exec_create: sh -c ..' -> 'exec_create';
    Docker's 'health_status: healthy' and Podman's bare one both 'health_status:healthy')."""
    head, colon, tail = action.partition(":")
    if head != "health_status":
        return head
    status = tail if colon else str((attributes or {}).get("health_status", ""))
    return f"health_status:{status.strip()}" if status.strip() else "health_status"


class ContainerWatcher(Worker):
    """Two threads: the reader (Docker's events into a queue) and this worker's own, the one
    consumer of the queue (the event loop)."""

    def __init__(
        self,
        docker: ContainerSource,
        keeper: LeaseKeeper,
        naming: NamingContext,
        metrics: Metrics,
        *,
        resync: float,
        only: str | None = None,
        finished: threading.Event | None = None,
        first: ContainerInfo | None = None,
    ) -> None:
        """`only`: a sidecar's container id; `finished` is set when that container is gone;
        `first`: that container as an inspect found it running (applied at once; the first
        stream replays its events from its start, so that nothing after the inspect is
        missed).
        A `Checker` runs registrar's own checks (`registrar.check` labels) on a thread of its
        own: a checked port is registered only while its check holds; a change comes back
        to the one consumer as a `_Recheck`. It is made (and its module imported) with the
        first checked port: most containers have none, and a sidecar starts sooner without."""
        super().__init__("event loop",
                         lambda loop: metrics.internal_errors.labels(loop=loop).inc())
        self._docker = docker
        self._checker: Checker | None = None  # the consumer's alone to create
        self._started = False
        self._keeper = keeper
        self._naming = naming
        self._metrics = metrics
        self._resync = resync
        self._only = only
        self._queue: queue.Queue[Any] = queue.Queue()
        self._tracked: dict[str, _Tracked] = {}
        self._sidecars: frozenset[str] = frozenset()
        self._replay = ReplayFilter()
        self._reader = Worker("docker-events", target=self._read)
        self._docker_ok: bool | None = None
        self.finished = finished if finished is not None else threading.Event()
        self.finished_reason: str | None = None
        # A sidecar's streams begin at its container's start (at most REPLAY_SPAN ago) until
        # an event was seen (then where the replay filter says), so that none of what came
        # after `first` is missed; and whether the consumer may skip the reconcile of the
        # first one it opens.
        started = timestamps.engine_time_ns(first.started_at) if first else None
        self._from_ns = None if started is None else max(
            started, time.time_ns() - int(REPLAY_SPAN * 1e9))
        self._replays_first = False
        if first is not None and self._from_ns is not None:
            self._queue.put(_Known(first))

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self._reader.start()
        super().start()

    def recheck(self, container_id: str) -> None:
        """From the checker's thread: a check result changed a port's rotation."""
        self._queue.put(_Recheck(container_id))

    def wake(self) -> None:
        """Stops taking events: ends the stream; both threads end (see `join`)."""
        self._docker.close_events()
        if self._checker is not None:
            self._checker.request_stop()
        self._queue.put(None)

    def join(self, deadline: float) -> None:
        self._reader.join(deadline)
        super().join(deadline)
        if self._checker is not None:
            self._checker.join(deadline)

    def checker_loops(self) -> tuple[LoopHealth, ...]:
        """The checker's health for /healthz, once there is a checker (a port to check)."""
        checker = self._checker
        return () if checker is None else (checker.health,)

    def _checks(self) -> Checker:
        """The checker, made and started with the first checked port (consumer thread)."""
        if self._checker is None:
            from registrar.agent.checker import Checker

            checker = Checker(self.recheck, self._metrics)
            if self._started and not self.stopping:
                checker.start()
            self._checker = checker
        return self._checker

    def alive(self) -> bool:
        return self._reader.alive() and super().alive()

    # --- reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        while not self.stopping:
            try:
                retry_forever(self._read_once, what="docker events", errors=(DockerUnavailable,),
                              stop=self._stopping, log=log, on_failure=self._docker_failed)
            except DockerUnavailable:
                return  # stopping
            # A stream that was open has ended: reconnect with a fresh backoff.
            self.wait(INITIAL_BACKOFF)

    def _read_once(self) -> None:
        filters = {"container": self._only} if self._only else None
        resume = self._replay.resume_from() or self._from_ns
        since = None if resume is None else timestamps.since(resume)
        events = self._docker.open_events(since, filters)
        # Subscribed: now the consumer may list what runs (nothing starting meanwhile is missed).
        self._queue.put(_StreamOpened())
        for event in events:
            self._queue.put(event)
        if not self.stopping:
            self._queue.put(_StreamLost("the events stream ended"))

    def _docker_failed(self, error: BaseException) -> None:
        self._queue.put(_StreamLost(str(error)))

    # --- consumer thread ----------------------------------------------------------------

    def run(self) -> None:  # the consumer
        next_resync = time.monotonic() + self._resync if self._resync else None
        while not self.stopping:
            timeout = QUEUE_POLL
            if next_resync is not None:
                timeout = max(0.0, min(timeout, next_resync - time.monotonic()))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            self.health.progressed()
            if self.stopping:
                return
            try:
                self._handle(item)
                if next_resync is not None and time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self._resync
                    if self._docker_ok:
                        self.reconcile(reread=True)
            except DockerUnavailable as exc:
                # Make the reader reconnect (it may not have noticed: a timed-out inspect on a
                # live stream); the full reconcile after it catches up on what we missed.
                self._set_docker_up(False, str(exc))
                self._docker.close_events()
            except Exception:  # a bug: it must show, and must not stop the consumer
                log.exception("handling %r failed", item)
                self.health.internal_error()
            else:
                self.health.succeeded()

    def _handle(self, item: object) -> None:
        if isinstance(item, _StreamOpened):
            self._set_docker_up(True, "events stream open")
            if self._replays_first:
                self._replays_first = False  # it delivers what changed since `first`
            else:
                self.reconcile(reread=True)
        elif isinstance(item, _Known):
            self.reconcile(reread=True, known=item.info)
            self._replays_first = True
        elif isinstance(item, _StreamLost):
            self._replays_first = False
            self._set_docker_up(False, item.reason)
        elif isinstance(item, dict):
            self._apply_event(item)
        elif isinstance(item, _Recheck):
            tracked = self._tracked.get(item.container_id)
            if tracked is not None:
                self._update(tracked.info, event_time=None, push=True)

    def _set_docker_up(self, up: bool, reason: str) -> None:
        self._metrics.docker_up.set(1 if up else 0)
        if up != self._docker_ok:
            if up:
                log.info("docker connected (%s)", reason, extra={"event": "docker_up"})
            else:
                log.warning("docker unreachable: %s; reconnecting", reason,
                            extra={"event": "docker_down", "reason": reason})
        self._docker_ok = up

    def reconcile(self, reread: bool = False, known: ContainerInfo | None = None) -> None:
        """Re-reads every running container (or the one) and hands the whole set to the keeper
        (`reread`: and makes it read this node's keys in etcd again: at start, after Docker
        came back and at each periodic resync, which so puts right what someone else changed).
        `known`: the one container as just inspected (a sidecar's `first`)."""
        self._metrics.reconciles.inc()
        if self._only:
            info = known if known is not None else self._docker.inspect(self._only)
            running = [info] if info is not None and info.running else []
            if info is None or not info.running:
                self._container_gone(self._only, "not running")
        else:
            running = self._docker.running()
        seen = set()
        for info in running:
            seen.add(info.id)
            self._update(info, event_time=None, push=False)
        for cid in list(self._tracked):
            if cid not in seen:
                del self._tracked[cid]
                self._unchecked(cid)
        if not self._only:
            self._sidecars = frozenset(
                t.info.name for t in self._tracked.values() if has_sidecar(t.info)
            )
        self._keeper.replace_all(
            {cid: tracked.values for cid, tracked in self._tracked.items()},
            sidecars=None if self._only else self._sidecars, reread=reread,
            runs={cid: run for cid, tracked in self._tracked.items()
                  if (run := tracked.run()) is not None},
        )

    def _apply_event(self, event: dict[str, Any]) -> None:
        if not self._replay.first_time(event):
            return  # delivered again by a resumed stream
        action = str(event.get("Action") or event.get("status") or "")
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        network = event.get("Type") == "network"
        # a network event is about the container it names, not about its actor (the network)
        cid = str(attributes.get("container") or "") if network else str(
            actor.get("ID") or event.get("id") or "")
        if not cid or (self._only and cid != self._only):
            return
        self._metrics.docker_events.labels(
            action=f"network_{action}" if network else event_label(action, attributes)).inc()
        tracked = self._tracked.get(cid)
        if network:
            effect = network_effect(action)
            if tracked is None or tracked.stopping or not tracked.info.running:
                return  # not one of ours (yet), or on its way out: its start will read it
        else:
            effect = effect_of(action, attributes,
                               tracked.info.stop_signal if tracked else "SIGTERM")
        time_nano = event_time_nano(event)
        event_time = time_nano / 1e9 if time_nano else time.time()
        log.debug("event %s %s -> %s", action, cid[:12], effect.value)
        if effect is Effect.RECHECK:
            if tracked is None or not tracked.info.has_healthcheck:
                return
            effect = Effect.REFRESH
        if (effect is Effect.START and self._only and tracked is not None
                and tracked.info.running and not tracked.stopping):
            # A sidecar's first stream replays the start of the run it registered from: the
            # container died in between otherwise, and that death ended the sidecar.
            return
        if effect in (Effect.START, Effect.REFRESH):
            info = self._docker.inspect(cid)
            if info is None:
                self._forget(cid)
                return
            if effect is Effect.START and tracked is not None:
                tracked.stopping = False
            self._update(info, event_time=event_time, push=True)
        elif effect is Effect.WITHDRAW:
            if tracked is None:
                tracked = self._tracked[cid] = _Tracked(info=_placeholder(cid))
            tracked.stopping = True
            self._withdraw(cid)
        elif effect in (Effect.OUT, Effect.DIED):
            if effect is Effect.DIED and tracked is not None:
                tracked.info = tracked.info._replace(running=False)
            self._withdraw(cid)
            if effect is Effect.DIED and self._only:
                self._container_gone(cid, action)
        elif effect is Effect.GONE:
            self._forget(cid)
            if self._only:
                self._container_gone(cid, action)

    def _note_sidecar(self, info: ContainerInfo) -> None:
        if has_sidecar(info) != (info.name in self._sidecars):
            names = set(self._sidecars)
            if has_sidecar(info):
                names.add(info.name)
            else:
                names.discard(info.name)
            self._sidecars = frozenset(names)
            self._keeper.set_sidecars(self._sidecars)

    def _update(self, info: ContainerInfo, *, event_time: float | None, push: bool) -> None:
        if not self._only:
            self._note_sidecar(info)
        tracked = self._tracked.get(info.id)
        if tracked is None:
            tracked = self._tracked[info.id] = _Tracked(info=info)
        else:
            tracked.info = info
        values: dict[str, str] = {}
        checked = False
        if info.serving and not tracked.stopping:
            outcome = registrations_for(info, self._naming, timestamps.now())
            self._note_outcome(tracked, outcome)
            registrations = outcome.registrations
            if outcome.rejected is None and any(r.check is not None for r in registrations):
                from registrar.agent.checker import targets_of

                targets = targets_of(registrations)
                checked = bool(targets)
                checker = self._checks()
                checker.set_targets(info.id, targets)
                registrations = tuple(r for r in registrations
                                      if r.check is None or checker.passing(r.key))
            for registration in registrations:
                encoded = registration.encoded()
                old = tracked.values.get(registration.key)
                # Keep registered_at of an unchanged registration: a resync writes nothing.
                if old is not None and _same_but_time(old, registration.value):
                    encoded = old
                values[registration.key] = encoded
        if not checked:
            self._unchecked(info.id)
        tracked.values = values
        if push:
            self._keeper.set_container(info.id, values, event_time, tracked.run())

    def _note_outcome(self, tracked: _Tracked, outcome: Outcome) -> None:
        if outcome.rejected is None:
            tracked.rejected = None
            return
        if tracked.rejected != outcome.rejected:
            self._metrics.rejected.labels(reason=outcome.rejected).inc()
            log.warning(
                "container %s not registered: %s (%s)",
                tracked.info.name[:64], outcome.rejected, outcome.detail,
                extra={"event": "reject", "container": tracked.info.name[:64],
                       "reason": outcome.rejected},
            )
        tracked.rejected = outcome.rejected

    def _withdraw(self, cid: str) -> None:
        tracked = self._tracked.get(cid)
        if tracked is not None:
            tracked.values = {}
        self._unchecked(cid)  # its checks stop the moment it starts stopping
        self._keeper.set_container(cid, {}, None, tracked.run() if tracked else None)

    def _forget(self, cid: str) -> None:
        self._tracked.pop(cid, None)
        self._unchecked(cid)
        self._keeper.drop_container(cid)

    def _unchecked(self, cid: str) -> None:
        if self._checker is not None:
            self._checker.forget(cid)

    def _container_gone(self, cid: str, why: str) -> None:
        log.info("container %s %s: deregistering and exiting", cid[:12], why,
                 extra={"event": "container_gone"})
        self.finished_reason = why
        self.finished.set()


def _placeholder(cid: str) -> ContainerInfo:
    return ContainerInfo(id=cid, name="", image="", running=False)


def _same_but_time(old: str, value: Any) -> bool:
    previous = json_object(old)
    return previous is not None and {**previous, "registered_at": None} == {
        **value, "registered_at": None
    }
