"""The etcd adapter: etcd's v3 JSON gateway (`/v3/...` on its client port, etcd >= 3.4) through
our own small HTTP/1.1 client (`http1`), with its pitfalls handled in one place.

Why not gRPC: the gRPC stack (grpcio, protobuf, a client library) cost the sidecar most of its
memory and start time; the JSON gateway carries every call the project makes.

- Every request has a timeout (`EtcdSettings.timeout`; the shutdown's revoke its own deadline).
- Several endpoints with failover: a request that fails in transport goes to the next endpoint,
  and the one that answered is used first from then on.
- TLS through one `ssl.SSLContext` (CA, client certificate and key), built at the first
  request; `ssl` is imported only when an https:// endpoint is given.
- Authentication: `/v3/auth/authenticate` gives a token for the `Authorization` header. An
  expired token (etcd drops one after --auth-token-ttl of disuse), one lost with an etcd
  restart, or one issued before a change of users/roles is renewed at once: authenticate again
  and retry the request once (the request was refused before it was applied).
- Keys and values are bytes, base64 in the JSON; 64-bit numbers (lease ids, revisions) are
  strings both ways (JSON numbers lose precision past 2**53 elsewhere).
- Errors say what is wrong in one line, etcd's own message kept: a TLS handshake refused, a
  wrong password, a missing permission, with the flag to check (never the password).
- Every error becomes `EtcdUnavailable` (etcd cannot be reached or will not let us in: retry
  later), `EtcdRefused` (etcd answered and refused this request: its quota is full, a
  permission is missing, the value is too large) or `LeaseNotFound` (grant a new lease).
- Whether etcd answers is tracked here, from every request and every watch stream, in one
  place: `registrar_etcd_up`, and one log line when it goes and when it comes back.
Retries themselves live with the callers' one policy (`registrar.retry`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from registrar.adapters import http1
from registrar.core.store import (
    REFUSAL_CODES,
    EtcdError,
    EtcdRefused,
    EtcdUnavailable,
    KeyEvent,
    LeaseNotFound,
    StoredKey,
    WatchCompacted,
)
from registrar.typing_shim import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # types only: the sidecar imports no ssl for etcd
    import ssl

    from registrar.metrics import Metrics
    from registrar.settings import EtcdSettings

__all__ = [
    "EtcdError", "EtcdRefused", "EtcdStore", "EtcdUnavailable", "KeyEvent", "LeaseNotFound",
    "PrefixWatch", "StoredKey", "WatchCompacted", "diagnose",
]

log = logging.getLogger(__name__)

# etcd's default --max-txn-ops is 128.
TXN_MAX_OPS = 128
# A watch stream sends nothing while nothing changes, so a peer that vanished without a word
# (a host powered off, a dropped route) is noticed by TCP keepalive alone: probed after 1 s of
# silence, given up after one more second without an answer. `registrar_etcd_up` then turns 0
# about 2 s after etcd went silent (a closed or reset connection is seen at once).
WATCH_KEEPALIVE = http1.KeepAlive(idle=1, interval=1, probes=1)
# etcd's JSON gateway (Go's HTTP/1 server) reads a watch's body through a JSON decoder that
# takes 512 bytes first; once the answer to the first creation is written, the server drops
# what it had not read yet, so a creation past those bytes is lost now and then (etcd 3.4:
# 3 to 6 streams of 150, none with bodies of 512 bytes or less). Every watch here stays within.
GATEWAY_WATCH_BODY = 512
IDLE_CONNECTIONS = 4  # kept per endpoint: the keeper, heartbeats and readers do not queue

# gRPC status codes, as the gateway's error bodies give them.
CODE_NAMES = {
    1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


def check_tls_files(settings: EtcdSettings) -> None:
    """`--etcd-ca`, `--etcd-cert`, `--etcd-key` at start (SettingsError naming the flag): PEM
    files, the CA parses as certificates, and the client key belongs to the client certificate.
    (`ssl` only when there is a file to check: it costs every process ~4 MiB and ~10 ms.)"""
    from registrar.adapters.files import pem
    from registrar.flags import SettingsError

    ca = pem("--etcd-ca", settings.ca, "cert")
    cert = pem("--etcd-cert", settings.cert, "cert")
    key = pem("--etcd-key", settings.key, "key")
    if ca is None and (cert is None or key is None):
        return
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise SettingsError(f"--etcd-ca: {ca!r} holds no valid certificate: {exc}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
        except ssl.SSLError as exc:
            mismatch = "KEY_VALUES_MISMATCH" in str(exc) or "values mismatch" in str(exc)
            why = "the key does not belong to the certificate" if mismatch else str(exc)
            raise SettingsError(f"--etcd-cert/--etcd-key: {why}") from None


class GatewayError(Exception):
    """etcd answered with an error: its gRPC status code and its own message."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.name = CODE_NAMES.get(code, f"CODE_{code}")
        self.message = message
        super().__init__(f"{self.name}: {message}")


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(field: Any) -> str:
    """A key or value from the JSON (absent: empty), decoded as UTF-8 with replacement: values
    are other people's input, and a stray byte must not stop a read."""
    return base64.b64decode(field or "").decode("utf-8", "replace")


def prefix_range(prefix: str) -> dict[str, str]:
    """The range of every key under `prefix/`."""
    return starting_range(prefix + "/")


def starting_range(start: str) -> dict[str, str]:
    """The range of every key that starts with `start` (its last byte plus one ends it)."""
    first = start.encode("utf-8")
    end = first[:-1] + bytes([first[-1] + 1])
    return {"key": base64.b64encode(first).decode("ascii"),
            "range_end": base64.b64encode(end).decode("ascii")}


def key_range(start: str, end: str) -> dict[str, str]:
    """The range `[start, end)`."""
    return {"key": b64(start), "range_end": b64(end)}


def gateway_error(status: int, body: Any) -> GatewayError | None:
    """The error an answer carries, if any: a unary error (`code`, `message`/`error`), a
    stream's (`error: {grpc_code, message}`), or an HTTP error without JSON."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return GatewayError(int(error.get("grpc_code") or 2),
                                str(error.get("message") or error))
        if "code" in body and "header" not in body:
            return GatewayError(int(body["code"] or 2),
                                str(body.get("message") or error or f"HTTP {status}"))
    if status != 200:
        return GatewayError(2, f"HTTP {status}: {str(body)[:200]}")
    return None


def _tls_error(exc: BaseException) -> bool:
    """An error of the `ssl` module (imported only when TLS is in use)."""
    return any(cls.__module__ == "ssl" for cls in type(exc).__mro__)


def diagnose(exc: BaseException, settings: EtcdSettings) -> tuple[str, bool]:
    """(one line saying what went wrong and which flag to check, whether it is a configuration
    problem that retrying will not fix)."""
    if isinstance(exc, GatewayError):
        raw, text = str(exc), exc.message.lower()
    elif isinstance(exc, OSError):
        raw = f"{type(exc).__name__}: {exc}"
        text = raw.lower()
    else:
        return f"{type(exc).__name__}: {exc}", False
    secure = any(ep.secure for ep in settings.endpoints)
    denied = isinstance(exc, GatewayError) and exc.name == "PERMISSION_DENIED"
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
    elif "commonname of client" in text:
        # etcd's guard (embed/serve.go): with auth and --client-cert-auth on, a /v3 gateway
        # request whose client certificate has a Common Name is refused, whatever its token.
        hint = (
            "etcd refuses JSON-gateway requests made with a client certificate that has a "
            "Common Name while its authentication is on: the CN cannot be the etcd user here; "
            "use a client certificate without a CN (--etcd-cert) and --etcd-user with "
            "REGISTRAR_ETCD_PASSWORD"
        )
    elif denied:
        who = f"user {settings.user!r}" if settings.user else "this client"
        hint = (
            f"{who} lacks a permission: its role needs readwrite on --prefix/ and "
            "--control-prefix/ (read is enough for ls and haproxy)"
        )
    elif secure and "certificate_verify_failed" in text and "hostname" in text:
        hint = "TLS: etcd's server certificate does not name the host of the --etcd URL"
    elif secure and "certificate_verify_failed" in text:
        hint = "TLS: etcd's server certificate is not trusted (check --etcd-ca)"
    elif secure and (_tls_error(exc) or any(
        word in text for word in ("ssl", "tls", "handshake", "bad_certificate")
    )):
        hint = (
            "TLS: the handshake with etcd failed (does it want a client certificate? check "
            "--etcd-cert/--etcd-key, and that it is signed by a CA etcd trusts)"
        )
    if hint is None:
        return raw, False
    return f"{hint} ({raw})", not denied


def _token_stale(exc: GatewayError) -> bool:
    """The token is no longer good: expired, lost with an etcd restart, or issued before a
    change of users/roles ("revision of auth store is old"). A new one fixes it."""
    return (exc.name == "UNAUTHENTICATED" and "token" in exc.message) or (
        exc.name == "INVALID_ARGUMENT" and "auth store is old" in exc.message
    )


class WatchRefused(EtcdUnavailable):
    """etcd would not start a watch (no permission there, or a token it no longer takes)."""


def _first_answers(stream: http1.Stream, watches: int) -> tuple[list[bytes | None], list[Any]]:
    """The first answer of each of the stream's `watches` ("created", or why not), and the
    messages of events that came among them: with several watches on one stream, the first
    one created can replay its events (from its start revision) before etcd has answered the
    creation of the next, and those events must not be taken for an answer and lost."""
    firsts: list[bytes | None] = []
    early: list[Any] = []
    while len(firsts) < watches:
        line = stream.read_line()
        try:
            message = json.loads(line) if line else None
        except ValueError:
            message = None
        result = message.get("result") if isinstance(message, dict) else None
        if isinstance(result, dict) and not result.get("created") and result.get("events"):
            early.append(message)
            continue
        firsts.append(line)
    return firsts, early


class PrefixWatch:
    """Events under a prefix, from a revision on, read with `get()` on the caller's own
    thread (the follower's): one HTTP connection, no thread of its own.

    `get()` raises EtcdUnavailable when the watch died with its connection (start a new one
    from the last revision seen + 1) and WatchCompacted when that revision is gone.
    """

    def __init__(self, prefix: str, stream: http1.Stream,
                 on_answer: Callable[[bool, str], None], early: Sequence[Any] = ()) -> None:
        """`on_answer(up, why)`: told of every message (True) and of the stream's end; `early`:
        messages of events that came while the stream's watches were still being created."""
        self._prefix = prefix
        self._stream = stream
        self._early = list(early)
        self._on_answer = on_answer
        self._woken = False
        self._cancelled = False
        self._over: BaseException | None = None

    def wake(self) -> None:
        """Makes a waiting `get()` return at once (with no events): for stopping."""
        self._woken = True
        self._stream.interrupt()

    def get(self, timeout: float) -> list[KeyEvent]:
        """The next batch of events ([] when none came within `timeout`)."""
        if self._over is not None:
            raise self._over
        if self._woken:
            return []
        if self._early:
            return self._deliver(self._early.pop(0))
        try:
            line = self._stream.read_line(timeout)
        except TimeoutError:
            return []
        except OSError as exc:
            if self._woken or self._cancelled:
                return []
            self._end(EtcdUnavailable(f"watch ended: {type(exc).__name__}: {exc}"))
        if line is None:
            if self._woken or self._cancelled:
                return []
            self._end(EtcdUnavailable("watch ended: etcd closed the stream"))
        try:
            message = json.loads(line)
        except ValueError:
            self._end(EtcdUnavailable(f"watch ended: not JSON: {line[:80]!r}"))
        return self._deliver(message)

    def cancel(self) -> None:
        """Closes the connection: etcd then drops its watcher."""
        self._cancelled = True
        self._stream.close()

    def _end(self, error: BaseException) -> NoReturn:
        if isinstance(error, EtcdUnavailable):
            self._on_answer(False, str(error))
        self._over = error
        self._stream.close()
        raise error

    def _deliver(self, message: Any) -> list[KeyEvent]:
        """The events one message carries (raises when the watch is over)."""
        error = gateway_error(200, message)
        result = message.get("result") if isinstance(message, dict) else None
        if error is not None or not isinstance(result, dict):
            self._end(EtcdUnavailable(f"watch ended: {error or message}"))
        self._on_answer(True, "")
        if result.get("canceled"):
            if result.get("compact_revision"):
                self._end(WatchCompacted(int(result["compact_revision"])))
            self._end(EtcdUnavailable(
                f"etcd canceled the watch on {self._prefix}/: "
                f"{result.get('cancel_reason') or 'no reason given'}"))
        revision = int(result.get("header", {}).get("revision") or 0)
        batch = []
        for event in result.get("events") or ():
            kv = event.get("kv", {})
            deleted = event.get("type") == "DELETE"
            batch.append(KeyEvent(
                key=unb64(kv.get("key")),
                value=None if deleted else unb64(kv.get("value")),
                revision=int(kv.get("mod_revision") or revision),
            ))
        return batch


class EtcdStore:
    """Every etcd call the project makes (`registrar.core.store.Store`)."""

    def __init__(self, settings: EtcdSettings, metrics: Metrics | None = None,
                 *, log_health: bool = False) -> None:
        """`metrics`: `registrar_etcd_up` and request durations go there; `log_health`: log
        when etcd stops answering and when it answers again (long-running commands)."""
        self._settings = settings
        self._metrics = metrics
        self._log_health = log_health
        self._lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._addresses = [
            http1.Address(host=ep.host, port=ep.port, tls=ep.secure) for ep in settings.endpoints
        ]
        self._idle: list[list[http1.Connection]] = [[] for _ in self._addresses]
        self._preferred = 0  # the endpoint that answered last
        self._ssl: ssl.SSLContext | None = None
        self._token: str | None = None
        self._up: bool | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = False
        self._warned_body = False  # a watch's body was longer than GATEWAY_WATCH_BODY
        self.request_timeout = settings.timeout  # a unary request's, each endpoint's

    @property
    def up(self) -> bool | None:
        """Whether etcd answers (None: not asked yet)."""
        return self._up

    # --- plumbing ---------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not any(address.tls for address in self._addresses):
            return None
        with self._lock:
            if self._ssl is None:
                import ssl

                s = self._settings
                context = ssl.create_default_context(cafile=s.ca)
                if s.cert:
                    # The password callback keeps OpenSSL from asking on the terminal for an
                    # encrypted key (settings refuse one; this is for a file changed since).
                    context.load_cert_chain(s.cert, s.key, password=lambda: b"")
                self._ssl = context
            return self._ssl

    def _take(self, index: int) -> http1.Connection:
        with self._lock:
            if self._idle[index]:
                return self._idle[index].pop()
        return http1.Connection(self._addresses[index], self._settings.timeout,
                                self._ssl_context())

    def _give(self, index: int, connection: http1.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle[index]) < IDLE_CONNECTIONS:
                self._idle[index].append(connection)
                return
        connection.close()

    def _order(self) -> list[int]:
        first = self._preferred
        return [first, *(i for i in range(len(self._addresses)) if i != first)]

    def _exchange(self, path: str, payload: Mapping[str, Any], *, token: str | None,
                  timeout: float | None = None, patience: float | None = None) -> Any:
        """One request, to each endpoint in turn until one answers (OSError from the last one
        when none did); the answer's JSON, or GatewayError. Each endpoint is waited for
        `patience` (default `request_timeout`), all of them together at most `timeout`."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token  # etcd wants the bare token, no "Bearer"
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: OSError | None = None
        for index in self._order():
            left = patience or self.request_timeout
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    break
            connection = self._take(index)
            try:
                response = connection.request("POST", path, body, headers, timeout=left)
            except OSError as exc:
                connection.close()
                failure = exc
                continue
            self._give(index, connection)
            self._preferred = index
            try:
                answer = http1.json_body(response)
            except ValueError:
                answer = response.body.decode("utf-8", "replace")
            error = gateway_error(response.status, answer)
            if error is not None:
                raise error
            return answer
        raise failure or TimeoutError("no time left for the request")

    def _current_token(self) -> str | None:
        s = self._settings
        if s.user is None or s.password is None:  # none, or a client certificate's CN
            return None
        with self._auth_lock:
            if self._token is None:
                answer = self._exchange(
                    "/v3/auth/authenticate", {"name": s.user, "password": s.password},
                    token=None)
                self._token = str(answer.get("token") or "")
            return self._token

    def _renew_token(self, stale: str | None) -> None:
        with self._auth_lock:
            if self._token == stale:  # not renewed by another thread meanwhile
                self._token = None

    def _request(self, path: str, payload: Mapping[str, Any],
                 timeout: float | None = None, patience: float | None = None) -> Any:
        """A request with the current token, renewed once if etcd says it is stale."""
        token = self._current_token()
        try:
            return self._exchange(path, payload, token=token, timeout=timeout, patience=patience)
        except GatewayError as exc:
            if token is None or not _token_stale(exc):
                raise
        # Refused before it was applied: authenticate anew and try once more.
        log.debug("etcd auth token expired; authenticating again")
        self._renew_token(token)
        return self._exchange(path, payload, token=self._current_token(), timeout=timeout,
                              patience=patience)

    def _call(self, op: str, path: str, payload: Mapping[str, Any],
              timeout: float | None = None, patience: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            answer = self._request(path, payload, timeout, patience)
        except GatewayError as exc:
            if exc.name == "NOT_FOUND" and "lease" in exc.message:
                self._heard()
                raise LeaseNotFound(exc.message) from None
            if exc.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                self._renew_token(self._token)  # maybe its roles changed: a new one next time
            why, lasting = diagnose(exc, self._settings)
            if exc.name in REFUSAL_CODES and not lasting:
                self._heard()
                raise EtcdRefused(why, exc.name) from None
            raise self._unavailable(why, lasting) from None
        except OSError as exc:  # every endpoint failed: refused, timed out, TLS, files
            why, lasting = diagnose(exc, self._settings)
            if len(self._addresses) > 1:
                why = f"no etcd endpoint available (last error: {why})"
            raise self._unavailable(why, lasting) from None
        else:
            self._heard()
        finally:
            if self._metrics is not None:
                self._metrics.etcd_request_duration.labels(op=op).observe(
                    time.perf_counter() - started
                )
        return answer

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
            before, self._up = self._up, up
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
        with self._lock:
            self._closed = True
            idle = [c for connections in self._idle for c in connections]
            for connections in self._idle:
                connections.clear()
        for connection in idle:
            connection.close()

    # --- leases -----------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self._call("lease_grant", "/v3/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int, patience: float | None = None) -> int:
        """One heartbeat; returns the TTL etcd granted. A lease that no longer exists is
        answered without a TTL: LeaseNotFound. `patience`: how long to wait for the answer
        (each endpoint), else the usual request timeout."""
        answer = self._call("lease_keepalive", "/v3/lease/keepalive", {"ID": str(lease)},
                            patience=patience)
        result = answer.get("result", answer) if isinstance(answer, dict) else {}
        ttl = int(result.get("TTL") or 0)
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} not found (keepalive answered without a TTL)")
        return ttl

    def revoke(self, lease: int, timeout: float | None = None) -> None:
        """Revokes the lease (every key bound to it goes); `timeout` bounds this one request
        (the shutdown's deadline), else the usual request timeout."""
        with contextlib.suppress(LeaseNotFound):  # already gone: its keys are gone too
            self._call("lease_revoke", "/v3/lease/revoke", {"ID": str(lease)},
                       timeout=min(timeout, self._settings.timeout) if timeout else None)

    # --- keys -------------------------------------------------------------------------

    @staticmethod
    def _keys(answer: Mapping[str, Any]) -> dict[str, StoredKey]:
        return {
            unb64(kv.get("key")): StoredKey(unb64(kv.get("value")), int(kv.get("lease") or 0))
            for kv in answer.get("kvs") or ()
        }

    def list_prefix(self, prefix: str) -> tuple[dict[str, StoredKey], int]:
        """Every key under `prefix/` with its value and lease, and the store's revision."""
        answer = self._call("range", "/v3/kv/range", prefix_range(prefix))
        return self._keys(answer), int(answer["header"]["revision"])

    def list_prefixes(self, prefixes: Sequence[str], *, serializable: bool = False
                      ) -> tuple[list[dict[str, StoredKey]], int]:
        """Every key under each of `prefixes` (a dict each, in their order) as of one revision
        (one transaction of a range each), and that revision. `serializable`: the member asked
        answers from what it has applied, without asking the leader (no ReadIndex round): cheap
        and never held up by a busy leader, but maybe a little behind."""
        # Counted as a read ("range"): dashboards and tests take "txn" for writes.
        ranges = [{**prefix_range(prefix), **({"serializable": True} if serializable else {})}
                  for prefix in prefixes]
        answer = self._call("range", "/v3/kv/txn", {"success": [
            {"request_range": r} for r in ranges]})
        found = [self._keys(r.get("response_range", {})) for r in answer["responses"]]
        return found, int(answer["header"]["revision"])

    def list_starting(self, starts: Sequence[str]) -> tuple[dict[str, StoredKey], int]:
        """Every key starting with one of `starts`, as of one revision (one transaction of a
        range each), and that revision."""
        answer = self._call("range", "/v3/kv/txn", {"success": [
            {"request_range": starting_range(start)} for start in starts]})
        found: dict[str, StoredKey] = {}
        for response in answer.get("responses") or ():
            found.update(self._keys(response.get("response_range", {})))
        return found, int(answer["header"]["revision"])

    @staticmethod
    def _put_op(key: str, value: str, lease: int) -> dict[str, str]:
        op = {"key": b64(key), "value": b64(value)}
        if lease:
            op["lease"] = str(lease)
        return op

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self._call("put", "/v3/kv/put", self._put_op(key, value, lease))

    def put_if_absent(self, key: str, value: str) -> bool:
        """Puts `key` unless it exists (one transaction); False when it was there."""
        answer = self._call("txn", "/v3/kv/txn", {
            "compare": [{"key": b64(key), "target": "VERSION", "result": "EQUAL",
                         "version": "0"}],
            "success": [{"request_put": self._put_op(key, value, 0)}],
        })
        return bool(answer.get("succeeded"))

    def delete(self, key: str) -> None:
        self._call("delete", "/v3/kv/deleterange", {"key": b64(key)})

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
                self._call("txn", "/v3/kv/txn", {"success": [
                    {"request_delete_range": {"key": b64(key)}} if value is None else
                    {"request_put": self._put_op(key, value, lease)}
                    for key, value in chunk
                ]})

    # --- watches ----------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int) -> PrefixWatch:
        """Watches `prefix/` from `start_revision` on (raises WatchCompacted if it is gone)."""
        return self.watch_prefixes((prefix,), start_revision)

    def watch_prefixes(self, prefixes: Sequence[str], start_revision: int) -> PrefixWatch:
        """Every one of `prefixes`, from `start_revision` on, on one connection: the gateway
        takes several create requests in one request body, one watch each, and the answers
        of all come on the one stream."""
        return self._watch([prefix_range(prefix) for prefix in prefixes],
                           ", ".join(prefixes), start_revision)

    def watch_ranges(self, ranges: Sequence[tuple[str, str]], start_revision: int
                     ) -> PrefixWatch:
        """Every key in one of `ranges` (`[start, end)`), as `watch_prefixes`."""
        return self._watch([key_range(start, end) for start, end in ranges],
                           ", ".join(f"{start}..{end}" for start, end in ranges),
                           start_revision)

    def _watch(self, ranges: list[dict[str, str]], what: str, start_revision: int
               ) -> PrefixWatch:
        try:
            return self._open_watch(ranges, what, start_revision)
        except WatchRefused:
            if not self._settings.user:
                raise
        # etcd refuses a watch (created and canceled at once) when the token has expired:
        # authenticate anew and try once more.
        self._renew_token(self._token)
        return self._open_watch(ranges, what, start_revision)

    def _open_watch(self, ranges: list[dict[str, str]], prefix: str, start_revision: int
                    ) -> PrefixWatch:
        body = "\n".join(
            json.dumps({"create_request": {**key_range, "start_revision": str(start_revision)}},
                       separators=(",", ":"))
            for key_range in ranges).encode()
        if len(body) > GATEWAY_WATCH_BODY and not self._warned_body:
            self._warned_body = True
            log.warning("the watch of %s takes %d bytes to create: etcd's JSON gateway may lose "
                        "a creation beyond the first %d (a shorter --control-prefix or --prefix "
                        "avoids it); a lost one is retried", prefix, len(body),
                        GATEWAY_WATCH_BODY, extra={"event": "watch_body"})

        def open_stream() -> tuple[http1.Stream, Any]:
            token = self._current_token()
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = token
            failure: OSError | None = None
            for index in self._order():
                stream = None
                try:
                    stream = http1.open_stream(
                        self._addresses[index], "POST", "/v3/watch",
                        timeout=self._settings.timeout, body=body,
                        headers=headers, ssl_context=self._ssl_context(),
                        keepalive=WATCH_KEEPALIVE, read_timeout=self._settings.timeout)
                    firsts, early = _first_answers(stream, len(ranges))
                except OSError as exc:
                    if stream is not None:
                        stream.close()
                    failure = exc
                    continue
                self._preferred = index
                early_events.extend(early)
                return stream, self._created(stream, firsts)
            raise failure or ConnectionError("no etcd endpoint answered the watch")

        early_events: list[Any] = []
        started = time.perf_counter()
        try:
            stream, created = self._call_watch(open_stream)
        finally:
            if self._metrics is not None:
                self._metrics.etcd_request_duration.labels(op="watch").observe(
                    time.perf_counter() - started)
        if created.get("canceled"):
            stream.close()
            if created.get("compact_revision"):
                raise WatchCompacted(int(created["compact_revision"]))
            raise WatchRefused(
                f"etcd refused the watch on {prefix}/ (permission denied: it needs read "
                "permission there)"
            )
        # From now on, silence is normal (each get() waits its own time); TCP keepalive
        # notices a peer that died.
        return PrefixWatch(prefix, stream, self._watch_answer, early_events)

    @staticmethod
    def _created(stream: http1.Stream, firsts: list[bytes | None]) -> Any:
        """The first answer of every watch of the stream: the first that is not "created"
        (canceled, or an error), else the last."""
        result: Any = None
        for first in firsts:
            try:
                message = json.loads(first) if first else None
            except ValueError:
                message = first.decode("utf-8", "replace") if first else None
            if message is None:
                stream.close()
                raise ConnectionError("etcd ended the watch stream before answering")
            error = gateway_error(stream.status, message)
            if error is not None:
                stream.close()
                raise error
            result = message["result"]
            if result.get("canceled"):
                break
        return result

    def _call_watch(self, open_stream: Callable[[], tuple[http1.Stream, Any]]
                    ) -> tuple[http1.Stream, Any]:
        try:
            result = open_stream()
        except GatewayError as exc:
            why, lasting = diagnose(exc, self._settings)
            if exc.name == "UNAUTHENTICATED" or _token_stale(exc):
                self._set_up(False, why)
                raise WatchRefused(why, lasting) from None
            raise self._unavailable(why, lasting) from None
        except OSError as exc:
            why, lasting = diagnose(exc, self._settings)
            raise self._unavailable(why, lasting) from None
        self._heard()
        return result
