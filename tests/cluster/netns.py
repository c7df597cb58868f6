"""Network namespaces: ``ip`` wrappers, running commands inside a namespace, and sockets made
inside one, so the test process (which stays in the root namespace) reaches services there.

``socket_in(ns)`` creates the socket in a short-lived thread that entered the namespace with
setns(2) (CLONE_NEWNET affects only the calling thread); a socket keeps the namespace it was
created in, so it can then be used from any thread. ``NetnsForwarder`` builds on it: it listens
on ``127.0.0.1:<free port>`` in the root namespace and connects from inside the namespace, so
tests keep dialling only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from tests.support.forwarders import TcpForwarder

T = TypeVar("T")

IP = shutil.which("ip") or "/usr/sbin/ip"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    pass


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell); NetnsError with its stderr when ``check`` and it fails."""
    proc = subprocess.run(
        list(argv),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def ip(*args: str, check: bool = True) -> str:
    return run([IP, *args], check=check).stdout


def ipn(ns: str, *args: str, check: bool = True) -> str:
    """``ip -n NS ARGS``."""
    return run([IP, "-n", ns, *args], check=check).stdout


def netns_list() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = run([IP, "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_path(ns: str) -> str:
    return f"{NETNS_DIR}/{ns}"


def netns_inode(ns: str) -> int | None:
    """Inode of the namespace (what /proc/PID/ns/net shows as ``net:[INODE]``), or None."""
    try:
        return os.stat(netns_path(ns)).st_ino
    except OSError:
        return None


def netns_add(ns: str) -> None:
    ip("netns", "add", ns)
    ipn(ns, "link", "set", "lo", "up")


def netns_delete(ns: str) -> None:
    ip("netns", "delete", ns, check=False)
    # a name whose mount went away but whose file stayed would block a later `ip netns add`
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, OSError):
        if os.path.exists(netns_path(ns)):
            run(["umount", "-l", netns_path(ns)], check=False)
            os.unlink(netns_path(ns))


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``ip netns exec NS ARGV...`` (a private mount namespace with the netns's /sys)."""
    return [IP, "netns", "exec", ns, *argv]


def engine_argv(ns: str, argv: Sequence[str], scratch_dir: str) -> list[str]:
    """Like ``exec_argv`` but keeping /sys/fs/cgroup, which a Docker engine needs.

    ``ip netns exec`` mounts a fresh sysfs on /sys, which hides /sys/fs/cgroup (runc then
    fails). So: enter the netns (nsenter), make a private mount namespace whose mounts do not
    propagate back to the root one (unshare --propagation slave), keep a copy of the cgroup
    tree, mount the namespace's own sysfs, put the cgroup tree back, exec ARGV. Mounts the
    engine makes (overlays, netns files) stay in that private mount namespace and vanish with
    its last process. Each step execs: the process started is ARGV's process itself.
    ``scratch_dir`` (an empty directory of the cluster's) holds the cgroup tree meanwhile.
    """
    script = (
        'set -e; keep=$0; mount --rbind /sys/fs/cgroup "$keep"; '
        "umount -l /sys; mount -t sysfs -o nosuid,nodev,noexec sysfs /sys; "
        'mount --rbind "$keep" /sys/fs/cgroup; umount -l "$keep"; exec "$@"'
    )
    return [
        NSENTER,
        f"--net={netns_path(ns)}",
        UNSHARE,
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        script,
        scratch_dir,
        *argv,
    ]


def exec_in(
    ns: str,
    *argv: str,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV inside the namespace and wait (``ip netns exec``)."""
    return run(exec_argv(ns, argv), check=check, timeout=timeout, input=input)


# --- sockets inside a namespace -------------------------------------------------------------
def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that entered the namespace; its result (or exception)."""
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=work, name=f"setns-{ns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def socket_in(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that lives in network namespace ``ns``."""
    return in_netns(ns, lambda: socket.socket(family, type))


def connect_in(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port`` made from inside ``ns``."""
    s = socket_in(ns)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


class NetnsForwarder(TcpForwarder):
    """Listens on a free 127.0.0.1 port (root namespace) and connects to ``target_host:
    target_port`` from inside namespace ``ns``. ``cut()``/``blackhole()``/``restore()`` as
    for ``tests.support.forwarders.TcpForwarder``."""

    def __init__(self, ns: str, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.ns = ns
        super().__init__(target_host, target_port, listen_port)

    def _connect_target(self) -> socket.socket:
        s = connect_in(self.ns, self.target[0], self.target[1], timeout=5)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def __repr__(self) -> str:
        return f"NetnsForwarder(:{self.port}->{self.ns}:{self.target[0]}:{self.target[1]})"


class _NsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = connect_in(self._ns, self.host, self.port, timeout=self.timeout or 5.0)


def http_get_in(
    ns: str, host: str, port: int, path: str = "/", timeout: float = 5.0
) -> tuple[int, bytes]:
    """GET http://host:port/path from inside ``ns``: (status, body)."""
    conn = _NsHTTPConnection(ns, host, port, timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
