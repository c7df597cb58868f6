"""What the project asks of etcd: the `Store` and `Watch` protocols, the values they carry and
the errors they raise (pure: no I/O here, so the core and the fakes may import it).

The real store is `registrar.adapters.etcd_store.EtcdStore` (etcd's v3 JSON gateway);
`tests/fakes.FakeEtcd` is the in-memory one. Every loop and command is typed against `Store`,
so a call the fake lacks, or one the real store answers differently, shows in `mypy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from registrar.typing_shim import NamedTuple, Protocol

# Status codes (gRPC's, which the gateway's error bodies carry) with which etcd answers a
# request it will not carry out while it is up.
REFUSAL_CODES = frozenset({
    "RESOURCE_EXHAUSTED",  # "mvcc: database space exceeded" (the NOSPACE alarm)
    "PERMISSION_DENIED",
    "INVALID_ARGUMENT",  # a request too large, a value etcd rejects
    "FAILED_PRECONDITION",
    "OUT_OF_RANGE",
})


class StoredKey(NamedTuple):
    """One key as etcd holds it (or as we last wrote it)."""

    value: str
    lease: int


class KeyEvent(NamedTuple):
    key: str
    value: str | None  # None: deleted (or expired with its lease)
    revision: int


class EtcdError(Exception):
    """An etcd request failed (EtcdUnavailable or EtcdRefused)."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, or will not let us in; worth retrying later.

    `lasting`: a configuration problem (TLS refused, a wrong password) that waiting will not
    fix: long-running commands still retry (an operator may fix it), one-shot ones say so."""

    def __init__(self, message: str, lasting: bool = False) -> None:
        super().__init__(message)
        self.lasting = lasting


class EtcdRefused(EtcdError):
    """etcd answered and refused this request (quota full, permission missing, value too
    large...): it is up, and other requests (heartbeats, deletes) may still go through."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # the gRPC status name, e.g. RESOURCE_EXHAUSTED


class LeaseNotFound(Exception):
    """The lease expired or was revoked: grant a new one and put every key again."""


class WatchCompacted(Exception):
    """The revision a watch wanted is compacted away: read everything again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (now {revision})")
        self.revision = revision


class Watch(Protocol):
    """Events under a prefix, from a revision on."""

    def get(self, timeout: float) -> list[KeyEvent]:
        """The next batch ([] when none came within `timeout`); raises EtcdUnavailable when the
        watch died with its connection, WatchCompacted when its revision is gone."""
        ...

    def wake(self) -> None:
        """Makes a waiting `get()` return at once (with no events): for stopping."""
        ...

    def cancel(self) -> None:
        """Ends the watch (on etcd too); `get()` then returns nothing more."""
        ...


class Store(Protocol):
    """Every etcd call the project makes."""

    # How long one request waits for etcd's answer (EtcdSettings.timeout unless changed: a
    # one-shot command's later attempts wait longer, `commands.oneshot`).
    request_timeout: float

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(up)` is called whenever etcd goes from answering to not, or back."""
        ...

    def close(self) -> None: ...

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        ...

    def keepalive(self, lease: int, patience: float | None = None) -> int:
        """One heartbeat; the TTL etcd granted (0: the lease is gone). `patience`: how long to
        wait for the answer, else `request_timeout`."""
        ...

    def revoke(self, lease: int, timeout: float | None = None) -> None:
        """Revokes the lease (its keys go); `timeout` bounds this one request."""
        ...

    def list_prefix(self, prefix: str) -> tuple[dict[str, StoredKey], int]:
        """Every key under `prefix/`, and the store's revision."""
        ...

    def list_prefixes(self, prefixes: Sequence[str], *, serializable: bool = False
                      ) -> tuple[list[dict[str, StoredKey]], int]:
        """Every key under each of `prefixes` (a dict each, in their order), as of one
        revision, and that revision. `serializable`: as the member asked has it, which may be
        a little behind (no round to the leader)."""
        ...

    def list_starting(self, starts: Sequence[str]) -> tuple[dict[str, StoredKey], int]:
        """Every key that starts with one of `starts` (taken as they are: `/s/web/n1:` is the
        instances of node n1 in service web), as of one revision, and that revision."""
        ...

    def put(self, key: str, value: str, lease: int = 0) -> None: ...

    def put_if_absent(self, key: str, value: str) -> bool:
        """Puts `key` unless it exists (one transaction); False when it was there."""
        ...

    def delete(self, key: str) -> None: ...

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str], lease: int) -> None:
        """Writes puts (bound to `lease`) and deletes, those of one instance in one
        transaction."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> Watch:
        """Watches `prefix/` from `start_revision` on (raises WatchCompacted if it is gone)."""
        ...

    def watch_prefixes(self, prefixes: Sequence[str], start_revision: int) -> Watch:
        """Watches every one of `prefixes` from `start_revision` on, as one watch (one
        connection: a process that follows two prefixes needs one thread, not two)."""
        ...

    def watch_ranges(self, ranges: Sequence[tuple[str, str]], start_revision: int) -> Watch:
        """As `watch_prefixes`, of every key in one of `ranges` (`[start, end)`)."""
        ...
