"""The simulated cluster: N hosts (a network namespace, a Docker engine and later a
``registrar watch`` each), a 3-member etcd, routers, Prometheus and an ops namespace, joined
by one bridge in a "switch" namespace. See ``tests/cluster/README.md``.

    with Cluster(hosts=4, routers=2) as c:          # start() ... destroy()
        web = c.host_run_container(0, service="web", version="v1")
        c.hosts[0].start_agent()
        ...
        c.kill_host(0)                               # agent SIGKILLed + link cut
        c.cut_from_etcd(1); c.heal(1)
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.docker_env import BUSYBOX_IMAGE, DOCKER, DockerError, ensure_busybox_image
from tests.support.etcd import EtcdError

from . import names
from .cleanup import Resources, cleanup_leftovers, find_processes, remove_resources
from .dockerapi import DockerAPI
from .load import ClientLoad
from .netns import (
    NetnsError,
    NetnsForwarder,
    engine_argv,
    exec_in,
    http_get_in,
    ip,
    ipn,
    netns_add,
    run,
)
from .procs import NsProcess, ProcInfo, role_of, scan_processes
from .prometheus import Prometheus, ScrapeJob

log = logging.getLogger("tests.cluster")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOAD_SCRIPT = Path(__file__).resolve().with_name("load.py")
DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
ETCD = shutil.which("etcd") or "etcd"
ETCDCTL = shutil.which("etcdctl") or "etcdctl"
NFT = shutil.which("nft") or "/usr/sbin/nft"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
CUT_TABLE = "rgccut"

# The containers serve "NODE NAME VERSION" at / (the client load reads it); httpd is PID 1,
# which ignores SIGTERM: `docker stop -t N` takes N seconds, as in tests/support/docker_env.
HTTPD_SCRIPT = (
    'echo "$RGC_NODE $RGC_NAME $RGC_VERSION" > /www/index.html '
    '&& exec httpd -f -p "$RGC_PORT" -h /www'
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")

Progress = Callable[[str], None]


def default_python() -> str:
    """The project's venv python (has registrar and its libraries), else this one."""
    venv = PROJECT_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


class ClusterError(RuntimeError):
    pass


# --- containers --------------------------------------------------------------------------------
@dataclass
class ClusterContainer:
    """A container on one host, publishing ``private_port`` on the host's address."""

    host: Host
    id: str
    name: str
    service: str
    version: str
    private_port: int
    host_port: int | None

    @property
    def address(self) -> str:
        """``HOST_IP:PORT`` to dial from inside the cluster (a router, ops)."""
        return f"{self.host.ip}:{self.host_port}"

    @property
    def instance(self) -> str:
        return f"{self.host.node}:{self.name}:{self.private_port}"

    def key(self, prefix: str = "/services") -> str:
        """The key the registrar writes for it."""
        return f"{prefix}/{self.service}/{self.instance}"

    def inspect(self) -> dict[str, Any]:
        return self.host.api.inspect(self.id)

    def refresh(self) -> int | None:
        self.host_port = _host_port(self.inspect(), self.private_port)
        return self.host_port

    def stop(self, timeout: int = 1) -> None:
        self.host.api.stop(self.id, timeout)

    def kill(self, signal: str = "KILL") -> None:
        self.host.api.kill(self.id, signal)

    def start(self) -> None:
        self.host.api.start(self.id)
        self.refresh()

    def remove(self) -> None:
        self.host.api.remove(self.id)

    def http_get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
        """GET from the ops namespace (as a client in the cluster would)."""
        assert self.host_port is not None, f"{self.name}: not published"
        return http_get_in(self.host.cluster.ops.ns, self.host.ip, self.host_port, path, timeout)


def _host_port(info: Mapping[str, Any], private_port: int) -> int | None:
    bindings = (info.get("NetworkSettings", {}).get("Ports") or {}).get(f"{private_port}/tcp")
    for b in bindings or []:
        if b.get("HostPort"):
            return int(b["HostPort"])
    return None


# --- nodes ---------------------------------------------------------------------------------------
class Node:
    """One namespace on the cluster's switch: a name (h01, e1, r01, ops), an address, a state
    directory, and the processes started in it."""

    kind = "node"

    def __init__(self, cluster: Cluster, index: int, name: str, ip: str) -> None:
        self.cluster = cluster
        self.index = index
        self.name = name
        self.ip = ip
        self.ns = f"{cluster.prefix}-{name}"
        self.veth = f"{cluster.prefix}-{name}"  # its end on the switch
        self.dir = cluster.state_dir / name
        self.processes: list[NsProcess] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} {self.ip} ns={self.ns})"

    # -- network -------------------------------------------------------------------------------
    def _create(self) -> None:
        sw = self.cluster.switch_ns
        self.dir.mkdir(parents=True, exist_ok=True)
        netns_add(self.ns)
        ip("link", "add", self.veth, "netns", sw, "type", "veth",
           "peer", "name", "eth0", "netns", self.ns)  # fmt: skip
        ipn(sw, "link", "set", self.veth, "master", self.cluster.bridge, "up")
        ipn(self.ns, "addr", "add", f"{self.ip}/{names.SUBNET_PREFIXLEN}", "dev", "eth0")
        ipn(self.ns, "link", "set", "eth0", "up")

    def link_down(self) -> None:
        """Cut its cable: both ends of its veth down (routes through it go with it)."""
        ipn(self.cluster.switch_ns, "link", "set", self.veth, "down")
        ipn(self.ns, "link", "set", "eth0", "down")

    def link_up(self) -> None:
        ipn(self.ns, "link", "set", "eth0", "up")
        ipn(self.cluster.switch_ns, "link", "set", self.veth, "up")

    @property
    def link_is_up(self) -> bool:
        out = ipn(self.ns, "-o", "link", "show", "eth0")
        return ",UP" in out or "<UP" in out

    # -- processes -----------------------------------------------------------------------------
    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        log_name: str | None = None,
        wrap: bool = True,
    ) -> NsProcess:
        """Start ``argv`` inside this namespace (``ip netns exec``), output appended to
        ``{dir}/{log_name or name}.log``; killed with the cluster at the latest."""
        pname = name or Path(str(argv[0])).name
        proc = NsProcess(
            self.ns,
            argv,
            log_path=self.dir / f"{log_name or pname}.log",
            cwd=self.dir,
            env=env,
            name=f"{self.name}/{pname}",
            wrap=wrap,
        )
        with self._lock:
            self.processes.append(proc)
        return proc

    def start_registrar(
        self,
        *args: str,
        name: str = "registrar",
        env: Mapping[str, str] | None = None,
        log_name: str | None = None,
    ) -> NsProcess:
        """``python -m registrar ARGS`` in this namespace (the project's venv python)."""
        return self.spawn(
            [self.cluster.python, "-m", "registrar", *args],
            name=name,
            env=env,
            log_name=log_name,
        )

    def exec(
        self, *argv: str, check: bool = True, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        return exec_in(self.ns, *argv, check=check, timeout=timeout, input=input)

    def kill_all(self, pred: Callable[[NsProcess], bool] | None = None) -> None:
        """SIGKILL the processes started with ``spawn`` (those matching ``pred``)."""
        for p in list(self.processes):
            if p.alive and (pred is None or pred(p)):
                p.kill()

    # -- reaching it from the test process -------------------------------------------------------
    def forward(self, port: int, host: str | None = None) -> NetnsForwarder:
        """A 127.0.0.1 forwarder to ``host`` (default its own address):``port``, connecting
        from the ops namespace (so a cut link cuts the test's view too)."""
        return self.cluster.forward(self.cluster.ops.ns, host or self.ip, port)

    def http_get(self, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
        """GET http://{ip}:{port}{path} from the ops namespace: (status, body)."""
        return http_get_in(self.cluster.ops.ns, self.ip, port, path, timeout)


class OpsNode(Node):
    """Prometheus and the client load run here."""

    kind = "ops"


class EtcdMember(Node):
    kind = "etcd"

    def __init__(self, cluster: Cluster, index: int) -> None:
        super().__init__(cluster, index, names.etcd_name(index), names.etcd_ip(index))
        self.proc: NsProcess | None = None
        self.forwarder: NetnsForwarder | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.ip}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{ETCD_PEER_PORT}"

    @property
    def url_from_root(self) -> str:
        if self.forwarder is None:
            self.forwarder = self.forward(ETCD_CLIENT_PORT)
        return self.forwarder.url

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive

    def command(self) -> list[str]:
        c = self.cluster
        return [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in c.etcd),
            "--initial-cluster-state", "new",
            "--initial-cluster-token", c.prefix,
            "--heartbeat-interval", str(c.etcd_heartbeat_ms),
            "--election-timeout", str(c.etcd_election_ms),
            "--logger", "zap",
            "--log-outputs", str(self.dir / "etcd.log"),
            "--log-level", "warn",
        ]  # fmt: skip

    def start(self) -> NsProcess:
        """Start (again: same data dir, same address). Does not wait: see ``wait_healthy``."""
        if self.running:
            assert self.proc is not None
            return self.proc
        self.proc = self.spawn(self.command(), name="etcd", log_name="etcd-stdout")
        return self.proc

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def healthy(self, timeout: float = 1.0) -> bool:
        """GET /health answers {"health": "true"} (through the forwarder)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url_from_root}/health", timeout=timeout) as r:
                body = json.loads(r.read().decode() or "{}")
        except (OSError, ValueError):
            return False
        return str(body.get("health")) == "true"

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and not self.proc.alive:
                raise EtcdError(f"etcd {self.name} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd {self.name} not healthy in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "etcd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Host(Node):
    """A host: its own Docker engine (socket ``{dir}/docker.sock``, reachable from the root
    namespace as a file), and the registrar agent/sidecars started on it."""

    kind = "host"

    def __init__(self, cluster: Cluster, index: int) -> None:
        super().__init__(cluster, index, names.host_name(index), names.host_ip(index))
        self.node = self.name  # its --node
        self.socket_path = str(self.dir / "docker.sock")
        self.api = DockerAPI(self.socket_path)
        self.engine: NsProcess | None = None
        self.agent: NsProcess | None = None
        self.engine_ready_after: float | None = None
        self.docker_bridge = f"{cluster.prefix}-dk"
        self._tags: set[str] = set()
        self._n = 0

    @property
    def docker_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def metrics_addr(self) -> str:
        return f"{self.ip}:{self.cluster.agent_metrics_port}"

    def _create(self) -> None:
        super()._create()
        ipn(self.ns, "link", "add", self.docker_bridge, "type", "bridge")
        ipn(self.ns, "addr", "add", names.DOCKER_BRIDGE_CIDR, "dev", self.docker_bridge)
        ipn(self.ns, "link", "set", self.docker_bridge, "up")

    # -- the engine ----------------------------------------------------------------------------
    def engine_command(self) -> list[str]:
        d = self.dir
        (d / "daemon.json").write_text("{}\n")
        (d / "cg").mkdir(exist_ok=True)
        args = [
            DOCKERD,
            f"--host={self.docker_url}",
            f"--data-root={d / 'data'}",
            f"--exec-root={d / 'exec'}",
            f"--pidfile={d / 'docker.pid'}",
            f"--config-file={d / 'daemon.json'}",
            f"--bridge={self.docker_bridge}",
            f"--cgroup-parent={self.cluster.prefix}-{self.name}",
            "--storage-driver=overlay2",
            "--ip6tables=false",
            "--ip-masq=false",
            "--shutdown-timeout=2",
            "--log-level=warn",
        ]
        if self.cluster.userland_proxy:
            args += ["--iptables=false", "--userland-proxy=true"]
        else:  # NAT rules in this host's own namespace only (no docker-proxy per port)
            args += ["--iptables=true", "--userland-proxy=false"]
        return engine_argv(self.ns, args, str(d / "cg"))

    def start_engine(self) -> NsProcess:
        self.engine = self.spawn(self.engine_command(), name="dockerd", wrap=False)
        return self.engine

    def engine_ready(self) -> bool:
        return self.api.ping(timeout=2.0)

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """The docker CLI against this host's engine; its stdout (DockerError on failure)."""
        proc = subprocess.run(
            [DOCKER, "-H", self.docker_url, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise DockerError(f"{self.name}: docker {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _image_for(self, service: str, version: str) -> str:
        repo, tag = service.lower(), version
        if not (_REPO_RE.match(repo) and _TAG_RE.match(tag)):
            return self.cluster.image
        ref = f"{repo}:{tag}"
        if ref not in self._tags:
            self.api.tag(self.cluster.image, repo, tag)
            self._tags.add(ref)
        return ref

    def run_container(
        self,
        service: str = "web",
        version: str = "v1",
        *,
        name: str | None = None,
        private_port: int = 8080,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        image: str | None = None,
        service_labels: bool = True,
        publish: bool = True,
        command: Sequence[str] | None = None,
        host_config: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> ClusterContainer:
        """``docker run -d`` a busybox httpd answering ``NODE NAME VERSION`` on
        ``private_port``, published on this host's address (a free host port).

        The image is the test image tagged ``SERVICE:VERSION`` in this engine (so the image
        name says what runs), unless ``image`` is given. ``service_labels`` adds
        ``registrar.service`` and ``registrar.version``; ``labels`` are added on top.
        ``name`` defaults to ``SERVICE-VERSION-N``."""
        with self._lock:
            self._n += 1
            n = self._n
        cname = name or f"{service}-{version}-{n}"
        all_labels = (
            {"registrar.service": service, "registrar.version": version} if (service_labels) else {}
        )
        all_labels.update(labels or {})
        all_env = {"RGC_NODE": self.node, "RGC_NAME": cname, "RGC_VERSION": version,
                   "RGC_PORT": str(private_port)}  # fmt: skip
        all_env.update(env or {})
        info = self.api.run(
            cname,
            image or self._image_for(service, version),
            list(command) if command is not None else ["sh", "-c", HTTPD_SCRIPT],
            env=all_env,
            labels=all_labels,
            publish={f"{private_port}/tcp": self.ip} if publish else None,
            host_config=host_config,
            config=config,
        )
        return ClusterContainer(
            host=self,
            id=str(info["Id"]),
            name=cname,
            service=service,
            version=version,
            private_port=private_port,
            host_port=_host_port(info, private_port),
        )

    # -- the agent -----------------------------------------------------------------------------
    def agent_args(self, *extra: str, ttl: int | None = None) -> list[str]:
        """The ``registrar watch`` command line for this host (without the python part)."""
        return [
            "watch",
            "--docker", self.docker_url,
            "--node", self.node,
            "--host-ip", self.ip,
            "--etcd", self.cluster.etcd_endpoints,
            "--metrics-addr", self.metrics_addr,
            "--ttl", str(ttl or self.cluster.agent_ttl),
            *extra,
        ]  # fmt: skip

    def start_agent(
        self, *extra: str, ttl: int | None = None, env: Mapping[str, str] | None = None
    ) -> NsProcess:
        """Start ``registrar watch`` in this host's namespace (``extra`` args appended)."""
        if self.agent is not None and self.agent.alive:
            raise ClusterError(f"{self.name}: agent already running ({self.agent})")
        self.agent = self.start_registrar(*self.agent_args(*extra, ttl=ttl), name="agent", env=env)
        return self.agent

    def stop_agent(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (it deregisters), wait; its exit code (None if it had to be killed)."""
        return self.agent.stop(timeout) if self.agent is not None else None

    def kill_agent(self) -> None:
        if self.agent is not None:
            self.agent.kill()

    def kill_registrars(self) -> None:
        """SIGKILL every registrar process started here (the agent, sidecars)."""
        self.kill_all(lambda p: "registrar" in p.argv)


class Router(Node):
    """A namespace for one ``registrar haproxy``: an address, a config path, a process."""

    kind = "router"

    def __init__(self, cluster: Cluster, index: int) -> None:
        super().__init__(cluster, index, names.router_name(index), names.router_ip(index))
        self.config_path = self.dir / "haproxy.cfg"
        self.proc: NsProcess | None = None

    @property
    def metrics_addr(self) -> str:
        return f"{self.ip}:{self.cluster.router_metrics_port}"

    def frontend(self, port: int) -> str:
        return f"{self.ip}:{port}"

    def haproxy_args(
        self, binds: Mapping[str, int], *extra: str, mode: str = "tcp", ttl: int | None = None
    ) -> list[str]:
        """A usual ``registrar haproxy`` command line for this router: a frontend per service
        on this router's address, its config path, metrics address, node name and etcd."""
        args = ["haproxy"]
        for service, port in binds.items():
            args += ["--bind", f"{service}={self.ip}:{port}"]
        return [
            *args,
            "--mode", mode,
            "--config", str(self.config_path),
            "--etcd", self.cluster.etcd_endpoints,
            "--metrics-addr", self.metrics_addr,
            "--node", self.name,
            "--ttl", str(ttl or self.cluster.agent_ttl),
            *extra,
        ]  # fmt: skip

    def start(self, *args: str, env: Mapping[str, str] | None = None) -> NsProcess:
        """``python -m registrar ARGS`` here (e.g. ``*router.haproxy_args({"web": 8000})``)."""
        if self.proc is not None and self.proc.alive:
            raise ClusterError(f"{self.name}: already running ({self.proc})")
        self.proc = self.start_registrar(*args, name="router", env=env)
        return self.proc

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.proc.stop(timeout) if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


# --- measurements ------------------------------------------------------------------------------
@dataclass
class MemoryReport:
    """RSS of the cluster's processes (kB), by role and per host engine."""

    by_role: dict[str, tuple[int, int]]  # role -> (processes, total RSS kB)
    engine_per_host_kb: dict[str, int]  # host -> dockerd + containerd RSS
    total_kb: int
    mem_available_drop_kb: int  # /proc/meminfo MemAvailable: at construction minus now
    processes: list[ProcInfo] = field(default_factory=list)

    def rss_per(self, role: str) -> float:
        """Average RSS (MiB) of one process of ``role`` (0 when there is none)."""
        n, kb = self.by_role.get(role, (0, 0))
        return kb / 1024 / n if n else 0.0

    def format(self) -> str:
        lines = [f"{'role':<22}{'procs':>6}{'RSS MiB':>10}{'MiB each':>10}"]
        for role, (n, kb) in sorted(self.by_role.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{role:<22}{n:>6}{kb / 1024:>10.1f}{kb / 1024 / n:>10.1f}")
        eng = list(self.engine_per_host_kb.values())
        if eng:
            lines.append(
                f"engine (dockerd+containerd) per host: avg {sum(eng) / len(eng) / 1024:.1f} "
                f"MiB, max {max(eng) / 1024:.1f} MiB"
            )
        lines.append(
            f"total RSS {self.total_kb / 1024:.0f} MiB; MemAvailable dropped by "
            f"{self.mem_available_drop_kb / 1024:.0f} MiB since the cluster was made"
        )
        return "\n".join(lines)


# --- the cluster ---------------------------------------------------------------------------------
class Cluster:
    """``Cluster(hosts=4, routers=2, ...)``; ``start()`` returns once every engine answers
    (with the test image loaded), etcd is healthy and Prometheus is ready; ``destroy()``
    removes everything it made (also after a failed start). A context manager.

    ``hosts[i]``, ``routers[i]``, ``etcd[i]`` are 0-based; names are 1-based (h01, r01, e1).
    """

    def __init__(
        self,
        hosts: int = 4,
        routers: int = 2,
        *,
        state_root: str | Path = names.DEFAULT_STATE_ROOT,
        prefix: str | None = None,
        etcd_members: int = 3,
        prometheus: bool = True,
        scrape_interval: str = "2s",
        image: str = BUSYBOX_IMAGE,
        python: str | None = None,
        progress: Progress | None = None,
        agent_ttl: int = 15,
        agent_metrics_port: int = 9477,
        router_metrics_port: int = 9478,
        etcd_heartbeat_ms: int = 100,
        etcd_election_ms: int = 1000,
        userland_proxy: bool = True,
        engine_batch: int = 0,
        clean_leftovers: bool = True,
    ) -> None:
        """``engine_batch``: start that many engines at a time (0: all at once).
        ``userland_proxy=False`` lets each engine publish ports with NAT rules in its own
        namespace (``--iptables=true --userland-proxy=false``) instead of one docker-proxy
        process per published port. ``clean_leftovers``: ``start()`` first removes what
        crashed earlier runs left (clusters whose owner process is gone; never a live one)."""
        if not 1 <= hosts <= names.MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{names.MAX_HOSTS}")
        if not 0 <= routers <= names.MAX_ROUTERS:
            raise ValueError(f"routers must be 0..{names.MAX_ROUTERS}")
        if not 1 <= etcd_members <= names.MAX_ETCD:
            raise ValueError(f"etcd_members must be 1..{names.MAX_ETCD}")
        self.prefix = names.check_prefix(prefix) if prefix else names.new_prefix()
        self.state_root = Path(state_root)
        self.state_dir = self.state_root / self.prefix
        self.switch_ns = f"{self.prefix}-sw"
        self.bridge = f"{self.prefix}-br"
        self.image = image
        self.python = python or default_python()
        self.agent_ttl = agent_ttl
        self.agent_metrics_port = agent_metrics_port
        self.router_metrics_port = router_metrics_port
        self.etcd_heartbeat_ms = etcd_heartbeat_ms
        self.etcd_election_ms = etcd_election_ms
        self.userland_proxy = userland_proxy
        self.engine_batch = engine_batch
        self.clean_leftovers = clean_leftovers
        self._progress = progress
        self.ops = OpsNode(self, 0, "ops", names.OPS_IP)
        self.etcd = [EtcdMember(self, i) for i in range(etcd_members)]
        self.hosts = [Host(self, i) for i in range(hosts)]
        self.routers = [Router(self, i) for i in range(routers)]
        self.prometheus: Prometheus | None = None
        if prometheus:
            self.prometheus = Prometheus(
                self.ops.ns, self.ops.ip, self.ops.dir / "prometheus", self.scrape_jobs(),
                scrape_interval,
            )  # fmt: skip
        self.forwarders: list[NetnsForwarder] = []
        self.loads: list[ClientLoad] = []
        self.timings: dict[str, float] = {}
        self.leftovers_removed: list[Resources] = []
        self._image_tar = self.state_dir / "image.tar"
        self._mem0 = _meminfo().get("MemAvailable", 0)
        self._t0 = time.monotonic()
        self._started = False
        self._destroyed = False
        self._made_anything = False
        self._lock = threading.Lock()

    # -- progress ------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        text = f"[{self.prefix} {time.monotonic() - self._t0:6.1f}s] {msg}"
        if self._progress is not None:
            self._progress(text)
        else:
            log.info(text)

    @property
    def nodes(self) -> list[Node]:
        return [self.ops, *self.etcd, *self.hosts, *self.routers]

    # -- start -----------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> Cluster:
        if self._started:
            return self
        if self._destroyed:
            raise ClusterError("destroyed; make a new Cluster")
        deadline = time.monotonic() + timeout
        t_start = time.monotonic()
        try:
            if self.clean_leftovers:
                t = time.monotonic()
                self.leftovers_removed = cleanup_leftovers([self.state_root], progress=self.say)
                self.timings["cleanup_leftovers"] = time.monotonic() - t
            self.say(
                f"starting: {len(self.hosts)} hosts, {len(self.etcd)} etcd, "
                f"{len(self.routers)} routers, state {self.state_dir}"
            )
            self._made_anything = True
            names.write_owner(self.prefix, self.state_dir)  # first: marks it as live
            self.state_dir.mkdir(parents=True, exist_ok=False)
            self._timed("network", self._create_network)
            for m in self.etcd:  # all at once: none is healthy before a quorum runs
                m.start()
            if self.prometheus is not None:
                self.prometheus.start()
            self._timed("image_save", self._save_image)
            self._timed("engines", lambda: self._start_engines(deadline))
            self._timed("image_load", self._load_images)
            self._timed("etcd", lambda: self._wait_etcd(deadline))
            if self.prometheus is not None:
                self._timed(
                    "prometheus",
                    lambda: self._prometheus().wait_ready(max(1.0, deadline - time.monotonic())),
                )
        except BaseException as exc:
            self.say(f"start failed ({type(exc).__name__}: {exc}); destroying what was made")
            with contextlib.suppress(Exception):
                self.destroy()
            raise
        self.timings["start_total"] = time.monotonic() - t_start
        self._started = True
        self.say(
            "started in "
            f"{self.timings['start_total']:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if k != "start_total")
            + ")"
        )
        return self

    def _timed(self, what: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        fn()
        self.timings[what] = time.monotonic() - t

    def _create_network(self) -> None:
        netns_add(self.switch_ns)
        ipn(self.switch_ns, "link", "add", self.bridge, "type", "bridge")
        ipn(self.switch_ns, "link", "set", self.bridge, "up")
        for node in self.nodes:
            node._create()
        self.say(f"network: {len(self.nodes) + 1} namespaces on bridge {self.bridge}")

    def _save_image(self) -> None:
        if self.image == BUSYBOX_IMAGE:
            ensure_busybox_image(self.image)
        run([DOCKER, "save", "-o", str(self._image_tar), self.image], timeout=120)

    def _start_engines(self, deadline: float) -> None:
        batch = self.engine_batch or len(self.hosts)
        t0 = time.monotonic()
        for lo in range(0, len(self.hosts), batch):
            group = self.hosts[lo : lo + batch]
            for h in group:
                h.start_engine()
            pending = list(group)
            last_report = time.monotonic()
            while pending:
                for h in list(pending):
                    if h.engine_ready():
                        h.engine_ready_after = time.monotonic() - t0
                        pending.remove(h)
                    elif h.engine is not None and not h.engine.alive:
                        raise ClusterError(
                            f"{h.name}: dockerd exited ({h.engine.returncode}):\n"
                            f"{h.engine.logs()[-3000:]}"
                        )
                if time.monotonic() > deadline:
                    raise ClusterError(f"engines not answering: {[h.name for h in pending]}")
                if pending:
                    if time.monotonic() - last_report > 5:
                        up = len(self.hosts) - len(pending) - (len(self.hosts) - lo - len(group))
                        self.say(f"engines: {up}/{len(self.hosts)} answering")
                        last_report = time.monotonic()
                    time.sleep(0.1)
        self.say(f"engines: {len(self.hosts)} answering after {time.monotonic() - t0:.1f} s")

    def _load_images(self) -> None:
        def load(h: Host) -> None:
            h.docker("load", "-q", "-i", str(self._image_tar), timeout=180)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(load, self.hosts))
        self.say(f"image {self.image} loaded into {len(self.hosts)} engines")

    def _wait_etcd(self, deadline: float) -> None:
        for m in self.etcd:
            m.wait_healthy(max(1.0, deadline - time.monotonic()))
        self.say(f"etcd: {len(self.etcd)} members healthy ({self.etcd_endpoints})")

    def _prometheus(self) -> Prometheus:
        if self.prometheus is None:
            raise ClusterError("this cluster has no Prometheus (prometheus=False)")
        return self.prometheus

    def scrape_jobs(self) -> list[ScrapeJob]:
        return [
            ScrapeJob("registrar-watch", [(h.metrics_addr, {"node": h.node}) for h in self.hosts]),
            ScrapeJob("registrar-haproxy",
                      [(r.metrics_addr, {"node": r.name}) for r in self.routers]),
            ScrapeJob("etcd", [(f"{m.ip}:{ETCD_CLIENT_PORT}", {"member": m.name})
                               for m in self.etcd]),
        ]  # fmt: skip

    # -- destroy ---------------------------------------------------------------------------------
    def destroy(self, check: bool = False) -> Resources:
        """Remove everything of this cluster (processes, namespaces, cgroups, mounts, shim
        sockets, state dir); what is left afterwards (empty when all went). ``check``:
        raise ClusterError when something is left."""
        with self._lock:
            already = self._destroyed
            self._destroyed = True
        if already or not self._made_anything:
            from .cleanup import find_resources

            return find_resources(self.prefix, self.state_dir)
        t = time.monotonic()
        self.say("destroying")
        for fwd in self.forwarders:
            with contextlib.suppress(Exception):
                fwd.close()
        if self.prometheus is not None and self.prometheus.forwarder is not None:
            with contextlib.suppress(Exception):
                self.prometheus.forwarder.close()
        spawned = [p for n in self.nodes for p in n.processes]
        for p in spawned:
            with contextlib.suppress(Exception):
                os.killpg(p.pid, 9)
        left = remove_resources(self.prefix, self.state_dir, progress=self.say)
        for p in spawned:  # reap the children we started
            with contextlib.suppress(Exception):
                p.proc.wait(5)
        self.timings["destroy"] = time.monotonic() - t
        self.say(
            f"destroyed in {self.timings['destroy']:.1f} s"
            + ("" if left.empty else f"; LEFT: {left.summary()}")
        )
        if check and not left.empty:
            raise ClusterError(f"destroy left {left.summary()}")
        return left

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.destroy(check=exc_type is None)

    # -- etcd --------------------------------------------------------------------------------------
    @property
    def etcd_urls(self) -> list[str]:
        """Client URLs inside the cluster (for --etcd of agents and routers)."""
        return [m.client_url for m in self.etcd]

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(self.etcd_urls)

    @property
    def etcd_urls_from_root(self) -> list[str]:
        """The members' client URLs through forwarders on 127.0.0.1 (from the ops netns)."""
        return [m.url_from_root for m in self.etcd]

    @property
    def etcd_url_from_root(self) -> str:
        """Comma-separated, as ``--etcd`` takes them (EtcdReader uses the first one)."""
        return ",".join(self.etcd_urls_from_root)

    def etcdctl(self, *args: str, timeout: float = 15.0, check: bool = True) -> str:
        """``etcdctl ARGS`` (v3) against every member through the forwarders; its stdout."""
        endpoints = ",".join(u.removeprefix("http://") for u in self.etcd_urls_from_root)
        proc = subprocess.run(
            [ETCDCTL, f"--endpoints={endpoints}", "--dial-timeout=2s", "--command-timeout=5s",
             *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"}, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def etcd_get_prefix(self, prefix: str) -> dict[str, str]:
        """Key -> value of every key under ``prefix`` (one linearizable read)."""
        data = json.loads(self.etcdctl("get", "--prefix", prefix, "-w", "json") or "{}")
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in data.get("kvs", [])
        }

    def etcd_keys(self, prefix: str = "/services/") -> list[str]:
        return sorted(self.etcd_get_prefix(prefix))

    def etcd_healthy(self) -> dict[str, bool]:
        return {m.name: m.healthy() for m in self.etcd}

    # -- reaching into the cluster --------------------------------------------------------------
    def forward(self, ns: str | Node, host: str, port: int) -> NetnsForwarder:
        """A forwarder on 127.0.0.1:<free port> connecting to ``host:port`` from inside
        ``ns``; closed by ``destroy()``."""
        fwd = NetnsForwarder(ns.ns if isinstance(ns, Node) else ns, host, port)
        with self._lock:
            self.forwarders.append(fwd)
        return fwd

    def exec_in(self, ns: str | Node, *argv: str, check: bool = True,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command inside a namespace (``ip netns exec``) and wait for it."""
        return exec_in(ns.ns if isinstance(ns, Node) else ns, *argv, check=check, timeout=timeout)

    def prom_query(self, expr: str) -> list[dict[str, Any]]:
        return self._prometheus().query(expr)

    def prom_value(self, expr: str) -> float | None:
        return self._prometheus().value(expr)

    # -- containers and agents ------------------------------------------------------------------
    def host_run_container(self, i: int, *args: Any, **kwargs: Any) -> ClusterContainer:
        """``hosts[i].run_container(...)``."""
        return self.hosts[i].run_container(*args, **kwargs)

    def start_agents(self, *extra: str, ttl: int | None = None,
                     hosts: Iterable[int] | None = None) -> list[NsProcess]:  # fmt: skip
        """``registrar watch`` on every host (or those indexes)."""
        return [self.hosts[i].start_agent(*extra, ttl=ttl)
                for i in (hosts if hosts is not None else range(len(self.hosts)))]  # fmt: skip

    # -- client load ------------------------------------------------------------------------------
    def start_load(
        self,
        targets: Mapping[str, str | Sequence[str]] | Sequence[str],
        rate: float,
        *,
        node: Node | None = None,
        timeout: float = 2.0,
        path: str = "/",
        duration: float = 0.0,
        interval: float = 0.5,
        max_inflight: int = 2000,
        niceness: int = 0,
    ) -> ClientLoad:
        """Start a client load in ``node``'s namespace (default ops): ``rate`` requests/s in
        all, round-robin over ``targets`` ({service: "IP:PORT" or [..]}, or
        ["service=IP:PORT", ...]). ``stats()`` / ``stop()`` on the result.

        ``niceness`` < 0 runs the client ahead of the cluster's processes: on a machine whose
        CPUs the cluster saturates, a starved client would time out requests the cluster
        answered in time (a real client runs on a machine of its own)."""
        specs: list[str] = []
        if isinstance(targets, Mapping):
            for service, addrs in targets.items():
                for a in [addrs] if isinstance(addrs, str) else addrs:
                    specs.append(f"{service}={a}")
        else:
            specs = list(targets)
        where = node or self.ops
        with self._lock:
            n = len(self.loads) + 1
        stats = where.dir / f"load-{n}.json"
        nice = ["nice", "-n", str(niceness)] if niceness else []
        argv = [*nice, sys.executable, str(LOAD_SCRIPT), "--rate", str(rate), "--stats", str(stats),
                "--timeout", str(timeout), "--path", path, "--duration", str(duration),
                "--interval", str(interval), "--max-inflight", str(max_inflight)]  # fmt: skip
        for s in specs:
            argv += ["--target", s]
        proc = where.spawn(argv, name=f"load-{n}")
        load = ClientLoad(proc, stats)
        with self._lock:
            self.loads.append(load)
        return load

    # -- faults ------------------------------------------------------------------------------------
    def _host(self, i: int | Host) -> Host:
        return i if isinstance(i, Host) else self.hosts[i]

    def kill_host(self, i: int | Host) -> None:
        """The host dies: SIGKILL its agent (and sidecars), cut its link. Its engine and
        containers keep running, unreachable, like a machine that fell off the network."""
        h = self._host(i)
        h.kill_registrars()
        h.link_down()
        self.say(f"{h.name}: killed (agent SIGKILL, link down)")

    def cut_from_etcd(self, i: int | Host, mode: str = "drop") -> None:
        """Cut the host off from etcd only (everything else still reaches it).

        ``mode="drop"``: nftables rules in the host's namespace drop every packet to and from
        the etcd members (a silent partition: connections hang). ``mode="reject"``:
        ``prohibit`` routes to the members (connections fail at once)."""
        h = self._host(i)
        ips = [m.ip for m in self.etcd]
        if mode == "drop":
            addrs = ", ".join(ips)
            script = (
                f"table inet {CUT_TABLE} {{\n"
                f"  chain out {{ type filter hook output priority 0; policy accept;"
                f" ip daddr {{ {addrs} }} drop; }}\n"
                f"  chain in {{ type filter hook input priority 0; policy accept;"
                f" ip saddr {{ {addrs} }} drop; }}\n"
                "}\n"
            )
            h.exec(NFT, "-f", "-", input=script)
        elif mode == "reject":
            for a in ips:
                ipn(h.ns, "route", "replace", "prohibit", f"{a}/32")
        else:
            raise ValueError(f"mode must be 'drop' or 'reject', not {mode!r}")
        self.say(f"{h.name}: cut from etcd ({mode})")

    def heal(self, i: int | Host) -> None:
        """Undo ``kill_host``'s link cut and ``cut_from_etcd`` (a killed agent stays dead:
        start it again with ``hosts[i].start_agent()``)."""
        h = self._host(i)
        h.link_up()
        h.exec(NFT, "delete", "table", "inet", CUT_TABLE, check=False)
        for m in self.etcd:
            ipn(h.ns, "route", "del", "prohibit", f"{m.ip}/32", check=False)
        self.say(f"{h.name}: healed")

    def cut_etcd_member(self, j: int) -> None:
        """Member ``j``'s link down (the others keep a quorum when there are 3)."""
        self.etcd[j].link_down()

    def heal_etcd_member(self, j: int) -> None:
        self.etcd[j].link_up()

    # -- measurements ------------------------------------------------------------------------------
    def log_tails(self, lines: int = 20, logs: Sequence[str] = ("agent", "router")) -> str:
        """The last lines of each node's ``{name}.log`` for the names in ``logs``: what to
        print when something failed, before ``destroy()`` removes the state dir."""
        out: list[str] = []
        for node in self.nodes:
            for name in logs:
                path = node.dir / f"{name}.log"
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace").splitlines()[-lines:]
                    out.append(f"--- {node.name}/{name}.log (last {len(text)} lines)")
                    out += text
        return "\n".join(out)

    def processes(self) -> list[ProcInfo]:
        """Every live process of the cluster (engines, shims, containers, agents, ...)."""
        return find_processes(self.prefix)

    def memory(self) -> MemoryReport:
        procs = scan_processes()
        mine = find_processes(self.prefix, procs)
        by_role: dict[str, list[int]] = {}
        for p in mine:
            by_role.setdefault(role_of(p), []).append(p.rss_kb)
        engine: Counter[str] = Counter()
        host_by_netns: dict[int, str] = {}
        for h in self.hosts:
            with contextlib.suppress(OSError):
                host_by_netns[os.stat(f"/run/netns/{h.ns}").st_ino] = h.name
        for p in mine:
            if p.comm in ("dockerd", "containerd") and p.netns in host_by_netns:
                engine[host_by_netns[p.netns]] += p.rss_kb
        return MemoryReport(
            by_role={r: (len(v), sum(v)) for r, v in by_role.items()},
            engine_per_host_kb=dict(engine),
            total_kb=sum(p.rss_kb for p in mine),
            mem_available_drop_kb=self._mem0 - _meminfo().get("MemAvailable", 0),
            processes=mine,
        )

    def __repr__(self) -> str:
        return (
            f"Cluster({self.prefix}, hosts={len(self.hosts)}, routers={len(self.routers)}, "
            f"state={self.state_dir})"
        )


__all__ = [
    "Cluster",
    "ClusterContainer",
    "ClusterError",
    "EtcdMember",
    "Host",
    "MemoryReport",
    "NetnsError",
    "Node",
    "OpsNode",
    "Router",
]
