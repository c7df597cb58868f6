"""etcd for a one-shot command (`ls`, `promote`, `maint`): every request is retried through
transient errors (an outage, a leader election, a connection attempt that timed out on a loaded
machine) until the command's own deadline, and then given up on with one line that says so.
A configuration problem (TLS refused, a wrong password) or a refusal (a missing permission) is
not transient: it ends the command at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from registrar.core.store import EtcdRefused, EtcdUnavailable, Store, StoredKey
from registrar.errors import FatalError
from registrar.retry import GaveUp, poll_until, retry_within

T = TypeVar("T")
log = logging.getLogger(__name__)


# The longest a one-shot command's later attempts wait for one answer of etcd's.
PATIENCE = 16.0


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
            store.request_timeout = max(usual, min(usual * 2 ** attempts, PATIENCE))
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


def read_until(etcd: OneShot, read: Callable[[], T], settled: Callable[[T], object]) -> T:
    """`read()` again every POLL_INTERVAL (retry.poll_until, the one poll) until `settled`
    says so or the command's deadline has passed; the last read either way."""
    last: list[T] = []

    def look() -> bool:
        last[:] = [read()]
        return bool(settled(last[0]))

    poll_until(look, etcd.left())
    return last[0]


def read_two(etcd: OneShot, first: str, second: str
             ) -> tuple[dict[str, StoredKey], dict[str, StoredKey]]:
    """Two prefixes as of one revision, in one transaction: an agent's move between rotation
    and standby is one transaction, which two reads on either side of it would show as an
    instance in neither place, or in both."""
    a, b, _revision = etcd(lambda store: store.list_two(first, second))
    return a, b
