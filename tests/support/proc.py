"""Processes under test, free ports and polling helpers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port free on 127.0.0.1 right now (and not in ``exclude``)."""
    excluded = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in excluded:
            return port
    raise RuntimeError("no free port found")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    On timeout raise AssertionError with ``message`` (a string or a callable giving one, e.g.
    to add logs) and the last value seen. Exceptions of the types in ``ignore`` count as a
    falsy result (and the last one is reported); any other exception propagates at once.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (after {timeout} s; last value: {last!r})")
        time.sleep(interval)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class RegistrarProcess:
    """``python -m registrar ARGS`` in its own session, output to a log file (no pipes).

    The child does not inherit ``REGISTRAR_*`` variables from the test runner's environment:
    only those given in ``env`` are set. ``PYTHONUNBUFFERED=1`` keeps the log current.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        log_dir: str | Path | None = None,
        cwd: str | Path | None = None,
        module: str = "registrar",
    ) -> None:
        self.args = [str(a) for a in args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")}
        base["PYTHONUNBUFFERED"] = "1"
        base.update(env or {})
        self.env = base
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="rgt-proc-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="registrar-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.log_path = Path(path)
        self.command = [sys.executable, "-m", module, *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=cwd,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to the registrar itself (not to its process group)."""
        self.send_signal(signal.SIGTERM)

    def interrupt(self) -> None:
        self.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the registrar and whatever it started in its session (e.g. haproxy)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for exit and return the exit code; AssertionError (with the log) on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"registrar {self.args} still running after {timeout} s; log:\n{tail(self.logs())}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the exit code."""
        self.terminate()
        return self.wait(timeout)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the log matches the regex ``pattern``; the match."""
        rx = re.compile(pattern)

        def check() -> re.Match[str] | None:
            m = rx.search(self.logs())
            if m is None and self.proc.poll() is not None:
                raise AssertionError(
                    f"registrar exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                    f"{tail(self.logs())}"
                )
            return m

        return wait_until(
            check,
            timeout=timeout,
            message=lambda: f"log never matched {pattern!r}; log:\n{tail(self.logs())}",
        )

    def cleanup(self) -> None:
        """SIGKILL if still alive (the group too, in case it left children)."""
        if self.proc.poll() is None:
            self.kill()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> RegistrarProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RegistrarProcess(pid={self.pid}, args={self.args}, rc={self.proc.poll()})"
