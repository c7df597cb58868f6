"""The etcd adapter: pyetcd behind a small interface, with its pitfalls handled in one place.

- Every call has a timeout (pyetcd has none by default: a hung etcd would block forever).
- Several endpoints with failover; a failed endpoint is retried after one second, not pyetcd's
  300 s; gRPC's own reconnect backoff is capped at one second so a restarted etcd is used again
  at once.
- Authentication: the token goes as plain gRPC metadata (pyetcd also sends it as call
  credentials, which gRPC refuses on an http:// channel). An expired token (etcd drops one after
  --auth-token-ttl of disuse; heartbeats do not use it) or one lost with an etcd restart is
  renewed at once on the same client: authenticate again and retry the request once.
- Errors say what is wrong in one line: a TLS handshake refused, a wrong password, a missing
  permission, with the flag to check (never the password).
- Every error becomes `EtcdUnavailable` (retry later) or `LeaseNotFound` (grant a new lease).
Retries themselves live with the callers' one policy (`registrar.retry`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from registrar.core.planner import StoredKey
from registrar.metrics import Metrics
from registrar.settings import EtcdSettings

log = logging.getLogger(__name__)

# gRPC's C core writes its own lines to stderr (a refused TLS handshake gives three), which
# would break the one-line errors and the JSON log format; our messages carry the status
# details instead. Set before grpc is first imported; GRPC_VERBOSITY=ERROR brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

T = TypeVar("T")

# etcd's default --max-txn-ops is 128.
TXN_MAX_OPS = 128
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 3000),
]


class EtcdUnavailable(Exception):
    """etcd could not be reached or refused the request; worth retrying later."""


class LeaseNotFound(Exception):
    """The lease expired or was revoked: grant a new one and put every key again."""


class WatchCompacted(Exception):
    """The revision a watch wanted is compacted away: read everything again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (now {revision})")
        self.revision = revision


@dataclass(frozen=True)
class KeyEvent:
    key: str
    value: str | None  # None: deleted (or expired with its lease)
    revision: int


class PrefixWatch:
    """Events under a prefix, from a revision on, read with `get()`.

    `get()` raises EtcdUnavailable when the watch died with its connection (start a new one
    from the last revision seen + 1) and WatchCompacted when that revision is gone.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[list[KeyEvent] | BaseException] = queue.Queue()
        self.cancel: Callable[[], None] = lambda: None

    def wake(self) -> None:
        """Makes a waiting `get()` return at once (with no events): for stopping."""
        self._queue.put([])

    def get(self, timeout: float) -> list[KeyEvent]:
        """The next batch of events ([] when none came within `timeout`)."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if isinstance(item, BaseException):
            raise item
        return item

    def _deliver(self, response: Any) -> None:
        from pyetcd import events as etcd_events
        from pyetcd import exceptions as etcd_errors

        if isinstance(response, etcd_errors.RevisionCompactedError):
            self._queue.put(WatchCompacted(response.compacted_revision))
        elif isinstance(response, BaseException):
            self._queue.put(EtcdUnavailable(f"watch ended: {response}"))
        else:
            revision = int(response.header.revision)
            batch = []
            for event in response.events:
                deleted = isinstance(event, etcd_events.DeleteEvent)
                batch.append(KeyEvent(
                    key=bytes(event.key).decode("utf-8", "replace"),
                    value=None if deleted else bytes(event.value).decode("utf-8", "replace"),
                    revision=int(getattr(event, "mod_revision", 0) or revision),
                ))
            self._queue.put(batch)


def _status(exc: BaseException) -> tuple[Any, str]:
    """(grpc.StatusCode or None, details) of an RpcError, or of the RpcError a pyetcd exception
    was raised from (pyetcd turns UNAVAILABLE into a bare "etcd connection failed")."""
    import grpc

    for error in (exc, exc.__context__):
        if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
            details = (error.details() if hasattr(error, "details") else "") or ""
            return error.code(), details
    return None, ""


def _token_expired(exc: BaseException) -> bool:
    """The token is no longer good: expired, lost with an etcd restart, or issued before a
    change of users/roles ("revision of auth store is old"). A new one fixes it."""
    import grpc

    code, details = _status(exc)
    return (code == grpc.StatusCode.UNAUTHENTICATED and "token" in details) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and "auth store is old" in details
    )


def describe_error(exc: BaseException, settings: EtcdSettings) -> str:
    """One line saying what went wrong and which flag to check (never the password)."""
    import grpc

    code, details = _status(exc)
    if code is None:
        return f"{type(exc).__name__}: {exc}"
    raw = f"{code.name}: {details}"
    text = details.lower()
    secure = any(ep.secure for ep in settings.endpoints)
    hint = None
    if "authentication failed" in text:
        hint = f"etcd refused user {settings.user!r}: check --etcd-user and the password"
    elif "authentication is not enabled" in text:
        hint = "--etcd-user is given but etcd has authentication disabled"
    elif "user name is empty" in text:
        hint = (
            "etcd requires authentication: give --etcd-user and REGISTRAR_ETCD_PASSWORD (or a "
            "client certificate whose CN is an etcd user)"
        )
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        who = f"user {settings.user!r}" if settings.user else "this client"
        hint = (
            f"{who} lacks a permission: its role needs readwrite on --prefix/ and "
            "--control-prefix/ (read is enough for ls and haproxy)"
        )
    elif secure and "certificate_verify_failed" in text:
        hint = "TLS: etcd's server certificate is not trusted (check --etcd-ca)"
    elif secure and ("peer name" in text or "hostname" in text):
        hint = "TLS: etcd's server certificate does not name the host of the --etcd URL"
    elif secure and any(
        word in text for word in ("tsi_", "ssl", "tls", "handshake", "bad_certificate")
    ):
        hint = (
            "TLS: the handshake with etcd failed (does it want a client certificate? check "
            "--etcd-cert/--etcd-key, and that it is signed by a CA etcd trusts)"
        )
    return f"{hint} ({raw})" if hint else raw


class EtcdStore:
    def __init__(self, settings: EtcdSettings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._lock = threading.Lock()
        self._client: Any = None
        self._last_error = "none"

    # --- plumbing ---------------------------------------------------------------------

    def _build_client(self) -> Any:
        import grpc
        import pyetcd

        s = self._settings
        creds = None
        if any(ep.secure for ep in s.endpoints):
            def read(path: str | None) -> bytes | None:
                if path is None:
                    return None
                with open(path, "rb") as handle:
                    return handle.read()

            creds = grpc.ssl_channel_credentials(read(s.ca), read(s.key), read(s.cert))
        endpoints = [
            pyetcd.Endpoint(
                ep.host, ep.port, secure=ep.secure, creds=creds if ep.secure else None,
                time_retry=1.0, opts=_GRPC_OPTIONS,
            )
            for ep in s.endpoints
        ]
        client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=s.timeout, user=s.user, password=s.password,
            failover=True,
        )
        # pyetcd sends the token twice: as metadata and as call credentials. gRPC refuses call
        # credentials on an insecure channel ("Established channel does not have a sufficient
        # security level"), so with http:// every request failed; the metadata is enough.
        client.call_credentials = None
        return client

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _renew_token(self) -> Any:
        """A new token for the same client: its channel and open watch streams stay (closing
        them would end the promotion watch at every renewal)."""
        import pyetcd

        s = self._settings
        client = self._get_client()
        if s.user is None or s.password is None:  # not ours (a client certificate's CN?)
            self._drop_client()
            return self._get_client()
        request = pyetcd.etcdrpc.AuthenticateRequest(name=s.user, password=s.password)
        token = client.authstub.Authenticate(request, s.timeout).token
        client.metadata = (("token", token),)
        watcher = client._stubs.get("watcher")
        if watcher is not None:  # the stream it opens next (after this one ends) uses it
            watcher._metadata = client.metadata
        return client

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken channel may fail; it is gone either way
                log.debug("closing etcd client failed", exc_info=True)

    def _call(self, op: str, fn: Callable[[Any], T]) -> T:
        import grpc
        from pyetcd import exceptions as etcd_errors

        started = time.perf_counter()
        try:
            try:
                return fn(self._get_client())
            except grpc.RpcError as exc:
                if not _token_expired(exc):
                    raise
                # Refused before it was applied: authenticate anew and try once more.
                log.debug("etcd auth token expired; authenticating again")
                return fn(self._renew_token())
        except grpc.RpcError as exc:
            code, details = _status(exc)
            if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
                raise LeaseNotFound(details) from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
                "token" in details
            ):
                self._drop_client()
            self._last_error = describe_error(exc, self._settings)
            raise EtcdUnavailable(self._last_error) from None
        except etcd_errors.Etcd3Exception as exc:
            if isinstance(exc, etcd_errors.NoServerAvailableError):
                # Every endpoint failed within the last second: say why the last one did.
                self._drop_client()
                raise EtcdUnavailable(
                    f"no etcd endpoint available (last error: {self._last_error})"
                ) from None
            self._last_error = describe_error(exc, self._settings)
            raise EtcdUnavailable(self._last_error) from None
        except (OSError, ValueError) as exc:
            # ValueError: pyetcd's "Trying to use a failed node"; OSError: TLS files.
            self._drop_client()
            raise EtcdUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            if self._metrics is not None:
                self._metrics.etcd_request_duration.labels(op=op).observe(
                    time.perf_counter() - started
                )

    def close(self) -> None:
        self._drop_client()

    # --- leases -----------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self._call("lease_grant", lambda c: c.lease(ttl).id))

    def keepalive(self, lease: int) -> int:
        """One heartbeat; returns the TTL etcd granted (0: the lease is gone)."""

        def refresh(client: Any) -> int:
            responses = list(client.refresh_lease(lease))
            return int(responses[0].TTL) if responses else 0

        return self._call("lease_keepalive", refresh)

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseNotFound):  # already gone: its keys are gone too
            self._call("lease_revoke", lambda c: c.revoke_lease(lease))

    # --- keys -------------------------------------------------------------------------

    def list_prefix(self, prefix: str) -> tuple[dict[str, StoredKey], int]:
        """Every key under `prefix/` with its value and lease, and the store's revision."""

        def read(client: Any) -> tuple[dict[str, StoredKey], int]:
            response = client.get_prefix_response(prefix + "/")
            keys = {
                kv.key.decode("utf-8", "replace"): StoredKey(
                    kv.value.decode("utf-8", "replace"), int(kv.lease)
                )
                for kv in response.kvs
            }
            return keys, int(response.header.revision)

        return self._call("range", read)

    def get(self, key: str) -> str | None:
        def read(client: Any) -> str | None:
            value, _meta = client.get(key)
            return None if value is None else bytes(value).decode("utf-8", "replace")

        return self._call("get", read)

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self._call("put", lambda c: c.put(key, value, lease=lease))

    def delete(self, key: str) -> None:
        self._call("delete", lambda c: c.delete(key))

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str], lease: int) -> None:
        """Writes puts and deletes in transactions of at most TXN_MAX_OPS operations.

        Operations on the same instance (the last path segment: a key moving between rotation
        and standby is a delete and a put) always share one transaction.
        """
        groups: dict[str, list[tuple[str, str | None]]] = {}
        for key, value in [*puts.items(), *((key, None) for key in deletes)]:
            groups.setdefault(key.rsplit("/", 1)[-1], []).append((key, value))
        chunks: list[list[tuple[str, str | None]]] = [[]]
        for ops in groups.values():
            if chunks[-1] and len(chunks[-1]) + len(ops) > TXN_MAX_OPS:
                chunks.append([])
            chunks[-1].extend(ops)
        for chunk in chunks:
            if len(chunk) == 1:
                key, value = chunk[0]
                if value is None:
                    self.delete(key)
                else:
                    self.put(key, value, lease)
            elif chunk:
                self._txn(chunk, lease)

    def _txn(self, chunk: list[tuple[str, str | None]], lease: int) -> None:
        def txn(client: Any) -> None:
            t = client.transactions
            success = [
                t.delete(key) if value is None else t.put(key, value, lease=lease)
                for key, value in chunk
            ]
            client.transaction(compare=[], success=success, failure=[])

        self._call("txn", txn)

    # --- watches ----------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int) -> PrefixWatch:
        """Watches `prefix/` from `start_revision` on (raises WatchCompacted if it is gone)."""
        from pyetcd import exceptions as etcd_errors

        watch = PrefixWatch()

        def add(client: Any) -> Any:
            try:
                watch_id = client.add_watch_prefix_callback(
                    prefix + "/", watch._deliver, start_revision=start_revision
                )
            except etcd_errors.RevisionCompactedError as exc:
                raise WatchCompacted(exc.compacted_revision) from None
            return client, watch_id

        client, watch_id = self._call("watch", add)
        if watch_id < 0 and self._settings.user:
            # etcd refuses a watch silently (created and canceled at once, id -1) when the
            # stream's token has expired: authenticate anew and try once more.
            with contextlib.suppress(Exception):
                client.cancel_watch(watch_id)
            self._drop_client()
            client, watch_id = self._call("watch", add)
        if watch_id < 0:
            with contextlib.suppress(Exception):
                client.cancel_watch(watch_id)
            self._drop_client()
            raise EtcdUnavailable(
                f"etcd refused the watch on {prefix}/ (permission denied: it needs read "
                "permission there)"
            )

        def cancel() -> None:
            with contextlib.suppress(Exception):
                client.cancel_watch(watch_id)

        watch.cancel = cancel
        return watch
