"""`registrar promote SERVICE --pause | --resume | --abort`, from any machine: steer the canary
of SERVICE in progress.

The canary command that runs it holds `{control_prefix}/canary/{SERVICE}/owner` on its lease;
this command writes `.../request` = {"action", "id", "at"} and waits (ACK_WITHIN) until the
canary has acted on it and deleted it. The weights key says whether the canary is paused, so
"nothing to do" is answered without asking it. A weights key with no owner is followed by no
command any more (one killed with SIGKILL): `--abort` deletes it itself; `--pause` and
`--resume` cannot, and say so.
"""

from __future__ import annotations

import time
import uuid
from typing import TextIO

from registrar.adapters.etcd_store import EtcdStore
from registrar.commands.oneshot import OneShot
from registrar.commands.output import say
from registrar.core import timestamps
from registrar.core.canary import SteeringRequest
from registrar.core.control import Canary, parse_canaries
from registrar.core.layout import Layout
from registrar.errors import FatalError
from registrar.retry import poll_until
from registrar.settings import Settings

ACK_WITHIN = 2.0  # the running canary acknowledges within 2 s (README, Canary)
POLL = 0.1
OWNER_GRACE = 4.0  # --abort, unacknowledged: how long an owner key of a dead command may stand
ETCD_BUDGET = 10.0


class Steering:
    def __init__(self, store: EtcdStore, settings: Settings, out: TextIO) -> None:
        p = settings.promote
        assert p is not None and p.steer is not None
        self.service, self.action, self.out = p.service, p.steer, out
        self.layout = Layout(settings.prefix, settings.control_prefix)
        self.weights = f"{self.layout.weights}/{p.service}"
        self.dir = f"{self.layout.canary}/{p.service}"
        self.owner, self.request = f"{self.dir}/owner", f"{self.dir}/request"
        self.etcd = OneShot(store, ETCD_BUDGET)

    def canary(self) -> Canary | None:
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.layout.weights))
        mine = {k: v for k, v in stored.items() if k == self.weights}
        return parse_canaries(mine, self.layout).get(self.service)

    def steering_keys(self) -> tuple[bool, SteeringRequest | None]:
        """Whether a canary command holds the owner key, and the request waiting, if any."""
        stored, _revision = self.etcd(lambda s: s.list_prefix(self.dir))
        raw = stored.get(self.request)
        return self.owner in stored, SteeringRequest.parse(raw.value) if raw else None

    def say(self, line: str) -> int:
        say(line, self.out)
        return 0

    def run(self) -> int:
        canary = self.canary()
        if canary is None:
            raise FatalError(f"no canary of {self.service} in progress (no {self.weights});"
                             " nothing to do")
        head = f"canary of {self.service} {canary.version}"
        followed, _waiting = self.steering_keys()
        if not followed:
            return self._unfollowed(head)
        if self.action == "pause" and canary.paused:
            return self.say(f"{head} is paused already at {canary.percent}%; nothing to do")
        if self.action == "resume" and not canary.paused:
            return self.say(f"{head} is not paused (at {canary.percent}%); nothing to do")
        request = SteeringRequest(self.action, uuid.uuid4().hex)
        self.etcd(lambda s: s.put(self.request, request.value(timestamps.now())))
        took = self._acknowledged(request, ACK_WITHIN)
        if took is not None:
            return self._done(head, took)
        if self.action == "abort" and self._owner_gone(OWNER_GRACE):
            return self._unfollowed(head)  # it died while we asked
        self._withdraw(request)
        raise FatalError(f"{head} did not acknowledge --{self.action} within"
                         f" {ACK_WITHIN:g}s; is its command stuck?")

    def _acknowledged(self, request: SteeringRequest, within: float) -> float | None:
        """Seconds until the canary acknowledged `request` (None: not within `within`)."""
        asked = time.monotonic()

        def acted_on() -> bool:  # the canary acted on it and deleted it
            _followed, waiting = self.steering_keys()
            return waiting is None or waiting.id != request.id

        return time.monotonic() - asked if poll_until(acted_on, within, interval=POLL) else None

    def _owner_gone(self, within: float) -> bool:
        return poll_until(lambda: not self.steering_keys()[0], within, interval=POLL * 2)

    def _withdraw(self, request: SteeringRequest) -> None:
        _followed, waiting = self.steering_keys()
        if waiting is not None and waiting.id == request.id:
            self.etcd(lambda s: s.delete(self.request))

    def _done(self, head: str, took: float) -> int:
        canary = self.canary()
        acknowledged = f"(acknowledged in {took:.2f}s)"
        if self.action == "abort":
            return self.say(f"{head} aborted: rolled back {acknowledged}")
        if canary is None:  # it ended meanwhile (promoted, or rolled back)
            return self.say(f"{head} acknowledged --{self.action} and has ended since")
        state = "paused" if canary.paused else "running"
        return self.say(f"{head} {self.action}d: {state} at {canary.percent}% {acknowledged}")

    def _unfollowed(self, head: str) -> int:
        if self.action != "abort":
            raise FatalError(f"{head}: no canary command follows {self.weights} any more "
                             f"(killed?); `registrar promote {self.service} --abort` deletes it")
        self.etcd(lambda s: s.delete(self.weights))
        self.etcd(lambda s: s.delete(self.request))
        return self.say(f"{head}: no canary command follows {self.weights} any more (killed?);"
                        " deleted it: traffic is split as before the canary")


def run_steering(store: EtcdStore, settings: Settings, out: TextIO) -> int:
    return Steering(store, settings, out).run()
