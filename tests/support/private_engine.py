"""A private Docker engine beside the main one, for tests that stop and restart an engine.

Its own socket, data and exec roots, pid file and bridge (made first, with an address of its
own: never `--bridge=none`, which deletes the main engine's docker0), no iptables rules; it
publishes ports through docker-proxy, so tests dial them on 127.0.0.1 as usual. Everything
carries one name (``rgtpe`` + 6 hex digits) and goes in ``destroy()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.docker_env import BUSYBOX_IMAGE, DOCKER, DockerError

DOCKERD = shutil.which("dockerd") or "dockerd"


class PrivateEngine:
    def __init__(self, base_dir: Path, *, live_restore: bool = False) -> None:
        self.name = f"rgtpe{secrets.token_hex(3)}"
        # unix socket paths hold 108 bytes, containerd's under the exec root too: keep the
        # engine's roots short (`base_dir` holds only the log)
        self.dir = Path(f"/tmp/{self.name}")
        self.dir.mkdir(parents=True)
        self.socket = self.dir / "docker.sock"
        self.live_restore = live_restore
        self.log_path = Path(base_dir) / f"{self.name}-dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        octet = 100 + secrets.randbelow(150)
        self.bridge_cidr = f"10.213.{octet}.1/24"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def docker(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        proc = subprocess.run([DOCKER, "-H", self.url, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise DockerError(f"docker -H {self.url} {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _bridge(self) -> None:
        subprocess.run(["ip", "link", "add", self.name, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", self.bridge_cidr, "dev", self.name], check=True)
        subprocess.run(["ip", "link", "set", self.name, "up"], check=True)

    def start(self, timeout: float = 60.0) -> PrivateEngine:
        if not (Path("/sys/class/net") / self.name).exists():
            self._bridge()
        command = [
            DOCKERD, f"--host={self.url}", f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}", f"--pidfile={self.dir / 'dockerd.pid'}",
            f"--bridge={self.name}", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--userland-proxy=true",
        ]
        if self.live_restore:
            command.append("--live-restore")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon's, closed with it
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DockerError(f"private dockerd exited: {self.log_tail()}")
            with contextlib.suppress(DockerError, subprocess.TimeoutExpired):
                self.docker("info", "--format", "{{.ID}}", timeout=5)
                return self
            if time.monotonic() > deadline:
                raise DockerError(f"private dockerd did not answer: {self.log_tail()}")
            time.sleep(0.2)

    def load_image(self, tag: str = BUSYBOX_IMAGE) -> None:
        """Copies an image of the main engine into this one (`docker save | docker load`)."""
        save = subprocess.Popen([DOCKER, "save", tag], stdout=subprocess.PIPE)
        load = subprocess.run([DOCKER, "-H", self.url, "load", "-q"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=120)
        save.wait(60)
        if load.returncode != 0 or save.returncode != 0:
            raise DockerError(f"cannot load {tag}: {load.stderr.strip()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to dockerd, as `systemctl stop docker` does; waits for it to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(DockerError, subprocess.TimeoutExpired):
                ids = self.docker("ps", "-aq", timeout=10).split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=60, check=False)
        self.stop()
        # containers of a live-restore engine outlive it: their shims go with the engine's dir
        for pid in _pids_mentioning(str(self.dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in reversed(_mounts_under(self.dir)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.name], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1]
            if point.startswith(prefix):
                found.append(point)
    return found


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            if text in cmdline:
                pids.append(int(entry))
    return pids
