"""A private Podman service (its Docker-compatible API) for the real tests.

``PodmanService`` runs ``podman system service`` with its state in a directory named after a
unique prefix (``rgtpm1a2b3c``): storage (``--root``), run state (``--runroot``), the tmpdir
(events file, file locks, exit files), its own containers.conf / storage.conf /
registries.conf (passed through ``CONTAINERS_*``), its own bridge network (network, bridge
interface and container names all carry the prefix) and the API socket. Point registrar's
``--docker`` (or its ``DockerSource``, or ``docker -H``) at ``service.url``.

Facts behind the flags (Podman 4.3.1 from Debian 12, as root, measured here):
- root here lacks CAP_SYS_RESOURCE: podman's default rlimits (nofile 1048576, nproc max) make
  runc fail ("error setting rlimit type 7: operation not permitted"), through the CLI and the
  compat API alike. The private containers.conf sets ``default_ulimits`` (nofile and nproc
  4096), so containers created through the API by any client start too; ``run()`` also passes
  ``--ulimit`` explicitly.
- no systemd: ``cgroup_manager = "cgroupfs"``, and HEALTHCHECK timers never fire (the service
  logs "unable to get systemd connection to add healthchecks" and carries on). Run checks with
  ``healthcheck_run(name)``, or ``start_healthchecks(name, interval)`` for a ticker thread.
- no journald: ``events_logger = "file"``. Events reach API subscribers by polling the file
  (0-250 ms late). Rotation is off by default (``events_max_size="0"``): a rotating file makes
  Podman 4.3 re-send events to live streams.
- every CLI call against this service must carry the same flags and ``CONTAINERS_*``
  environment (``podman()`` does): without them it silently uses another events file and lock
  type.

Some state outside the directory cannot be avoided with rootful Podman 4.3: netavark's IPAM
database (/run/containers/networks/ipam.db, one bucket per network name: ``destroy()`` removes
ours), per-container netns files in /run/netns and runc state in /run/runc (removed with each
container), the NETAVARK-* iptables chains (our rules go with our last container), the
/sys/fs/cgroup/*/libpod_parent cgroups, and the blob-info cache in /var/lib/containers/cache
(written by ``podman build``). ``remove_shared_podman_state()`` removes the chains and cgroups
at the end of a session when no Podman runs any more.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .docker_env import BUSYBOX_DOCKERFILE, BUSYBOX_IMAGE, HTTPD_COMMAND

PODMAN_BIN = os.environ.get("RGT_PODMAN_BIN", "podman")
# Every service's directory, network, bridge and container names start with this.
FAMILY = "rgtpm"
ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")
API_VERSION = "v1.41"
INSTALL_HINT = "install it with `apt-get install -y podman` (Debian 12 has 4.3.1)"
_STATE_DIR_RX = re.compile(rf"^(?P<dir>/.*/(?P<prefix>{FAMILY}[0-9a-f]{{6}}))(?:/.*)?$")
_SOCKET_MAX = 100
_RUNROOT_MAX = 50


class PodmanError(RuntimeError):
    pass


# -- availability ------------------------------------------------------------------------------
def podman_available() -> tuple[bool, str]:
    """``(True, "podman version 4.3.1 (/usr/bin/podman)")`` when podman and the helpers it
    needs here are installed; otherwise ``(False, why)``. Tests needing Podman must FAIL on
    False (``require_podman()``), never skip."""
    binary = shutil.which(PODMAN_BIN)
    if binary is None:
        return False, f"podman binary {PODMAN_BIN!r} not found on PATH: {INSTALL_HINT}"
    try:
        proc = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{binary} --version failed: {exc!r}"
    if proc.returncode != 0:
        return False, f"{binary} --version exited {proc.returncode}: {proc.stderr.strip()}"
    missing = [
        what
        for what, paths in (
            ("conmon", ["/usr/bin/conmon", "/usr/libexec/podman/conmon"]),
            ("an OCI runtime (runc or crun)", ["/usr/sbin/runc", "/usr/bin/runc", "/usr/bin/crun"]),
            ("netavark", ["/usr/lib/podman/netavark", "/usr/libexec/podman/netavark"]),
        )
        if not any(Path(p).exists() for p in paths)
    ]
    if missing:
        return False, f"podman is installed but {', '.join(missing)} is missing: {INSTALL_HINT}"
    return True, f"{proc.stdout.strip()} ({binary})"


def require_podman() -> str:
    """The version line; PodmanError saying why (and how to fix it) when podman is unusable."""
    ok, why = podman_available()
    if not ok:
        raise PodmanError(f"Podman is required by this test and is not usable: {why}")
    return why


def _runtime() -> str:
    return "crun" if Path("/usr/bin/crun").exists() else "runc"


# -- containers --------------------------------------------------------------------------------
@dataclass
class PodmanContainer:
    """A container of a PodmanService: id, full name, published ports ("8080/tcp" -> port)."""

    id: str
    name: str
    ports: dict[str, int] = field(default_factory=dict)

    def port(self, private: str | int = 8080, proto: str = "tcp") -> int:
        """The host port published for ``private`` (on 127.0.0.1)."""
        key = str(private) if "/" in str(private) else f"{private}/{proto}"
        try:
            return self.ports[key]
        except KeyError:
            raise KeyError(f"{self.name}: {key} not published ({self.ports})") from None

    @property
    def host_port(self) -> int:
        """The host port of 8080/tcp (the busybox httpd's)."""
        return self.port(8080)

    def url(self, private: str | int = 8080) -> str:
        return f"http://127.0.0.1:{self.port(private)}/"


def published_ports(info: Mapping[str, Any]) -> dict[str, int]:
    """``{"8080/tcp": 35553}`` from a compat inspect (Podman lists each binding once; an
    all-interfaces binding has ``HostIp`` "")."""
    ports: dict[str, int] = {}
    for key, bindings in (info.get("NetworkSettings", {}).get("Ports") or {}).items():
        for b in bindings or []:
            if b.get("HostPort"):
                ports[key] = int(b["HostPort"])
    return ports


def _healthcheck_args(healthcheck: str | Mapping[str, Any] | None) -> list[str]:
    """A shell command, or a dict with ``cmd`` and optional ``interval``, ``timeout``,
    ``retries``, ``start_period`` (seconds, or duration strings like "2s"). Defaults: interval
    30s, timeout 5s, retries 1 (one failed run turns it unhealthy). Podman wants intervals of
    at least 1 s; nothing runs the checks here but ``healthcheck_run``/``start_healthchecks``."""
    if healthcheck is None:
        return []
    hc = {"cmd": healthcheck} if isinstance(healthcheck, str) else dict(healthcheck)
    cmd = hc.pop("cmd", None)
    if not cmd:
        raise ValueError(f"healthcheck without a command: {healthcheck!r}")
    args = ["--health-cmd", str(cmd)]
    settings = {"interval": "30s", "timeout": "5s", "retries": 1, **hc}
    for key, value in settings.items():
        if key not in ("interval", "timeout", "retries", "start_period"):
            raise ValueError(f"unknown healthcheck key {key!r}")
        if isinstance(value, int | float) and key != "retries":
            value = f"{int(value * 1000)}ms"
        args += [f"--health-{key.replace('_', '-')}", str(value)]
    return args


# -- a tiny HTTP client over the unix socket ---------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _request(sock_path: str, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    conn = _UnixConnection(sock_path, timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- leftovers ---------------------------------------------------------------------------------
def _owner_alive(state_dir: Path) -> bool:
    """The process that made ``state_dir`` still runs (same pid and start time)."""
    try:
        pid_text, start = (state_dir / "owner").read_text().split()
        return _start_time(int(pid_text)) == start
    except (OSError, ValueError):
        return False


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    points: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(f"{path}/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _processes_using(path: Path) -> list[int]:
    """Pids whose command line names ``path`` or something below it (service, conmon,
    ``podman container cleanup``)."""
    pids = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(a == str(path) or a.startswith(f"{path}/") for a in text):
            pids.append(int(entry.name))
    return pids


def _bridges() -> list[str]:
    try:
        out = subprocess.run(
            ["ip", "-o", "link", "show", "type", "bridge"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _delete_link(name: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["ip", "link", "delete", name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )


def _unmount(points: Iterable[str]) -> None:
    for point in points:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["umount", "-l", point], stdin=subprocess.DEVNULL, capture_output=True, timeout=10
            )


def cleanup_leftovers(keep: Iterable[str] = ()) -> list[str]:
    """Remove what crashed earlier services left (whose creating process is gone): their
    containers (through podman itself, with that service's own flags, so netns, iptables rules
    and mounts go too), processes, mounts, IPAM buckets, bridges and directories. Found by name
    prefix (``rgtpm`` + 6 hex digits) in process command lines, the mount table and the bridge
    list. ``keep``: prefixes not to touch. Returns the prefixes cleaned."""
    kept = set(keep)
    dirs: dict[str, Path] = {}
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        candidates += [
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
        ]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                candidates += (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
    for text in candidates:
        m = _STATE_DIR_RX.match(text)
        if m and m["prefix"] not in kept:
            dirs.setdefault(m["prefix"], Path(m["dir"]))
    cleaned = []
    for prefix, state_dir in dirs.items():
        if _owner_alive(state_dir):
            continue
        PodmanService.from_state_dir(state_dir).destroy()
        cleaned.append(prefix)
    live = {p for p, d in dirs.items() if _owner_alive(d)} | kept
    for name in _bridges():
        if re.fullmatch(rf"{FAMILY}[0-9a-f]{{6}}", name) and name not in live:
            _delete_link(name)
            if name not in cleaned:
                cleaned.append(name)
    return cleaned


_NETAVARK_JUMPS = (
    ("nat", "PREROUTING", "-m addrtype --dst-type LOCAL -j NETAVARK-HOSTPORT-DNAT"),
    ("nat", "OUTPUT", "-m addrtype --dst-type LOCAL -j NETAVARK-HOSTPORT-DNAT"),
    ("nat", "POSTROUTING", "-j NETAVARK-HOSTPORT-MASQ"),
    (
        "filter",
        "FORWARD",
        '-m comment --comment "netavark firewall plugin rules" -j NETAVARK_FORWARD',
    ),
)
_PODMAN_COMMS = ("podman", "conmon")
_NETAVARK_CHAINS = (
    ("nat", "NETAVARK-HOSTPORT-DNAT"),
    ("nat", "NETAVARK-HOSTPORT-MASQ"),
    ("nat", "NETAVARK-HOSTPORT-SETMARK"),
    ("filter", "NETAVARK_FORWARD"),
)


def _podman_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() in _PODMAN_COMMS:
                pids.append(int(entry.name))
    return pids


def remove_shared_podman_state() -> bool:
    """At the end of a test session: remove what every rootful Podman shares and recreates on
    demand (netavark's iptables chains and jumps, empty libpod_parent cgroups), but only while
    no podman or conmon process runs on the host. False (nothing done) otherwise. Left alone
    on purpose: /var/lib/containers/cache and /run/containers/networks/ipam.db, which a
    system Podman's stopped containers may still need."""
    if _podman_processes():
        return False

    def iptables(*args: str) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                ["iptables", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=10
            )

    for table, chain, rule in _NETAVARK_JUMPS:
        iptables("-t", table, "-D", chain, *shlex.split(rule))
    for table, chain in _NETAVARK_CHAINS:
        iptables("-t", table, "-F", chain)
        iptables("-t", table, "-X", chain)
    for parent in Path("/sys/fs/cgroup").glob("*/libpod_parent"):
        for sub in parent.iterdir():
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()
    return True


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            cols = line.split()
            dest = socket.inet_ntoa(struct.pack("<I", int(cols[1], 16)))
            mask = socket.inet_ntoa(struct.pack("<I", int(cols[7], 16)))
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.128-255.x.0/24 that no route on this host overlaps (0.0.0.0/0 aside)."""
    used = [n for n in _used_networks() if n.prefixlen > 0]
    rng = random.SystemRandom()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randint(128, 255)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise PodmanError("no free 10.x.y.0/24 subnet for the podman network")


# -- the service -------------------------------------------------------------------------------
class PodmanService:
    """A private ``podman system service``: ``start()``, ``url``, ``run()``, ``destroy()``.

    Its state lives in ``{base_dir}/{prefix}/`` (``prefix`` is ``rgtpm`` + 6 hex digits, also
    the name of its network and bridge interface and the start of every container name). The
    socket is ``{state}/podman.sock`` and the runroot ``{state}/run``; each moves to
    ``/tmp/{prefix}.run/`` when its path would be too long (Podman refuses a runroot of more
    than 50 characters; a unix socket path holds 108 bytes). Containers outlive
    ``stop_service()`` (as with Podman itself), not ``destroy()``.
    """

    def __init__(
        self,
        base_dir: str | Path,
        *,
        prefix: str | None = None,
        busybox: str = "/bin/busybox",
        image: str = BUSYBOX_IMAGE,
        storage_driver: str = "overlay",
        events_max_size: str = "0",
        log_level: str = "warn",
    ) -> None:
        """``image``: the tag under which ``start()`` builds the busybox image ("" skips the
        build). ``events_max_size``: containers.conf ``events_logfile_max_size``
        ("0" never rotates). ``log_level``: the service's (``info`` logs every request)."""
        self.prefix = prefix or f"{FAMILY}{secrets.token_hex(3)}"
        if not re.fullmatch(rf"{FAMILY}[0-9a-f]{{6}}", self.prefix):
            raise ValueError(f"prefix must be {FAMILY} and 6 hex digits, not {self.prefix!r}")
        self.state_dir = Path(base_dir).absolute() / self.prefix
        self.busybox = busybox
        self.image = image
        self.storage_driver = storage_driver
        self.events_max_size = events_max_size
        self.log_level = log_level
        # Podman refuses a runroot longer than 50 characters; sun_path holds 108 bytes.
        run = self.state_dir / "run"
        self.run_dir = run if len(str(run)) <= _RUNROOT_MAX else Path(f"/tmp/{self.prefix}.run")
        sock = self.state_dir / "podman.sock"
        self.socket_path = sock if len(str(sock)) <= _SOCKET_MAX else self.run_dir / "podman.sock"
        self.log_path = self.state_dir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._n = 0
        self._health_names: dict[str, float] = {}
        self._health_stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> PodmanService:
        """A handle on an existing state directory (e.g. a crashed run's, to destroy it)."""
        driver = "overlay"
        with contextlib.suppress(OSError):
            m = re.search(
                r'^driver = "(\w+)"', (state_dir / "etc" / "storage.conf").read_text(), re.M
            )
            driver = m[1] if m else driver
        return cls(state_dir.parent, prefix=state_dir.name, storage_driver=driver)

    # -- paths and flags ---------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.state_dir / name

    @property
    def url(self) -> str:
        """``unix:///.../podman.sock``: for ``DockerSource(url)`` and ``registrar --docker``."""
        return f"unix://{self.socket_path}"

    @property
    def network(self) -> str:
        """The service's default bridge network (also its bridge interface's name)."""
        return self.prefix

    @property
    def events_file(self) -> Path:
        return self._dir("tmp") / "events.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def global_args(self) -> list[str]:
        """The flags every podman call against this state needs (conmon's cleanup calls get
        the same ones from the service)."""
        return [
            "--root", str(self._dir("root")),
            "--runroot", str(self.run_dir),
            "--tmpdir", str(self._dir("tmp")),
            "--storage-driver", self.storage_driver,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--network-backend", "netavark",
            "--network-config-dir", str(self._dir("networks")),
            "--runtime", _runtime(),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        """The environment for podman: the private config files, and no remote connection."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINER_", "DOCKER_"))}
        env.update(
            CONTAINERS_CONF=str(self._dir("etc") / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(self._dir("etc") / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self._dir("etc") / "registries.conf"),
            TMPDIR=str(self._dir("tmp")),
        )
        return env

    def podman(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run the podman CLI on this service's state; its stdout (stripped). PodmanError with
        stderr when it fails and ``check``."""
        proc = self._podman(*args, timeout=timeout)
        if check and proc.returncode != 0:
            raise PodmanError(
                f"podman {shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout.strip()

    def _podman(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PODMAN_BIN, *self.global_args(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )

    # -- setup -------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for path in (*(self._dir(n) for n in ("root", "tmp", "etc", "networks")), self.run_dir):
            path.mkdir(parents=True, exist_ok=True)
        tmp, root, networks = (self._dir(n) for n in ("tmp", "root", "networks"))
        run = self.run_dir
        ulimits = ", ".join(json.dumps(u) for u in ULIMITS)
        (self._dir("etc") / "containers.conf").write_text(
            f"""\
[containers]
default_ulimits = [{ulimits}]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{tmp}/events.log"
events_logfile_max_size = "{self.events_max_size}"
tmp_dir = "{tmp}"
lock_type = "file"
runtime = "{_runtime()}"
static_dir = "{root}/libpod"
volume_path = "{root}/volumes"
image_copy_tmp_dir = "{tmp}"

[network]
network_backend = "netavark"
network_config_dir = "{networks}"
default_network = "{self.network}"
"""
        )
        (self._dir("etc") / "storage.conf").write_text(
            f"""\
[storage]
driver = "{self.storage_driver}"
graphroot = "{root}"
runroot = "{run}"
"""
        )
        (self._dir("etc") / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "permissive"\n'
        )
        subnet = _free_subnet()
        gateway = subnet.network_address + 1
        network = {
            "name": self.network,
            "id": secrets.token_hex(32),
            "driver": "bridge",
            "network_interface": self.network,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "subnets": [{"subnet": str(subnet), "gateway": str(gateway)}],
            "ipv6_enabled": False,
            "internal": False,
            "dns_enabled": False,
            "ipam_options": {"driver": "host-local"},
        }
        path = self._dir("networks") / f"{self.network}.json"
        path.write_text(json.dumps(network, indent=1) + "\n")

    def _build_image(self) -> None:
        if not self.image or self.podman("images", "-q", self.image, check=False):
            return
        if not Path(self.busybox).exists():
            raise PodmanError(f"{self.busybox} missing: install busybox-static")
        ctx = self._dir("tmp") / "busybox-image"
        ctx.mkdir(exist_ok=True)
        shutil.copy2(self.busybox, ctx / "busybox")
        (ctx / "Dockerfile").write_text(BUSYBOX_DOCKERFILE)
        try:
            self.podman("build", "-q", "-t", self.image, str(ctx), timeout=300)
        finally:
            shutil.rmtree(ctx, ignore_errors=True)

    def start(self, timeout: float = 30.0) -> PodmanService:
        """Clean up crashed runs' leftovers, write the private config, build the busybox image
        (``image``), start the service and wait until ``/_ping`` answers. PodmanError with the
        service log's tail when it cannot start."""
        if self.running:
            return self
        require_podman()
        cleanup_leftovers(keep=[self.prefix])
        if not (self._dir("etc") / "containers.conf").exists():
            self._write_config()  # not again on a restart: the network must stay as it is
        pid = os.getpid()
        (self.state_dir / "owner").write_text(f"{pid} {_start_time(pid)}\n")
        self._build_image()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    PODMAN_BIN, *self.global_args(), "--log-level", self.log_level,
                    "system", "service", "--time=0", self.url,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env(),
                start_new_session=True,
            )  # fmt: skip
        self.wait_ready(timeout)
        return self

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            status, body = _request(str(self.socket_path), "GET", "/_ping", timeout)
        except OSError:
            return False
        return status == 200 and body.strip() == b"OK"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PodmanError(
                    f"podman service {self.prefix} exited with {self.proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if self.ping():
                return
            if time.monotonic() > deadline:
                raise PodmanError(
                    f"podman service at {self.url} did not answer /_ping within {timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop_service(self, timeout: float = 10.0) -> None:
        """SIGTERM the service (it takes about 1 s), SIGKILL after ``timeout``. Containers go
        on running; ``start()`` again serves them (and the events file) on the same socket;
        Docker clients' event streams end without an error, like Docker's."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def destroy(self) -> None:
        """Stop everything and remove everything this service made: containers (by podman, so
        their netns, iptables rules and mounts go), the IPAM bucket, the service, stray
        processes and mounts, the bridge, the socket and the state directory."""
        self.stop_healthchecks()
        conf = self._dir("etc") / "containers.conf"
        if conf.exists():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self._podman("rm", "-a", "-f", "-t", "0", timeout=120)
                # Podman refuses to remove its default network (and with it the IPAM bucket)
                text = re.sub(r"(?m)^default_network = .*$", "", conf.read_text())
                conf.write_text(
                    text.replace("[network]", f'[network]\ndefault_network = "{self.prefix}-gone"')
                )
                self._podman("network", "rm", "-f", self.network, timeout=60)
        self.stop_service()
        dirs = [self.state_dir, self.run_dir]
        for pid in {p for d in dirs for p in _processes_using(d)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for d in dirs:
            _unmount(_mounts_under(d))
        if self.network in _bridges():
            _delete_link(self.network)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> PodmanService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- the API -----------------------------------------------------------------------------
    def api(self, path: str, method: str = "GET", timeout: float = 10.0) -> Any:
        """A compat API call (``/containers/json``; the version prefix is added); its JSON."""
        status, body = _request(str(self.socket_path), method, f"/{API_VERSION}{path}", timeout)
        if status >= 400:
            raise PodmanError(f"{method} {path}: HTTP {status}: {body.decode(errors='replace')}")
        return json.loads(body) if body.strip() else None

    def inspect(self, name: str) -> dict[str, Any]:
        """The container as Docker clients see it (``GET /containers/{name}/json``)."""
        info: dict[str, Any] = self.api(f"/containers/{quote(name, safe='')}/json")
        return info

    def containers(self, include_stopped: bool = True) -> list[dict[str, Any]]:
        """``GET /containers/json`` (with ``all=1`` unless not ``include_stopped``)."""
        listing: list[dict[str, Any]] = self.api(f"/containers/json?all={int(include_stopped)}")
        return listing

    # -- containers --------------------------------------------------------------------------
    def full_name(self, name: str | None = None) -> str:
        if name is None:
            self._n += 1
            name = f"c{self._n}-{secrets.token_hex(2)}"
        return name if name.startswith(f"{self.prefix}-") else f"{self.prefix}-{name}"

    def run(
        self,
        name: str | None = None,
        *,
        ports: Iterable[str | int] = ("8080",),
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        healthcheck: str | Mapping[str, Any] | None = None,
        command: str | Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        image: str | None = None,
    ) -> PodmanContainer:
        """``podman run -d`` a busybox ``httpd -f -p 8080`` (serving its host name at ``/``;
        PID 1, so it ignores SIGTERM) named ``{prefix}-NAME``, each of ``ports`` published on
        ``127.0.0.1::PORT``, with the ulimits this host needs; returns it with its host ports.
        ``healthcheck``: see ``_healthcheck_args``; run it with ``healthcheck_run``."""
        full = self.full_name(name)
        args = ["run", "-d", "--name", full]
        for limit in ULIMITS:
            args += ["--ulimit", limit]
        for p in ports:
            args += ["-p", f"127.0.0.1::{p}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        args += _healthcheck_args(healthcheck)
        args += list(extra_args)
        args.append(image or self.image)
        if command is None:
            args += HTTPD_COMMAND
        elif isinstance(command, str):
            args += shlex.split(command)
        else:
            args += list(command)
        cid = self.podman(*args, timeout=120).splitlines()[-1]
        return PodmanContainer(id=cid, name=full, ports=published_ports(self.inspect(cid)))

    def healthcheck_run(self, name: str) -> str:
        """Run the container's HEALTHCHECK once: "healthy" or "unhealthy" (this check's
        result; the container turns unhealthy after ``retries`` failures). PodmanError when
        it cannot run (no healthcheck, not running)."""
        proc = self._podman("healthcheck", "run", name, timeout=120)
        if proc.returncode in (0, 1):
            return "healthy" if proc.returncode == 0 else "unhealthy"
        raise PodmanError(
            f"podman healthcheck run {name} failed ({proc.returncode}): {proc.stderr.strip()}"
        )

    def start_healthchecks(self, name: str, interval: float = 1.0) -> None:
        """Run ``name``'s healthcheck every ``interval`` seconds in a background thread (what
        systemd timers would do) until ``stop_healthchecks``; failures to run are ignored."""
        with self._lock:
            self._health_names[name] = interval
            if self._health_thread is None or not self._health_thread.is_alive():
                self._health_stop.clear()
                self._health_thread = threading.Thread(
                    target=self._tick, name=f"{self.prefix}-healthchecks", daemon=True
                )
                self._health_thread.start()

    def stop_healthchecks(self, name: str | None = None) -> None:
        """Stop ticking ``name`` (every container when None)."""
        with self._lock:
            if name is not None:
                self._health_names.pop(name, None)
                if self._health_names:
                    return
            self._health_names.clear()
            self._health_stop.set()
            thread = self._health_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30)

    def _tick(self) -> None:
        due: dict[str, float] = {}
        while not self._health_stop.is_set():
            with self._lock:
                names = dict(self._health_names)
            now = time.monotonic()
            for name, interval in names.items():
                if due.get(name, 0.0) <= now:
                    due[name] = now + interval
                    with contextlib.suppress(PodmanError, OSError, subprocess.TimeoutExpired):
                        self.healthcheck_run(name)
            self._health_stop.wait(0.05)

    def start_container(self, name: str) -> None:
        self.podman("start", name)

    def stop(self, name: str, timeout: int = 1) -> None:
        """``podman stop -t TIMEOUT`` the container. Podman 4.3 sends no ``kill`` event for
        it; ``die`` comes once the container is gone (``stop`` only sometimes)."""
        self.podman("stop", "-t", str(timeout), name, timeout=timeout + 60)

    def kill(self, name: str, signal_name: str = "KILL") -> None:
        self.podman("kill", "-s", signal_name, name)

    def pause(self, name: str) -> None:
        self.podman("pause", name)

    def unpause(self, name: str) -> None:
        self.podman("unpause", name)

    def restart(self, name: str, timeout: int = 1) -> None:
        self.podman("restart", "-t", str(timeout), name, timeout=timeout + 60)

    def remove(self, name: str) -> None:
        """Force-remove (``rm -f -t 0``); no error when it is gone already."""
        self.podman("rm", "-f", "-t", "0", name, check=False, timeout=120)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PodmanService({self.prefix} {self.url} {state})"
