"""The etcd adapter: pyetcd behind a small interface, with its pitfalls handled in one place.

- Every call has a timeout (pyetcd has none by default: a hung etcd would block forever).
- Several endpoints with failover; a failed endpoint is retried after one second, not pyetcd's
  300 s; gRPC's reconnect backoff is capped at one second so a restarted etcd is used again at
  once, while each connection attempt may take as long as a request (a slow link connects).
- Authentication: the token goes as plain gRPC metadata (pyetcd also sends it as call
  credentials, which gRPC refuses on an http:// channel). An expired token (etcd drops one after
  --auth-token-ttl of disuse; heartbeats do not use it) or one lost with an etcd restart is
  renewed at once on the same client: authenticate again and retry the request once.
- Errors say what is wrong in one line: a TLS handshake refused, a wrong password, a missing
  permission, with the flag to check (never the password).
- Every error becomes `EtcdUnavailable` (etcd cannot be reached or will not let us in: retry
  later), `EtcdRefused` (etcd answered and refused this request: its quota is full, a
  permission is missing, the value is too large) or `LeaseNotFound` (grant a new lease).
- Whether etcd answers is tracked here, from every request and every watch stream, in one
  place: `registrar_etcd_up`, and one log line when it goes and when it comes back.
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
# etcd (grpc-go) refuses transport pings more often than every 5 s (--grpc-keepalive-min-time).
KEEPALIVE_TIME_MS = 5000


def grpc_options(timeout: float) -> list[tuple[str, int]]:
    """gRPC channel options. gRPC's "min reconnect backoff" is also the deadline of one
    connection attempt: it follows the request timeout, so that a link of a few hundred
    milliseconds' round trip still completes its handshake (at 100 ms it never did)."""
    timeout_ms = max(1000, int(timeout * 1000))
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", timeout_ms),
        ("grpc.max_reconnect_backoff_ms", max(1000, timeout_ms)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", timeout_ms),
    ]


# Status codes with which etcd answers a request it will not carry out, while it is up.
REFUSAL_CODES = frozenset({
    "RESOURCE_EXHAUSTED",  # "mvcc: database space exceeded" (the NOSPACE alarm)
    "PERMISSION_DENIED",
    "INVALID_ARGUMENT",  # a request too large, a value etcd rejects
    "FAILED_PRECONDITION",
    "OUT_OF_RANGE",
})


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

    def __init__(self, on_answer: Callable[[bool, str], None] = lambda up, why: None) -> None:
        """`on_answer(up, why)`: told of every response (True) and of the stream's end."""
        self._queue: queue.Queue[list[KeyEvent] | BaseException] = queue.Queue()
        self._on_answer = on_answer
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
            self._on_answer(True, "")
            self._queue.put(WatchCompacted(response.compacted_revision))
        elif isinstance(response, BaseException):
            why = f"watch ended: {response}"
            self._on_answer(False, why)
            self._queue.put(EtcdUnavailable(why))
        else:
            self._on_answer(True, "")
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


def diagnose(exc: BaseException, settings: EtcdSettings) -> tuple[str, bool]:
    """(one line saying what went wrong and which flag to check, whether it is a configuration
    problem that retrying will not fix)."""
    import grpc

    code, details = _status(exc)
    if code is None:
        return f"{type(exc).__name__}: {exc}", False
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
    if hint is None:
        return raw, False
    return f"{hint} ({raw})", code != grpc.StatusCode.PERMISSION_DENIED


class EtcdStore:
    def __init__(self, settings: EtcdSettings, metrics: Metrics | None = None,
                 *, log_health: bool = False) -> None:
        """`metrics`: `registrar_etcd_up` and request durations go there; `log_health`: log
        when etcd stops answering and when it answers again (long-running commands)."""
        self._settings = settings
        self._metrics = metrics
        self._log_health = log_health
        self._lock = threading.Lock()
        self._client: Any = None
        self._last_error = "none"
        self._last_lasting = False
        self.up: bool | None = None  # whether etcd answers (None: not asked yet)
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = False

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
                time_retry=1.0, opts=grpc_options(s.timeout),
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
                result = fn(self._get_client())
            except grpc.RpcError as exc:
                if not _token_expired(exc):
                    raise
                # Refused before it was applied: authenticate anew and try once more.
                log.debug("etcd auth token expired; authenticating again")
                result = fn(self._renew_token())
        except grpc.RpcError as exc:
            code, details = _status(exc)
            if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
                self._heard()
                raise LeaseNotFound(details) from None
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
                "token" in details
            ):
                self._drop_client()
            self._last_error, lasting = diagnose(exc, self._settings)
            self._last_lasting = lasting
            if code is not None and code.name in REFUSAL_CODES and not lasting:
                self._heard()
                raise EtcdRefused(self._last_error, code.name) from None
            raise self._unavailable(self._last_error, lasting) from None
        except etcd_errors.Etcd3Exception as exc:
            if isinstance(exc, etcd_errors.NoServerAvailableError):
                # Every endpoint failed within the last second: say why the last one did.
                self._drop_client()
                raise self._unavailable(
                    f"no etcd endpoint available (last error: {self._last_error})",
                    self._last_lasting,
                ) from None
            self._last_error, self._last_lasting = diagnose(exc, self._settings)
            raise self._unavailable(self._last_error, self._last_lasting) from None
        except ValueError as exc:
            if "failed node" not in str(exc):
                raise  # a bug, not an outage: it must show
            self._drop_client()  # pyetcd's "Trying to use a failed node"
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # TLS files that became unreadable
            self._drop_client()
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        else:
            self._heard()
        finally:
            if self._metrics is not None:
                self._metrics.etcd_request_duration.labels(op=op).observe(
                    time.perf_counter() - started
                )
        return result

    # --- whether etcd answers -----------------------------------------------------------

    def _heard(self) -> None:
        """etcd answered (a result, or a refusal of this one request)."""
        self._set_up(True, "")

    def _unavailable(self, why: str, lasting: bool = False) -> EtcdUnavailable:
        self._set_up(False, why)
        return EtcdUnavailable(why, lasting)

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """`listener(up)` is called whenever etcd goes from answering to not, or back."""
        self._listeners.append(listener)

    def _watch_answer(self, up: bool, why: str) -> None:
        if not self._closed:  # our own close ends every stream: not an outage
            self._set_up(up, why)

    def _set_up(self, up: bool, why: str) -> None:
        with self._lock:
            before, self.up = self.up, up
        if self._metrics is not None:
            self._metrics.etcd_up.set(1 if up else 0)
        if before is up:
            return
        if self._log_health and up and before is False:
            log.info("etcd reachable again", extra={"event": "etcd_up"})
        elif self._log_health and not up:
            log.warning("etcd unreachable or refusing requests: %s", why,
                        extra={"event": "etcd_down"})
        for listener in self._listeners:
            listener(up)

    def close(self) -> None:
        self._closed = True
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

    def revoke(self, lease: int, timeout: float | None = None) -> None:
        """Revokes the lease (every key bound to it goes); `timeout` bounds this one request
        (the shutdown's deadline), else the usual request timeout."""
        import pyetcd

        def revoke(client: Any) -> None:
            request = pyetcd.etcdrpc.LeaseRevokeRequest(ID=lease)
            client.leasestub.LeaseRevoke(
                request, min(timeout, self._settings.timeout) if timeout else
                self._settings.timeout, credentials=client.call_credentials,
                metadata=client.metadata)

        with contextlib.suppress(LeaseNotFound):  # already gone: its keys are gone too
            self._call("lease_revoke", revoke)

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

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self._call("put", lambda c: c.put(key, value, lease=lease))

    def put_if_absent(self, key: str, value: str) -> bool:
        """Puts `key` unless it exists (one transaction); False when it was there."""

        def txn(client: Any) -> bool:
            t = client.transactions
            succeeded, _responses = client.transaction(
                compare=[t.version(key) == 0], success=[t.put(key, value)], failure=[])
            return bool(succeeded)

        return self._call("txn", txn)

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

        watch = PrefixWatch(self._watch_answer)

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
