"""`registrar promote SERVICE VERSION --canary P1,P2,...`: the judgement of the deploy's step
four ("if the new code is running and requests are being successfully routed to it") made by
the program, from the traffic every router really served.

Each step writes `{control_prefix}/weights/{SERVICE}` (every router then sends VERSION P % of
the service's new requests, every agent keeps VERSION's instances in rotation); every second
it reads the routers' reports under `{control_prefix}/routers/` and asks the pure judgement
(`core.canary.CanaryRun`) what to do. Every step passed: the promotion is written and waited
for as without --canary, then the weights key goes. A step failed, the timeout passed, a gate
refused, `--abort`, or SIGINT/SIGTERM: the weights key goes (traffic is split as before), no
promotion is written, exit 1 with one line saying why.

Steering from any machine: while it runs, the command holds `{control_prefix}/canary/
{SERVICE}/owner` on a lease of its own (TTL OWNER_TTL, kept alive every second on a thread):
a canary killed with SIGKILL stops counting as followed within seconds, and `--abort` may then
delete its weights key itself. Every STEER_EVERY it reads `.../request` (written by `promote
SERVICE --pause|--resume|--abort`), acts on it and deletes it: the deletion is the
acknowledgement the steering command waits for. The main thread waits in slices of SLICE, so a
signal is acted on at once, whatever the canary is doing (a gate's POST included).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TextIO, TypeVar

from registrar.adapters.gate import INTERRUPTED, ask_gate
from registrar.commands.oneshot import OneShot
from registrar.commands.output import say
from registrar.commands.promote import (
    Rotation,
    promote_and_wait,
    read_rotation,
    refuse_unless_registered,
)
from registrar.core import timestamps
from registrar.core.canary import (
    CanaryPlan,
    CanaryRun,
    LatencyRules,
    Promote,
    Reason,
    Report,
    RollBack,
    SetPercent,
    SteeringRequest,
    StepResult,
    gate_payload,
    http_router_for,
)
from registrar.core.canary import parse_reports as parse_router_reports
from registrar.core.layout import Layout
from registrar.core.store import EtcdError, Store, StoredKey
from registrar.errors import FatalError
from registrar.retry import GaveUp, retry_within
from registrar.settings import CanarySettings, Settings
from registrar.worker import Worker

log = logging.getLogger(__name__)
LIFT_WITHIN = 5.0  # how long a rollback tries to delete the weights key through etcd errors
T = TypeVar("T")

LOOK_EVERY = 1.0  # the routers report every 2 s: a look every second sees each report
STEER_EVERY = 0.5  # a steering request is acted on within this (acknowledged within 2 s)
SLICE = 0.2  # the main thread never waits longer than this without looking at signals
OWNER_TTL = 3  # the owner key outlives a killed canary command by at most this


class Interrupted:
    """SIGINT/SIGTERM while the canary runs: remembered, acted on by the loop."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.event = threading.Event()
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Renewed(OneShot):
    """Each etcd request gets the whole budget again: a paused canary may last for hours, so
    no deadline for the whole command can be set in advance."""

    def __init__(self, store: Store, budget: float) -> None:
        super().__init__(store, budget)
        self.budget = budget

    def __call__(self, fn: Callable[[Store], T]) -> T:
        self.deadline = time.monotonic() + self.budget
        return super().__call__(fn)


class OwnerLease(Worker):
    """`{control}/canary/{SERVICE}/owner`, bound to a lease kept alive every second on its own
    thread (the main loop may wait on a gate); granted again if it was lost."""

    def __init__(self, store: Store, key: str, value: str) -> None:
        super().__init__("canary owner")
        self._store, self.key, self._value = store, key, value
        self._lease: int | None = None

    def take(self, etcd: OneShot) -> None:
        """Grants the lease and puts the key through `etcd` (retried within its budget),
        then keeps it alive."""
        lease = etcd(lambda store: store.grant(OWNER_TTL))
        etcd(lambda store: store.put(self.key, self._value, lease))
        self._lease = lease
        super().start()

    def run(self) -> None:
        while not self.wait(1.0):
            try:
                if self._lease is None or self._store.keepalive(self._lease) == 0:
                    self._lease = self._store.grant(OWNER_TTL)
                    self._store.put(self.key, self._value, self._lease)
            except EtcdError as exc:  # tried again in a second; the TTL covers two misses
                log.debug("canary owner keepalive failed: %s", exc)

    def stop(self, deadline: float | None = None) -> None:
        """Revokes the lease: the owner key goes at once (the thread joined within 2 s)."""
        super().stop(time.monotonic() + 2.0 if deadline is None else deadline)
        if self._lease is not None:
            with contextlib.suppress(EtcdError):
                self._store.revoke(self._lease, timeout=2.0)


def weights_value(canary: CanarySettings, version: str, percent: int,
                  paused: bool = False) -> str:
    value: dict[str, object] = {"version": version, "percent": percent, "at": timestamps.now()}
    if paused:
        value["paused"] = True
    if canary.header is not None:
        value["header"] = canary.header
    if canary.sticky:
        value["sticky"] = True
    return json.dumps(value)


def run(settings: Settings, out: TextIO = sys.stdout) -> int:
    """`registrar promote SERVICE VERSION --canary ...`: refused like a plain promotion unless
    enough instances of VERSION are registered, then step by step."""
    p = settings.promote
    assert p is not None and p.version is not None
    from registrar.adapters.etcd_store import EtcdStore

    store = EtcdStore(settings.etcd)
    try:
        before = read_rotation(OneShot(store, p.timeout), settings, p.service)
        refuse_unless_registered(before, p.service, p.version, p.min_instances)
        return run_canary(store, settings, before, out)
    finally:
        store.close()


def run_canary(store: Store, settings: Settings, before: Rotation, out: TextIO) -> int:
    return CanaryCommand(store, settings, out).run(before)


class CanaryCommand:
    """One canary, from the refusals to the promotion or the rollback."""

    def __init__(self, store: Store, settings: Settings, out: TextIO) -> None:
        p = settings.promote
        assert p is not None and p.canary is not None and p.version is not None
        self.store, self.settings, self.out = store, settings, out
        self.service, self.version, self.c = p.service, p.version, p.canary
        self.layout = Layout(settings.prefix, settings.control_prefix)
        self.weights = f"{self.layout.weights}/{p.service}"
        self.steering = f"{self.layout.canary}/{p.service}"
        self.request = f"{self.steering}/request"
        c = p.canary
        self.canary = CanaryRun(CanaryPlan(
            p.service, p.version, c.steps, c.interval, p.timeout, c.max_error_rate,
            c.min_requests, latency=LatencyRules(c.max_p99_ms, c.max_latency_ratio)))
        self.etcd = Renewed(store, p.timeout + 10)
        self.in_force = 0  # the percent the weights key holds (0: not written)
        self.handled: str | None = None  # the last steering request acted on
        self.unacknowledged: str | None = None  # an --abort, acknowledged once rolled back
        self.owner = OwnerLease(store, f"{self.steering}/owner", json.dumps(
            {"version": p.version, "at": timestamps.now()}))
        self.stop = Interrupted()

    def say(self, line: str) -> None:
        say(line, self.out)  # the routers' figures and versions are etcd's values
        self.out.flush()

    def run(self, before: Rotation) -> int:
        p = self.settings.promote
        assert p is not None
        final: Promote | RollBack | None = None
        try:
            self._refuse_unless_ready()
            final = self._first_step(before)
            if final is None:
                final = self._steps()
            if isinstance(final, Promote):
                self.stop.restore()  # the promotion is written: a signal ends its wait as before
                for line in final.lines:
                    self.say(f"  {line}")  # every step passed: said before the promotion's wait
                return promote_and_wait(OneShot(self.store, p.timeout), self.settings, before,
                                        self.out)
        finally:
            self.stop.restore()
            if self.in_force:
                self._lift()  # traffic goes back to how it was split (or the promotion stands)
            self._acknowledge()
            self.owner.stop()
        assert final is not None
        raise FatalError(final.message)

    # --- before the first step -----------------------------------------------------------

    def _refuse_unless_ready(self) -> None:
        needs = self.c.needs_http
        head = f"refusing a canary of {self.service} {self.version}"
        if needs is not None and not http_router_for(self._reports(), self.service):
            raise FatalError(f"{head}: {needs} needs routers in http mode, and no router "
                             f"reporting on {self.service} runs in http mode; nothing changed")
        if self._weights_stand():
            raise FatalError(self._another())

    def _another(self) -> str:
        return (f"refusing a canary of {self.service} {self.version}: another canary of "
                f"{self.service} is in progress ({self.weights} exists); nothing changed")

    def _first_step(self, before: Rotation) -> RollBack | None:
        """The gate's step 0, then the weights key at the first step's percent."""
        refused = self._gate(0, None)
        if refused is not None:
            return refused
        baseline = self._reports()  # where the first step's counting starts
        step = self.canary.start(time.monotonic())
        value = weights_value(self.c, self.version, step.percent)
        if not self.etcd(lambda s: s.put_if_absent(self.weights, value)):
            raise FatalError(self._another())
        self.in_force = step.percent
        # the owner key only once the weights key is ours: a canary refused here must not
        # take (and, ending, delete) the owner key of the one in progress
        self.owner.take(self.etcd)
        self.say(f"{step.message} ({len(before.active)} in rotation)")
        self.canary.decide(time.monotonic(), baseline)
        return None

    # --- the steps -----------------------------------------------------------------------

    def _steps(self) -> Promote | RollBack:
        next_look = next_steer = 0.0
        while True:
            if self.stop.event.wait(SLICE):
                assert self.stop.signal is not None
                return self.canary.interrupt(time.monotonic(), self.stop.signal)
            now = time.monotonic()
            final: Promote | RollBack | None = None
            if now >= next_steer:
                next_steer = now + STEER_EVERY
                final = self._steer(now)
            if final is None and now >= next_look:
                next_look = now + LOOK_EVERY
                final = self._look(now)
            if final is not None:
                return final

    def _look(self, now: float) -> Promote | RollBack | None:
        reports = self._reports()
        if not self._weights_stand():
            return self.canary.stopped(Reason.GONE, self.in_force, f"its weights key "
                                       f"{self.weights} was deleted by someone else")
        decision = self.canary.decide(now, reports)
        if isinstance(decision, RollBack):
            return decision
        if isinstance(decision, Promote):
            return self._gate(len(decision.steps), decision.steps[-1]) or decision
        if isinstance(decision, SetPercent):
            assert decision.passed is not None
            refused = self._gate(len(self.canary.passed), decision.passed)
            if refused is not None:
                return refused
            self._put_weights(decision.percent)
            self.say(decision.message)
        return None

    def _gate(self, step: int, result: StepResult | None) -> RollBack | None:
        """Asks --gate (if any) before step `step + 1` or the promotion: None lets it go on."""
        if self.c.gate is None:
            return None
        payload = gate_payload(self.service, self.version, step, result)
        why = ask_gate(self.c.gate, payload, self.stop.event.wait)
        if why is None:
            self.say(f"canary of {self.service} {self.version}: gate {self.c.gate} passed"
                     f" step {step}")
            return None
        if why == INTERRUPTED:
            why = f"interrupted by {self.stop.signal} while asking the gate"
            return self.canary.stopped(Reason.INTERRUPTED, self.in_force, why)
        return self.canary.stopped(Reason.GATE, self.in_force, why)

    # --- steering ------------------------------------------------------------------------

    def _steer(self, now: float) -> RollBack | Promote | None:
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.steering))
        raw = stored.get(self.request)
        request = SteeringRequest.parse(raw.value) if raw is not None else None
        if request is None or request.id == self.handled:
            return None
        self.handled = request.id
        head = f"canary of {self.service} {self.version}"
        if request.action == "abort":
            self.unacknowledged = request.id  # acknowledged once rolled back
            return self.canary.abort(now, self._reports())
        if request.action == "pause" and self.canary.pause():
            self._put_weights(self.canary.percent, paused=True)
            self.say(f"{head} paused at {self.in_force}% (until --resume or --abort)")
        elif request.action == "resume" and self.canary.resume(now, self._reports()):
            self._put_weights(self.canary.percent)
            self.say(f"{head} resumed at {self.in_force}%: the step starts again")
        self.unacknowledged = request.id
        self._acknowledge()
        return None

    def _acknowledge(self) -> None:
        """Deletes the steering request acted on: what the steering command waits for."""
        if self.unacknowledged is None:
            return
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.steering))
        raw = stored.get(self.request)
        request = SteeringRequest.parse(raw.value) if raw is not None else None
        if request is not None and request.id == self.unacknowledged:
            self.etcd(lambda s: s.delete(self.request))
        self.unacknowledged = None

    # --- etcd ----------------------------------------------------------------------------

    def _reports(self) -> dict[str, Report]:
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.layout.routers))
        return parse_router_reports(stored, self.layout)

    def _weights_stand(self) -> bool:
        stored: dict[str, StoredKey]
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.layout.weights))
        return self.weights in stored

    def _put_weights(self, percent: int, paused: bool = False) -> None:
        value = weights_value(self.c, self.version, percent, paused)
        self.etcd(lambda store: store.put(self.weights, value))
        self.in_force = percent

    def _lift(self) -> None:
        """Deletes the weights key, trying a few seconds whatever else failed; when etcd stays
        away, one line naming what is left behind (and how to remove it), never a traceback
        over the error already in flight."""
        try:
            retry_within(lambda: self.store.delete(self.weights), what=f"deleting {self.weights}",
                         errors=(EtcdError,), timeout=LIFT_WITHIN, log=log)
        except GaveUp as exc:
            service = self.settings.promote.service if self.settings.promote else "SERVICE"
            raise FatalError(
                f"{exc}; left behind: {self.weights} (the canary's split stands until it is "
                f"deleted: `registrar promote {service} --abort` deletes it)") from None
