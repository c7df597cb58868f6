"""Checker: registrar's own health checks of registered ports, every one on one thread.

The watcher says what to check; the checker dials, counts rise and fall (`core.checks`), and
says when a port enters or leaves rotation. It decides nothing about keys: the watcher asks
`passing(key)` when it computes a container's keys on its one consumer thread.

    checker = Checker(on_change=lambda cid: queue.put(Recheck(cid)), metrics=metrics)
    checker.start()
    # in the watcher's _update, for a serving container that is not stopping:
    checker.set_targets(info.id, targets_of(outcome.registrations))
    keys = {r.key: ... for r in outcome.registrations
            if r.check is None or checker.passing(r.key)}
    # when it starts stopping, stops serving, is rejected or is gone:
    checker.forget(info.id)
    # shutdown
    checker.request_stop(); checker.join(deadline)

- `set_targets(container_id, {key: Target})` replaces that container's targets. A target whose
  host, port and spec did not change keeps its state and schedule (a resync must not take a
  port out of rotation); a new or changed one starts out of rotation and is checked at once.
  A key belongs to one container: the last `set_targets` naming it wins.
- `forget(container_id)` drops its targets at once: `passing()` is False for them as soon as
  it returns, and no result of a check already in flight is counted.
- `passing(key)`: whether that port is in rotation by its check right now (False for a key
  without a target, and until `rise` passes in a row).
- `on_change(container_id)` is called on the checker's thread, after the state changed, when
  one of that container's ports enters or leaves rotation. It must not block (put an item on
  a queue). It may come once more for a container just forgotten; recomputing is harmless.
- `status(key)`: the last result and its reason, for logs and tests.

How: one thread, non-blocking sockets under one `selectors` selector, and a heap of due
times. A check that hangs (a server that accepts and never answers, a frozen process) is one
socket more in the selector until its timeout, when it fails: it holds up no other check and
nothing outside this thread. Checks dial the registered numeric host (IPv4 or IPv6, never a
name lookup, which could block the thread). A port's next check starts `interval` after its
previous one started (or at once, if the thread fell behind). An error opening a socket (no
file descriptors left) is registrar's problem, not the port's: it counts as no result.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from registrar.core.checks import (
    INITIAL,
    NOT_HTTP,
    CheckState,
    Target,
    after,
    http_request,
    http_status,
    in_rotation,
)
from registrar.core.naming import Registration
from registrar.metrics import Metrics
from registrar.worker import Worker

__all__ = ["CheckStatus", "Checker", "Target", "targets_of"]

log = logging.getLogger(__name__)

IDLE_WAKE = 1.0  # the thread notes progress at least this often (for /healthz)
ERROR_PAUSE = 0.1  # after an unexpected error in the loop, so a bug cannot spin a core
RECV_BYTES = 1024
# registrar's own shortage (descriptors, local ports, memory), not the port's fault
_LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EAGAIN, errno.EADDRNOTAVAIL})
_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


def targets_of(registrations: Iterable[Registration]) -> dict[str, Target]:
    """The check targets of a container's registrations: its checked ports, by key."""
    return {
        r.key: Target(str(r.value["host"]), int(r.value["port"]), r.check)
        for r in registrations if r.check is not None
    }


@dataclass(frozen=True)
class CheckStatus:
    in_rotation: bool
    results: int  # checks finished since the target was set
    last_passed: bool | None  # None before the first result
    reason: str  # of the last result: "connected", "HTTP 503", "refused", "timeout (...)"


class _Port:
    """One target and its state (guarded by the checker's lock)."""

    __slots__ = ("address", "container_id", "due", "key", "last_passed", "probing", "reason",
                 "results", "state", "target")

    def __init__(self, key: str, container_id: str, target: Target) -> None:
        self.key = key
        self.container_id = container_id
        self.target = target
        self.state: CheckState = INITIAL
        self.results = 0
        self.last_passed: bool | None = None
        self.reason = ""
        self.due = 0.0
        self.probing = False
        self.address: tuple[socket.AddressFamily, Any] | None = None  # family, sockaddr


class _Probe:
    """One check in flight (the checker thread's alone)."""

    __slots__ = ("deadline", "port", "received", "settling", "sock", "started", "to_send")

    def __init__(self, port: _Port, sock: socket.socket, started: float) -> None:
        self.port = port
        self.sock = sock
        self.started = started
        self.deadline = started + port.target.spec.timeout
        self.to_send: bytes | None = None  # None: still connecting
        self.received = b""
        self.settling = False  # tcp: connected, watching that the peer does not close at once


TCP_SETTLE = 0.1  # a TCP check passes once the connection stayed open this long (or data came)


def _reason(code: int) -> str:
    return _REASONS.get(code) or os.strerror(code).lower()


class Checker(Worker):
    def __init__(self, on_change: Callable[[str], None], metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        super().__init__("checker", self._count_error)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._ports: dict[str, _Port] = {}  # key -> port
        self._by_container: dict[str, dict[str, _Port]] = {}
        self._heap: list[tuple[float, int, _Port]] = []
        self._seq = itertools.count()
        self._dropped = False  # a port was forgotten or replaced: close its probe, if any
        self._probes: dict[int, _Probe] = {}  # fd -> probe; the thread's alone
        self._shortage = False  # out of sockets: said once, until one opens again
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._may_start = False  # start() was called: the thread starts with the first port
        self._started = False  # its thread was started (it is started once)

    # --- the interface ------------------------------------------------------------------

    def set_targets(self, container_id: str, targets: Mapping[str, Target]) -> None:
        now = time.monotonic()
        with self._lock:
            old = self._by_container.pop(container_id, {})
            ports: dict[str, _Port] = {}
            for key, target in targets.items():
                port = old.get(key)
                if port is None or port.target != target:
                    other = self._ports.get(key)
                    if other is not None and other.container_id != container_id:
                        self._by_container.get(other.container_id, {}).pop(key, None)
                    port = self._ports[key] = _Port(key, container_id, target)
                    self._schedule(port, now)
                ports[key] = port
            for key, port in old.items():
                if ports.get(key) is not port:
                    self._dropped = True
                    if self._ports.get(key) is port:
                        del self._ports[key]
            if ports:
                self._by_container[container_id] = ports
            self._count_failing()
            self._wake()
        if targets:
            self._start_thread()

    def forget(self, container_id: str) -> None:
        with self._lock:
            ports = self._by_container.pop(container_id, {})
            for key, port in ports.items():
                if self._ports.get(key) is port:
                    del self._ports[key]
            if ports:
                self._dropped = True
                self._count_failing()
                self._wake()

    def passing(self, key: str) -> bool:
        with self._lock:
            port = self._ports.get(key)
            return port is not None and in_rotation(port.state)

    def status(self, key: str) -> CheckStatus | None:
        with self._lock:
            port = self._ports.get(key)
            if port is None:
                return None
            return CheckStatus(in_rotation(port.state), port.results, port.last_passed,
                               port.reason)

    def start(self) -> None:
        """The thread starts with the first port to check: most containers have none, and a
        sidecar's is then one thread fewer."""
        self._may_start = True
        with self._lock:
            needed = bool(self._ports)
        if needed:
            self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._started or not self._may_start or self.stopping:
                return
            self._started = True
        super().start()

    def wake(self) -> None:
        with self._lock:
            self._wake()

    def alive(self) -> bool:
        """Running, or started and not needed yet (no port to check so far)."""
        if self._thread is None:
            return self._may_start and not self.stopping
        return self._thread.is_alive()

    def _count_error(self, loop: str) -> None:
        if self._metrics is not None:
            self._metrics.internal_errors.labels(loop=loop).inc()

    # --- under the lock -----------------------------------------------------------------

    def _schedule(self, port: _Port, due: float) -> None:
        port.due = due
        heapq.heappush(self._heap, (due, next(self._seq), port))

    def _current(self, due: float, port: _Port) -> bool:
        return self._ports.get(port.key) is port and port.due == due and not port.probing

    def _count_failing(self) -> None:
        if self._metrics is not None:
            out = sum(1 for port in self._ports.values() if not in_rotation(port.state))
            self._metrics.failing_checks.set(out)

    def _wake(self) -> None:
        # full: the thread is woken already; closed: it has ended
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # --- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                try:
                    if not self._turn():
                        return
                    self.health.succeeded()
                except Exception:  # a bug: count it, keep checking
                    log.exception("health checker failed unexpectedly")
                    self.health.internal_error()
                    time.sleep(ERROR_PAUSE)
        finally:
            self._close()

    def _turn(self) -> bool:
        """One round: reap, time out, start what is due, wait for sockets. False: stop."""
        now = time.monotonic()
        with self._lock:
            if self.stopping:
                return False
            if self._dropped:
                self._dropped = False
                self._reap()
            due = self._take_due(now)
        for probe in [p for p in self._probes.values() if p.deadline <= now]:
            if probe.settling:  # connected, and the peer kept the connection: it listens
                self._finish(probe, True, "connected")
                continue
            phase = "connecting" if probe.to_send is None else "no answer"
            self._finish(probe, False, f"timeout ({phase})")
        for port in due:
            self._begin(port, now)
        for key, _mask in self._selector.select(self._wait(time.monotonic())):
            if key.data is None:
                self._drain_wake()
                continue
            try:
                self._step(key.data)
            except Exception:
                # a bug: drop this check (no result, the next one is scheduled) and count it
                self._close_probe(key.data)
                self._record(key.data.port, key.data.started, None, "")
                raise
        return True

    def _reap(self) -> None:
        for probe in list(self._probes.values()):
            if self._ports.get(probe.port.key) is not probe.port:
                self._close_probe(probe)

    def _take_due(self, now: float) -> list[_Port]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, _seq, port = heapq.heappop(self._heap)
            if self._current(when, port):
                port.probing = True
                due.append(port)
        return due

    def _wait(self, now: float) -> float:
        wait = IDLE_WAKE
        with self._lock:
            while self._heap and not self._current(self._heap[0][0], self._heap[0][2]):
                heapq.heappop(self._heap)
            if self._heap:
                wait = min(wait, self._heap[0][0] - now)
        for probe in self._probes.values():
            wait = min(wait, probe.deadline - now)
        return max(0.0, wait)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _begin(self, port: _Port, now: float) -> None:
        target = port.target
        if not 0 < target.port < 65536:  # getaddrinfo would take 70000 for 4464
            self._record(port, now, False, "not a port number")
            return
        if port.address is None:
            try:
                found = socket.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            except (socket.gaierror, UnicodeError):
                found = []
            if not found:
                self._record(port, now, False, "host is not an IP address")
                return
            port.address = (found[0][0], found[0][4])
        family, sockaddr = port.address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._short_of_sockets(port, now, exc.errno or 0)
            return
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            if code in _LOCAL_ERRORS:
                self._short_of_sockets(port, now, code)
            else:
                self._record(port, now, False, _reason(code))
            return
        self._shortage = False
        probe = _Probe(port, sock, now)
        self._probes[sock.fileno()] = probe
        self._selector.register(sock, selectors.EVENT_WRITE, probe)

    def _short_of_sockets(self, port: _Port, now: float, code: int) -> None:
        """No socket to check with: no result (this port is not to blame), said once."""
        if not self._shortage:
            log.warning("cannot open a socket to check %s: %s; checks wait for sockets",
                        port.key, _reason(code), extra={"event": "check_skipped"})
        self._shortage = True
        self._record(port, now, None, "")

    def _step(self, probe: _Probe) -> None:
        """The probe's socket is ready: go one step further."""
        try:
            if probe.settling:
                data = probe.sock.recv(1)
                self._finish(probe, bool(data), "connected" if data else (
                    "closed at once (a proxy with nothing listening behind it?)"))
                return
            if probe.to_send is None:
                code = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(probe, False, _reason(code))
                    return
                spec, target = probe.port.target.spec, probe.port.target
                if spec.path is None:
                    # Docker's userland proxy accepts on the published port even when nothing
                    # listens in the container, then closes: connected means "and kept open"
                    probe.settling = True
                    probe.deadline = min(probe.deadline, time.monotonic() + TCP_SETTLE)
                    self._selector.modify(probe.sock, selectors.EVENT_READ, probe)
                    return
                probe.to_send = http_request(target.host, target.port, spec.path)
            if probe.to_send:
                probe.to_send = probe.to_send[probe.sock.send(probe.to_send):]
                if not probe.to_send:
                    self._selector.modify(probe.sock, selectors.EVENT_READ, probe)
                return
            data = probe.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(probe, False, _reason(exc.errno) if exc.errno else str(exc))
            return
        if not data:
            self._finish(probe, False, "closed without an answer")
            return
        probe.received += data
        status = http_status(probe.received)
        if status is None:
            return
        if status == NOT_HTTP:
            self._finish(probe, False, "not an HTTP answer")
        else:
            self._finish(probe, 200 <= status < 400, f"HTTP {status}")

    def _close_probe(self, probe: _Probe) -> None:
        if self._probes.pop(probe.sock.fileno(), None) is None:
            return  # closed already (fileno() is -1 then)
        self._selector.unregister(probe.sock)
        probe.sock.close()

    def _finish(self, probe: _Probe, passed: bool, reason: str) -> None:
        self._close_probe(probe)
        self._record(probe.port, probe.started, passed, reason)

    def _record(self, port: _Port, started: float, passed: bool | None, reason: str) -> None:
        """Counts one result (None: none) and schedules the port's next check."""
        changed = False
        with self._lock:
            port.probing = False
            if self._ports.get(port.key) is not port:
                return  # forgotten or replaced while it was checked
            if passed is not None:
                before = in_rotation(port.state)
                port.state = after(port.state, passed, port.target.spec)
                port.results += 1
                port.last_passed = passed
                port.reason = reason
                changed = in_rotation(port.state) != before
                if changed:
                    self._count_failing()
            spec = port.target.spec
            self._schedule(port, max(started + spec.interval, time.monotonic()))
        if passed is None:
            return
        if self._metrics is not None:
            self._metrics.check_results.labels(result="pass" if passed else "fail").inc()
        if changed:
            self._changed(port, passed, reason)

    def _changed(self, port: _Port, passed: bool, reason: str) -> None:
        spec = port.target.spec
        if passed:
            log.info("check of %s passed %d time(s) in a row (%s): in rotation", port.key,
                     spec.rise, reason,
                     extra={"event": "check_in", "key": port.key, "reason": reason})
        else:
            log.warning("check of %s failed %d time(s) in a row (%s): out of rotation",
                        port.key, spec.fall, reason,
                        extra={"event": "check_out", "key": port.key, "reason": reason})
        try:
            self._on_change(port.container_id)
        except Exception:
            log.exception("on_change(%s) failed", port.container_id[:12])
            self.health.internal_error()

    def _close(self) -> None:
        for probe in list(self._probes.values()):
            self._close_probe(probe)
        with self._lock:
            self._stopping.set()  # ended: never started again
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
