"""Processes of a cluster: the ones it spawns (``NsProcess``) and a /proc scan to find every
process that belongs to it (for cleanup and memory figures)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.proc import tail

from .netns import exec_argv


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    comm: str
    cmdline: tuple[str, ...]
    cwd: str
    netns: int | None
    cgroup: str
    rss_kb: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")

    @property
    def args(self) -> str:
        return " ".join(self.cmdline) or f"[{self.comm}]"


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def proc_info(pid: int) -> ProcInfo | None:
    base = f"/proc/{pid}"
    status = _read(f"{base}/status")
    if status is None:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        cwd = os.readlink(f"{base}/cwd")
    except OSError:
        cwd = ""
    try:
        link = os.readlink(f"{base}/ns/net")
        netns: int | None = int(link[link.index("[") + 1 : -1])
    except (OSError, ValueError):
        netns = None
    rss = fields.get("VmRSS", "0 kB").split()[0]
    return ProcInfo(
        pid=pid,
        ppid=int(fields.get("PPid", "0").strip() or 0),
        state=fields.get("State", "?").strip()[:1],
        comm=fields.get("Name", "").strip(),
        cmdline=tuple(a for a in (_read(f"{base}/cmdline") or "").split("\0") if a),
        cwd=cwd,
        netns=netns,
        cgroup=_read(f"{base}/cgroup") or "",
        rss_kb=int(rss) if rss.isdigit() else 0,
    )


def scan_processes() -> dict[int, ProcInfo]:
    """Every process on the machine (threads excluded), by pid."""
    out: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := proc_info(int(name))) is not None:
            out[info.pid] = info
    return out


def ancestors(pid: int, procs: Mapping[int, ProcInfo]) -> set[int]:
    """``pid`` and its ancestors (never to be killed by a cleanup run from ``pid``)."""
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        info = procs.get(pid) or proc_info(pid)
        if info is None:
            break
        pid = info.ppid
    return seen


def with_descendants(roots: Iterable[int], procs: Mapping[int, ProcInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, ()))
    return out


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# --- roles (for memory figures) -------------------------------------------------------------
_ROLE_BY_COMM = {
    "dockerd": "dockerd",
    "containerd": "containerd",
    "containerd-shim": "containerd-shim",
    "docker-proxy": "docker-proxy",
    "etcd": "etcd",
    "prometheus": "prometheus",
    "haproxy": "haproxy",
}
_REGISTRAR_RE = re.compile(r"-m registrar (\w+)|/registrar (\w+)")


def role_of(p: ProcInfo) -> str:
    """``dockerd``, ``containerd``, ``containerd-shim``, ``docker-proxy``, ``etcd``,
    ``prometheus``, ``haproxy``, ``registrar-watch`` / ``registrar-haproxy`` / ...,
    ``client-load``, or ``container`` for anything else (the processes in containers)."""
    if p.comm in _ROLE_BY_COMM:
        return _ROLE_BY_COMM[p.comm]
    args = p.args
    if m := _REGISTRAR_RE.search(args):
        return f"registrar-{m.group(1) or m.group(2)}"
    if "tests/cluster/load.py" in args:
        return "client-load"
    return "container"


# --- processes the cluster starts -----------------------------------------------------------
class NsProcess:
    """One process started inside a network namespace, in its own session, its output
    appended to a log file (no pipes). ``argv`` runs through ``ip netns exec`` unless
    ``wrap=False`` (then ``argv`` must enter the namespace itself)."""

    def __init__(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        log_path: str | Path,
        cwd: str | Path,
        env: Mapping[str, str] | None = None,
        name: str = "",
        wrap: bool = True,
        clean_env: bool = True,
    ) -> None:
        self.ns = ns
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log_path = Path(log_path)
        base = dict(os.environ)
        if clean_env:  # never let the test runner's REGISTRAR_* settings leak in
            base = {k: v for k, v in base.items() if not k.startswith("REGISTRAR_")}
        base["PYTHONUNBUFFERED"] = "1"
        base.update(env or {})
        self.command = exec_argv(ns, self.argv) if wrap else list(self.argv)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=base,
                cwd=str(cwd),
                start_new_session=True,
            )
        self._log_offset = self.log_path.stat().st_size
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL it and whatever it started in its session (haproxy of a router...)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s; log:\n{tail(self.logs())}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL (the session) after ``timeout``. The exit code, or None
        when it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def logs(self, all_runs: bool = False) -> str:
        """This run's output (``all_runs``: the whole log file, earlier runs too)."""
        try:
            with open(self.log_path, "rb") as f:
                if not all_runs:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until this run's output matches the regex ``pattern``; the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.logs())
            if m is not None:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                    f"{tail(self.logs())}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: log never matched {pattern!r} in {timeout} s:\n"
                    f"{tail(self.logs())}"
                )
            time.sleep(0.05)

    def rss_kb(self) -> int:
        info = proc_info(self.pid)
        return info.rss_kb if info is not None else 0

    def __repr__(self) -> str:
        return f"NsProcess({self.name} pid={self.pid} ns={self.ns} rc={self.proc.poll()})"
