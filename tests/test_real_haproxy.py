"""`registrar haproxy` with a real HAProxy (Debian's), real Docker and etcd, and the real
`registrar watch` agent registering busybox httpd containers. Traffic goes to 127.0.0.1 only.

Each test has its own prefix, node and service name (`web-<id>`), so containers that other
tests label on the same engine are never routed here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from registrar.core.control import Canary
from registrar.haproxy.config import Server, builtin_template_text, server_weights
from tests.helpers import Scope, healthz, metrics_flag, scrape
from tests.support.docker_env import Container, ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

if TYPE_CHECKING:
    from tests.conftest import Forwarders, RegistrarFactory

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture(scope="module", autouse=True)
def haproxy_installed() -> None:
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail("haproxy missing: run `make setup` (scripts/setup.sh installs it)",
                    pytrace=False)


@pytest.fixture
def scope(etcd: EtcdServer, unique: str) -> Scope:
    return Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)


@pytest.fixture
def service(unique: str) -> str:
    return f"web-{unique}"


StartAgent = Callable[[], RegistrarProcess]


@pytest.fixture
def agent(registrar: RegistrarFactory, scope: Scope) -> StartAgent:
    """`registrar watch` for this test's scope (it registers containers at 127.0.0.1)."""

    def start() -> RegistrarProcess:
        proc = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--resync", "2",
                          "--explicit", "--metrics-addr", "127.0.0.1:0"])
        proc.wait_for_log("docker connected", timeout=15)
        return proc

    return start


def host_of(container: Container) -> str:
    """What busybox httpd answers at / in that container: its host name, the short id."""
    return str(container.id[:12])


def get(port: int, timeout: float = 2.0) -> str:
    """GET / through HAProxy; the body (raises on refused connections and HTTP errors)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
        return str(response.read().decode().strip())


def status(port: int) -> int | str:
    try:
        get(port)
        return 200
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except urllib.error.URLError as exc:
        return type(exc.reason).__name__
    except OSError as exc:
        return type(exc).__name__


class Load:
    """A steady stream of requests through HAProxy, in a thread, while the `with` block runs:
    `answers` (time, body) and `failures`. Bounded in time, stops by itself."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._done.is_set() and time.monotonic() < deadline:
            try:
                self.answers.append((time.monotonic(), get(self.port)))
            except Exception as exc:
                self.failures.append(repr(exc))
            time.sleep(0.002)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)


@dataclass
class Router:
    proc: RegistrarProcess
    port: int  # the frontend
    metrics_port: int
    config: Path

    def bodies(self, n: int = 12) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            with contextlib.suppress(OSError):
                seen[get(self.port)] += 1
        return seen

    def serves(self, *containers: Container) -> set[str]:
        """Waits until exactly these containers answer through HAProxy."""
        want = {host_of(c) for c in containers}
        served = wait_until(lambda: set(self.bodies()) == want and want, timeout=15,
                            message=lambda: f"wanted {want}; log:\n{self.proc.logs()[-3000:]}")
        assert isinstance(served, set)  # wait_until returns a truthy value: `want`
        return served

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def master_pid(self) -> int:
        return int(re.findall(r"master pid (\d+)", self.proc.logs())[-1])


class StartRouter(Protocol):
    def __call__(self, *extra: str, mode: str = ..., etcd_url: str | None = ...,
                 port: int | None = ..., config: Path | None = ...,
                 wait: str | None = ...) -> Router: ...


@pytest.fixture
def router(registrar: RegistrarFactory, scope: Scope, service: str,
           tmp_path: Path) -> StartRouter:
    """Starts `registrar haproxy` for this test's service; returns a Router."""

    def start(*extra: str, mode: str = "http", etcd_url: str | None = None,
              port: int | None = None, config: Path | None = None,
              wait: str | None = "haproxy started") -> Router:
        port = port or free_port()
        flag, metrics_port = metrics_flag()
        config = config or tmp_path / "haproxy.cfg"
        proc = registrar(["haproxy", "--etcd", etcd_url or scope.etcd_url, "--prefix",
                          scope.prefix, "--bind", f"{service}=127.0.0.1:{port}", "--mode", mode,
                          "--config", str(config), *flag, *extra])
        if wait:
            proc.wait_for_log(wait, timeout=15)
        return Router(proc, port, metrics_port, config)

    return start


def labels(service: str) -> dict[str, str]:
    return {"registrar.service": service}


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)


# --- traffic --------------------------------------------------------------------------------


def test_a_started_container_gets_traffic_and_two_instances_share_it(
    scope: Scope, service: str, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory, etcd_reader: EtcdReader,
) -> None:
    # Values no router can use are skipped and counted; the rest still routes.
    etcd_reader.put(f"{scope.prefix}/{service}/bad-json", "not json")
    etcd_reader.put(f"{scope.prefix}/{service}/no-port", {"host": "127.0.0.1"})
    etcd_reader.put(f"{scope.prefix}/{service}/a-name", {"host": "example.com", "port": 80})
    agent()
    r = router()
    assert status(r.port) == 503  # a frontend with an empty backend
    assert healthz(r.metrics_port) == 200

    first = containers(labels=labels(service))
    r.serves(first)
    second = containers(labels=labels(service))
    r.serves(first, second)
    counts = r.bodies(20)
    assert set(counts.values()) == {10}  # round robin

    m = r.metrics()
    assert m[f'registrar_haproxy_backend_servers{{service="{service}"}}'] == 2
    assert m["registrar_haproxy_reloads_total"] == 0  # servers came in by the runtime API
    assert m["registrar_haproxy_runtime_updates_total"] >= 1
    assert m["registrar_haproxy_reload_failures_total"] == 0
    assert m["registrar_etcd_up"] == 1
    assert m['registrar_build_info{version="0.1.0"}'] == 1
    for reason in ("invalid_json", "missing_host_or_port", "invalid_host"):
        assert m[f'registrar_haproxy_invalid_registrations_total{{reason="{reason}"}}'] == 1

    # The installed config (it follows the runtime API) names both instances and is valid.
    lines = [f"server {scope.node}:{c.name}:8080 127.0.0.1:{c.port(8080)}"
             for c in (first, second)]
    wait_until(lambda: all(line in r.config.read_text() for line in lines), timeout=5)
    text = r.config.read_text()
    assert "example.com" not in text
    assert check(r.config).returncode == 0
    assert not [p for p in r.config.parent.iterdir() if p.name.endswith(".tmp")]


def test_docker_stop_under_load_fails_no_request(
    scope: Scope, service: str, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    agent()
    r = router()
    leaving = containers(labels=labels(service))
    staying = containers(labels=labels(service))
    r.serves(leaving, staying)

    with Load(r.port, seconds=30) as load:
        time.sleep(0.5)
        stop_started = time.monotonic()
        leaving.stop(timeout=3)  # httpd is PID 1 and ignores TERM: it serves 3 s, then KILL
        stopped = time.monotonic()
        time.sleep(0.5)
    answers, failures = load.answers, load.failures
    assert failures == [], failures[:5]
    assert len(answers) > 200
    assert stopped - stop_started > 2.5
    # Out of rotation at the kill event, long before the container died.
    last_leaving = max(t for t, body in answers if body == host_of(leaving))
    assert last_leaving - stop_started < 1.0
    assert {body for t, body in answers if t > stop_started + 1.0} == {host_of(staying)}
    assert r.metrics()["registrar_haproxy_reloads_total"] == 0


# --- etcd unreachable -----------------------------------------------------------------------


def test_etcd_cut_keeps_the_last_servers_and_catches_up_after(
    scope: Scope, service: str, etcd: EtcdServer, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory, forwarders: Forwarders,
) -> None:
    fwd = forwarders.etcd(etcd)
    agent()
    r = router(mode="tcp", etcd_url=fwd.url)
    first = containers(labels=labels(service))
    r.serves(first)

    fwd.cut()
    wait_until(lambda: r.metrics()["registrar_etcd_up"] == 0, timeout=5)
    second = containers(labels=labels(service))  # registered by the agent, unseen by the router
    for _ in range(5):
        assert r.bodies(10) == Counter({host_of(first): 10})
        time.sleep(0.2)
    assert healthz(r.metrics_port) == 200
    assert r.metrics()[f'registrar_haproxy_backend_servers{{service="{service}"}}'] == 1

    fwd.restore()
    r.serves(first, second)
    wait_until(lambda: r.metrics()["registrar_etcd_up"] == 1, timeout=5)


def test_haproxy_starts_from_the_existing_config_when_etcd_is_unreachable(
    scope: Scope, service: str, etcd: EtcdServer, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory, forwarders: Forwarders,
) -> None:
    agent()
    first = containers(labels=labels(service))
    before = router()
    before.serves(first)
    assert before.proc.stop(20) == 0

    fwd = forwarders.etcd(etcd)
    fwd.cut()
    after = router(etcd_url=fwd.url, port=before.port, config=before.config)
    assert "starting HAProxy from the existing" in after.proc.logs()
    after.serves(first)  # the last known servers, from the file
    second = containers(labels=labels(service))
    fwd.restore()
    after.serves(first, second)
    # It could not know what the file held: the first update was a reload.
    assert after.metrics()["registrar_haproxy_reloads_total"] == 1


def test_a_compacted_revision_is_read_again_in_full(
    scope: Scope, service: str, etcd: EtcdServer, router: StartRouter, etcd_reader: EtcdReader,
    forwarders: Forwarders,
) -> None:
    fwd = forwarders.etcd(etcd)
    r = router(mode="tcp", etcd_url=fwd.url)
    key = f"{scope.prefix}/{service}/n:c{{}}:80"
    gauge = f'registrar_haproxy_backend_servers{{service="{service}"}}'
    etcd_reader.put(key.format(1), {"host": "127.0.0.1", "port": 20001})
    wait_until(lambda: r.metrics().get(gauge) == 1, timeout=5)

    fwd.cut()
    wait_until(lambda: r.metrics()["registrar_etcd_up"] == 0, timeout=5)
    etcd_reader.delete(key.format(1))
    etcd_reader.put(key.format(2), {"host": "127.0.0.1", "port": 20002})
    revision = etcd_reader.put(key.format(3), {"host": "127.0.0.1", "port": 20003})
    etcd_reader.compact(revision)
    fwd.restore()

    wait_until(lambda: r.metrics().get(gauge) == 2, timeout=15,
               message=lambda: r.proc.logs()[-2000:])
    wait_until(lambda: "127.0.0.1:20003" in r.config.read_text(), timeout=5)
    text = r.config.read_text()
    assert "127.0.0.1:20002" in text
    assert "127.0.0.1:20001" not in text
    assert "compacted" in r.proc.logs()


# --- bad configs ----------------------------------------------------------------------------


def test_a_template_with_a_syntax_error_is_refused_at_start(
    router: StartRouter, tmp_path: Path,
) -> None:
    template = tmp_path / "broken.j2"
    template.write_text("{% for b in backends %}\n")
    r = router("--template", str(template), wait=None)
    assert r.proc.wait(15) == 2
    lines = r.proc.logs().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("registrar: error: --template:"), lines
    assert not r.config.exists()


def test_a_config_that_fails_the_check_is_never_installed(
    service: str, agent: StartAgent, router: StartRouter, containers: ContainerFactory,
    tmp_path: Path,
) -> None:
    # A template that renders a config HAProxy refuses once a second server appears.
    template = tmp_path / "custom.j2"
    template.write_text(
        builtin_template_text()
        + "{% if backends[0].servers|length > 1 %}\nnot-a-keyword here\n{% endif %}\n"
    )
    agent()
    r = router("--template", str(template))
    first = containers(labels=labels(service))
    r.serves(first)
    assert r.metrics()["registrar_haproxy_reloads_total"] == 1  # --template: every change reloads
    good = r.config.read_text()

    containers(labels=labels(service))
    wait_until(lambda: r.metrics()["registrar_haproxy_reload_failures_total"] == 1, timeout=10)
    assert "refused by haproxy -c" in r.proc.logs()
    assert "not-a-keyword" in r.proc.logs()  # HAProxy's own words
    assert r.config.read_text() == good
    assert r.bodies(10) == Counter({host_of(first): 10})  # the old config keeps serving
    assert r.metrics()["registrar_haproxy_reloads_total"] == 1
    assert not [p for p in r.config.parent.iterdir() if p.name.endswith(".tmp")]


# --- debounce -------------------------------------------------------------------------------


def test_changes_close_together_are_one_reload(
    scope: Scope, service: str, router: StartRouter, etcd_reader: EtcdReader, tmp_path: Path,
) -> None:
    template = tmp_path / "copy.j2"  # any --template: every change is a reload
    template.write_text(builtin_template_text())
    r = router("--template", str(template))
    assert r.metrics()["registrar_haproxy_reloads_total"] == 0  # the first start is no reload
    gauge = f'registrar_haproxy_backend_servers{{service="{service}"}}'

    def put_all(indexes: range, gap: float) -> int:
        """Puts one key per index, `gap` apart; how many gaps came out longer than 90 ms (a
        slow etcd write), each of which may rightly start a batch of its own."""
        slow, last = 0, time.monotonic()
        for i in indexes:
            etcd_reader.put(f"{scope.prefix}/{service}/n:c{i}:80",
                            {"host": "127.0.0.1", "port": 20000 + i})
            now = time.monotonic()
            slow += now - last > 0.09
            last = now
            time.sleep(gap)
        return slow

    slow = put_all(range(10), 0.02)
    wait_until(lambda: r.metrics().get(gauge) == 10, timeout=5)
    time.sleep(0.5)
    assert 1 <= r.metrics()["registrar_haproxy_reloads_total"] <= 1 + slow

    # Changes that never pause are still applied within a second of arriving.
    before = r.metrics()["registrar_haproxy_reloads_total"]
    started = time.monotonic()
    slow = put_all(range(10, 40), 0.05)
    wait_until(lambda: r.metrics().get(gauge) == 40, timeout=5)
    elapsed = time.monotonic() - started
    reloads = r.metrics()["registrar_haproxy_reloads_total"] - before
    assert 2 <= reloads <= elapsed + 1 + slow, (reloads, elapsed, slow)


# --- the HAProxy process --------------------------------------------------------------------


def test_sigterm_stops_the_watcher_and_soft_stops_haproxy(
    service: str, agent: StartAgent, router: StartRouter, containers: ContainerFactory,
) -> None:
    agent()
    r = router("--log-format", "json", mode="tcp")
    c = containers(labels=labels(service))
    r.serves(c)
    master = r.master_pid()

    # A request in flight: connected through HAProxy, not finished yet.
    conn = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    conn.sendall(b"GET / HTTP/1.0\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    r.proc.terminate()
    # The listener closes at once; the open connection is served to its end.
    wait_until(lambda: status(r.port) == "ConnectionRefusedError", timeout=5)
    conn.sendall(b"\r\n")
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    conn.close()
    assert reply.startswith(b"HTTP/1.") and host_of(c).encode() in reply

    assert r.proc.wait(15) == 0
    assert time.monotonic() - started < 12
    with pytest.raises(ProcessLookupError):
        os.kill(master, 0)
    # Every line is one JSON object, HAProxy's own lines too.
    entries = [json.loads(line) for line in r.proc.logs().splitlines()]
    assert any(e["logger"] == "haproxy" and "Proxy" in e["message"] for e in entries)
    assert entries[-1]["message"] == "stopped"


def test_haproxy_dying_is_restarted_with_backoff_and_reported(
    service: str, agent: StartAgent, router: StartRouter, containers: ContainerFactory,
) -> None:
    agent()
    r = router()
    c = containers(labels=labels(service))
    r.serves(c)
    master = r.master_pid()
    worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])

    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(healthz(r.metrics_port))
            time.sleep(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        os.kill(worker, signal.SIGKILL)  # the master follows it (exit-on-failure)
        wait_until(lambda: len(re.findall("haproxy started", r.proc.logs())) == 2, timeout=15)
        r.serves(c)
    finally:
        done.set()
        thread.join(5)
    assert 503 in seen
    assert healthz(r.metrics_port) == 200
    assert r.master_pid() != master
    assert r.metrics()["registrar_haproxy_restarts_total"] == 1
    assert "haproxy exited with status" in r.proc.logs()


def test_reload_cmd_for_an_haproxy_managed_elsewhere(
    scope: Scope, service: str, router: StartRouter, etcd_reader: EtcdReader, tmp_path: Path,
) -> None:
    calls = tmp_path / "calls"
    r = router("--reload-cmd", f"echo reloaded >> {calls}", wait="read 0 keys")
    config = r.config
    wait_until(config.exists, timeout=10)
    wait_until(lambda: calls.exists() and calls.read_text().count("reloaded") == 1, timeout=5)
    etcd_reader.put(f"{scope.prefix}/{service}/n:c:80", {"host": "127.0.0.1", "port": 20000})
    wait_until(lambda: calls.read_text().count("reloaded") == 2, timeout=5)
    assert "server n:c:80 127.0.0.1:20000" in config.read_text()
    assert "stats socket" not in config.read_text()
    assert r.metrics()["registrar_haproxy_reloads_total"] == 2
    assert "haproxy started" not in r.proc.logs()  # it runs no HAProxy of its own
    assert healthz(r.metrics_port) == 200
    assert r.proc.stop(10) == 0



def test_promote_switches_every_request_without_a_failure(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    """The deploy's step four through HAProxy: promote v2, then roll back to v1, under load."""
    ctl = scope.prefix + "-ctl"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    r = router()
    v1 = [containers(labels={**labels(service), "registrar.version": "v1"}) for _ in range(2)]
    v2 = [containers(labels={**labels(service), "registrar.version": "v2"}) for _ in range(2)]
    r.serves(*v1, *v2)

    def promote(*args: str) -> tuple[float, float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "registrar", "promote", service, *args, "--etcd",
             scope.etcd_url, "--prefix", scope.prefix, "--control-prefix", ctl],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return started, time.monotonic()

    with Load(r.port, seconds=60) as load:
        time.sleep(0.5)
        _started, promoted = promote("v2")
        r.serves(*v2)
        switched_v2 = time.monotonic()
        time.sleep(1)
        rollback_started, rolled_back = promote("v1")
        r.serves(*v1)
        switched_v1 = time.monotonic()
        time.sleep(1)
    answers, failures = load.answers, load.failures
    assert failures == [], failures[:5]
    v1_hosts, v2_hosts = {host_of(c) for c in v1}, {host_of(c) for c in v2}
    assert {b for t, b in answers if switched_v2 < t < rollback_started} <= v2_hosts
    assert {b for t, b in answers if t > switched_v1} <= v1_hosts
    # HAProxy follows within its debounce (at most 1 s after the change).
    assert switched_v2 - promoted < 2 and switched_v1 - rolled_back < 2
    assert r.metrics()["registrar_haproxy_reloads_total"] == 0  # runtime API only


# --- the router heals itself, counts traffic by version, splits by weight -------------------


class Clients:
    """Several clients at once through HAProxy (a request hung on a frozen server holds up only
    its own client), each giving up after `timeout`: `answers` (time, body) and `failures`
    (time, error)."""

    def __init__(self, port: int, clients: int = 4, timeout: float = 2.0) -> None:
        self.port, self.timeout = port, timeout
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._done.is_set() and time.monotonic() < deadline:
            try:
                self.answers.append((time.monotonic(), get(self.port, self.timeout)))
            except Exception as exc:
                self.failures.append((time.monotonic(), repr(exc)[:80]))
            time.sleep(0.005)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(10)


def stats_socket(r: Router) -> str:
    from registrar.haproxy.process import socket_paths

    return socket_paths(str(r.config.parent), str(r.config))[1]


def server_rows(r: Router) -> dict[str, list[str]]:
    """`show servers state` of the running worker, by server name (fields as HAProxy gives)."""
    from registrar.haproxy.process import cli

    rows = {}
    for line in cli(stats_socket(r), "show servers state").splitlines():
        fields = line.split()
        if len(fields) > 18 and fields[0].isdigit():
            rows[fields[3]] = fields
    return rows


def slot_of(r: Router, container: Container) -> str:
    """The server slot that routes to `container` (by its published port)."""
    port = str(container.port(8080))
    return wait_until(lambda: next((name for name, f in server_rows(r).items()
                                    if f[18] == port and f[6] in ("0", "4")), None),
                      timeout=10, message=f"no slot for {container.name}")


def host_pid(container: Container) -> int:
    return int(container.state()["Pid"])


def test_a_frozen_server_leaves_rotation_in_2_s_and_comes_back_when_thawed(
    scope: Scope, service: str, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    agent()
    r = router()
    healthy, frozen = containers(labels=labels(service)), containers(labels=labels(service))
    r.serves(healthy, frozen)
    slot = slot_of(r, frozen)
    with Clients(r.port) as clients:
        time.sleep(1)
        froze = time.monotonic()
        os.kill(host_pid(frozen), signal.SIGSTOP)  # its key stands: only HAProxy can tell
        try:
            wait_until(lambda: server_rows(r)[slot][5] == "0", timeout=10,
                       message="the frozen server never left rotation")
            out_after = time.monotonic() - froze
            time.sleep(2.5)  # every client's hung request has given up by now
        finally:
            os.kill(host_pid(frozen), signal.SIGCONT)
        thawed = time.monotonic()
        wait_until(lambda: any(t > thawed and b == host_of(frozen) for t, b in clients.answers),
                   timeout=10, message="the thawed server takes no traffic")
        back_after = time.monotonic() - thawed
    failed = [f for f in clients.failures if f[0] > froze - 0.1]
    print(f"frozen server: out of rotation after {out_after:.2f} s, back {back_after:.2f} s "
          f"after thawing; {len(failed)} failed of {len(clients.answers)} requests")
    assert out_after < 3.0
    assert back_after < 3.0
    # each client lost at most the one request it had sent to the frozen server
    assert len(failed) <= 4, failed
    assert {b for t, b in clients.answers if froze + out_after + 0.1 < t < thawed} == {
        host_of(healthy)}


def test_a_server_that_refuses_connections_fails_no_request(
    scope: Scope, service: str, agent: StartAgent, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    agent()
    r = router()
    staying = containers(labels=labels(service))
    # httpd in the background, the container's PID 1 a shell: killing httpd leaves the
    # container running (its key stands) with nothing listening
    refusing = containers(labels=labels(service), command=[
        "sh", "-c", "hostname > /www/index.html && httpd -p 8080 -h /www && exec sleep 1d"])
    r.serves(staying, refusing)
    slot = slot_of(r, refusing)
    with Clients(r.port) as clients:
        time.sleep(1)
        killed = time.monotonic()
        docker_env_top = subprocess.run(["docker", "top", refusing.id, "-o", "pid,comm"],
                                        capture_output=True, text=True, check=True).stdout
        httpd = [int(line.split()[0]) for line in docker_env_top.splitlines()[1:]
                 if line.split()[1] == "httpd"]
        for pid in httpd:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: server_rows(r)[slot][5] == "0", timeout=10)
        out_after = time.monotonic() - killed
        time.sleep(1)
    failed = [f for f in clients.failures if f[0] > killed - 0.1]
    print(f"refusing server: out of rotation after {out_after:.2f} s; {len(failed)} failed "
          f"of {len(clients.answers)} requests")
    assert failed == []
    assert out_after < 2.5
    assert {b for t, b in clients.answers if t > killed + out_after + 0.1} == {host_of(staying)}


def test_traffic_by_version_is_counted_reported_and_survives_a_reload_from_outside(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory, etcd_reader: EtcdReader,
) -> None:
    ctl = scope.prefix + "-ctl"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    node = f"router-{scope.node}"
    r = router("--control-prefix", ctl, "--node", node, "--ttl", "3")
    v1 = containers(labels={**labels(service), "registrar.version": "v1"})
    v2 = containers(labels={**labels(service), "registrar.version": "v2"})
    r.serves(v1, v2)
    version_of = {host_of(v1): "v1", host_of(v2): "v2"}
    key = f"{ctl}/routers/{node}"
    base = json.loads(etcd_reader.get(key) or '{"services": {}}')["services"].get(service, {})

    def client_counts(n: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(n):
            seen[version_of[get(r.port)]] += 1
        return seen

    def reported() -> dict[str, int]:
        services = json.loads(etcd_reader.get(key) or "{}").get("services", {})
        return {v: services.get(service, {}).get(v, {}).get("2xx", 0)
                - base.get(v, {}).get("2xx", 0) for v in ("v1", "v2")}

    def matches(sent: Counter[str]) -> bool:
        got = reported()
        return all(abs(got[v] - sent[v]) <= max(2, 0.05 * sent[v]) for v in ("v1", "v2"))

    sent = client_counts(300)
    wait_until(lambda: matches(sent), timeout=8, message=lambda: f"{reported()} vs {sent}")
    report = json.loads(etcd_reader.get(key) or "{}")
    assert set(report) == {"at", "services", "mode", "applied", "in_flight", "latency"}
    assert report["mode"] == "http"  # the router's --mode: what a canary's latency rules need
    assert set(report["services"][service]["v1"]) == {
        "2xx", "3xx", "4xx", "5xx", "other", "tcp", "connection_errors"}
    assert etcd_reader.lease_id(key), "the report is bound to the router's lease"
    m = r.metrics()
    assert m[f'registrar_haproxy_responses_total{{code="2xx",service="{service}",'
             'version="v1"}'] >= sent["v1"]

    # A reload someone else makes (SIGUSR2 to the master): a new worker, counters at 0
    os.kill(r.master_pid(), signal.SIGUSR2)
    r.proc.wait_for_log("reloaded from outside", timeout=10)
    sent += client_counts(300)
    wait_until(lambda: matches(sent), timeout=8, message=lambda: f"{reported()} vs {sent}")
    # ... and its view of the servers is right: v1 leaving takes it out of rotation
    v1.stop(timeout=3)
    r.serves(v2)
    assert set(r.bodies(30)) == {host_of(v2)}
    assert r.metrics()["registrar_haproxy_outside_reloads_total"] >= 1
    assert r.proc.stop(15) == 0
    assert etcd_reader.get(key) is None  # its lease revoked: the report goes with the router


@pytest.mark.parametrize("each_side", [1, 3])
def test_weights_send_the_canary_its_share(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory, etcd_reader: EtcdReader, each_side: int,
) -> None:
    ctl = scope.prefix + "-ctl"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    r = router("--control-prefix", ctl)
    old = [containers(labels={**labels(service), "registrar.version": "v1"})
           for _ in range(each_side)]
    new = [containers(labels={**labels(service), "registrar.version": "v2"})
           for _ in range(each_side)]
    r.serves(*old, *new)
    new_hosts = {host_of(c) for c in new}
    slots = {slot_of(r, c) for c in new}

    def share(n: int = 1000) -> float:
        seen = r.bodies(n)
        return sum(v for body, v in seen.items() if body in new_hosts) / sum(seen.values())

    shares = {}
    for percent in (10, 50):
        etcd_reader.put(f"{ctl}/weights/{service}",
                        {"version": "v2", "percent": percent, "at": "2026-12-01T00:00:00Z"})
        model = [Server(f"o{i}", "127.0.0.1", i, f"o{i}", "v1") for i in range(each_side)] + [
            Server(f"n{i}", "127.0.0.1", i, f"n{i}", "v2") for i in range(each_side)]
        want = str(server_weights(model, Canary("v2", percent))["n0"])

        def weights_applied(w: str = want) -> bool:
            return {server_rows(r)[s][7] for s in slots} == {w}

        wait_until(weights_applied, timeout=10, message=r.proc.logs)
        shares[percent] = share()
        assert abs(shares[percent] * 100 - percent) <= 5, shares
    etcd_reader.delete(f"{ctl}/weights/{service}")
    wait_until(lambda: {server_rows(r)[s][7] for s in slots} == {"100"}, timeout=10)
    even = share(600)
    print(f"weights with {each_side} instance(s) a side: shares {shares}, after: {even:.3f}")
    assert abs(even - 0.5) <= 0.05
    assert r.metrics()["registrar_haproxy_reloads_total"] == 0  # runtime API only


def test_an_ipv6_host_is_dialled_as_such(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    port = free_port()
    agent = registrar([*scope.args("watch"), "--host-ip", "::1", "--explicit",
                       "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    r = router()
    six = containers(labels=labels(service), network="host", publish=False,
                     ports=(str(port),), detach_wait=False,
                     command=["sh", "-c", f"hostname > /www/index.html && exec httpd -f -p "
                              f"[::1]:{port} -h /www"])
    wait_until(lambda: "[::1]" in r.config.read_text(), timeout=10, message=r.proc.logs)
    assert f"[::1]:{port}" in r.config.read_text()
    wait_until(lambda: status(r.port) == 200, timeout=10, message=r.proc.logs)
    assert get(r.port) == socket.gethostname()  # a host-network container: the host's name
    six.remove()


def test_maintenance_under_load_fails_no_request_and_lifts_within_1_s(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory,
) -> None:
    ctl = scope.prefix + "-ctl"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    r = router()
    held, staying = containers(labels=labels(service)), containers(labels=labels(service))
    r.serves(held, staying)
    instance = f"{scope.node}:{held.name}:8080"

    def maint(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "registrar", "maint", *args, "--etcd", scope.etcd_url,
             "--prefix", scope.prefix, "--control-prefix", ctl], capture_output=True,
            text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    with Clients(r.port) as clients:
        time.sleep(0.5)
        enabled = time.monotonic()
        maint("enable", service, "--instance", instance, "--reason", "debugging")
        r.serves(staying)
        time.sleep(0.5)
        disabled = time.monotonic()
        maint("disable", service, "--instance", instance)
        wait_until(lambda: any(t > disabled and b == host_of(held)
                               for t, b in clients.answers), timeout=5)
        back_after = min(t for t, b in clients.answers
                         if t > disabled and b == host_of(held)) - disabled
    print(f"maintenance: 0 of {len(clients.answers)} failed; back {back_after:.2f} s after "
          "`maint disable` began")
    assert clients.failures == []
    assert back_after < 1.0 + 1.0  # the command's own start (~0.5 s) plus the SPEC's second
    assert enabled < disabled


@pytest.mark.parametrize("started", ["before", "after", "old worker busy"])
def test_traffic_after_a_reload_from_outside_is_counted_when_a_server_left_before_it(
    scope: Scope, service: str, registrar: RegistrarFactory, router: StartRouter,
    containers: ContainerFactory, etcd_reader: EtcdReader, started: str,
) -> None:
    """A promoted v2 (v1 on standby, through the agent and `registrar promote`), then SIGUSR2
    to the master: the v2 requests that follow are counted, in the metric and in the report
    (a canary judged after `systemctl reload haproxy` must see them). The router starts before
    the containers (their servers in spare slots) or after the promotion (v1 never routed), or
    before with a slow request open across the reload (the old worker lives on meanwhile)."""
    from tests.support.cgi_app import PATH, app

    ctl = scope.prefix + "-ctl"
    node = f"router-{scope.node}"
    agent = registrar([*scope.args("watch"), "--host-ip", "127.0.0.1", "--explicit",
                       "--control-prefix", ctl, "--metrics-addr", "127.0.0.1:0"])
    agent.wait_for_log("docker connected", timeout=15)
    r = router("--control-prefix", ctl, "--node", node, "--ttl", "3") if started != "after" \
        else None
    # `/` answers at once; the CGI at PATH after 6 s (to hold the old worker)
    v1 = containers(labels={**labels(service), "registrar.version": "v1"},
                    command=app("v1", delay=6))
    v2 = containers(labels={**labels(service), "registrar.version": "v2"},
                    command=app("v2", delay=6))
    if r is not None:
        r.serves(v1, v2)
    wait_until(lambda: len(etcd_reader.keys(f"{scope.prefix}/{service}/")) == 2, timeout=10)
    promoted = subprocess.run(
        [sys.executable, "-m", "registrar", "promote", service, "v2", "--etcd", scope.etcd_url,
         "--prefix", scope.prefix, "--control-prefix", ctl],
        capture_output=True, text=True, timeout=60)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    if r is None:
        r = router("--control-prefix", ctl, "--node", node, "--ttl", "3")
    r.serves(v2)
    key = f"{ctl}/routers/{node}"
    metric = (f'registrar_haproxy_responses_total{{code="2xx",service="{service}",'
              'version="v2"}')

    def reported() -> int:
        services = json.loads(etcd_reader.get(key) or "{}").get("services", {})
        return int(services.get(service, {}).get("v2", {}).get("2xx", 0))

    def timed() -> int:  # responses in the report's latency histogram (+Inf: every one)
        latency = json.loads(etcd_reader.get(key) or "{}").get("latency", {})
        return int(latency.get(service, {}).get("v2", [0] * 12)[11])

    histogram = (f'registrar_haproxy_response_seconds_count{{service="{service}",'
                 'version="v2"}')
    wait_until(lambda: reported() == r.metrics().get(metric, 0) > 0, timeout=8)
    wait_until(lambda: timed() == r.metrics().get(histogram, 0) > 0, timeout=8)
    before_report, before_metric = reported(), r.metrics()[metric]
    before_timed, before_histogram = timed(), r.metrics()[histogram]
    from registrar.haproxy.process import cli, socket_paths
    from registrar.haproxy.runtime import parse_show_proc

    master = socket_paths(str(r.config.parent), str(r.config))[0]

    def workers() -> tuple[int, ...]:
        try:
            info = parse_show_proc(cli(master, "show proc"))
        except OSError:  # the master re-executes itself during a reload
            return ()
        return info.workers if info is not None else ()

    old = workers()
    slow = threading.Thread(target=lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{r.port}{PATH}", timeout=15).read())
    if started == "old worker busy":
        slow.start()
        time.sleep(0.5)
    os.kill(r.master_pid(), signal.SIGUSR2)
    wait_until(lambda: workers() not in ((), old), timeout=10)
    sent = 180
    for _ in range(sent):  # at once: most before the router notices the reload
        assert get(r.port) == host_of(v2)
    r.proc.wait_for_log("reloaded from outside", timeout=10)
    wait_until(lambda: reported() - before_report >= sent
               and r.metrics()[metric] - before_metric >= sent, timeout=8,
               message=lambda: f"report +{reported() - before_report}, metric "
                               f"+{r.metrics()[metric] - before_metric} of {sent}; "
                               f"log:\n{r.proc.logs()[-3000:]}")
    if slow.is_alive() or started == "old worker busy":
        slow.join(15)
    assert reported() - before_report <= sent + 2
    # response times too, counted across the outside reload: every request, once (the slow
    # one as well, answered by the old worker)
    timed_sent = sent + (started == "old worker busy")
    wait_until(lambda: timed() - before_timed == timed_sent
               and r.metrics()[histogram] - before_histogram == timed_sent, timeout=8,
               message=lambda: f"latency +{timed() - before_timed}, histogram "
                               f"+{r.metrics()[histogram] - before_histogram} of {timed_sent}")
    latency = json.loads(etcd_reader.get(key) or "{}")["latency"][service]["v2"]
    assert len(latency) == 12 and latency == sorted(latency)  # cumulative, `le` style
    assert r.proc.stop(15) == 0


def test_the_report_says_what_is_applied_and_what_is_still_open_on_a_server_that_left(
    scope: Scope, service: str, router: StartRouter, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    """A request in flight on a slow instance (a CGI that sleeps 2 s) whose key is deleted:
    within 0.5 s the report has `applied` the delete and lists the request `in_flight`; once
    it is answered, within 0.5 s the entry is gone."""
    from tests.support.cgi_app import PATH, app

    ctl = scope.prefix + "-ctl"
    node = f"router-{scope.node}"
    r = router("--control-prefix", ctl, "--node", node, "--ttl", "3")
    slow = containers(labels={"role": "slow"}, command=app("v1", delay=2))
    instance = f"{scope.node}:{slow.name}:8080"
    key = f"{scope.prefix}/{service}/{instance}"
    etcd_reader.put(key, {"host": "127.0.0.1", "port": slow.port(8080), "version": "v1"})
    r.serves(slow)
    report_key = f"{ctl}/routers/{node}"

    def report() -> dict[str, object]:
        return dict(json.loads(etcd_reader.get(report_key) or "{}"))

    wait_until(lambda: report().get("in_flight") == {}, timeout=5)
    answered: list[float] = []
    body: list[str] = []

    def slow_request() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.port}{PATH}", timeout=10) as got:
            body.append(got.read().decode().strip())
        answered.append(time.monotonic())

    client = threading.Thread(target=slow_request)
    client.start()
    time.sleep(0.5)  # the request is with the CGI now
    etcd_reader.delete(key)
    deleted_at, revision = time.monotonic(), etcd_reader.revision()
    wait_until(lambda: int(str(report().get("applied", 0))) >= revision
               and report().get("in_flight") == {service: {instance: 1}}, timeout=3,
               interval=0.02, message=lambda: f"{report()} (delete at revision {revision})")
    reported_after = time.monotonic() - deleted_at
    client.join(10)
    assert body == ["v1"]  # a server set to maint finishes what it has open
    wait_until(lambda: report().get("in_flight") == {}, timeout=3, interval=0.02,
               message=lambda: str(report()))
    dropped_after = time.monotonic() - answered[0]
    print(f"report: applied and in flight {reported_after:.2f} s after the delete, in_flight "
          f"empty {dropped_after:.2f} s after the answer")
    assert reported_after < 0.5 + 0.1  # the SPEC's 0.5 s, plus this test's own reads
    assert dropped_after < 0.5 + 0.1
    assert r.proc.stop(15) == 0


def test_a_frozen_server_costs_no_get_and_no_post_is_sent_twice(
    scope: Scope, service: str, router: StartRouter, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    """Layer-7 retries: with --response-timeout (0.5 s) below the clients' timeout (2 s), a
    server frozen with requests in flight (`docker pause`) costs no GET it had not begun to
    answer: each is retried on the other server; a POST is never retried, so each reaches the
    servers at most once (those answered exactly once)."""
    from tests.support.cgi_app import PATH, POSTS, counting_app

    r = router("--response-timeout", "0.5")
    servers = [containers(labels={"role": "app"}, command=counting_app("v1")) for _ in range(2)]
    for c in servers:
        etcd_reader.put(f"{scope.prefix}/{service}/{scope.node}:{c.name}:8080",
                        {"host": "127.0.0.1", "port": c.port(8080), "version": "v1"})
    r.serves(*servers)
    frozen = servers[1]
    posts: list[tuple[int, int | str]] = []  # (id, status)
    stop = threading.Event()

    def post_loop() -> None:
        for n in range(100_000):
            if stop.is_set():
                return
            request = urllib.request.Request(f"http://127.0.0.1:{r.port}{PATH}?p{n}",
                                             data=b"x", method="POST")
            try:
                with urllib.request.urlopen(request, timeout=2) as got:
                    posts.append((n, got.status))
            except urllib.error.HTTPError as exc:
                posts.append((n, exc.code))
            except OSError as exc:
                posts.append((n, type(exc).__name__))
            time.sleep(0.01)

    poster = threading.Thread(target=post_loop)
    with Clients(r.port, clients=6) as clients:
        poster.start()
        time.sleep(1)
        froze = time.monotonic()
        subprocess.run(["docker", "pause", frozen.id], check=True, capture_output=True)
        try:
            time.sleep(3)
        finally:
            subprocess.run(["docker", "unpause", frozen.id], check=True, capture_output=True)
        time.sleep(1.5)
        stop.set()
        poster.join(10)
    time.sleep(1)  # a POST the frozen server held is answered (once) after the thaw

    def received(c: Container) -> list[str]:
        out = subprocess.run(["docker", "exec", c.id, "cat", POSTS], capture_output=True,
                             text=True)
        return out.stdout.split()

    seen = Counter(received(servers[0]) + received(servers[1]))
    answered = [n for n, code in posts if code == 200]
    failed_gets = [f for f in clients.failures if f[0] > froze - 0.1]
    # A GET whose answer the server had begun when it froze (status line and headers already
    # passed to the client, the body not) cannot be retried by any proxy: HAProxy retries only
    # a request with no answer yet. busybox httpd writes a file's headers and body apart, so a
    # pause can land between them (seen once in CI). Each client has one request in flight.
    truncated = [f for f in failed_gets if f[1].startswith("IncompleteRead(")]
    print(f"frozen server with layer-7 retries: {len(failed_gets)} failed GETs of "
          f"{len(clients.answers)} ({len(truncated)} cut mid-answer); POSTs: {len(posts)} sent, "
          f"{len(answered)} answered 200, {sum(seen.values())} received by the servers, "
          f"{Counter(str(code) for _, code in posts)}")
    assert [f for f in failed_gets if f not in truncated] == []
    assert len(truncated) <= 6
    assert len(answered) > 50
    assert max(seen.values()) == 1, [p for p, k in seen.items() if k > 1]  # never twice
    assert all(seen[f"p{n}"] == 1 for n in answered)  # answered: received exactly once
    assert r.proc.stop(15) == 0
