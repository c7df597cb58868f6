"""A small etcd v3 client for test assertions, tolerant of etcd restarts.

pyetcd marks an endpoint failed after one UNAVAILABLE/DEADLINE_EXCEEDED and refuses it for
``time_retry`` seconds; gRPC channels also back off reconnecting. So on any error the reader
drops its client, builds a fresh one and retries once, then raises.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyetcd

T = TypeVar("T")


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or 2379


class EtcdReader:
    def __init__(self, url: str, timeout: float = 3.0) -> None:
        self.url = url.split(",")[0]
        self.host, self.port = parse_url(self.url)
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    # -- connection --------------------------------------------------------------------------
    def _new_client(self) -> Any:
        return pyetcd.MultiEndpointEtcd3Client(
            endpoints=[pyetcd.Endpoint(self.host, self.port, secure=False, time_retry=0.2)],
            timeout=self.timeout,
            failover=True,
        )

    @property
    def client(self) -> Any:
        """The underlying pyetcd client (rebuilt after errors)."""
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def reset(self) -> None:
        with self._lock:
            old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()

    def _call(self, fn: Callable[[Any], T], retries: int = 1) -> T:
        for attempt in range(retries + 1):
            try:
                return fn(self.client)
            except Exception:
                self.reset()
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.reset()

    def __enter__(self) -> EtcdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        value, _ = self._call(lambda c: c.get(key))
        return None if value is None else bytes(value).decode()

    def get_meta(self, key: str) -> tuple[str, Any] | None:
        """(value, pyetcd KVMetadata: create/mod_revision, version, lease_id) or None."""
        value, meta = self._call(lambda c: c.get(key))
        return None if value is None else (bytes(value).decode(), meta)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        def op(c: Any) -> dict[str, str]:
            return {
                bytes(meta.key).decode(): bytes(value).decode()
                for value, meta in c.get_prefix(prefix)
            }

        return self._call(op)

    def get_json_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.get_prefix(prefix).items()}

    def keys(self, prefix: str) -> list[str]:
        return sorted(self.get_prefix(prefix))

    def lease_ids(self, prefix: str) -> dict[str, int]:
        """Key -> lease id (0: no lease) for every key under ``prefix``."""

        def op(c: Any) -> dict[str, int]:
            return {
                bytes(meta.key).decode(): int(meta.lease_id) for _, meta in c.get_prefix(prefix)
            }

        return self._call(op)

    def lease_id(self, key: str) -> int | None:
        got = self.get_meta(key)
        return None if got is None else int(got[1].lease_id)

    def lease_info(self, lease_id: int) -> tuple[int, int]:
        """(granted_ttl, remaining_ttl) of a lease; remaining is -1 once it has expired."""
        resp = self._call(lambda c: c.get_lease_info(lease_id))
        return int(resp.grantedTTL), int(resp.TTL)

    def lease_ttl(self, key: str) -> tuple[int, int] | None:
        """(granted_ttl, remaining_ttl) of the key's lease; None if no such key or no lease."""
        lease = self.lease_id(key)
        if not lease:
            return None
        return self.lease_info(lease)

    def revision(self) -> int:
        """The store's current revision (header of a read)."""
        resp = self._call(lambda c: c.get_response("\0"))
        return int(resp.header.revision)

    def member_id(self) -> int:
        resp = self._call(lambda c: c.get_response("\0"))
        return int(resp.header.member_id)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, value: str | bytes | dict[str, Any], lease: int | None = None) -> int:
        """Put (a dict is stored as JSON); the revision of the write."""
        if isinstance(value, dict):
            value = json.dumps(value)
        resp = self._call(lambda c: c.put(key, value, lease=lease))
        return int(resp.header.revision)

    def grant_lease(self, ttl: int) -> int:
        lease = self._call(lambda c: c.lease(ttl))
        return int(lease.id)

    def revoke_lease(self, lease_id: int) -> None:
        self._call(lambda c: c.revoke_lease(lease_id))

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda c: c.delete(key)))

    def delete_prefix(self, prefix: str) -> int:
        resp = self._call(lambda c: c.delete_prefix(prefix))
        return int(resp.deleted)

    def __repr__(self) -> str:
        return f"EtcdReader({self.url})"
