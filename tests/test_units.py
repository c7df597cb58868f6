"""The deploy units (units/: fleet; units/systemd/: plain systemd; units/quadlet/: Podman's
Quadlet), checked three ways (Quadlet's `.container` files as far as this host can: see
`test_quadlet_*`).

1. ``systemd-analyze verify`` on every unit (and an instance of each template), with any
   warning counted as a failure: verify exits 0 on "Unknown key ..., ignoring".
2. Every registrar command line in them uses only flags that ``registrar COMMAND --help``
   lists and values that parse, every REGISTRAR_* variable passed into the container names a
   flag of that command, and every docker flag is one ``docker run --help`` lists.
3. The command lines run as written, specifiers and variables filled in the way systemd
   does, against the test Docker engine and etcd: the app template's ExecStartPre, ExecStart,
   ExecStartPost (the `registrar register` sidecar), then its ExecStop lines in order (the key
   must be gone, and the drain over, before the app container gets its stop signal), then
   ExecStopPost; and the host agent unit's ExecStart/ExecStop.

The test stands in for the host's files: /etc/environment and /etc/registrar/registrar.env
are given by the test (image, etcd URL, prefix, app); the runtime file the units write
themselves (/run/registrar/%n.env, with DOCKER_GID) is real, named after the test's unit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registrar import __version__
from registrar.settings import parse_settings
from registrar.shutdown import SHUTDOWN_BUDGET
from tests.helpers import healthz, value_of
from tests.support.docker_env import BUSYBOX_IMAGE, ContainerFactory, docker
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.image import BuiltImage, registrar_image
from tests.support.proc import free_port, tail, wait_until

__all__ = ["registrar_image"]  # the fixture, imported to be used here

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "units"
VARIANTS = {"fleet": UNITS, "systemd": UNITS / "systemd"}
UNIT_FILES = [(variant, d / name) for variant, d in VARIANTS.items()
              for name in ("registrar.service", "app@.service")]
REGISTRAR_IMAGE_WORD = "${REGISTRAR_IMAGE}"
# files the test stands in for; anything else a unit reads must be one it writes itself
HOST_FILES = ("/etc/environment", "/etc/registrar/registrar.env")
RUNTIME_DIR = "/run/registrar/"


# --- reading units like systemd does --------------------------------------------------------
@dataclass
class Unit:
    """A unit file: sections of (key, value) pairs in file order, continuation lines joined."""

    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Unit:
        unit = cls(path)
        section: list[tuple[str, str]] | None = None
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if pending and line and line[0] in "#;":
                continue  # a comment inside a continued value
            line = pending + line
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            pending = ""
            if line.startswith("[") and line.endswith("]"):
                section = unit.sections.setdefault(line[1:-1], [])
                continue
            key, sep, value = line.partition("=")
            assert sep and section is not None, f"{path.name}: not key=value: {line!r}"
            section.append((key.strip(), value.strip()))
        assert not pending, f"{path.name}: file ends in a continuation"
        return unit

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def one(self, key: str, section: str = "Service") -> str:
        values = self.all(key, section)
        assert len(values) == 1, f"{self.path.name}: [{section}] {key}= given {len(values)}x"
        return values[0]


def specifiers(unit_name: str, hostname: str) -> dict[str, str]:
    """%-specifiers of systemd for a unit name such as ``web@1.service``."""
    stem, _, _suffix = unit_name.rpartition(".")
    prefix, _at, instance = stem.partition("@")
    return {"n": unit_name, "N": stem, "p": prefix, "i": instance, "I": instance,
            "H": hostname, "%": "%"}


def expand_specifiers(text: str, spec: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in spec, f"unexpected specifier %{m.group(1)} in {text!r}"
        return spec[m.group(1)]

    return re.sub(r"%(.)", sub, text)


def expand_env(words: list[str], env: Mapping[str, str], used: set[str]) -> list[str]:
    """systemd's variable expansion of an Exec command line (already split into words):
    a word that is exactly ``$VAR`` becomes the value split at whitespace (zero or more words),
    ``${VAR}`` anywhere becomes the value (one word), ``$$`` a ``$``."""
    out: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            used.add(whole.group(1))
            out.extend(env.get(whole.group(1), "").split())
            continue

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            used.add(m.group(1))
            return env.get(m.group(1), "")

        out.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, word))
    return out


@dataclass
class Command:
    words: list[str]
    ignore_failure: bool  # the "-" prefix

    def __str__(self) -> str:
        return ("-" if self.ignore_failure else "") + shlex.join(self.words)


def parse_env_assignments(text: str) -> dict[str, str]:
    """Environment= value: space-separated VAR=VALUE words, quotes allowed."""
    env = {}
    for word in shlex.split(text):
        name, sep, value = word.partition("=")
        assert sep, f"not VAR=VALUE: {word!r}"
        env[name] = value
    return env


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not VAR=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


@dataclass
class UnitRun:
    """One unit, loaded under ``unit_name``, whose commands are run the way systemd would."""

    unit: Unit
    unit_name: str
    hostname: str
    host_files: Mapping[str, Mapping[str, str]]  # stand-ins for files of the host
    used: set[str] = field(default_factory=set)

    @property
    def spec(self) -> dict[str, str]:
        return specifiers(self.unit_name, self.hostname)

    def env(self) -> dict[str, str]:
        """Environment= lines, then EnvironmentFile= files in order (read now: systemd reads
        them before each command, so a file written by ExecStartPre counts for ExecStart)."""
        env: dict[str, str] = {}
        for line in self.unit.all("Environment"):
            env.update(parse_env_assignments(expand_specifiers(line, self.spec)))
        for entry in self.unit.all("EnvironmentFile"):
            optional = entry.startswith("-")
            path = expand_specifiers(entry.lstrip("-"), self.spec)
            if path in self.host_files:
                env.update(self.host_files[path])
            elif path.startswith(RUNTIME_DIR):
                if Path(path).exists():
                    env.update(parse_env_file(Path(path).read_text()))
                else:
                    assert optional, f"{self.unit_name}: EnvironmentFile={path} missing"
            else:
                raise AssertionError(f"{self.unit_name}: EnvironmentFile={path} unexpected")
        return env

    def commands(self, key: str) -> list[Command]:
        env = self.env()
        cmds = []
        for line in self.unit.all(key):
            ignore = line.startswith("-")
            assert line.lstrip("-")[:1] not in "@+!:", f"unsupported prefix in {line!r}"
            words = shlex.split(expand_specifiers(line.lstrip("-"), self.spec))
            cmds.append(Command(expand_env(words, env, self.used), ignore))
        return cmds

    def process_env(self) -> dict[str, str]:
        """What a command of the unit sees: the unit's environment, not the test's."""
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
        return {**base, **self.env()}

    def run(self, cmd: Command, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd.words, env=self.process_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 and not cmd.ignore_failure:
            raise AssertionError(f"{self.unit_name}: {cmd} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}")
        return proc

    def run_all(self, key: str) -> list[subprocess.CompletedProcess[str]]:
        return [self.run(cmd) for cmd in self.commands(key)]

    def start_main(self, log: Path) -> subprocess.Popen[str]:
        """ExecStart in the background (Type=simple: the unit counts as started at once)."""
        (cmd,) = self.commands("ExecStart")
        with open(log, "w") as out:
            return subprocess.Popen(cmd.words, env=self.process_env(), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, text=True)


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unsupported time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def flag_value(words: list[str], flag: str) -> str:
    for i, w in enumerate(words):
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
        if w == flag:
            return words[i + 1]
    raise AssertionError(f"{flag} not in {shlex.join(words)}")


def registrar_part(words: list[str]) -> list[str] | None:
    """The registrar arguments of a `docker run ... ${REGISTRAR_IMAGE} ARGS` line (unexpanded
    words), or None when the line does not run the registrar image."""
    if REGISTRAR_IMAGE_WORD not in words or words[1:2] != ["run"]:
        return None
    return words[words.index(REGISTRAR_IMAGE_WORD) + 1:]


def raw_commands(unit: Unit, key: str) -> list[list[str]]:
    return [shlex.split(line.lstrip("-")) for line in unit.all(key)]


# --- 1. systemd-analyze verify --------------------------------------------------------------
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: scripts/setup.sh installs systemd",
                    pytrace=False)
    return path


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", "--man=no", *map(str, paths)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


@pytest.mark.real  # runs systemd-analyze: not in the fast tier
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_units_pass_systemd_analyze_verify(variant: str, tmp_path: Path) -> None:
    # Copies in a directory of their own (the two variants share file names), plus one
    # instance of the template so that its specifiers are resolved too.
    paths = []
    for name in ("registrar.service", "app@.service"):
        paths.append(tmp_path / name)
        shutil.copy(VARIANTS[variant] / name, paths[-1])
    paths.append(tmp_path / "app@1.service")
    shutil.copy(VARIANTS[variant] / "app@.service", paths[-1])
    result = verify(paths)
    # verify exits 0 on "Unknown key ..., ignoring" and the like: any output is a failure
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    # and it really checks here: a wrong setting in a copy is reported
    bad = tmp_path / "bad" / "registrar.service"
    bad.parent.mkdir()
    bad.write_text((VARIANTS[variant] / "registrar.service").read_text()
                   .replace("Restart=on-failure", "Restart=on-failur"))
    assert "on-failur" in verify([bad]).stderr, "systemd-analyze verify checks nothing here"


# --- 2. structure, flags and variables ------------------------------------------------------
@functools.cache  # one `--help` run per command, not one per unit file
def help_flags(*command: str) -> frozenset[str]:
    out = subprocess.run([sys.executable, "-m", "registrar", *command, "--help"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def docker_run_flags() -> set[str]:
    out = docker("run", "--help")
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def docker_part(words: list[str]) -> list[str]:
    return words[2:words.index(REGISTRAR_IMAGE_WORD)] if REGISTRAR_IMAGE_WORD in words else []


@pytest.mark.parametrize(("variant", "path"), UNIT_FILES,
                         ids=[f"{v}-{p.name}" for v, p in UNIT_FILES])
def test_unit_commands_use_only_flags_registrar_accepts(variant: str, path: Path) -> None:
    unit = Unit.load(path)
    lines = [w for key in ("ExecStartPre", "ExecStart", "ExecStartPost")
             for w in raw_commands(unit, key)]
    runs = [(w, args) for w in lines if (args := registrar_part(w)) is not None]
    assert len(runs) == 1, f"{path}: expected one line running {REGISTRAR_IMAGE_WORD}"
    words, args = runs[0]
    command = args[0]
    assert command == ("watch" if path.name == "registrar.service" else "register")

    accepted = help_flags(command)
    used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert used <= accepted, f"{path}: flags registrar {command} does not accept"

    # REGISTRAR_<FLAG> passed into the container must name a flag of that command
    docker_args = docker_part(words)
    passed = [docker_args[i + 1] for i, a in enumerate(docker_args) if a in ("-e", "--env")]
    for name in passed:
        assert "=" not in name, f"{path}: -e {name}: pass the host's value, do not set it here"
        if name.startswith("REGISTRAR_"):
            flag = "--" + name.removeprefix("REGISTRAR_").lower().replace("_", "-")
            assert flag in accepted, f"{path}: -e {name}: registrar {command} has no {flag}"
        else:
            assert name == "COREOS_PRIVATE_IPV4", f"{path}: -e {name}: not read by registrar"

    # docker flags that exist (`--net` is a hidden alias, so the units say --network)
    flags = {a.split("=", 1)[0] for a in docker_args if a.startswith("--")}
    assert flags <= docker_run_flags(), f"{path}: unknown docker run flags"

    # the values parse, with the placeholders filled in as on a CoreOS host
    env = {"COREOS_PRIVATE_IPV4": "10.0.0.5"}
    spec = specifiers("web@1.service" if "@" in path.name else path.name, "core-01")
    filled = expand_env([expand_specifiers(a, spec) for a in args], env, set())
    settings = parse_settings(filled, {})
    assert settings.node == "core-01"
    if variant == "fleet":
        assert "--host-ip=${COREOS_PRIVATE_IPV4}" in args
        assert settings.host_ip == "10.0.0.5"
    else:
        # no --host-ip: an empty flag would shadow REGISTRAR_HOST_IP given in the environment
        assert not any(a.startswith("--host-ip") for a in args)
        assert {"REGISTRAR_HOST_IP", "COREOS_PRIVATE_IPV4"} <= set(passed)
    if command == "register":
        assert settings.agent is not None and settings.agent.container == "web-1"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unit_structure(variant: str) -> None:
    agent = Unit.load(VARIANTS[variant] / "registrar.service")
    app = Unit.load(VARIANTS[variant] / "app@.service")
    for unit in (agent, app):
        assert unit.one("Requires", "Unit") == "docker.service"
        assert "docker.service" in unit.one("After", "Unit").split()
        assert unit.one("Restart") == "on-failure"
        envs = [e.lstrip("-") for e in unit.all("EnvironmentFile")]
        assert envs[0] == "/etc/environment"
        assert envs[-1] == "/etc/registrar/registrar.env"  # the operator's, wins
        defaults = parse_env_assignments(" ".join(unit.all("Environment")))
        # the image the units run by default is this version's
        assert defaults["REGISTRAR_IMAGE"].rpartition(":")[2] == __version__
        if variant == "fleet":
            assert unit.all("EnvironmentFile")[0] == "/etc/environment"
            assert "Install" not in unit.sections  # fleet schedules; nothing to enable
        else:
            assert unit.all("EnvironmentFile")[0] == "-/etc/environment"
            assert "X-Fleet" not in unit.sections
            assert unit.one("WantedBy", "Install") == "multi-user.target"

    # host agent: stop timeouts longer than --drain plus the bounded revoke
    (start,) = raw_commands(agent, "ExecStart")
    drain = float(flag_value(start, "--drain"))
    (stop,) = raw_commands(agent, "ExecStop")
    assert stop[:3] == ["/usr/bin/docker", "stop", "-t"] and stop[4] == "%p"
    docker_timeout = float(stop[3])
    assert drain + SHUTDOWN_BUDGET < docker_timeout < seconds(agent.one("TimeoutStopSec"))
    assert flag_value(start, "--name") == "%p"
    if variant == "fleet":
        assert agent.one("Global", "X-Fleet") == "true"
        assert "--host-ip=${COREOS_PRIVATE_IPV4}" in start

    # app template: sidecar from ExecStartPost; ExecStop deregisters first, then stops the app
    (post,) = raw_commands(app, "ExecStartPost")
    assert post[:3] == ["/usr/bin/docker", "run", "-d"]
    assert flag_value(post, "--name") == "registrar-%p-%i"
    post_args = registrar_part(post)
    assert post_args is not None and post_args[:2] == ["register", "%p-%i"]
    (main,) = raw_commands(app, "ExecStart")
    assert flag_value(main, "--name") == "%p-%i"
    # ExecStop: `registrar drain` of the app's container first, then the sidecar, then the app
    drain_line, *stops = raw_commands(app, "ExecStop")
    drain_args = registrar_part(drain_line)
    assert drain_args is not None and drain_args[:2] == ["drain", "%p-%i"], drain_line
    assert flag_value(drain_args, "--node") == "%H"  # the node the sidecar writes (--node=%H)
    assert flag_value(post, "--node") == "%H"
    assert [s[:3] + s[4:] for s in stops] == [
        ["/usr/bin/docker", "stop", "-t", "registrar-%p-%i"],
        ["/usr/bin/docker", "stop", "-t", "%p-%i"],
    ]
    assert all(line.startswith("-") for line in app.all("ExecStop"))
    sidecar_drain = float(flag_value(post, "--drain"))
    assert sidecar_drain >= 30  # cheap when the routers are idle: it ends as soon as they are
    assert float(stops[0][3]) > sidecar_drain + SHUTDOWN_BUDGET
    assert seconds(app.one("TimeoutStopSec")) > max(
        [float(s[3]) for s in stops] + [float(flag_value(drain_args, "--timeout"))])
    cleanup = raw_commands(app, "ExecStopPost")
    assert ["/usr/bin/docker", "rm", "-f", "registrar-%p-%i"] in cleanup
    assert ["/usr/bin/docker", "rm", "-f", "%p-%i"] in cleanup
    assert all(line.startswith("-") for line in app.all("ExecStopPost"))
    if variant == "fleet":
        assert app.one("Conflicts", "X-Fleet") == "%p@*.service"
    else:
        assert "Conflicts" not in dict(app.sections["Unit"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_app_templates_drain_line_uses_only_what_registrar_drain_accepts(
    variant: str
) -> None:
    unit = Unit.load(VARIANTS[variant] / "app@.service")
    drain = raw_commands(unit, "ExecStop")[0]
    check_registrar_line(drain, "drain")
    args = registrar_part(drain)
    assert args is not None
    spec = specifiers("web@1.service", "core-01")
    settings = parse_settings(expand_env([expand_specifiers(a, spec) for a in args], {}, set()),
                              {})
    assert settings.drain_cmd is not None
    assert (settings.drain_cmd.container, settings.drain_cmd.node) == ("web-1", "core-01")


def check_registrar_line(words: list[str], command: str) -> None:
    """A `docker|podman run ... ${REGISTRAR_IMAGE} COMMAND ...` line: flags `registrar COMMAND`
    accepts, and every REGISTRAR_* passed in names one of its flags."""
    args = registrar_part(words)
    assert args is not None and args[0] == command, words
    accepted = help_flags(command)
    used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert used <= accepted, f"flags registrar {command} does not accept: {used - accepted}"
    docker_args = docker_part(words)
    passed = [docker_args[i + 1] for i, a in enumerate(docker_args) if a in ("-e", "--env")]
    for name in passed:
        assert name.startswith("REGISTRAR_") and "=" not in name, name
        flag = "--" + name.removeprefix("REGISTRAR_").lower().replace("_", "-")
        assert flag in accepted, f"-e {name}: registrar {command} has no {flag}"


# --- Quadlet (Podman): what this host can check -----------------------------------------------
# Debian's Podman 4.3 has no Quadlet generator (it came with 4.4): the `.container` files cannot
# be turned into units here. So: their keys are read with the unit parser and checked against
# the [Container] keys Quadlet knows, the registrar command lines are checked like the others,
# and `systemd-analyze verify` runs on the part systemd itself reads ([Unit], [Service],
# [Install]) with the ExecStart= that Quadlet would generate stood in for.
QUADLET = UNITS / "quadlet"
QUADLET_CONTAINER_KEYS = frozenset({
    "ContainerName", "Image", "Exec", "Environment", "EnvironmentFile", "Label", "PublishPort",
    "Volume", "Network", "User", "Group", "SecurityLabelDisable", "PodmanArgs",
    "AddCapability", "DropCapability", "ReadOnly", "Notify", "HealthCmd",
})
PODMAN_SOCKET = "/run/podman/podman.sock"


def quadlet_units() -> tuple[Unit, Unit]:
    return Unit.load(QUADLET / "app.container"), Unit.load(QUADLET / "registrar.container")


def test_quadlet_units_use_known_keys_and_sections() -> None:
    for unit in quadlet_units():
        assert set(unit.sections) <= {"Unit", "Container", "Service", "Install"}, unit.path
        keys = {key for key, _ in unit.sections["Container"]}
        assert keys <= QUADLET_CONTAINER_KEYS, keys - QUADLET_CONTAINER_KEYS
        assert unit.one("WantedBy", "Install") == "multi-user.target"
        assert "Exec" + "Start" not in dict(unit.sections.get("Service", []))  # Quadlet's own


def test_quadlet_app_drains_its_own_container_first() -> None:
    app, _agent = quadlet_units()
    name = app.one("ContainerName", "Container")
    assert app.one("Label", "Container") == "registrar.service=web"
    (drain,) = raw_commands(app, "ExecStop")
    assert drain[:2] == ["/usr/bin/podman", "run"] and app.one("ExecStop").startswith("-")
    check_registrar_line(drain, "drain")
    args = registrar_part(drain)
    assert args is not None
    settings = parse_settings([expand_specifiers(a, specifiers("web.service", "core-01"))
                               for a in args], {})
    assert settings.drain_cmd is not None
    assert (settings.drain_cmd.container, settings.drain_cmd.node) == (name, "core-01")
    assert seconds(app.one("TimeoutStopSec")) > settings.drain_cmd.timeout + 10
    assert "registrar.service" in app.one("After", "Unit").split()


def test_quadlet_agent_follows_the_podman_socket() -> None:
    _app, agent = quadlet_units()
    assert agent.one("Volume", "Container") == f"{PODMAN_SOCKET}:{PODMAN_SOCKET}"
    assert agent.one("Network", "Container") == "host"
    env = parse_env_assignments(" ".join(agent.all("Environment", "Container")))
    words = shlex.split(agent.one("Exec", "Container"))
    assert words[0] == "watch"
    assert {w.split("=", 1)[0] for w in words if w.startswith("--")} <= help_flags("watch")
    settings = parse_settings([expand_specifiers(w, specifiers("registrar.service", "core-01"))
                               for w in words], env)
    assert settings.docker_url == f"unix://{PODMAN_SOCKET}" and settings.node == "core-01"
    # podman stop's timeout above --drain plus the bounded revoke, systemd's above that
    stop_timeout = float(flag_value(shlex.split(agent.one("PodmanArgs", "Container")),
                                    "--stop-timeout"))
    assert settings.drain + SHUTDOWN_BUDGET < stop_timeout < seconds(
        agent.one("TimeoutStopSec"))
    assert "podman.socket" in agent.one("Requires", "Unit").split()


@pytest.mark.real  # runs systemd-analyze: not in the fast tier
def test_quadlet_units_service_part_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    for unit in quadlet_units():
        text = unit.path.read_text()
        kept, section = [], None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
                if section == "Service":
                    kept += [line, "ExecStart=/usr/bin/podman run --name stand-in image"]
                    continue
            if section != "Container":
                kept.append(line)
        if "[Service]" not in text:
            kept += ["[Service]", "ExecStart=/usr/bin/podman run --name stand-in image"]
        service = tmp_path / unit.path.with_suffix(".service").name
        service.write_text("\n".join(kept) + "\n")
        result = verify([service])
        # podman is not a dependency of this host's checks: only its path may be missing
        output = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                           if "/usr/bin/podman" not in line and "podman.socket" not in line)
        assert output == "", output


# --- 3. running them ------------------------------------------------------------------------
@pytest.fixture
def stand_ins(
    registrar_image: BuiltImage, etcd: EtcdServer, unique: str
) -> dict[str, dict[str, str]]:
    """The host's files as the test gives them."""
    return {
        "/etc/environment": {"COREOS_PRIVATE_IPV4": "127.0.0.1"},
        "/etc/registrar/registrar.env": {
            "REGISTRAR_IMAGE": registrar_image.tag,
            "REGISTRAR_ETCD": etcd.url,
            "REGISTRAR_PREFIX": f"/rgt-{unique}",
            "REGISTRAR_TTL": "5",
            # the app: busybox httpd behind an init that passes SIGTERM on, published on
            # loopback only
            "APP_IMAGE": BUSYBOX_IMAGE,
            "APP_PORT": "127.0.0.1::8080",
            "APP_RUN_ARGS": "--init",
            "APP_CMD": "httpd -f -p 8080",
        },
    }


@dataclass
class Timeline:
    """When the key went, whether the app still ran then (polled beside the stop commands)."""

    key_gone_at: float | None = None
    app_running_when_gone: bool | None = None


def watch_key(
    etcd_reader: EtcdReader, key: str, app: str, stop: threading.Event, out: Timeline
) -> None:
    while not stop.is_set():
        if etcd_reader.get(key) is None:
            out.key_gone_at = time.time()
            state = docker("inspect", "--format", "{{.State.Running}}", app, check=False)
            out.app_running_when_gone = state == "true"
            return
        time.sleep(0.02)


def kill_events(container: str, since: float) -> list[tuple[float, str]]:
    """Docker's `kill` events of ``container`` since ``since``: (time, signal)."""
    out = docker("events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                 "--filter", f"container={container}", "--filter", "event=kill",
                 "--format", "{{.TimeNano}} {{index .Actor.Attributes \"signal\"}}")
    return [(int(t) / 1e9, sig) for t, sig in (ln.split() for ln in out.splitlines())]


def cleanup_unit(run: UnitRun, names: list[str], main: subprocess.Popen[str] | None) -> None:
    docker("rm", "-f", "-v", *names, check=False, timeout=60)
    if main is not None and main.poll() is None:
        main.kill()
        main.wait(10)
    Path(f"{RUNTIME_DIR}{run.unit_name}.env").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(RUNTIME_DIR).rmdir()  # made by the unit's ExecStartPre; only when empty


@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_app_template_registers_then_deregisters_and_drains_before_the_app_stops(
    variant: str, stand_ins: dict[str, dict[str, str]], etcd_reader: EtcdReader,
    containers: ContainerFactory, unique: str, tmp_path: Path,
) -> None:
    unit = Unit.load(VARIANTS[variant] / "app@.service")
    # The template under the app's name, as an operator copies it; the prefix makes every
    # container name unique to this test.
    run = UnitRun(unit, f"{containers.prefix}-app{unique[:4]}@1.service",
                  hostname=f"node-{unique}", host_files=stand_ins)
    app = f"{run.spec['p']}-1"
    sidecar = f"registrar-{app}"
    key = f"/rgt-{unique}/{run.spec['p']}/{run.hostname}:{app}:8080"
    main = None
    try:
        started = time.time()
        run.run_all("ExecStartPre")
        assert run.env()["DOCKER_GID"] == str(os.stat("/var/run/docker.sock").st_gid)
        main = run.start_main(tmp_path / "main.log")
        run.run_all("ExecStartPost")
        # every variable the unit refers to is set (systemd would quietly make it empty)
        assert run.used <= set(run.env()), run.used - set(run.env())

        def logs() -> str:
            return tail(subprocess.run(["docker", "logs", sidecar], capture_output=True,
                                       text=True).stderr, 30)

        value = value_of(wait_until(lambda: etcd_reader.get(key), timeout=30, message=logs))
        published = int(docker("port", app, "8080/tcp").rpartition(":")[2])
        assert (value["host"], value["port"]) == ("127.0.0.1", published)
        assert value["service"] == run.spec["p"] and value["node"] == run.hostname
        assert docker("inspect", "--format", "{{.Config.User}}", sidecar) == "10001:10001"

        # systemctl stop: ExecStop in order, the key watched beside them
        timeline, done = Timeline(), threading.Event()
        watcher = threading.Thread(target=watch_key,
                                   args=(etcd_reader, key, app, done, timeline), daemon=True)
        watcher.start()
        stops = run.commands("ExecStop")
        stop_started = time.time()
        drained = run.run(stops[0])  # registrar drain: no router reports here, none waited for
        assert drained.returncode == 0 and "drained in" in drained.stdout, drained.stderr
        drained_at = time.time()
        first = run.run(stops[1])
        sidecar_stopped = time.time()
        assert first.returncode == 0, first.stderr
        assert docker("inspect", "--format", "{{.State.ExitCode}}", sidecar) == "0", logs()
        for cmd in stops[2:]:
            assert run.run(cmd).returncode == 0
        done.set()
        watcher.join(5)
        assert main.wait(30) in (0, *map(int, unit.one("SuccessExitStatus").split()))
        run.run_all("ExecStopPost")

        kills = kill_events(app, started)
        assert kills, "the app container got no stop signal"
        app_signalled = kills[0][0]
        drain = float(flag_value(raw_commands(unit, "ExecStartPost")[0], "--drain"))
        assert timeline.key_gone_at is not None, "the key never went"
        # out of rotation at once (the drain line starts a registrar container first), while
        # the app still ran ...
        assert timeline.key_gone_at - stop_started < 5
        assert timeline.app_running_when_gone is True
        # ... and the drains were over before the app got its signal (with no router
        # reporting, the sidecar's --drain is waited in full)
        assert app_signalled >= drained_at - 0.5
        assert app_signalled - timeline.key_gone_at >= drain - 0.5
        assert app_signalled >= sidecar_stopped - 0.5
        print(f"{variant}: key gone {timeline.key_gone_at - stop_started:.2f} s after stop, "
              f"app signalled {app_signalled - timeline.key_gone_at:.2f} s after that")

        # ExecStopPost left nothing behind
        assert docker("ps", "-a", "-q", "--filter", f"name=^/({app}|{sidecar})$") == ""
        assert not Path(f"{RUNTIME_DIR}{run.unit_name}.env").exists()
    finally:
        cleanup_unit(run, [app, sidecar], main)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_agent_unit_runs_watch_and_its_stop_deregisters_then_drains(
    variant: str, stand_ins: dict[str, dict[str, str]], etcd_reader: EtcdReader,
    containers: ContainerFactory, unique: str, tmp_path: Path,
) -> None:
    unit = Unit.load(VARIANTS[variant] / "registrar.service")
    port = free_port()
    files = {**stand_ins}
    files["/etc/registrar/registrar.env"] = {
        **stand_ins["/etc/registrar/registrar.env"],
        "REGISTRAR_METRICS_ADDR": f"127.0.0.1:{port}",  # not the shared default 9477
    }
    run = UnitRun(unit, f"{containers.prefix}-registrar{unique[:4]}.service",
                  hostname=f"node-{unique}", host_files=files)
    name = run.spec["p"]
    main = None
    try:
        run.run_all("ExecStartPre")
        main = run.start_main(tmp_path / "main.log")
        c = containers(labels={"registrar.service": "web"})
        key = f"/rgt-{unique}/web/{run.hostname}:{c.name}:8080"

        def logs() -> str:
            return tail((tmp_path / "main.log").read_text(), 30)

        value = value_of(wait_until(lambda: etcd_reader.get(key), timeout=30, message=logs))
        assert value["host"] == "127.0.0.1" and value["port"] == c.port(8080)
        assert healthz(port) == 200  # REGISTRAR_METRICS_ADDR reached it through -e
        if variant == "fleet":
            assert "--host-ip=127.0.0.1" in run.commands("ExecStart")[0].words

        timeline, done = Timeline(), threading.Event()
        watcher = threading.Thread(target=watch_key,
                                   args=(etcd_reader, key, c.name, done, timeline),
                                   daemon=True)
        watcher.start()
        stop_started = time.time()
        run.run_all("ExecStop")
        took = time.time() - stop_started
        done.set()
        watcher.join(5)
        assert main.wait(30) == 0, logs()
        run.run_all("ExecStopPost")

        drain = float(flag_value(raw_commands(unit, "ExecStart")[0], "--drain"))
        assert timeline.key_gone_at is not None and timeline.key_gone_at - stop_started < 2
        assert timeline.app_running_when_gone is True  # the agent's stop, not the app's
        assert drain - 0.5 <= took < drain + SHUTDOWN_BUDGET, logs()
        assert etcd_reader.get_prefix(f"/rgt-{unique}/") == {}
        assert docker("ps", "-a", "-q", "--filter", f"name=^/{name}$") == ""
    finally:
        cleanup_unit(run, [name], main)


def test_unit_runner_follows_systemd_expansion() -> None:
    """The small systemd model the tests above rely on."""
    spec = specifiers("web@2.service", "core-01")
    assert expand_specifiers("%p-%i %n %H 100%%", spec) == "web-2 web@2.service core-01 100%"
    used: set[str] = set()
    env = {"A": "x y", "B": "", "C": "c"}
    words = shlex.split("run $A $B ${A} --c=${C} $$HOME 'q $$(x)'")
    assert expand_env(words, env, used) == ["run", "x", "y", "x y", "--c=c", "$HOME", "q $(x)"]
    assert used == {"A", "B", "C"}
    assert parse_env_file("# c\nA=1\nB=\"two words\"\n") == {"A": "1", "B": "two words"}
