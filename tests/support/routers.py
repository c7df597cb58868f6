"""A router's report written by a test (`{control_prefix}/routers/{NODE}` on a lease, with
`applied` and `in_flight` as `registrar haproxy` writes them), for tests of what waits on the
routers (`drain`, `maint enable`, the agents' SIGTERM drain)."""

from __future__ import annotations

import threading
from typing import Any

from tests.support.etcd_reader import EtcdReader


class FakeRouter:
    """A router's report, kept by a thread: `applied` the store's revision at each write
    (`frozen`: left where it is), `in_flight` as the test sets it; every 50 ms."""

    def __init__(self, url: str, ctl: str, node: str, with_applied: bool = True) -> None:
        self.reader = EtcdReader(url)
        self.key = f"{ctl}/routers/{node}"
        self.lease = self.reader.grant_lease(30)
        self.in_flight: dict[str, dict[str, int]] = {}
        self.frozen: int | None = None
        self.with_applied = with_applied
        self._stop = threading.Event()
        self.write()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self) -> None:
        report: dict[str, Any] = {"at": "2026-12-04T20:00:00Z", "services": {},
                                  "in_flight": self.in_flight}
        if self.with_applied:
            report["applied"] = self.frozen if self.frozen is not None else (
                self.reader.revision())
        self.reader.put(self.key, report, lease=self.lease)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.write()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.reader.revoke_lease(self.lease)
        self.reader.close()
