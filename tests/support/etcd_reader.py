"""A small etcd v3 client for test assertions, tolerant of etcd restarts: etcd's JSON gateway
through the project's own HTTP/1.1 client and helpers (`registrar.adapters.http1`,
`registrar.adapters.etcd_store`), without the retries and error mapping of `EtcdStore` so that
a test sees exactly what etcd answered.

Every call opens a fresh connection when the last one broke, and is tried once more after a
transport error or an election (an etcd restarting between two assertions, a leader killed).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from registrar.adapters import http1
from registrar.adapters.etcd_store import GatewayError, b64, gateway_error, unb64


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or 2379


@dataclass(frozen=True)
class KVMeta:
    """What etcd keeps about a key besides its value."""

    key: str
    create_revision: int
    mod_revision: int
    version: int
    lease_id: int


def kv_meta(kv: dict[str, Any]) -> KVMeta:
    return KVMeta(unb64(kv.get("key")), int(kv.get("create_revision") or 0),
                  int(kv.get("mod_revision") or 0), int(kv.get("version") or 0),
                  int(kv.get("lease") or 0))


def raw_range(kv: dict[str, Any]) -> bytes:
    return base64.b64decode(kv.get("value") or "")


class Gateway:
    """POSTs to etcd's JSON gateway: one kept connection; a token from `user`/`password`,
    renewed when etcd says it expired; GatewayError with etcd's own message on a refusal."""

    def __init__(self, url: str, *, timeout: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        host, port = parse_url(url)
        self.address = http1.Address(host=host, port=port, tls=url.startswith("https://"))
        self._connection = http1.Connection(self.address, timeout, ssl_context)
        self._auth = (user, password)
        self._token: str | None = None
        self._lock = threading.Lock()

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        response = self._connection.request("POST", path, json.dumps(payload).encode(),
                                            headers)
        try:
            answer = http1.json_body(response)
        except ValueError:
            answer = response.body.decode("utf-8", "replace")
        error = gateway_error(response.status, answer)
        if error is not None:
            raise error
        return answer

    def call(self, path: str, payload: dict[str, Any], retries: int = 1) -> Any:
        user, password = self._auth
        with self._lock:
            for attempt in range(retries + 1):
                try:
                    if user and password and self._token is None:
                        self._token = str(self._post(
                            "/v3/auth/authenticate", {"name": user, "password": password}
                        )["token"])
                    return self._post(path, payload)
                except GatewayError as exc:
                    if attempt == retries or exc.name not in ("UNAUTHENTICATED", "UNAVAILABLE"):
                        raise
                    if exc.name == "UNAUTHENTICATED":
                        self._token = None
                    else:  # "leader changed", "no leader": an election, over within a moment
                        time.sleep(0.5)
                except OSError:
                    self._connection.close()
                    if attempt == retries:
                        raise
        raise AssertionError("unreachable")

    def range(self, key: str) -> dict[str, Any] | None:
        kvs = self.call("/v3/kv/range", {"key": b64(key)}).get("kvs") or []
        return dict(kvs[0]) if kvs else None

    def close(self) -> None:
        self._connection.close()


class EtcdReader:
    def __init__(self, url: str, timeout: float = 3.0) -> None:
        self.url = url.split(",")[0]
        self.host, self.port = parse_url(self.url)
        self.timeout = timeout
        self.gateway = Gateway(self.url, timeout=timeout)

    def _call(self, path: str, payload: dict[str, Any], retries: int = 1) -> Any:
        return self.gateway.call(path, payload, retries)

    def close(self) -> None:
        self.gateway.close()

    def __enter__(self) -> EtcdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        kv = self.gateway.range(key)
        return None if kv is None else raw_range(kv).decode()

    def get_meta(self, key: str) -> tuple[str, KVMeta] | None:
        """(value, metadata: create/mod_revision, version, lease_id) or None."""
        kv = self.gateway.range(key)
        return None if kv is None else (raw_range(kv).decode(), kv_meta(kv))

    def get_meta_prefix(self, prefix: str) -> dict[str, tuple[str, KVMeta]]:
        """`get_meta` of every key starting with `prefix`, by key."""
        found = {}
        for kv in self._range_prefix(prefix):
            meta = kv_meta(kv)
            found[meta.key] = (raw_range(kv).decode(), meta)
        return found

    def _range_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """Every key starting with `prefix` (no "/" added: tests pass it themselves)."""
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        answer = self._call("/v3/kv/range", {
            "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
        return list(answer.get("kvs") or [])

    def raw_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under `prefix` with its value as bytes (values need not be UTF-8)."""
        return {unb64(kv.get("key")): raw_range(kv) for kv in self._range_prefix(prefix)}

    def get_prefix(self, prefix: str) -> dict[str, str]:
        return {key: value.decode() for key, value in self.raw_prefix(prefix).items()}

    def get_json_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.get_prefix(prefix).items()}

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.get_prefix(prefix))

    def lease_ids(self, prefix: str) -> dict[str, int]:
        """Key -> lease id (0: no lease) for every key under ``prefix``."""
        return {unb64(kv.get("key")): int(kv.get("lease") or 0)
                for kv in self._range_prefix(prefix)}

    def lease_id(self, key: str) -> int | None:
        got = self.get_meta(key)
        return None if got is None else got[1].lease_id

    def lease_info(self, lease_id: int) -> tuple[int, int]:
        """(granted_ttl, remaining_ttl) of a lease; remaining is -1 once it has expired."""
        answer = self._call("/v3/lease/timetolive", {"ID": str(lease_id)})
        return int(answer.get("grantedTTL") or 0), int(answer.get("TTL") or 0)

    def lease_ttl(self, key: str) -> tuple[int, int] | None:
        """(granted_ttl, remaining_ttl) of the key's lease; None if no such key or no lease."""
        lease = self.lease_id(key)
        if not lease:
            return None
        return self.lease_info(lease)

    def revision(self) -> int:
        """The store's current revision (header of a read)."""
        return int(self._call("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])

    def member_id(self) -> int:
        return int(self._call("/v3/kv/range", {"key": b64("\0")})["header"]["member_id"])

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, value: str | bytes | dict[str, Any], lease: int | None = None) -> int:
        """Put (a dict is stored as JSON); the revision of the write."""
        if isinstance(value, dict):
            value = json.dumps(value)
        raw = value.encode() if isinstance(value, str) else value
        payload = {"key": b64(key), "value": base64.b64encode(raw).decode()}
        if lease:
            payload["lease"] = str(lease)
        return int(self._call("/v3/kv/put", payload)["header"]["revision"])

    def grant_lease(self, ttl: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def keepalive_lease(self, lease_id: int) -> None:
        self._call("/v3/lease/keepalive", {"ID": str(lease_id)})

    def revoke_lease(self, lease_id: int) -> None:
        self._call("/v3/lease/revoke", {"ID": str(lease_id)})

    def delete(self, key: str) -> bool:
        return bool(int(self._call("/v3/kv/deleterange", {"key": b64(key)}).get("deleted") or 0))

    def delete_prefix(self, prefix: str) -> int:
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        answer = self._call("/v3/kv/deleterange", {
            "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
        return int(answer.get("deleted") or 0)

    def compact(self, revision: int) -> None:
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def __repr__(self) -> str:
        return f"EtcdReader({self.url})"

