"""`registrar promote SERVICE VERSION --canary ...` with two real `registrar haproxy` routers
(both reporting), a real agent, real containers and a client load through both routers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Scope
from tests.support.cgi_app import PATH, app
from tests.support.docker_env import Container, ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

@dataclass
class Load:
    """Clients through both routers: (time, answer or error) of every request."""

    ports: list[int]
    seen: list[tuple[float, str]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    def _run(self, port: int) -> None:
        while not self._done.is_set():
            try:
                url = f"http://127.0.0.1:{port}{PATH}"
                with urllib.request.urlopen(url, timeout=3) as response:
                    self.seen.append((time.monotonic(), response.read().decode().strip()))
            except urllib.error.HTTPError as exc:
                self.seen.append((time.monotonic(), f"HTTP {exc.code}"))
            except OSError as exc:
                self.seen.append((time.monotonic(), f"error {type(exc).__name__}"))
            time.sleep(0.003)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True)
                         for p in self.ports for _ in range(2)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(10)

    def failed(self, since: float = 0.0) -> list[tuple[float, str]]:
        return [s for s in self.seen if s[0] >= since and not s[1].startswith("v")]


@dataclass
class Rig:
    scope: Scope
    ctl: str
    service: str
    routers: list[RegistrarProcess]
    router_ports: list[int]
    reader: EtcdReader
    containers: ContainerFactory

    def run(self, version: str, fail_one_in: int = 0) -> Container:
        """A new version's instance: on standby (v1 is promoted), as in a real deploy."""
        c = self.containers(labels={"registrar.service": self.service,
                                    "registrar.version": version},
                            command=app(version, fail_one_in))
        if version != "v1":
            wait_until(lambda: any(c.name in k for k in self.reader.get_prefix(
                f"{self.ctl}/standby/{self.service}/")), timeout=15)
        return c

    def promote(self, version: str, *flags: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "registrar", "promote", self.service, version, *flags,
             "--etcd", self.scope.etcd_url, "--prefix", self.scope.prefix,
             "--control-prefix", self.ctl], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def weights(self) -> str | None:
        return self.reader.get(f"{self.ctl}/weights/{self.service}")

    def answers(self, n: int = 40) -> set[str]:
        out = set()
        for _ in range(n):
            try:
                url = f"http://127.0.0.1:{self.router_ports[0]}{PATH}"
                with urllib.request.urlopen(url, timeout=3) as response:
                    out.add(response.read().decode().strip())
            except urllib.error.HTTPError as exc:
                out.add(f"HTTP {exc.code}")
        return out


@pytest.fixture
def rig(registrar: RegistrarFactory, etcd: EtcdServer, unique: str,
        containers: ContainerFactory, etcd_reader: EtcdReader,
        tmp_path: Path) -> Iterator[Rig]:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    ctl = f"/rgtc-{unique}"
    service = f"web-{unique}"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    routers: list[RegistrarProcess] = []
    ports: list[int] = []
    for name in ("r1", "r2"):
        port = free_port(ports)
        routers.append(registrar([
            "haproxy", "--etcd", etcd.url, "--prefix", scope.prefix, "--control-prefix", ctl,
            "--bind", f"{service}=127.0.0.1:{port}", "--mode", "http", "--node",
            f"{name}-{unique}", "--ttl", "3", "--config", str(tmp_path / f"{name}.cfg"),
            "--metrics-addr", "127.0.0.1:0"]))
        ports.append(port)
    for r in routers:
        r.wait_for_log("haproxy started", timeout=15)
    rig = Rig(scope, ctl, service, routers, ports, etcd_reader, containers)
    old = [rig.run("v1") for _ in range(2)]
    wait_until(lambda: rig.answers(20) == {"v1"}, timeout=15)
    promoted = rig.promote("v1")  # the version in production
    assert promoted.wait(60) == 0
    wait_until(lambda: len(etcd_reader.get_prefix(f"{ctl}/routers/")) == 2, timeout=10)
    assert old
    yield rig


def weight_log(rig: Rig, stop: threading.Event) -> list[tuple[float, int | None]]:
    """(time, percent) whenever the weights key changes, polled in a thread."""
    seen: list[tuple[float, int | None]] = []

    def poll() -> None:
        last: object = object()
        while not stop.is_set():
            raw = rig.weights()
            percent = json.loads(raw)["percent"] if raw else None
            if percent != last:
                seen.append((time.monotonic(), percent))
                last = percent
            time.sleep(0.05)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_a_good_version_goes_through_its_steps_and_is_promoted(rig: Rig) -> None:
    new = [rig.run("v2")]
    stop = threading.Event()
    changes = weight_log(rig, stop)
    with Load(rig.router_ports) as load:
        started = time.monotonic()
        proc = rig.promote("v2", "--canary", "10,50", "--interval", "4", "--timeout", "20")
        out, err = proc.communicate(timeout=120)
        time.sleep(1)
    stop.set()
    assert proc.returncode == 0, out + err
    assert "passed 10%" in out and "passed 50%" in out and "promoted v2" in out, out
    assert load.failed(started) == [], load.failed(started)[:5]
    shares = {}
    steps = [c for c in changes if c[1] is not None]
    for i, (at, percent) in enumerate(steps):
        until = steps[i + 1][0] if i + 1 < len(steps) else next(
            t for t, p in changes if t > at and p is None)
        window = [b for t, b in load.seen if at + 1.0 < t < until]  # weights applied by then
        assert window, f"no request at {percent}%"
        assert percent is not None  # steps are the changes with a percent
        shares[percent] = sum(1 for b in window if b == "v2") / len(window)
        assert abs(shares[percent] * 100 - percent) <= 5, shares
    print(f"good canary: client shares {shares}; {len(load.seen)} requests, 0 failed;\n{out}")
    assert rig.weights() is None
    assert rig.answers() == {"v2"}
    assert new


@pytest.mark.parametrize("fail_one_in", [1, 20], ids=["all-500", "5pc-500"])
def test_a_bad_version_is_rolled_back_at_the_first_step(rig: Rig, fail_one_in: int) -> None:
    rig.run("v3", fail_one_in)
    with Load(rig.router_ports) as load:
        started = time.monotonic()
        proc = rig.promote("v3", "--canary", "10,50", "--interval", "6", "--timeout", "20",
                           "--min-requests", "40")
        out, err = proc.communicate(timeout=120)
        ended = time.monotonic()
    assert proc.returncode == 1, out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"registrar: canary of {rig.service} v3 rolled back at 10%: "
                           "error rate "), line
    assert rig.weights() is None
    assert json.loads(rig.reader.get(f"{rig.ctl}/promoted/{rig.service}") or "{}")[
        "version"] == "v1"  # the promotion that stood before stays
    wait_until(lambda: rig.answers() == {"v1"}, timeout=5)  # only the old version after
    during = [s for s in load.seen if started <= s[0] <= ended]
    failed = load.failed(started)
    print(f"bad canary (1 in {fail_one_in} fails): {line}; clients saw {len(failed)} failed of "
          f"{len(during)} ({len(failed) / max(1, len(during)):.3f})")
    assert len(failed) / max(1, len(during)) < 0.10 / fail_one_in + 0.03  # near the share


def test_too_little_traffic_prolongs_then_times_out(rig: Rig) -> None:
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10", "--interval", "1", "--timeout", "3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "too little traffic" in err.strip().splitlines()[-1], err
    assert rig.weights() is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_step_rolls_back(rig: Rig, sig: signal.Signals) -> None:
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10,50", "--interval", "30")
    wait_until(rig.weights, timeout=15)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert f"interrupted by {sig.name}" in err
    assert rig.reader.get_prefix(f"{rig.ctl}/weights/") == {}


def test_a_router_that_dies_during_a_step_leaves_the_other_to_judge(rig: Rig) -> None:
    rig.run("v2")
    with Load(rig.router_ports[:1]):
        proc = rig.promote("v2", "--canary", "20", "--interval", "5", "--timeout", "20")
        wait_until(rig.weights, timeout=15)
        rig.routers[1].kill()  # its report goes with its lease (TTL 3)
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    wait_until(lambda: len(rig.reader.get_prefix(f"{rig.ctl}/routers/")) == 1, timeout=10)


def test_refusals_and_ls(rig: Rig) -> None:
    rig.run("v2")
    none = rig.promote("v9", "--canary", "10")
    _out, err = none.communicate(timeout=30)
    assert none.returncode == 1 and "0 instance(s) of it registered" in err
    first = rig.promote("v2", "--canary", "10,50", "--interval", "30")
    wait_until(rig.weights, timeout=15)
    second = rig.promote("v2", "--canary", "10")
    _out, err = second.communicate(timeout=30)
    assert second.returncode == 1 and "another canary" in err, err
    listed = subprocess.run([sys.executable, "-m", "registrar", "ls", "--etcd",
                             rig.scope.etcd_url, "--prefix", rig.scope.prefix,
                             "--control-prefix", rig.ctl], capture_output=True, text=True)
    assert "CANARY" in listed.stdout and "10%" in listed.stdout, listed.stdout
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    for flags in (["--canary", "50,10"], ["--canary", "0"], ["--canary", "10",
                  "--max-error-rate", "1.5"], ["--canary", "10", "--interval", "0"]):
        bad = rig.promote("v2", *flags)
        _out, err = bad.communicate(timeout=30)
        assert bad.returncode == 2 and len(err.strip().splitlines()) == 1, (flags, err)
