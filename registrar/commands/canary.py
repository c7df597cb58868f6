"""`registrar promote SERVICE VERSION --canary P1,P2,...`: the judgement of the seed's step
four ("if the new code is running and requests are being successfully routed to it") made by
the program, from the traffic every router really served.

Each step writes `{control_prefix}/weights/{SERVICE}` (every router then sends VERSION P % of
the service's new requests, every agent keeps VERSION's instances in rotation); every second
it reads the routers' reports under `{control_prefix}/routers/` and asks the pure judgement
(`core.canary.CanaryRun`) what to do. Every step passed: the promotion is written and waited
for as without --canary, then the weights key goes. A step failed, the timeout passed, or
SIGINT/SIGTERM: the weights key goes (traffic is split as before), no promotion is written,
exit 1 with one line saying why.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import TextIO

from registrar.commands.oneshot import OneShot
from registrar.commands.promote import Rotation, promote_and_wait
from registrar.core.canary import CanaryPlan, CanaryRun, Promote, Report, RollBack, SetPercent
from registrar.core.canary import parse_reports as parse_router_reports
from registrar.core.layout import Layout
from registrar.core.store import EtcdError, Store
from registrar.errors import FatalError
from registrar.settings import Settings

LOOK_EVERY = 1.0  # the routers report every 2 s: a look every second sees each report


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _reports(etcd: OneShot, layout: Layout) -> dict[str, Report]:
    stored, _revision = etcd(lambda store: store.list_prefix(layout.routers))
    return parse_router_reports(stored, layout)


def run_canary(store: Store, settings: Settings, before: Rotation, out: TextIO) -> int:
    p = settings.promote
    assert p is not None and p.canary is not None and p.version is not None
    c = p.canary
    layout = Layout(settings.prefix, settings.control_prefix)
    weights = f"{layout.weights}/{p.service}"
    plan = CanaryPlan(p.service, p.version, c.steps, c.interval, p.timeout, c.max_error_rate,
                      c.min_requests)
    # the whole canary's budget for etcd's transient errors: its longest possible run
    etcd = OneShot(store, len(c.steps) * (c.interval + p.timeout) + p.timeout + 10)
    run = CanaryRun(plan)
    baseline = _reports(etcd, layout)
    step = run.start(time.monotonic())
    value = json.dumps({"version": p.version, "percent": step.percent, "at": _now()})
    # A signal from here on rolls back, however early it comes (once the weights key stands).
    stop = Interrupted()
    final: Promote | RollBack | None = None
    wrote = False
    try:
        if not etcd(lambda s: s.put_if_absent(weights, value)):
            raise FatalError(f"refusing a canary of {p.service} {p.version}: another canary "
                             f"of {p.service} is in progress ({weights} exists); nothing changed")
        wrote = True
        out.write(f"{step.message} ({len(before.active)} in rotation)\n")
        out.flush()
        run.decide(time.monotonic(), baseline)  # where the step's counting starts
        final = _steps(run, etcd, layout, weights, stop, out)
    finally:
        stop.restore()
        if wrote and not isinstance(final, Promote):
            _lift(store, weights)  # traffic goes back to how it was split before
    if isinstance(final, RollBack):
        raise FatalError(final.message)
    for line in final.lines:
        out.write(f"  {line}\n")
    out.flush()  # every step passed: said before the promotion is waited for
    try:
        return promote_and_wait(OneShot(store, p.timeout), settings, before, out)
    finally:
        _lift(store, weights)  # even when the wait is cut short: the promotion stands


def _steps(run: CanaryRun, etcd: OneShot, layout: Layout, weights: str, stop: Interrupted,
           out: TextIO) -> Promote | RollBack:
    while True:
        if stop.event.wait(LOOK_EVERY):
            assert stop.signal is not None
            return run.interrupt(time.monotonic(), stop.signal)
        decision = run.decide(time.monotonic(), _reports(etcd, layout))
        if isinstance(decision, Promote | RollBack):
            return decision
        if isinstance(decision, SetPercent):
            _put_weights(etcd, weights, run.plan.version, decision.percent)
            out.write(decision.message + "\n")
            out.flush()


def _put_weights(etcd: OneShot, key: str, version: str, percent: int) -> None:
    value = json.dumps({"version": version, "percent": percent, "at": _now()})
    etcd(lambda store: store.put(key, value))


def _lift(store: Store, weights: str) -> None:
    """Deletes the weights key, trying a few seconds whatever else failed."""
    deadline = time.monotonic() + 5
    while True:
        try:
            store.delete(weights)
            return
        except EtcdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
