"""Checker: the one health-check thread, against real sockets of this test process.

Nothing here sleeps to synchronise: tests wait for on_change calls (recorded with the time and
the port's status at that moment), for counters a server keeps, or for a status to change.
Intervals are short (0.2 s) so the whole file takes a few seconds.

`python -m tests.test_checker [--http] [SECONDS]` measures the CPU and RSS cost of 100 checked
ports at the default interval (the number quoted in the report).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from registrar.agent.checker import Checker, CheckStatus, Target, targets_of
from registrar.core.checks import CheckSpec
from registrar.core.naming import Registration
from registrar.metrics import Metrics

LOCAL = "127.0.0.1"
TCP = CheckSpec("tcp", None, interval=0.2, timeout=0.1, rise=1, fall=1)
WAIT = 5.0  # the longest any wait below may take before the test fails


def wait_until(condition: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """The first truthy condition(), polled every 2 ms (a counter, not a sleep-and-hope)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.002)


class Changes:
    """The checker's on_change calls: (time, container id, its ports' statuses then)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: list[tuple[float, str, dict[str, CheckStatus | None]]] = []
        self.checker: Checker | None = None
        self.keys: dict[str, list[str]] = {}  # container id -> keys to snapshot

    def __call__(self, container_id: str) -> None:
        assert self.checker is not None
        snapshot = {key: self.checker.status(key) for key in self.keys.get(container_id, [])}
        with self._cond:
            self.calls.append((time.monotonic(), container_id, snapshot))
            self._cond.notify_all()

    def of(self, container_id: str) -> list[tuple[float, str, dict[str, CheckStatus | None]]]:
        with self._cond:
            return self.of_locked(container_id)

    def wait(self, container_id: str, count: int, timeout: float = WAIT) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.of_locked(container_id)) >= count,
                                     timeout)
            calls = self.of_locked(container_id)
        assert ok, f"{container_id}: {len(calls)} change(s), wanted {count}"
        return calls

    def of_locked(self, container_id: str) -> list[Any]:
        return [call for call in self.calls if call[1] == container_id]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def checker(changes: Changes, metrics: Metrics) -> Iterator[Checker]:
    checker = Checker(changes, metrics)
    changes.checker = checker
    checker.start()
    yield checker
    checker.request_stop()
    checker.join(time.monotonic() + 2)
    assert not checker.alive()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> float:
    """Checks every 0.1 s, below the 0.2 s a label may ask for: the tests that count many
    results take half as long, and each check keeps its 0.1 s timeout."""
    from registrar.core import checks

    monkeypatch.setattr(checks, "MIN_INTERVAL", 0.1)
    return 0.1


def status(checker: Checker, key: str) -> CheckStatus:
    found = checker.status(key)
    assert found is not None, f"no target {key}"
    return found


def results(checker: Checker, key: str) -> int:
    found = checker.status(key)
    return 0 if found is None else found.results


def checked(checker: Checker, key: str, count: int) -> CheckStatus:
    """The status of `key` once it has `count` results."""
    wait_until(lambda: results(checker, key) >= count, what=f"{count} results of {key}")
    return status(checker, key)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- servers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def listener(host: str = LOCAL) -> Iterator[socket.socket]:
    """Listens and never accepts: the kernel completes every handshake (a frozen process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(512)
    try:
        yield sock
    finally:
        sock.close()


def closed_port() -> int:
    with listener() as sock:
        port: int = sock.getsockname()[1]
    return port


class Acceptor:
    """Accepts connections, counts them and reads what they send; answers nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.cond = threading.Condition()
        self.accepted = 0
        self.requests = 0  # connections that sent a request (and were never answered)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                self.held.append(conn)
                self.cond.notify_all()
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                if conn.recv(1024):
                    with self.cond:
                        self.requests += 1
                        self.cond.notify_all()

    def wait(self, what: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(what, WAIT)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@contextlib.contextmanager
def acceptor() -> Iterator[Acceptor]:
    with listener() as sock:
        server = Acceptor(sock)
        try:
            yield server
        finally:
            server.close()


class ScriptedHTTP(ThreadingHTTPServer):
    """Answers the next status of `script`, then `status`; records each request's Host."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, 0), _Handler)
        self.lock = threading.Lock()
        self.script: list[int] = []
        self.status = 200
        self.hosts: list[str] = []
        self.paths: list[str] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def answer(self, path: str, host: str) -> int:
        with self.lock:
            self.paths.append(path)
            self.hosts.append(host)
            return self.script.pop(0) if self.script else self.status


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedHTTP

    def do_GET(self) -> None:
        code = self.server.answer(self.path, self.headers.get("Host", ""))
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(host: str = LOCAL) -> Iterator[ScriptedHTTP]:
    server = ScriptedHTTP(host)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def ipv6_loopback() -> bool:
    try:
        with listener("::1"):
            return True
    except OSError:
        return False


# --- TCP ---------------------------------------------------------------------------------------


def test_a_listening_port_passes_and_enters_rotation_at_once(
    checker: Checker, changes: Changes, metrics: Metrics
) -> None:
    with listener() as sock:
        port = sock.getsockname()[1]
        assert not checker.passing("k")
        changes.keys["a"] = ["k"]
        slow = CheckSpec("tcp", None, interval=1.0, timeout=0.5, rise=1, fall=1)
        added = time.monotonic()
        checker.set_targets("a", {"k": Target(LOCAL, port, slow)})
        (when, cid, snapshot), = changes.wait("a", 1)
        assert cid == "a"
        assert when - added < 0.25  # the first check runs as soon as the port is added
        assert snapshot == {"k": CheckStatus(True, 1, True, "connected")}
        assert checker.passing("k")
        assert sample(metrics, "registrar_check_results_total", result="pass") >= 1
        assert sample(metrics, "registrar_failing_checks") == 0


def test_a_closed_port_fails_refused_and_stays_out(
    checker: Checker, changes: Changes, metrics: Metrics
) -> None:
    checker.set_targets("a", {"k": Target(LOCAL, closed_port(), TCP)})
    got = checked(checker, "k", 2)
    assert got.last_passed is False and got.reason == "refused"
    assert not checker.passing("k")
    assert changes.of("a") == []  # it never was in rotation: nothing changed
    assert sample(metrics, "registrar_check_results_total", result="fail") >= 2
    assert sample(metrics, "registrar_failing_checks") == 1


def test_a_host_that_is_not_an_address_fails_without_a_lookup(checker: Checker) -> None:
    checker.set_targets("a", {"k": Target("localhost", 80, TCP)})
    got = checked(checker, "k", 1)
    assert got.reason == "host is not an IP address" and not got.in_rotation


def test_a_port_number_out_of_range_fails(checker: Checker) -> None:
    checker.set_targets("a", {"k": Target(LOCAL, 70000, TCP)})
    assert checked(checker, "k", 1).reason == "not a port number"


def test_no_socket_to_check_with_is_no_result(
    checker: Checker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    fast: float,
) -> None:
    """Out of file descriptors is registrar's trouble: the port is not taken out for it."""
    spec = CheckSpec("tcp", None, interval=fast, timeout=0.1, rise=1, fall=1)
    with listener() as sock:
        checker.set_targets("a", {"k": Target(LOCAL, sock.getsockname()[1], spec)})
        wait_until(lambda: checker.passing("k"))
        attempts = []

        def no_descriptors(*args: Any, **kwargs: Any) -> socket.socket:
            attempts.append(args)
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(socket, "socket", no_descriptors)  # the checker's next socket
        before = results(checker, "k")
        wait_until(lambda: len(attempts) >= 3)
        assert checker.passing("k") and results(checker, "k") <= before + 1
        monkeypatch.undo()
        wait_until(lambda: results(checker, "k") >= before + 2)
        assert checker.passing("k")
    warnings = [r for r in caplog.records if "cannot open a socket" in r.getMessage()]
    assert len(warnings) == 1


# --- HTTP ----------------------------------------------------------------------------------------


def test_http_rise_and_fall_counts(
    checker: Checker, changes: Changes, caplog: pytest.LogCaptureFixture, fast: float
) -> None:
    spec = CheckSpec("http", "/health?deep=1", interval=fast, timeout=0.1, rise=2, fall=2)
    caplog.set_level(logging.INFO, logger="registrar.agent.checker")
    with http_server() as server:
        # P P F P F F F P P: in after the 2nd result, out after the 6th, in after the 9th
        server.script = [200, 204, 503, 302, 500, 503, 404, 200, 200]
        changes.keys["a"] = ["k"]
        checker.set_targets("a", {"k": Target(LOCAL, server.port, spec)})
        calls = changes.wait("a", 3)
    statuses = [call[2]["k"] for call in calls]
    assert [(s.in_rotation, s.results, s.reason) for s in statuses] == [
        (True, 2, "HTTP 204"), (False, 6, "HTTP 503"), (True, 9, "HTTP 200"),
    ]
    assert set(server.paths) == {"/health?deep=1"}
    assert set(server.hosts) == {f"{LOCAL}:{server.port}"}
    # one log line per change of rotation, not one per check
    lines = [r.getMessage() for r in caplog.records if r.name == "registrar.agent.checker"]
    assert len(lines) == 3, lines
    assert "out of rotation" in lines[1] and "HTTP 503" in lines[1]
    assert "in rotation" in lines[2]


def test_http_passing_then_failing_then_passing(
    checker: Checker, changes: Changes, metrics: Metrics, fast: float
) -> None:
    spec = CheckSpec("http", "/", interval=fast, timeout=0.1, rise=1, fall=2)
    with http_server() as server:
        checker.set_targets("a", {"k": Target(LOCAL, server.port, spec)})
        changes.wait("a", 1)
        assert checker.passing("k")
        server.status = 503  # the file removed
        changes.wait("a", 2)
        assert not checker.passing("k") and status(checker, "k").reason == "HTTP 503"
        assert sample(metrics, "registrar_failing_checks") == 1
        server.status = 200
        changes.wait("a", 3)
        assert checker.passing("k")
        assert sample(metrics, "registrar_failing_checks") == 0


def test_a_port_that_is_not_http_fails(checker: Checker) -> None:
    spec = CheckSpec("http", "/", interval=0.2, timeout=0.15, rise=1, fall=1)
    with listener() as sock:
        sock.settimeout(WAIT)
        checker.set_targets("a", {"k": Target(LOCAL, sock.getsockname()[1], spec)})
        conn, _ = sock.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            got = checked(checker, "k", 1)
        assert got.reason == "not an HTTP answer"
        conn2, _ = sock.accept()
        with conn2:
            conn2.settimeout(WAIT)
            assert conn2.recv(1024).startswith(b"GET / HTTP/1.0\r\n")
        # closed after reading the request, before answering
        wait_until(lambda: status(checker, "k").reason == "closed without an answer")


# --- what hangs holds up nothing else ---------------------------------------------------------


def test_a_hanging_check_fails_at_its_timeout_and_holds_up_no_other(
    checker: Checker, changes: Changes
) -> None:
    hang_spec = CheckSpec("http", "/", interval=1.0, timeout=0.5, rise=1, fall=1)
    with acceptor() as hang, listener() as good:
        checker.set_targets("hang", {"h": Target(LOCAL, hang.port, hang_spec)})
        hang.wait(lambda: hang.requests >= 1)  # connected and asked: now it hangs
        hung_at = time.monotonic()
        checker.set_targets("good", {"g": Target(LOCAL, good.getsockname()[1], TCP)})
        (entered, _, _), = changes.wait("good", 1)
        assert entered - hung_at < 0.25, "a new port waited for the hanging check"
        got = checked(checker, "h", 1)
        failed = time.monotonic()
        assert got.reason == "timeout (no answer)" and not got.in_rotation
        assert 0.4 <= failed - hung_at <= 0.7, failed - hung_at
        # meanwhile the good port kept its own rhythm (0.2 s) through the hang
        assert results(checker, "g") >= 2
        assert checker.passing("g")


def test_a_frozen_process_fails_an_http_check_by_timeout(checker: Checker) -> None:
    # kill -STOP: the kernel still completes handshakes, nobody reads the request
    spec = CheckSpec("http", "/", interval=0.3, timeout=0.2, rise=1, fall=1)
    with listener() as frozen:
        started = time.monotonic()
        checker.set_targets("a", {"k": Target(LOCAL, frozen.getsockname()[1], spec)})
        got = checked(checker, "k", 1)
        assert got.reason == "timeout (no answer)"
        assert 0.15 <= time.monotonic() - started <= 0.5


def test_many_ports_one_thread(checker: Checker, changes: Changes) -> None:
    threads = threading.active_count() + 1  # the checker's own, started with its first port
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(listener()) for _ in range(50)]
        checker.set_targets("a", {f"k{i}": Target(LOCAL, s.getsockname()[1], TCP)
                                  for i, s in enumerate(socks)})
        wait_until(lambda: all(checker.passing(f"k{i}") for i in range(50)))
        assert threading.active_count() == threads
        assert len(changes.of("a")) == 50


# --- set_targets and forget -------------------------------------------------------------------


def test_forget_stops_the_checks_at_once(
    checker: Checker, changes: Changes, metrics: Metrics, fast: float
) -> None:
    tcp = CheckSpec("tcp", None, interval=fast, timeout=0.1, rise=1, fall=1)
    with acceptor() as server, listener() as other:
        checker.set_targets("a", {"k": Target(LOCAL, server.port, tcp)})
        server.wait(lambda: server.accepted >= 2)
        checker.set_targets("b", {"s": Target(LOCAL, closed_port(), tcp)})
        wait_until(lambda: results(checker, "s") >= 1)
        assert sample(metrics, "registrar_failing_checks") == 1
        checker.forget("a")
        assert not checker.passing("k") and checker.status("k") is None
        assert sample(metrics, "registrar_failing_checks") == 1
        with server.cond:
            at_forget = server.accepted
        # a sentinel with the same interval: after 3 of its checks, "a" would have had 2
        checker.set_targets("c", {"c": Target(LOCAL, other.getsockname()[1], tcp)})
        wait_until(lambda: results(checker, "c") >= 3)
        with server.cond:
            assert server.accepted <= at_forget + 1  # at most one connect was under way
        checker.forget("b")
        checker.forget("c")
        assert sample(metrics, "registrar_failing_checks") == 0


def test_set_targets_keeps_the_state_of_unchanged_targets(
    checker: Checker, changes: Changes, fast: float
) -> None:
    spec = CheckSpec("tcp", None, interval=fast, timeout=0.1, rise=3, fall=1)
    with listener() as one, listener() as two:
        port1, port2 = one.getsockname()[1], two.getsockname()[1]
        checker.set_targets("a", {"k1": Target(LOCAL, port1, spec)})
        changes.wait("a", 1)
        before = results(checker, "k1")
        assert before >= 3
        # a resync: equal targets (new objects) and one more: k1 stays in rotation
        checker.set_targets("a", {"k1": Target(LOCAL, port1, CheckSpec("tcp", None, fast, 0.1,
                                                                         3, 1)),
                                  "k2": Target(LOCAL, port2, spec)})
        assert checker.passing("k1") and results(checker, "k1") >= before
        assert not checker.passing("k2")
        changes.wait("a", 2)  # k2 in, after its own 3 passes
        assert checker.passing("k2") and checker.passing("k1")
        # a changed spec starts over; a key left out is dropped
        checker.set_targets("a", {"k1": Target(LOCAL, port1, spec), "k2": Target(
            LOCAL, port2, CheckSpec("tcp", None, fast + 0.05, 0.1, 3, 1))})
        assert checker.passing("k1") and not checker.passing("k2")
        restarted = checker.status("k2")  # its first check may have run already
        assert restarted is not None and not restarted.in_rotation and restarted.results < 3
        changes.wait("a", 3)
        checker.set_targets("a", {"k2": Target(LOCAL, port2, spec)})
        assert checker.status("k1") is None and not checker.passing("k1")


def test_a_key_belongs_to_the_last_container_that_named_it(checker: Checker) -> None:
    with listener() as sock:
        target = Target(LOCAL, sock.getsockname()[1], TCP)
        checker.set_targets("old", {"k": target})
        wait_until(lambda: checker.passing("k"))
        checker.set_targets("new", {"k": target})  # renamed: a new container took the name
        checker.forget("old")
        assert checker.status("k") is not None
        wait_until(lambda: checker.passing("k"))
        checker.forget("new")
        assert checker.status("k") is None


def test_targets_of_registrations() -> None:
    value = {"host": "fd00::5", "port": 32768}
    checked = Registration("/s/web/n:c:80", "web", "n:c:80", value, TCP)
    unchecked = Registration("/s/web/n:c:81", "web", "n:c:81", value)
    assert targets_of([checked, unchecked]) == {"/s/web/n:c:80": Target("fd00::5", 32768, TCP)}


# --- IPv6 ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_tcp_and_http(checker: Checker, changes: Changes) -> None:
    spec = CheckSpec("http", "/ready", interval=0.2, timeout=0.1, rise=1, fall=1)
    with listener("::1") as sock, http_server("::1") as server:
        checker.set_targets("a", {"t": Target("::1", sock.getsockname()[1], TCP),
                                  "h": Target("::1", server.port, spec)})
        wait_until(lambda: checker.passing("t") and checker.passing("h"))
        assert server.hosts[0] == f"[::1]:{server.port}"
        assert status(checker, "h").reason == "HTTP 200"
    wait_until(lambda: not checker.passing("t") and not checker.passing("h"))
    assert status(checker, "t").reason == "refused"


# --- the loop ----------------------------------------------------------------------------------


def test_stop_is_prompt_and_health_moves(changes: Changes) -> None:
    checker = Checker(changes)
    assert not checker.alive()
    checker.start()
    with listener() as sock:
        checker.set_targets("a", {"k": Target(LOCAL, sock.getsockname()[1], TCP)})
        wait_until(lambda: checker.passing("k"))
    assert checker.alive() and time.monotonic() - checker.health.last_progress < 1.5
    asked = time.monotonic()
    checker.request_stop()
    checker.join(asked + 2)
    assert not checker.alive() and time.monotonic() - asked < 0.5
    checker.set_targets("a", {})  # after the end: harmless
    checker.forget("a")


def test_an_on_change_that_raises_is_counted_and_checks_go_on(metrics: Metrics) -> None:
    def boom(container_id: str) -> None:
        raise RuntimeError("bug")

    checker = Checker(boom, metrics)
    checker.start()
    try:
        with listener() as one, listener() as two:
            checker.set_targets("a", {"k1": Target(LOCAL, one.getsockname()[1], TCP)})
            wait_until(lambda: sample(metrics, "registrar_internal_errors_total",
                                      loop="checker") >= 1)
            checker.set_targets("b", {"k2": Target(LOCAL, two.getsockname()[1], TCP)})
            wait_until(lambda: checker.passing("k2"))
            assert checker.alive()
    finally:
        checker.request_stop()
        checker.join(time.monotonic() + 2)


def test_the_cost_of_many_fast_checks_is_small(checker: Checker) -> None:
    """100 ports every 0.2 s (ten times the default rate): far from a busy loop."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(listener()) for _ in range(100)]
        checker.set_targets("a", {f"k{i}": Target(LOCAL, s.getsockname()[1], TCP)
                                  for i, s in enumerate(socks)})
        wait_until(lambda: all(checker.passing(f"k{i}") for i in range(100)))
        cpu, wall = time.process_time(), time.monotonic()
        first = sum(results(checker, f"k{i}") for i in range(100))
        wait_until(lambda: sum(results(checker, f"k{i}") for i in range(100))
                   >= first + 400)
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert share < 0.5, share


# --- the measurement behind the report -------------------------------------------------------

_HTTP_SERVERS = """
import asyncio, sys
async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.0 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
    await writer.drain()
    writer.close()
async def main():
    servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(100)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench(seconds: float, http: bool) -> None:
    """100 checked ports at the default interval (2 s): CPU of this process and RSS growth."""
    spec = CheckSpec("http", "/", 2.0, 1.0, 1, 2) if http else CheckSpec("tcp", None)
    with contextlib.ExitStack() as stack:
        if http:
            proc = subprocess.Popen([sys.executable, "-c", _HTTP_SERVERS],
                                    stdout=subprocess.PIPE, text=True)
            stack.callback(proc.kill)
            assert proc.stdout is not None
            ports = [int(p) for p in proc.stdout.readline().split()]
        else:
            ports = [stack.enter_context(listener()).getsockname()[1] for _ in range(100)]
        rss_before = _rss_kib()
        checker = Checker(lambda cid: None, Metrics())
        checker.start()
        checker.set_targets("bench", {f"k{i}": Target(LOCAL, port, spec)
                                      for i, port in enumerate(ports)})
        wait_until(lambda: all(checker.passing(f"k{i}") for i in range(100)))
        assert checker._thread is not None
        clock = time.pthread_getcpuclockid(checker._thread.ident or 0)
        cpu, thread_cpu, wall = time.process_time(), time.clock_gettime(clock), time.monotonic()
        first = sum(results(checker, f"k{i}") for i in range(100))
        threading.Event().wait(seconds)  # the measurement window itself
        wall = time.monotonic() - wall
        cpu = time.process_time() - cpu
        thread_cpu = time.clock_gettime(clock) - thread_cpu
        checks = sum(results(checker, f"k{i}") for i in range(100)) - first
        failed = sum(not checker.passing(f"k{i}") for i in range(100))
        rss_after = _rss_kib()
        checker.request_stop()
        checker.join(time.monotonic() + 2)
    kind = "http" if http else "tcp"
    print(f"{kind}: 100 ports, interval 2 s, {wall:.1f} s: {checks} checks, {failed} out; "
          f"process CPU {cpu * 1000:.0f} ms = {100 * cpu / wall:.2f} % of one core; "
          f"checker thread {100 * thread_cpu / wall:.2f} %; "
          f"RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB "
          f"(+{(rss_after - rss_before) / 1024:.2f} MiB); pid {os.getpid()}")


if __name__ == "__main__":
    args = sys.argv[1:]
    bench(float(next((a for a in args if not a.startswith("--")), "10")), "--http" in args)
