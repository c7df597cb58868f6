"""HAProxy itself: `haproxy -c`, atomic installs, and the master-worker process we run.

- `check_config` runs `haproxy -c -f PATH`; `install_config` writes a temp file next to the
  config, checks it and renames it over the config (never installing one that fails).
- `HAProxyMaster` runs `haproxy -W -db -f CONFIG -S MASTER_SOCKET` as a child: reload = SIGUSR2
  to the master (old workers finish their connections), soft stop = SIGUSR1 (listeners close at
  once, open connections finish), the runtime API through the master CLI (`@1 <command>`), and
  restarts with backoff when it dies.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from registrar.haproxy.runtime import ProcInfo, parse_show_proc
from registrar.retry import RetryClock
from registrar.shutdown import start_thread

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 30.0
START_TIMEOUT = 10.0
RELOAD_TIMEOUT = 10.0
CLI_TIMEOUT = 3.0
CLI_CHUNK = 8000  # bytes of commands per master CLI connection (HAProxy's buffer is 16 kB)
UNIX_PATH_MAX = 107
STABLE_AFTER = 10.0  # a HAProxy that ran this long resets the restart backoff


class HAProxyError(Exception):
    """HAProxy did not start, reload or answer as expected."""


class ConfigRejected(Exception):
    """`haproxy -c` refused a config; the message is HAProxy's own output."""


# --- checking and installing --------------------------------------------------------------


def _relevant(output: str) -> str:
    """HAProxy's check output without its NOTICE banner lines."""
    lines = [ln for ln in output.splitlines() if ln.strip() and "[NOTICE]" not in ln]
    return "\n".join(lines[-20:]) or output.strip()


def check_config(haproxy_bin: str, path: str) -> None:
    """Raises ConfigRejected unless `haproxy -c -f path` accepts the file."""
    try:
        proc = subprocess.run(
            [haproxy_bin, "-c", "-f", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
        )
    except FileNotFoundError:
        raise ConfigRejected(f"{haproxy_bin}: not found (--haproxy-bin)") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigRejected(f"{haproxy_bin} -c: {exc}") from None
    if proc.returncode != 0:
        raise ConfigRejected(_relevant(proc.stderr + proc.stdout))


def install_config(haproxy_bin: str, path: str, text: str) -> None:
    """Atomically replaces `path` with `text` once `haproxy -c` accepts it.

    The text goes to a temp file in the same directory (so the rename is atomic), is flushed
    to disk and checked; only then is it renamed over `path`. A rejected text is never
    installed: ConfigRejected is raised and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        check_config(haproxy_bin, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def runtime_dir(config: str) -> tuple[str, bool]:
    """Where the master and stats sockets go: next to the config when the paths fit in a unix
    socket address, else a private temporary directory. (directory, is_temporary)"""
    directory = os.path.dirname(os.path.abspath(config))
    stem = os.path.splitext(os.path.basename(config))[0] or "haproxy"
    longest = os.path.join(directory, f"{stem}-master.sock")
    if len(longest.encode()) <= UNIX_PATH_MAX - 8:
        return directory, False
    return tempfile.mkdtemp(prefix="registrar-haproxy-"), True


def log_socket_path(directory: str, config: str) -> str:
    """Where HAProxy sends its per-request log to the router (a unix datagram socket)."""
    stem = os.path.splitext(os.path.basename(config))[0] or "haproxy"
    return os.path.join(directory, f"{stem}-log.sock")


def socket_paths(directory: str, config: str) -> tuple[str, str]:
    """(master CLI socket, stats socket) in `directory`, named after the config."""
    stem = os.path.splitext(os.path.basename(config))[0] or "haproxy"
    return (
        os.path.join(directory, f"{stem}-master.sock"),
        os.path.join(directory, f"{stem}-stats.sock"),
    )


# --- the master CLI -----------------------------------------------------------------------


def cli(path: str, command: str, timeout: float = CLI_TIMEOUT) -> str:
    """Sends one line to a HAProxy CLI socket (master or stats) and returns the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


_HAPROXY_LOG = logging.getLogger("haproxy")
_LEVEL = re.compile(r"^\[(\w+)\]")
_LEVELS = {"EMERG": logging.ERROR, "ALERT": logging.ERROR, "WARNING": logging.WARNING}


def _pump_output(proc: subprocess.Popen[bytes]) -> None:
    """HAProxy's stdout/stderr, one log record a line (so --log-format json holds for it)."""
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            match = _LEVEL.match(line)
            level = _LEVELS.get(match.group(1), logging.INFO) if match else logging.INFO
            _HAPROXY_LOG.log(level, "%s", line, extra={"event": "haproxy_output"})


def _with_parent_death(command: list[str]) -> list[str]:
    """HAProxy SIGTERMed if registrar dies (even by SIGKILL), without running Python between
    fork and exec (unsafe with gRPC's threads live): util-linux's setpriv sets it, then execs."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class ProcState(enum.Enum):
    NOT_STARTED = "not started"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "exited, restarting"
    FAILED = "not running, retrying"
    STOPPED = "stopped"


# --- the process we run -------------------------------------------------------------------


class HAProxyMaster:
    """One HAProxy in master-worker mode, started, reloaded, restarted and stopped by us.

    Used from one thread (the router's); `problem()` may be called from any.
    """

    def __init__(self, haproxy_bin: str, config: str, master_socket: str) -> None:
        self.haproxy_bin = haproxy_bin
        self.config = config
        self.master_socket = master_socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._restart = RetryClock()  # failed starts / deaths in a row, and the next start
        self._state = ProcState.NOT_STARTED
        self._why = ""  # what went wrong last, for /healthz
        self._ever_started = False
        self.restarts = 0  # successful starts after the first one

    # --- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def problem(self) -> str | None:
        """None while HAProxy runs; else why not (for /healthz)."""
        proc = self._proc
        if self._state is ProcState.RUNNING and proc is not None and proc.poll() is not None:
            return f"haproxy exited with status {proc.returncode}"
        if self._state is ProcState.RUNNING:
            return None
        return f"haproxy {self._state.value}" + (f": {self._why}" if self._why else "")

    # --- start / restart -----------------------------------------------------------------

    def start(self) -> ProcInfo:
        """Starts HAProxy on the installed config; returns once its worker is up."""
        if self.running():
            raise HAProxyError("already running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.master_socket)
        command = [
            self.haproxy_bin, "-W", "-db", "-f", self.config,
            "-S", f"{self.master_socket},mode,600",
        ]
        self._state, self._why = ProcState.STARTING, ""
        try:
            self._proc = subprocess.Popen(
                _with_parent_death(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self._state, self._why = ProcState.FAILED, f"failed to start: {exc}"
            raise HAProxyError(f"cannot run {self.haproxy_bin}: {exc}") from None
        start_thread(threading.Thread(
            target=_pump_output, args=(self._proc,), name="haproxy-output", daemon=True
        ))
        self._started_at = time.monotonic()
        deadline = self._started_at + START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                self._state, self._why = ProcState.FAILED, f"exited at start with status {code}"
                raise HAProxyError(f"haproxy exited at start with status {code}")
            info = self.show_proc()
            if info is not None and info.workers:
                self._state = ProcState.RUNNING
                if self._ever_started:
                    self.restarts += 1
                self._ever_started = True
                log.info("haproxy started (master pid %d, worker %s)", self._proc.pid,
                         ",".join(map(str, info.workers)),
                         extra={"event": "haproxy_started", "pid": self._proc.pid})
                return info
            if time.monotonic() > deadline:
                self._terminate(self._proc, 2.0)
                self._state, self._why = ProcState.FAILED, "did not start"
                raise HAProxyError(f"haproxy did not start within {START_TIMEOUT:g}s")
            time.sleep(0.01)

    def supervise(self, now: float) -> bool:
        """Notices a dead HAProxy and starts it again, with backoff. True when it (re)started
        right now (the caller must then assume the config file's layout)."""
        if self.running():
            if self._restart.failures and now - self._started_at > STABLE_AFTER:
                self._restart.reset()
            return False
        if self._proc is not None:
            code = self._proc.poll()
            self._proc = None
            delay = self._restart.failed()
            self._state, self._why = ProcState.RESTARTING, f"exited with status {code}"
            log.error("haproxy exited with status %s; restarting in %.1fs", code, delay,
                      extra={"event": "haproxy_died", "status": code})
        if self._restart.at is not None and now < self._restart.at:
            return False
        try:
            self.start()
        except HAProxyError as exc:
            delay = self._restart.failed()
            self._state, self._why = ProcState.FAILED, str(exc)
            log.error("%s; retrying in %.1fs", exc, delay, extra={"event": "haproxy_start_failed"})
            return False
        return True


    # --- reload and runtime API ----------------------------------------------------------

    def show_proc(self) -> ProcInfo | None:
        try:
            return parse_show_proc(cli(self.master_socket, "show proc", timeout=1.0))
        except OSError:
            return None

    def reload(self) -> None:
        """SIGUSR2 to the master; returns once the new worker runs (HAProxyError if the reload
        failed: the master keeps the old workers serving)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise HAProxyError("haproxy is not running")
        before = self.show_proc()
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.005)
            if proc.poll() is not None:
                raise HAProxyError(f"haproxy exited during the reload (status {proc.returncode})")
            info = self.show_proc()
            if info is None or (before is not None and info.reloads <= before.reloads):
                continue
            if info.failed:
                raise HAProxyError("haproxy refused the new config; the old one keeps serving")
            if info.workers:
                return
        raise HAProxyError(f"reload did not finish within {RELOAD_TIMEOUT:g}s")

    def runtime(self, commands: Sequence[str]) -> None:
        """Runs runtime API commands on the current worker (through the master CLI)."""
        batch: list[str] = []
        size = 0
        for command in commands:
            line = f"@1 {command}"
            if batch and size + len(line) + 2 > CLI_CHUNK:
                self._send_batch(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line) + 2
        if batch:
            self._send_batch(batch)

    def _send_batch(self, lines: list[str]) -> None:
        try:
            answer = cli(self.master_socket, "; ".join(lines))
        except OSError as exc:
            raise HAProxyError(f"master CLI: {exc}") from None
        log.debug("runtime API: %s -> %s", lines, answer.strip())

    def servers_state(self, backend: str | None = None) -> str:
        """`show servers state [BACKEND]` of the current worker."""
        return self._ask("@1 show servers state" + (f" {backend}" if backend else ""))

    def stat(self, worker: int | None = None, backend: str | None = None) -> str:
        """`show stat` of one worker (by pid; None: the current one), its servers only (type
        4), of every backend or of one. Asking a worker by pid ties the counters to the worker
        `show proc` named, so a reload between the two questions cannot mix two workers'
        counters."""
        target = f"@!{worker}" if worker is not None else "@1"
        return self._ask(f"{target} show stat {backend or -1} 4 -1")

    def info(self, worker: int) -> str:
        """`show info` of one worker (by pid)."""
        return self._ask(f"@!{worker} show info")

    def _ask(self, command: str) -> str:
        try:
            return cli(self.master_socket, command)
        except OSError as exc:
            raise HAProxyError(f"master CLI: {exc}") from None

    # --- stop ----------------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        """Soft stop: SIGUSR1 to the master (listeners close at once, open connections may
        finish); after `grace` seconds a hard stop (SIGTERM), then SIGKILL."""
        proc, self._proc = self._proc, None
        self._state = ProcState.STOPPED
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping haproxy (soft stop, up to %gs for open connections)", grace,
                 extra={"event": "haproxy_stop"})
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("haproxy still has connections after %gs: hard stop", grace)
            self._terminate(proc, 2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.master_socket)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], wait: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
