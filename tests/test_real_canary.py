"""`registrar promote SERVICE VERSION --canary ...` with two real `registrar haproxy` routers
(both reporting), a real agent, real containers and a client load through both routers."""

from __future__ import annotations

import functools
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

    def run(self, version: str, fail_one_in: int = 0, delay_ms: int = 0) -> Container:
        """A new version's instance: on standby (v1 is promoted), as in a real deploy."""
        c = self.containers(labels={"registrar.service": self.service,
                                    "registrar.version": version},
                            command=app(version, fail_one_in, delay_ms))
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


# --- the second step: response times, steering, gates ---------------------------------------

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


@dataclass
class ClientSideRouter:
    """Clients through both routers, timing every answer by the version that gave it; with
    `publish`, also publishing those times as one more router report (`{ctl}/routers/NAME`, on
    a lease of 3 s) with the SPEC's `latency` field and no counts, which drives the canary
    command by the contract alone (the real routers' own `latency` is judged without it)."""

    rig: Rig
    name: str
    publish: bool = True
    times: dict[str, list[int]] = field(default_factory=dict)
    seen: list[tuple[float, str, float]] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, port: int) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            try:
                url = f"http://127.0.0.1:{port}{PATH}"
                with urllib.request.urlopen(url, timeout=3) as response:
                    version = response.read().decode().strip()
            except OSError:
                continue
            took = time.monotonic() - started
            with self._lock:
                self.seen.append((started, version, took))
                counts = self.times.setdefault(version, [0] * len(BUCKETS))
                for i, bound in enumerate(BUCKETS):
                    if took <= bound:
                        counts[i] += 1
            time.sleep(0.003)

    def _publish(self) -> None:
        reader = self.rig.reader
        lease = reader.grant_lease(3)
        key = f"{self.rig.ctl}/routers/{self.name}"
        while not self._done.wait(0.5):
            with self._lock:
                latency = {self.rig.service: {v: list(c) for v, c in self.times.items()}}
            reader.put(key, json.dumps({"at": "2026-01-01T00:00:00Z", "mode": "http",
                                        "services": {}, "latency": latency}), lease=lease)
            reader.keepalive_lease(lease)
        reader.revoke_lease(lease)

    def __enter__(self) -> ClientSideRouter:
        self._threads = [threading.Thread(target=self._client, args=(p,), daemon=True)
                         for p in self.rig.router_ports for _ in range(2)]
        if self.publish:
            self._threads.append(threading.Thread(target=self._publish, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(10)

    def p99_ms(self, version: str, since: float = 0.0) -> float:
        times = sorted(t for at, v, t in self.seen if v == version and at >= since)
        return times[int(0.99 * (len(times) - 1))] * 1000 if times else float("nan")


@pytest.mark.parametrize("rule", [["--max-p99", "80"], ["--max-latency-ratio", "2"]],
                         ids=["max-p99", "ratio"])
def test_a_slow_version_is_rolled_back_by_a_latency_rule(rig: Rig, rule: list[str],
                                                         unique: str) -> None:
    rig.run("v3", delay_ms=120)  # no error at all, ~120 ms slower than v1's few ms
    stop = threading.Event()
    changes = weight_log(rig, stop)
    with ClientSideRouter(rig, f"client-{unique}") as clients:
        time.sleep(1.5)
        started = time.monotonic()
        proc = rig.promote("v3", "--canary", "20,50", "--interval", "8", "--timeout", "20",
                           "--min-requests", "20", *rule)
        out, err = proc.communicate(timeout=120)
        time.sleep(0.2)
    stop.set()
    assert proc.returncode == 1, out + err
    step = next(t for t, percent in changes if percent == 20)
    took = next(t for t, percent in changes if t > step and percent is None) - step
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"registrar: canary of {rig.service} v3 rolled back at 20%: p99 "), line
    if rule[0] == "--max-p99":
        assert "(max 80 ms)" in line, line
    else:
        assert "times the other versions'" in line and "(max 2)" in line, line
    assert rig.weights() is None
    client_p99 = {v: round(clients.p99_ms(v, started)) for v in ("v1", "v3")}
    print(f"slow version ({rule[0]}): rolled back {took:.1f}s after its first step started "
          f"(interval 8 s); {line}; client-side p99 {client_p99} ms")


def test_a_slow_version_is_rolled_back_by_the_routers_own_response_times(rig: Rig,
                                                                       unique: str) -> None:
    """End to end: the real routers count every response's time by version from HAProxy's
    log, write it in their reports, and the canary's p99 rule judges it."""
    rig.run("v3", delay_ms=120)
    with ClientSideRouter(rig, f"client-{unique}", publish=False) as clients:
        time.sleep(1.5)
        started = time.monotonic()
        proc = rig.promote("v3", "--canary", "20,50", "--interval", "8", "--timeout", "20",
                           "--min-requests", "20", "--max-p99", "80")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"registrar: canary of {rig.service} v3 rolled back at 20%: p99 "), line
    assert "(max 80 ms)" in line, line
    reported = float(line.split(": p99 ", 1)[1].split(" ms", 1)[0])
    client = clients.p99_ms("v3", started)
    # the routers time server to headers (Tr); the client adds HAProxy and its own side:
    # both in the same bucket of the SPEC's buckets, or the next one (interpolation)
    assert 100 <= reported <= 250 and 100 <= client <= 500, (reported, client)
    assert rig.weights() is None
    print(f"slow version, routers' own latency: {line}; client-side p99 {client:.0f} ms")


def test_a_version_as_fast_as_the_old_one_passes_both_latency_rules(rig: Rig,
                                                                     unique: str) -> None:
    rig.run("v2")
    with ClientSideRouter(rig, f"client-{unique}"):
        time.sleep(1.5)
        proc = rig.promote("v2", "--canary", "20", "--interval", "6", "--timeout", "20",
                           "--max-p99", "2000", "--max-latency-ratio", "4")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "passed 20%" in out and "; p99 " in out and "times the other versions'" in out, out
    print(f"fast version: {out}")


def test_latency_rules_refuse_without_an_http_router(rig: Rig) -> None:
    """A router report that says tcp, and no other: refused, nothing changed."""
    for router in rig.routers:
        router.stop()
    wait_until(lambda: rig.reader.get_prefix(f"{rig.ctl}/routers/") == {}, timeout=10)
    lease = rig.reader.grant_lease(30)
    rig.reader.put(f"{rig.ctl}/routers/tcp-one", json.dumps(
        {"mode": "tcp", "services": {rig.service: {"v1": {"tcp": 5}}}}), lease=lease)
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10", "--max-p99", "100")
    _out, err = proc.communicate(timeout=30)
    rig.reader.revoke_lease(lease)
    assert proc.returncode == 1, err
    assert "--max-p99 needs routers in http mode" in err and "nothing changed" in err, err
    assert rig.weights() is None


def steer(rig: Rig, action: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "registrar", "promote", rig.service, f"--{action}",
         "--etcd", rig.scope.etcd_url, "--prefix", rig.scope.prefix,
         "--control-prefix", rig.ctl], capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_abort_mid_step_rolls_back_within_2s(rig: Rig) -> None:
    rig.run("v2")
    code, said, _took = steer(rig, "abort")
    assert code == 1 and "no canary of" in said, said
    with Load(rig.router_ports):
        proc = rig.promote("v2", "--canary", "10,50", "--interval", "60")
        wait_until(rig.weights, timeout=15)
        time.sleep(2)
        started = time.monotonic()
        code, said, took = steer(rig, "abort")
        out, err = proc.communicate(timeout=30)
        ended = time.monotonic() - started
    assert code == 0 and "aborted" in said, said
    assert proc.returncode == 1, out + err
    assert f"registrar: canary of {rig.service} v2 aborted at 10%" in err, err
    assert rig.weights() is None
    acknowledged = float(said.split("acknowledged in ")[1].split("s)")[0])
    assert acknowledged < 2.0, said  # rolled back (weights key gone) before the ack
    print(f"--abort: rolled back and acknowledged {acknowledged:.2f}s after the request; the"
          f" steering command took {took:.2f}s in all (Python start-up included), the canary"
          f" exited {ended:.2f}s after it was started")


def test_pause_holds_past_the_interval_and_resume_goes_on(rig: Rig) -> None:
    rig.run("v2")
    with Load(rig.router_ports):
        proc = rig.promote("v2", "--canary", "10,50", "--interval", "3", "--timeout", "20")
        wait_until(rig.weights, timeout=15)
        code, said, took = steer(rig, "pause")
        assert code == 0 and "paused" in said, said
        took = float(said.split("acknowledged in ")[1].split("s)")[0])
        assert took < 2.0, said
        assert json.loads(rig.weights() or "{}") .get("paused") is True
        code, said, _ = steer(rig, "pause")
        assert code == 0 and "paused already" in said, said
        listed = subprocess.run([sys.executable, "-m", "registrar", "ls", "--etcd",
                                 rig.scope.etcd_url, "--prefix", rig.scope.prefix,
                                 "--control-prefix", rig.ctl], capture_output=True, text=True)
        assert "paused" in listed.stdout, listed.stdout
        time.sleep(8)  # well past the 3 s interval: still at 10 %, paused
        held = json.loads(rig.weights() or "{}")
        assert held.get("percent") == 10 and held.get("paused") is True, held
        assert proc.poll() is None
        code, said, _ = steer(rig, "resume")
        assert code == 0 and "resumed" in said, said
        code, said, _ = steer(rig, "resume")
        assert code == 0 and "not paused" in said, said
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert "paused at 10%" in out and "resumed at 10%" in out and "promoted v2" in out, out
    print(f"--pause acknowledged in {took:.2f}s; held 8 s past a 3 s interval; resumed, promoted")


def test_sigterm_to_a_paused_canary_rolls_back(rig: Rig) -> None:
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10", "--interval", "30")
    wait_until(rig.weights, timeout=15)
    code, said, _ = steer(rig, "pause")
    assert code == 0, said
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "interrupted by SIGTERM" in err, out + err
    assert rig.weights() is None


def test_abort_of_a_canary_killed_with_sigkill_deletes_its_weights(rig: Rig) -> None:
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10", "--interval", "30")
    wait_until(rig.weights, timeout=15)
    proc.kill()
    proc.communicate(timeout=10)
    assert rig.weights() is not None  # left behind, as the SPEC says of SIGKILL
    code, said, took = steer(rig, "pause")
    assert code in (0, 1)  # depends on whether its owner lease (3 s) expired yet
    code, said, took = steer(rig, "abort")
    assert code == 0 and "no canary command follows" in said, said
    assert rig.weights() is None
    print(f"--abort of a killed canary: weights key deleted in {took:.2f}s")


class Gate:
    """A stdlib HTTP server answering every POST with `status`, keeping the payloads."""

    def __init__(self, status: int) -> None:
        import http.server

        gate = self
        self.payloads: list[dict[str, object]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                gate.payloads.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [500, 204])
def test_a_gate_refusing_rolls_back_and_one_answering_2xx_lets_it_finish(rig: Rig,
                                                                        status: int) -> None:
    rig.run("v2")
    gate = Gate(status)
    try:
        with Load(rig.router_ports):
            proc = rig.promote("v2", "--canary", "10,50", "--interval", "3", "--timeout", "20",
                               "--gate", gate.url)
            out, err = proc.communicate(timeout=90)
    finally:
        gate.close()
    first = {"service": rig.service, "version": "v2", "step": 0, "percent": 0,
             "requests": 0, "error_rate": None, "p99_ms": None}
    assert gate.payloads[0] == first
    if status == 500:
        assert proc.returncode == 1, out + err
        assert err.strip().splitlines()[-1] == (
            f"registrar: canary of {rig.service} v2 rolled back at 0%: gate {gate.url}"
            " answered HTTP 500")
        assert len(gate.payloads) == 1
        assert rig.weights() is None
        return
    assert proc.returncode == 0, out + err
    assert [p["step"] for p in gate.payloads] == [0, 1, 2]
    assert [p["percent"] for p in gate.payloads] == [0, 10, 50]
    later = gate.payloads[1]
    assert isinstance(later["requests"], int) and later["requests"] >= 20
    assert later["error_rate"] == 0.0
    assert later["p99_ms"] is None or isinstance(later["p99_ms"], float)  # routers' latency
    assert "promoted v2" in out


def ask(port: int, headers: dict[str, str] | None = None,
        opener: urllib.request.OpenerDirector | None = None) -> tuple[str, str]:
    """(the version that answered, its Set-Cookie header or "")."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", headers=headers or {})
    with (opener or urllib.request.build_opener()).open(request, timeout=3) as response:
        return response.read().decode().strip(), response.headers.get("Set-Cookie") or ""


def started(rig: Rig, proc: subprocess.Popen[str]) -> None:
    """The canary's weights key stands (or the command ended: its output says why)."""
    wait_until(lambda: rig.weights() or proc.poll() is not None, timeout=15)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"the canary ended early: {out}{err}")


def answered(port: int, version: str, headers: dict[str, str] | None = None) -> bool:
    return ask(port, headers)[0] == version


def test_header_routing_sends_every_always_request_to_the_new_version(rig: Rig) -> None:
    rig.run("v2")
    proc = rig.promote("v2", "--canary", "10", "--interval", "60", "--header", "X-Canary")
    try:
        started(rig, proc)
        assert json.loads(rig.weights() or "{}").get("header") == "X-Canary"
        for port in rig.router_ports:  # each router reloads once for the header's backends
            wait_until(functools.partial(answered, port, "v2", {"X-Canary": "always"}),
                       timeout=15)
        seen: dict[str, list[str]] = {"always": [], "never": [], "": []}
        for _ in range(50):
            for port in rig.router_ports:
                for word in seen:
                    seen[word].append(ask(port, {"X-Canary": word} if word else None)[0])
        assert set(seen["always"]) == {"v2"}, seen["always"]
        assert set(seen["never"]) == {"v1"}, seen["never"]
        plain = seen[""].count("v2") / len(seen[""])
        assert plain < 0.3, plain  # the weights' 10 %, give or take
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    for port in rig.router_ports:  # the canary's end: the header means nothing any more
        wait_until(functools.partial(answered, port, "v1", {"X-Canary": "always"}),
                   timeout=15)
    print(f"--header: {len(seen['always'])} always -> v2 (100 %), {len(seen['never'])} never ->"
          f" v1, without the header {plain:.0%} v2 at a 10 % step")


def test_sticky_clients_keep_their_version_until_the_canary_ends(rig: Rig) -> None:
    import http.cookiejar

    rig.run("v2")
    proc = rig.promote("v2", "--canary", "30", "--interval", "60", "--sticky")
    try:
        started(rig, proc)
        cookie = f"registrar-{rig.service}="
        for port in rig.router_ports:
            wait_until(functools.partial(lambda p: cookie in ask(p)[1], port), timeout=15)
        time.sleep(2)  # v2 in rotation on both routers, its weight set
        clients = []
        for _ in range(30):
            jar = http.cookiejar.CookieJar()
            clients.append(urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)))
        answers: list[list[str]] = [[] for _ in clients]
        for round_ in range(8):
            for i, opener in enumerate(clients):  # both routers in turn: one cookie for both
                answers[i].append(ask(rig.router_ports[(i + round_) % 2], opener=opener)[0])
        firsts = [a[0] for a in answers]
        assert all(set(a) == {a[0]} for a in answers), answers
        assert "v2" in firsts and "v1" in firsts, firsts
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    print(f"--sticky: {len(clients)} clients x 8 requests over both routers, each kept its "
          f"version; {firsts.count('v2')} of them on v2 at a 30 % step")
