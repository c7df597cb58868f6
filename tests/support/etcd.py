"""Private etcd servers and clusters for the tests, on free loopback ports.

Each server has its own directory: ``data/`` is etcd's ``--data-dir`` (kept across
``stop()``/``start()``, so a restart has the same data on the same ports) and ``etcd.log``
takes etcd's own (warn-level) log, so test output stays quiet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

from .proc import free_port

ETCD_BIN = os.environ.get("RGT_ETCD_BIN", "etcd")

# Fast elections so a killed leader is replaced within about a second. Loopback round trips
# are well under a millisecond, so 50 ms heartbeats are ample even on a busy 2-core machine.
HEARTBEAT_MS = 50
ELECTION_MS = 500


class EtcdError(RuntimeError):
    pass


class EtcdServer:
    """One etcd process: ``start()``, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), ``url``.

    Alone it is a one-member cluster; ``EtcdCluster`` builds members of a bigger one by passing
    ``initial_cluster``/``token``.
    """

    def __init__(
        self,
        base_dir: str | Path | None = None,
        *,
        name: str = "rgt",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        token: str | None = None,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
        extra_args: Sequence[str] = (),
        scheme: str = "http",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``extra_args`` go to etcd as they are (TLS files, ``--auth-token``...). ``scheme``
        "https" serves clients over TLS (give the TLS flags in ``extra_args``); ``ssl_context``
        is what the health check presents then (trusted CA, client certificate)."""
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="rgt-etcd-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "etcd.log"
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port(exclude={self.client_port})
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.token = token or f"rgt-{uuid.uuid4().hex[:12]}"
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.extra_args = list(extra_args)
        self.scheme = scheme
        self.ssl_context = ssl_context
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            ETCD_BIN,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", str(self.log_path),
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 20.0) -> EtcdServer:
        """Start etcd (again: same ports, same data). ``wait`` waits until it is healthy."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then wait (SIGKILL after ``timeout``). The data dir is kept."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap. The data dir is kept."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process hangs (connections stay open, nothing answers)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def destroy(self) -> None:
        """Stop and delete everything, the data dir included."""
        self.resume()
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- health ------------------------------------------------------------------------------
    def healthy(self, timeout: float = 1.0) -> bool:
        """GET /health answers {"health": "true"} (it needs a leader and a working read)."""
        try:
            with urllib.request.urlopen(
                f"{self.url}/health", timeout=timeout, context=self.ssl_context
            ) as resp:
                body = json.loads(resp.read().decode() or "{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")) == "true"

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdError(
                    f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise EtcdError(
                    f"etcd {self.name} at {self.url} not healthy within {timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EtcdServer({self.name} {self.url} {state})"


class EtcdCluster:
    """A cluster of ``size`` (default 3) members on loopback ports."""

    def __init__(self, base_dir: str | Path | None = None, size: int = 3) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="rgt-etcd-cluster-"))
        ports: set[int] = set()
        specs: list[tuple[str, int, int]] = []
        for i in range(size):
            c = free_port(exclude=ports)
            ports.add(c)
            p = free_port(exclude=ports)
            ports.add(p)
            specs.append((f"m{i}", c, p))
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, _, p in specs)
        token = f"rgt-cluster-{uuid.uuid4().hex[:12]}"
        self.members = [
            EtcdServer(
                self.base_dir / n,
                name=n,
                client_port=c,
                peer_port=p,
                initial_cluster=initial,
                token=token,
            )
            for n, c, p in specs
        ]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        """Comma-separated client URLs, as for ``--etcd``."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:  # all at once: none can be healthy before a quorum is up
            m.start(wait=False)
        for m in self.members:
            m.wait_healthy(timeout)
        return self

    def member_status(self, i: int, timeout: float = 1.0) -> tuple[int, int] | None:
        """(member_id, leader_id) as member ``i`` sees it, or None when it does not answer."""
        m = self.members[i]
        if not m.running:
            return None
        from registrar.adapters.etcd_store import GatewayError
        from tests.support.etcd_reader import Gateway

        gateway = Gateway(m.url, timeout=timeout)
        try:
            status = gateway.call("/v3/maintenance/status", {}, retries=0)
            return int(status["header"]["member_id"]), int(status["leader"])
        except (OSError, ValueError, KeyError, GatewayError):  # not answering, not a member
            return None
        finally:
            gateway.close()

    def leader_index(self, timeout: float = 10.0) -> int:
        """Index of the member that is leader, waiting until the running members agree."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = {i: self.member_status(i) for i in range(len(self.members))}
            answered = {i: s for i, s in statuses.items() if s is not None}
            leaders = {s[1] for s in answered.values()}
            if len(leaders) == 1 and 0 not in leaders:
                (leader,) = leaders
                for i, s in answered.items():
                    if s[0] == leader:
                        return i
            if time.monotonic() > deadline:
                raise EtcdError(f"no agreed leader within {timeout} s: {statuses}")
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def stop(self, i: int) -> None:
        self.members[i].stop()

    def start_member(self, i: int, timeout: float = 20.0) -> None:
        self.members[i].start(timeout=timeout)

    def stop_all(self, timeout: float = 2.0) -> None:
        """SIGTERM every member at once, SIGKILL after ``timeout``. (A leader that stops tries
        to hand its leadership over first and waits ~6 s when no peer can take it.)"""
        for m in self.members:
            m.resume()
            if m.running:
                assert m.proc is not None
                m.proc.send_signal(signal.SIGTERM)
        for m in self.members:
            m.stop(timeout)

    def destroy(self) -> None:
        for m in self.members:
            m.resume()
            m.kill()
        for m in self.members:
            m.destroy()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"EtcdCluster({self.members})"
