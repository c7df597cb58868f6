"""etcd for a one-shot command (`ls`, `promote`, `maint`): every request is retried through
transient errors (an outage, a leader election, a connection attempt that timed out on a loaded
machine) until the command's own deadline, and then given up on with one line that says so.
A configuration problem (TLS refused, a wrong password) or a refusal (a missing permission) is
not transient: it ends the command at once.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from registrar.core.store import EtcdRefused, EtcdUnavailable, Store, StoredKey
from registrar.errors import FatalError
from registrar.retry import PATIENCE, GaveUp, patience, poll_until, retry_within

T = TypeVar("T")
log = logging.getLogger(__name__)


class OneShot:
    def __init__(self, store: Store, timeout: float, what: str = "etcd") -> None:
        """`timeout`: the command's --timeout, from now; `what` starts every error line."""
        self.store = store
        self.deadline = time.monotonic() + timeout
        self.what = what

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def __call__(self, fn: Callable[[Store], T]) -> T:
        """`fn(store)`, retried through transient errors until the deadline; each attempt
        waits twice as long as the one before for etcd's answers (up to PATIENCE): an etcd
        that answers in 3 s under load is slow, not gone, and a command that gave up on every
        request after 2 s would never see the answer (a dead endpoint still fails over after
        the first attempt's usual timeout)."""
        store = self.store
        usual = store.request_timeout
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            store.request_timeout = patience(usual, attempts, PATIENCE)
            attempts += 1
            try:
                return fn(store)
            except EtcdUnavailable as exc:
                if exc.lasting:
                    raise FatalError(f"{self.what}: {exc}") from None
                raise
            except EtcdRefused as exc:
                raise FatalError(f"{self.what}: {exc}") from None

        try:
            return retry_within(attempt, what=self.what, errors=(EtcdUnavailable,),
                                timeout=self.left(), log=log)
        except GaveUp as exc:
            raise FatalError(str(exc)) from None
        finally:
            store.request_timeout = usual


# One read in this many of read_until's is linearizable even when nothing looks settled.
LINEARIZABLE_EVERY = 10


def read_until(etcd: OneShot, read: Callable[[bool], T], settled: Callable[[T], object]) -> T:
    """`read(serializable)` again every POLL_INTERVAL (retry.poll_until, the one poll) until
    `settled` says so or the command's deadline has passed; the last read either way.

    The first read and one in LINEARIZABLE_EVERY are linearizable; the others serializable:
    the member asked answers from what it has applied, with no round to the leader (at 1,000
    hosts, eight commands reading linearizably ten times a second waited in line behind a busy
    leader for tens of seconds, docs/scale.md). A serializable read may be a little behind, so
    one that looks settled is believed only once a linearizable read says so too: the answer is
    never older than the command's own write, and a member cut off from the others (whose
    serializable answers never move) is read past every LINEARIZABLE_EVERY polls. What it
    returns unsettled at the deadline is a linearizable read too: the command says what etcd
    holds, not what one member had applied."""
    last: list[T] = []
    polls = itertools.count()
    behind = [False]  # whether the last read was serializable

    def look() -> bool:
        serializable = next(polls) % LINEARIZABLE_EVERY != 0
        last[:], behind[0] = [read(serializable)], serializable
        if serializable and settled(last[0]):
            last[:], behind[0] = [read(False)], False
        return bool(settled(last[0]))

    if not poll_until(look, etcd.left()) and behind[0]:
        last[:] = [read(False)]
    return last[0]


def read_prefixes(etcd: OneShot, prefixes: Sequence[str], serializable: bool = False
                  ) -> list[dict[str, StoredKey]]:
    """Several prefixes as of one revision, in one transaction: an agent's move between
    rotation and standby is one transaction, which two reads on either side of it would show
    as an instance in neither place, or in both."""
    found, _revision = etcd(lambda store: store.list_prefixes(prefixes,
                                                              serializable=serializable))
    return found
