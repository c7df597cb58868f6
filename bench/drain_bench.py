"""`make bench`, the drain part: `registrar drain` against two real routers.

    .venv/bin/python -m bench.drain_bench [--quick] [--out PATH]

A private etcd, one `registrar watch` agent, two `registrar haproxy` routers in http mode
(reports every 2 s, at once after a removal and when an in-flight entry falls to 0); busybox
httpd containers answering a CGI script that sleeps a while (the requests to hold in flight)
and static files (the load).
1. drain time: `registrar drain CONTAINER` of one of two instances, with 0, 1 and 10 slow
   requests (2 s each) in flight on it through the routers; from the command's start to its
   exit (interpreter start included), median over rounds; every slow request must be answered.
2. a rolling replace that drains before each stop: 4 instances (2 with --quick) replaced one by
   one (start the new one, wait until both routers serve it, `registrar drain` the old one,
   `docker stop -t 2` it) under a client load through both routers; failed requests / all, and
   the load's rate (target 0 failed at >= 200 requests/s).
Every container is named `rgbench-dr-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.haproxy_bench import (
    CONTROL,
    PREFIX,
    SERVE,
    Clients,
    Row,
    med,
    request,
    rounded,
    table,
)
from bench.report import part_main
from tests.support.cgi_app import PATH, app
from tests.support.docker_env import docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

SERVICE = "rgbench-dr"
HEADING = "## Drain: `registrar drain` with two routers (bench/drain_bench.py)"
SLOW = 2.0  # seconds each held request takes
IDLE_TARGET = 0.5  # issue 23: drain time when idle, p50, two routers


def say(message: str) -> None:
    print(f"bench drain: {message}", file=sys.stderr, flush=True)


class Stack:
    """A private etcd, the host agent and two routers in http mode."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.etcd = EtcdServer(work / "etcd", name="dr").start()
        self.reader = EtcdReader(self.etcd.url)
        self.node = "dr-host"
        self.common = ["--etcd", self.etcd.url, "--prefix", PREFIX, "--control-prefix", CONTROL,
                       "--log-format", "json"]
        self.agent = RegistrarProcess(
            ["watch", *self.common, "--node", self.node, "--host-ip", "127.0.0.1",
             "--explicit", "--metrics-addr", "127.0.0.1:0"], log_dir=work / "logs")
        self.ports: list[int] = []
        self.routers = []
        for name in ("dr-r1", "dr-r2"):
            port = free_port(exclude=self.ports)
            self.ports.append(port)
            self.routers.append(RegistrarProcess(
                ["haproxy", *self.common, "--bind", f"{SERVICE}=127.0.0.1:{port}", "--mode",
                 "http", "--node", name, "--ttl", "5", "--config", str(work / f"{name}.cfg"),
                 "--metrics-addr", "127.0.0.1:0"], log_dir=work / "logs"))
        self.agent.wait_for_log("docker connected", timeout=30)
        for router in self.routers:
            router.wait_for_log("haproxy started", timeout=30)
        wait_until(lambda: len(self.reader.get_prefix(f"{CONTROL}/routers/")) == 2, timeout=15)

    def drain(self, container: str, timeout: float = 30) -> tuple[int, float, str]:
        """`registrar drain CONTAINER`: (exit status, seconds, its output)."""
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "registrar", "drain", container, *self.common, "--node",
             self.node, "--timeout", str(timeout)],
            capture_output=True, text=True, timeout=timeout + 30, check=False)
        return done.returncode, time.monotonic() - started, done.stdout + done.stderr

    def close(self) -> None:
        for proc in (*self.routers, self.agent):
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
        self.reader.close()
        with contextlib.suppress(Exception):
            self.etcd.destroy()


class Bench:
    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self.work = work
        self.run_id = f"rgbench-dr-{secrets.token_hex(3)}"
        self.image = ""
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return f"{self.run_id}-{self._n}"

    def start(self, name: str, command: Sequence[str]) -> str:
        return docker("run", "-d", "--name", name, "--label", f"registrar.service={SERVICE}",
                      "-p", "127.0.0.1::8080", self.image, *command)

    def in_rotation(self, stack: Stack, names: Sequence[str]) -> bool:
        keys = stack.reader.get_prefix(f"{PREFIX}/{SERVICE}/")
        return all(any(f":{n}:" in key for key in keys) for n in names)

    def served_by_both(self, stack: Stack, cid: str, path: str = "/") -> bool:
        """Each router has answered from this container (its body starts with its short id)
        within a few tries."""
        for port in stack.ports:
            for _ in range(20):
                with contextlib.suppress(OSError):
                    if request(port, path=path)[1][:12] == cid[:12]:
                        break
            else:
                return False
        return True

    def _until_served(self, stack: Stack, name: str, cid: str) -> None:
        wait_until(lambda: self.in_rotation(stack, (name,)), timeout=30)
        wait_until(lambda: self.served_by_both(stack, cid), timeout=30)

    def drain_times(self, stack: Stack, held: int, rounds: int) -> tuple[list[float], int, int]:
        """(drain seconds by round, slow requests answered, slow requests sent): one instance,
        `held` requests sent to it through the routers and held open, then drained."""
        times: list[float] = []
        answered = sent = 0
        for _ in range(rounds):
            target = self.name()
            self._until_served(stack, target, self.start(target, app("v1", delay=SLOW)))
            results: list[int] = []
            threads = [threading.Thread(target=self._slow, args=(stack.ports[i % 2], results))
                       for i in range(held)]
            for thread in threads:
                thread.start()
            if held:
                time.sleep(0.3)  # every request has reached the instance
            code, seconds, output = stack.drain(target)
            if code != 0:
                say(f"drain of {target} exited {code}: {output.strip()[-300:]}")
            else:
                times.append(seconds)
            for thread in threads:
                thread.join(SLOW + 10)
            sent += held
            answered += sum(1 for status in results if status == 200)
            docker("rm", "-f", "-v", target, check=False, timeout=60)
            wait_until(lambda: not stack.reader.get_prefix(f"{PREFIX}/{SERVICE}/"), timeout=30)
        return times, answered, sent

    @staticmethod
    def _slow(port: int, results: list[int]) -> None:
        try:
            results.append(request(port, timeout=SLOW + 5, path=PATH)[0])
        except OSError:
            results.append(0)

    def rolling(self, stack: Stack, n: int) -> tuple[int, int, float]:
        """(failed, all, requests/s) of a rolling replace that drains before each stop."""
        old = [self.name() for _ in range(n)]
        for name in old:
            self._until_served(stack, name, self.start(name, ["sh", "-c", SERVE]))
        new: list[str] = []
        with Clients(stack.ports, per_port=4, timeout=2.0, pause=0.0, seconds=600) as clients:
            began = time.time()
            time.sleep(1.0)
            for name in old:
                fresh = self.name()
                new.append(fresh)
                self._until_served(stack, fresh, self.start(fresh, ["sh", "-c", SERVE]))
                code, _seconds, output = stack.drain(name)
                if code != 0:
                    say(f"drain of {name} exited {code}: {output.strip()[-300:]}")
                docker("stop", "-t", "2", name, timeout=60)
            time.sleep(1.0)
            ended = time.time()
        samples = [s for s in clients.samples if began <= s.start <= ended]
        failed = [s for s in samples if s.status != 200]
        if failed:
            say(f"failed during the rolling replace: {[(s.status, s.body) for s in failed[:5]]}")
        docker("rm", "-f", "-v", *old, *new, check=False, timeout=120)
        return len(failed), len(samples), len(samples) / max(0.001, ended - began)

    def run(self) -> list[Row]:
        self.image = ensure_busybox_image()
        stack = Stack(self.work)
        rows: list[Row] = []
        rounds = 2 if self.quick else 5
        try:
            for held in (0, 1, 10):
                say(f"drain time with {held} slow request(s) in flight, {rounds} rounds")
                times, answered, sent = self.drain_times(stack, held, rounds)
                p50 = med(times)
                rows.append(Row(
                    f"drain time, {held} request(s) in flight (2 s each), p50",
                    rounded(p50, 2), "s",
                    f"<= {IDLE_TARGET} (issue 23)" if held == 0 else "",
                    (p50 <= IDLE_TARGET if p50 is not None else None) if held == 0 else None,
                    f"`registrar drain` with 2 routers, from its start to its exit (interpreter "
                    f"start included); rounds: {', '.join(f'{t:.2f}' for t in times)} s; slow "
                    f"requests answered {answered} of {sent}",
                    baseline_note="before: `--drain` was a fixed sleep, and nothing confirmed "
                    "the routers"))
            n = 2 if self.quick else 4
            say(f"rolling replace of {n} with a drain before each stop")
            failed, total, rate = self.rolling(stack, n)
            rows.append(Row(
                "rolling replace with `registrar drain` before each `docker stop`: failed "
                "requests", failed, "requests", "0 at >= 200 requests/s (issue 23)",
                failed == 0 and rate >= 200,
                f"{n} instances replaced one by one under 8 clients through both routers (new "
                f"connection each, 2 s timeout): {failed} of {total} failed, {rate:.0f} "
                "requests/s"))
        finally:
            stack.close()
            remove_prefixed(self.run_id)
        return rows


def section(rows: Sequence[dict[str, Any]]) -> str:
    out = [HEADING, "",
           "A private etcd, one `registrar watch` agent, two `registrar haproxy` routers in "
           "http mode; busybox httpd containers (a CGI script that takes 2 s for the requests "
           "held in flight, static files for the load).", ""]
    out.extend(table(rows))
    out.append("")
    return "\n".join(out)


def run(quick: bool) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="rgbench-dr-"))
    say(f"logs in {work}")
    return [asdict(row) for row in Bench(quick, work).run()]


def main(argv: Sequence[str] | None = None) -> int:
    return part_main(argv, "python -m bench.drain_bench",
                     "fewer rounds, for a smoke run (writes nothing)", HEADING,
                     lambda quick: section(run(quick)))


if __name__ == "__main__":
    sys.exit(main())
