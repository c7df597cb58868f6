"""`make bench`, the canary part: how fast `registrar promote --canary` acts on its judgement.
A private etcd, one `registrar watch` agent, two `registrar haproxy` routers (http mode, both
reporting), busybox httpd containers answering their version (tests/support/cgi_app.py) and a
client load through both routers (4 clients, one new connection per request).

    .venv/bin/python -m bench.canary_bench [--quick] [--out PATH]

Rounds (3, 1 with --quick), each of two canaries with `--canary 10,50 --interval 3`:
1. a good version (2 instances) beside the promoted one (2 instances): from the moment every
   step passed (the command prints the steps' lines, read as they come) to the start of the
   last request the old version served after it: the time until only the new version serves
   new requests (the promotion written, the old instances moved to standby, the routers told);
   the old containers are removed afterwards and the new version is the promoted one.
2. a bad version (2 instances answering 500 to every request): from the failing judgement (the
   weights key's DELETE, the rollback's first write, as an etcd watch delivered it) to the start
   of the last request the bad version served after it: the time until every new request goes
   to the old version again; and the requests that failed during the canary.
Every container is named `rgbench-cy-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.haproxy_bench import Clients, Row, Sample, rounded, table
from bench.report import part_main
from tests.support.cgi_app import PATH, app
from tests.support.docker_env import docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.observe import KeyLog
from tests.support.proc import RegistrarProcess, free_port, wait_until

SERVICE = "rgbench-cy"
PREFIX = "/services"
CONTROL = "/rgbench-cy-ctl"
HEADING = "## Canary: `registrar promote --canary` (bench/canary_bench.py)"
TARGET_ROLLBACK = 1.0  # issue 16: failing judgement -> all new requests on the old version
STEPS = "10,50"
INTERVAL = 3


def say(message: str) -> None:
    print(f"bench canary: {message}", file=sys.stderr, flush=True)


@dataclass
class Results:
    rounds: int
    to_only_new: list[float] = field(default_factory=list)
    promote_returned: list[float] = field(default_factory=list)
    good_failed: int = 0
    good_sent: int = 0
    to_all_old: list[float] = field(default_factory=list)
    bad_failed: int = 0
    bad_sent: int = 0
    bad_canary_s: list[float] = field(default_factory=list)
    bad_keys_gone: list[float] = field(default_factory=list)


class Lines:
    """A command's stdout read line by line as it comes, each with the wall clock time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, text: str) -> float | None:
        return next((at for at, line in self.lines if text in line), None)

    def wait(self, timeout: float) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._thread.join(5)
        err = self.proc.stderr.read() if self.proc.stderr is not None else ""
        return code, "\n".join(line for _, line in self.lines) + "\n" + err


def last_served_after(samples: Sequence[Sample], version: str, at: float) -> float:
    """Seconds from `at` to the start of the last request `version` answered that started at
    `at` or later (0 when none did)."""
    starts = [s.start for s in samples if s.body == version and s.start >= at]
    return max(starts) - at if starts else 0.0


class Bench:
    def __init__(self, rounds: int, work: Path) -> None:
        self.rounds = rounds
        self.work = work
        self.run_id = f"rgbench-cy-{secrets.token_hex(3)}"
        self.image = ""
        self._n = 0
        self.etcd: EtcdServer | None = None
        self.procs: list[RegistrarProcess] = []
        self.ports: list[int] = []

    def url(self) -> str:
        assert self.etcd is not None
        return self.etcd.url

    def common(self) -> list[str]:
        return ["--etcd", self.url(), "--prefix", PREFIX, "--control-prefix", CONTROL,
                "--log-format", "json"]

    def start(self) -> None:
        self.image = ensure_busybox_image()
        self.etcd = EtcdServer(self.work / "etcd", name="cy").start()
        agent = RegistrarProcess(["watch", *self.common(), "--node", "cy-host", "--host-ip",
                                  "127.0.0.1", "--explicit", "--metrics-addr", "127.0.0.1:0"],
                                 log_dir=self.work / "logs")
        self.procs.append(agent)
        for name in ("cy-r1", "cy-r2"):
            port = free_port(exclude=self.ports)
            self.ports.append(port)
            self.procs.append(RegistrarProcess(
                ["haproxy", *self.common(), "--bind", f"{SERVICE}=127.0.0.1:{port}",
                 "--mode", "http", "--node", name, "--ttl", "5",
                 "--config", str(self.work / f"{name}.cfg"), "--metrics-addr", "127.0.0.1:0"],
                log_dir=self.work / "logs"))
        agent.wait_for_log("docker connected", timeout=30)
        for router in self.procs[1:]:
            router.wait_for_log("haproxy started", timeout=30)

    def containers(self, version: str, n: int, fail_one_in: int = 0) -> list[str]:
        names = []
        for _ in range(n):
            self._n += 1
            name = f"{self.run_id}-{version}-{self._n}"
            docker("run", "-d", "--name", name, "--label", f"registrar.service={SERVICE}",
                   "--label", f"registrar.version={version}", "-p", "127.0.0.1::8080",
                   self.image, *app(version, fail_one_in))
            names.append(name)
        return names

    def wait_keys(self, reader: EtcdReader, where: str, names: Sequence[str]) -> None:
        def there() -> bool:
            keys = reader.get_prefix(where)
            return all(any(n in k for k in keys) for n in names)

        wait_until(there, timeout=20, message=f"{names} not under {where}")

    def promote(self, version: str, *flags: str) -> Lines:
        proc = subprocess.Popen(
            [sys.executable, "-m", "registrar", "promote", SERVICE, version, *flags,
             "--etcd", self.url(), "--prefix", PREFIX, "--control-prefix", CONTROL],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Lines(proc)

    def canary(self, version: str) -> Lines:
        return self.promote(version, "--canary", STEPS, "--interval", str(INTERVAL),
                            "--min-requests", "20", "--timeout", "30")

    def run(self) -> Results:
        results = Results(self.rounds)
        self.start()
        reader = EtcdReader(self.url())
        weights = KeyLog(self.url(), f"{CONTROL}/weights/")
        self.keys = KeyLog(self.url(), f"{PREFIX}/{SERVICE}/")
        try:
            current = self.containers("v0", 2)
            self.wait_keys(reader, f"{PREFIX}/{SERVICE}/", current)
            code, out = self.promote("v0").wait(60)
            assert code == 0, out
            wait_until(lambda: len(reader.get_prefix(f"{CONTROL}/routers/")) == 2, timeout=15)
            with Clients(self.ports, per_port=2, path=PATH, pause=0.003, seconds=3600) as load:
                time.sleep(2)
                for i in range(1, self.rounds + 1):
                    current = self.good(results, reader, load, f"v{i}", current)
                    self.bad(results, reader, weights, load, f"bad{i}")
        finally:
            weights.close()
            self.keys.close()
            reader.close()
        return results

    def good(self, results: Results, reader: EtcdReader, load: Clients, version: str,
             old: list[str]) -> list[str]:
        say(f"good canary of {version}")
        old_version = old[0].split("-")[-2]
        new = self.containers(version, 2)
        self.wait_keys(reader, f"{CONTROL}/standby/{SERVICE}/", new)
        began = time.time()
        lines = self.canary(version)
        code, out = lines.wait(120)
        assert code == 0, out
        passed = lines.first("passed 50%")
        ended = lines.lines[-1][0] if lines.lines else time.time()
        assert passed is not None, out
        time.sleep(2)
        samples = load.since(began)
        results.to_only_new.append(last_served_after(samples, old_version, passed))
        results.promote_returned.append(ended - passed)
        results.good_sent += len(samples)
        results.good_failed += sum(1 for s in samples if s.status != 200)
        for name in old:
            docker("rm", "-f", name)
        return new

    def bad(self, results: Results, reader: EtcdReader, weights: KeyLog, load: Clients,
            version: str) -> None:
        say(f"bad canary of {version} (every request answered 500)")
        bad = self.containers(version, 2, fail_one_in=1)
        self.wait_keys(reader, f"{CONTROL}/standby/{SERVICE}/", bad)
        began = time.time()
        seen = len(weights.events)
        lines = self.canary(version)
        code, out = lines.wait(120)
        assert code == 1, out
        judged = next(e.at for e in weights.events[seen:] if e.kind == "delete")
        time.sleep(2)
        samples = load.since(began)
        results.to_all_old.append(last_served_after(samples, version, judged))
        results.bad_canary_s.append(judged - began)
        gone = [e.at for e in self.keys.events if e.kind == "delete" and e.at >= judged
                and any(n in e.key for n in bad)]
        results.bad_keys_gone.append(max(gone) - judged if gone else float("nan"))
        results.bad_sent += len(samples)
        results.bad_failed += sum(1 for s in samples if s.status != 200)
        for name in bad:
            docker("rm", "-f", name)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
        remove_prefixed(self.run_id)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.destroy()


def _ms(values: Sequence[float]) -> str:
    return "/".join(f"{v * 1000:.0f}" for v in values)


def rows(r: Results) -> list[Row]:
    none = "none: a person judged and switched by hand (issue 16)"
    only_new = statistics.median(r.to_only_new) if r.to_only_new else None
    all_old = statistics.median(r.to_all_old) if r.to_all_old else None
    return [
        Row("last step passed → only the new version serving new requests, p50",
            rounded(None if only_new is None else only_new * 1000, 0), "ms", "", None,
            f"the command's line for the last step, read as printed, to the start of the last "
            f"request the old version answered; {len(r.to_only_new)} canaries: "
            f"{_ms(r.to_only_new)} ms; the command returned (promotion in etcd's rotation) "
            f"{_ms(r.promote_returned)} ms after that line",
            baseline_note=none),
        Row("good canaries: failed requests", r.good_failed, "requests", "0",
            r.good_failed == 0, f"of {r.good_sent} sent through both routers during "
            f"{len(r.to_only_new)} canaries ({STEPS}, --interval {INTERVAL})"),
        Row("failing judgement → every new request on the old version, p50",
            rounded(None if all_old is None else all_old * 1000, 0), "ms",
            f"<= {TARGET_ROLLBACK * 1000:.0f} ms",
            None if all_old is None else max(r.to_all_old) <= TARGET_ROLLBACK,
            f"the weights key's DELETE (the rollback's first write) in an etcd watch to the "
            f"start of the last request the bad version answered; {len(r.to_all_old)} "
            f"canaries: {_ms(r.to_all_old)} ms (met: the max); the bad instances' keys left "
            f"the rotation (moved to standby by the agent) {_ms(r.bad_keys_gone)} ms after the "
            "DELETE", baseline_note=none),
        Row("bad canaries: failed requests (500 from the bad version)", r.bad_failed,
            "requests", "", None,
            f"of {r.bad_sent} sent while they ran ({100 * r.bad_failed / max(1, r.bad_sent):.1f}"
            f" %; the first step sends 10 %); rolled back "
            f"{'/'.join(f'{s:.1f}' for s in r.bad_canary_s)} s after the command started"),
    ]


def section(row_dicts: Sequence[dict[str, Any]], rounds: int) -> str:
    out = [HEADING, ""]
    out.append(
        "A private etcd; one `registrar watch` agent; two `registrar haproxy` routers (http "
        "mode, reports every 2 s); busybox httpd answering its version from a CGI script (a bad "
        "version: 500 to every request); 4 clients through both routers, a new connection per "
        f"request. {rounds} round(s) of a good then a bad canary, `--canary {STEPS} --interval "
        f"{INTERVAL} --min-requests 20`."
    )
    out.append("")
    out.extend(table(row_dicts))
    out.append("")
    return "\n".join(out)


def run(quick: bool) -> str:
    """The whole part; its markdown section."""
    rounds = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="rgbench-cy-"))
    say(f"logs in {work}")
    bench = Bench(rounds, work)
    try:
        results = bench.run()
    finally:
        bench.close()
    return section([asdict(r) for r in rows(results)], rounds)


def main(argv: Sequence[str] | None = None) -> int:
    return part_main(argv, "python -m bench.canary_bench", "one round (writes nothing)",
                     HEADING, run)


if __name__ == "__main__":
    sys.exit(main())
