"""The three registrars compared: registrar's host agent, registrar's sidecar, the shell sidekick.

Each is told about a container right after `docker run -d` returned (`attach`), the moment an
`ExecStartPost=` would run; the host agent needs no telling (it follows Docker's events).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from bench.observe import metric_value
from tests.support.proc import RegistrarProcess, free_port, wait_until

SIDEKICK = Path(__file__).with_name("sidekick.sh")
SERVICE = "rgbench"
HOST_IP = "127.0.0.1"
NODE = "bench-node"


def key_for(prefix: str, container: str, port: int = 8080) -> str:
    return f"{prefix}/{SERVICE}/{NODE}:{container}:{port}"


class Subject:
    label = ""
    per_container = True  # one process per container (False: one agent for the host)

    def __init__(
        self, etcd_url: str, prefix: str, ttl: int, log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: extra environment for registrar's processes."""
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.ttl = ttl
        self.log_dir = log_dir
        self.env = dict(env or {})
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = 0.0

    def registrar_args(self) -> list[str]:
        return [
            "--etcd", self.etcd_url, "--prefix", self.prefix, "--node", NODE,
            "--host-ip", HOST_IP, "--ttl", str(self.ttl), "--log-format", "json",
        ]  # fmt: skip

    def begin(self) -> None:
        """Starts what runs before any container (the host agent)."""

    def attach(self, container: str) -> None:
        """Called right after `docker run -d CONTAINER` has returned."""

    def pids(self) -> list[int]:
        return []

    def finish(self, timeout: float = 15.0) -> list[int | None]:
        """Stops whatever still runs (SIGTERM, then SIGKILL); the exit codes."""
        return []


class WatchAgent(Subject):
    label = "registrar watch"
    per_container = False

    def __init__(
        self, etcd_url: str, prefix: str, ttl: int, log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(etcd_url, prefix, ttl, log_dir, env)
        self.proc: RegistrarProcess | None = None
        self.metrics_port = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def begin(self) -> None:
        self.metrics_port = free_port()
        args = ["watch", *self.registrar_args(), "--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        self.started_at = time.time()
        self.proc = RegistrarProcess(args, self.env, log_dir=self.log_dir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the agent reports etcd and Docker up (it has listed what runs by then)."""

        def ready() -> bool:
            assert self.proc is not None
            if not self.proc.alive:
                raise RuntimeError(f"registrar watch exited:\n{self.proc.logs()[-2000:]}")
            return all(
                metric_value(self.metrics_url, name) == 1.0
                for name in ("registrar_etcd_up", "registrar_docker_up")
            )

        wait_until(ready, timeout=timeout, interval=0.05, ignore=(OSError,),
                   message="registrar watch never reported etcd and docker up")

    def running_at(self) -> float | None:
        """When the agent logged its start line (imports, settings and adapters done)."""
        assert self.proc is not None
        for line in self.proc.logs().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "start":
                    return datetime.fromisoformat(entry["time"]).timestamp()
        return None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.alive else []

    def finish(self, timeout: float = 15.0) -> list[int | None]:
        if self.proc is None:
            return []
        self.proc.terminate()
        try:
            code: int | None = self.proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.proc.cleanup()
        return [code]


class RegisterSidecars(Subject):
    label = "registrar register"

    def __init__(
        self, etcd_url: str, prefix: str, ttl: int, log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(etcd_url, prefix, ttl, log_dir, env)
        self.procs: list[RegistrarProcess] = []

    def attach(self, container: str) -> None:
        self.procs.append(
            RegistrarProcess(
                ["register", container, *self.registrar_args()], self.env, log_dir=self.log_dir
            )
        )

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.alive]

    def finish(self, timeout: float = 15.0) -> list[int | None]:
        for proc in self.procs:
            proc.terminate()
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
            proc.cleanup()
        self.procs = []
        return codes

    def exit_codes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]


class ShellSidekicks(Subject):
    label = "shell sidekick"

    def __init__(
        self, etcd_url: str, prefix: str, ttl: int, log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(etcd_url, prefix, ttl, log_dir, env)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.shell_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ETCDCTL_", "SIDEKICK_"))},
            "ETCDCTL_ENDPOINTS": etcd_url,
            "SIDEKICK_PREFIX": prefix,
            "SIDEKICK_TTL": str(ttl),
            "SIDEKICK_NODE": NODE,
            "COREOS_PRIVATE_IPV4": HOST_IP,
        }

    def attach(self, container: str) -> None:
        with open(self.log_dir / f"sidekick-{container}.log", "ab") as log:
            self.procs.append(subprocess.Popen(
                ["bash", str(SIDEKICK), container, SERVICE, "8080"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.shell_env,
                start_new_session=True,
            ))  # fmt: skip

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def finish(self, timeout: float = 15.0) -> list[int | None]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its session: `timeout docker wait` too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs = []
        return codes

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]
