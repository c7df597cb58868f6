"""Docker helpers for the real tests: a tiny busybox image and a container factory.

Everything the tests create carries the session's unique prefix in its name and is removed
by that name; nothing else on the engine is touched. Containers publish their ports on
127.0.0.1 only, and tests dial them there (never a container IP).
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX_IMAGE = "registrar-test-busybox:latest"
# Bump when the Dockerfile changes: a cached image with another revision is rebuilt.
BUSYBOX_REVISION = "2"
BUSYBOX_DOCKERFILE = f"""\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN mkdir -p /tmp /www && chmod 1777 /tmp && echo ok > /www/index.html
LABEL registrar-test.revision="{BUSYBOX_REVISION}"
CMD ["/bin/sh"]
"""
# GET / answers 200 with the container's host name (its short id): tests can tell who answered.
# httpd stays PID 1 (exec), which ignores SIGTERM: `docker stop -t N` takes N seconds.
HTTPD_COMMAND = ["sh", "-c", "hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
DOCKER = shutil.which("docker") or "docker"


class DockerError(RuntimeError):
    pass


def new_prefix() -> str:
    """A short unique prefix for one test session's Docker objects, like ``rgt1a2b3c``."""
    return f"rgt{secrets.token_hex(3)}"


def docker(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    """Run the docker CLI; its stdout (stripped). DockerError with stderr when it fails."""
    proc = subprocess.run(
        [DOCKER, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise DockerError(
            f"docker {shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout.strip()


def image_label(tag: str, label: str) -> str | None:
    """The image's label value ("" if unset), or None when there is no such image."""
    proc = subprocess.run(
        [DOCKER, "image", "inspect", "--format", f'{{{{index .Config.Labels "{label}"}}}}', tag],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    value = proc.stdout.strip()
    return "" if value == "<no value>" else value


def ensure_busybox_image(tag: str = BUSYBOX_IMAGE, busybox: str = "/bin/busybox") -> str:
    """Build the ~1 MB busybox image FROM scratch unless it exists already; the tag."""
    if image_label(tag, "registrar-test.revision") == BUSYBOX_REVISION:
        return tag
    if not Path(busybox).exists():
        raise DockerError(f"{busybox} missing: install busybox-static (scripts/setup.sh does)")
    with tempfile.TemporaryDirectory(prefix="rgt-busybox-") as ctx:
        shutil.copy2(busybox, Path(ctx) / "busybox")
        (Path(ctx) / "Dockerfile").write_text(BUSYBOX_DOCKERFILE)
        docker("build", "-q", "-t", tag, ctx, timeout=300)
    return tag


@dataclass
class Container:
    """A test container: id, full name, and its published ports ("8080/tcp" -> host port)."""

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

    def url(self, private: str | int = 8080) -> str:
        return f"http://127.0.0.1:{self.port(private)}/"

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(docker("inspect", self.id))
        return data[0]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.inspect()["State"]
        return state

    def refresh_ports(self) -> dict[str, int]:
        self.ports = published_ports(self.inspect())
        return self.ports

    # lifecycle through the CLI (the engine emits the real events)
    def stop(self, timeout: int = 1) -> None:
        docker("stop", "-t", str(timeout), self.id, timeout=timeout + 30)

    def kill(self, signal: str = "KILL") -> None:
        docker("kill", "-s", signal, self.id)

    def start(self) -> None:
        docker("start", self.id)
        self.refresh_ports()

    def restart(self, timeout: int = 1) -> None:
        docker("restart", "-t", str(timeout), self.id, timeout=timeout + 30)
        self.refresh_ports()

    def pause(self) -> None:
        docker("pause", self.id)

    def unpause(self) -> None:
        docker("unpause", self.id)

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.id, check=False)

    def http_text(self, private: str | int = 8080, path: str = "/", timeout: float = 2.0) -> str:
        """Body of a GET on the published port (127.0.0.1); raises on an HTTP error."""
        url = f"http://127.0.0.1:{self.port(private)}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
        return body.decode()

    def http_get(self, private: str | int = 8080, path: str = "/", timeout: float = 2.0) -> int:
        """GET on the published port (127.0.0.1); the HTTP status."""
        url = f"http://127.0.0.1:{self.port(private)}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:  # busybox httpd answers 404 for a missing file
            return int(e.code)


def published_ports(info: Mapping[str, Any]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for key, bindings in (info.get("NetworkSettings", {}).get("Ports") or {}).items():
        for b in bindings or []:
            if b.get("HostPort"):
                ports[key] = int(b["HostPort"])
    return ports


def _healthcheck_args(healthcheck: str | Mapping[str, Any] | None) -> list[str]:
    """``healthcheck``: a shell command, or a dict with ``cmd`` (or ``test``: a string, or a
    Docker-style list like ``["CMD-SHELL", "..."]``) and optional ``interval``, ``timeout``,
    ``retries``, ``start_period`` (seconds as numbers, or Docker durations like "500ms")."""
    if healthcheck is None:
        return []
    if isinstance(healthcheck, str):
        healthcheck = {"cmd": healthcheck}
    hc = dict(healthcheck)
    cmd = hc.pop("cmd", None) or hc.pop("test", None)
    if isinstance(cmd, list | tuple):
        kind, *rest = cmd
        if kind == "NONE":
            return ["--no-healthcheck"]
        cmd = rest[0] if kind == "CMD-SHELL" else shlex.join(rest)
    if not cmd:
        raise ValueError(f"healthcheck without a command: {healthcheck!r}")
    args = ["--health-cmd", str(cmd)]
    defaults = {"interval": "1s", "timeout": "1s", "retries": 3}
    for key in ("interval", "timeout", "retries", "start_period", "start_interval"):
        value = hc.pop(key, defaults.get(key))
        if value is None:
            continue
        if isinstance(value, int | float) and key != "retries":
            value = f"{int(value * 1000)}ms"
        args += [f"--health-{key.replace('_', '-')}", str(value)]
    if hc:
        raise ValueError(f"unknown healthcheck keys: {sorted(hc)}")
    return args


class ContainerFactory:
    """Runs busybox ``httpd -f -p 8080`` containers named ``{prefix}-...``; ``cleanup()``
    force-removes every one it made (and the networks it made)."""

    def __init__(self, prefix: str, image: str = BUSYBOX_IMAGE) -> None:
        self.prefix = prefix
        self.image = image
        self.created: list[Container] = []
        self.networks: list[str] = []
        self._n = 0

    def full_name(self, name: str | None = None) -> str:
        if name is None:
            self._n += 1
            name = f"c{self._n}-{secrets.token_hex(2)}"
        return name if name.startswith(f"{self.prefix}-") else f"{self.prefix}-{name}"

    def __call__(
        self,
        name: str | None = None,
        ports: Iterable[str | int] = ("8080",),
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        healthcheck: str | Mapping[str, Any] | None = None,
        network: str | None = None,
        publish: bool = True,
        extra_args: Sequence[str] = (),
        command: str | Sequence[str] | None = None,
        image: str | None = None,
        detach_wait: bool = True,
    ) -> Container:
        """``docker run -d`` one container and return it (with its published ports).

        ``ports`` are container ports ("8080", "53/udp"); with ``publish`` each is published as
        ``127.0.0.1::PORT``, without it each is only exposed (``--expose``). ``network`` is
        passed as ``--network`` (e.g. "host", or a name from ``network()``). ``command``
        replaces busybox ``httpd -f -p 8080`` serving the container's host name at ``/`` (httpd
        is PID 1, which ignores SIGTERM: ``docker stop -t N`` takes N seconds). ``extra_args``
        go before the image (``--stop-signal``, ``--restart``, ...).
        """
        full = self.full_name(name)
        args = ["run", "-d", "--name", full]
        for p in ports:
            args += ["-p", f"127.0.0.1::{p}"] if publish else ["--expose", str(p)]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        args += _healthcheck_args(healthcheck)
        if network:
            args += ["--network", network]
        args += list(extra_args)
        args.append(image or self.image)
        if command is None:
            args += HTTPD_COMMAND
        elif isinstance(command, str):
            args += shlex.split(command)
        else:
            args += list(command)
        # record the name first: a failed run may still leave a created container
        placeholder = Container(id=full, name=full)
        self.created.append(placeholder)
        cid = docker(*args)
        placeholder.id = cid
        if detach_wait:
            placeholder.refresh_ports()
        return placeholder

    run = __call__

    @staticmethod
    def docker_stop(name: str, timeout: int = 1) -> None:
        """``docker stop -t TIMEOUT NAME`` (for stopping many by name from a pool)."""
        docker("stop", "-t", str(timeout), name, timeout=timeout + 30)

    @staticmethod
    def docker_rm(name: str) -> None:
        docker("rm", "-f", "-v", name, check=False, timeout=60)

    def network(self, name: str | None = None, *args: str) -> str:
        """``docker network create {prefix}-NAME``; removed at cleanup. The full name."""
        full = self.full_name(name or f"net{secrets.token_hex(2)}")
        self.networks.append(full)
        docker("network", "create", *args, full)
        return full

    def cleanup(self) -> None:
        names = [c.name for c in self.created]
        if names:
            docker("rm", "-f", "-v", *names, check=False, timeout=120)
        for net in self.networks:
            docker("network", "rm", net, check=False)
        self.created.clear()
        self.networks.clear()


def remove_prefixed(prefix: str) -> None:
    """Force-remove every container and network whose name starts with ``{prefix}-``."""
    lines = docker("ps", "-a", "--format", "{{.ID}} {{.Names}}", check=False).splitlines()
    ids = [i for i, _, n in (ln.partition(" ") for ln in lines) if n.startswith(f"{prefix}-")]
    if ids:
        docker("rm", "-f", "-v", *ids, check=False, timeout=120)
    nets = docker("network", "ls", "--format", "{{.Name}}", check=False).split()
    mine = [n for n in nets if n.startswith(f"{prefix}-")]
    if mine:
        docker("network", "rm", *mine, check=False)


def wait_for_http(container: Container, private: str | int = 8080, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            return container.http_get(private)
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"{container.name}:{private} never answered HTTP: {last!r}")
