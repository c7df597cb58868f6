"""`make bench`, the health-checks part: what registrar's own checks (`registrar.check` labels)
cost the `registrar watch` agent, and how fast a failing check takes a port out of rotation. Real
Docker engine, a private etcd, busybox httpd containers.

    .venv/bin/python -m bench.checks_bench [--quick] [--out PATH]

Alone, it prints its section and (without --quick) puts it in bench/results.md in place of the
old one; `make bench` (bench/run.py) does the same with every part.

1. cost: 25 containers (5 with --quick) publishing 4 ports each on 127.0.0.1, an httpd on every
   port. One agent (`--explicit --host-ip 127.0.0.1`, metrics on) with the containers unchecked,
   then a fresh agent with the same containers but labelled `registrar.check=http:/` (default
   interval 2 s, timeout 1 s): once every key is in etcd and 3 s passed, the agent's CPU
   (utime + stime from /proc) over 30 s (10 s with --quick) as % of one core, and its VmRSS at
   the end. Twice each, alternating (once with --quick); medians, and checked minus unchecked.
2. failing check to key gone: one container labelled `registrar.check=http:/ok.html`,
   `registrar.check.interval=0.5`, `registrar.check.fall=2`, its /www a directory of the host:
   ok.html is unlinked on the host at a random moment of the check cycle, and the time until
   the port's key is deleted (an etcd watch) measured; the file put back and the key awaited
   again before the next sample. 10 samples (3 with --quick).
Every container is named `rgbench-chk-<run>-...` and removed by that name at the end.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.haproxy_bench import Row, med, p95, rounded, table
from bench.observe import KeyLog, cpu_seconds, rss_kib
from bench.report import part_main
from tests.helpers import scrape
from tests.support.docker_env import docker, ensure_busybox_image, remove_prefixed
from tests.support.etcd import EtcdServer
from tests.support.proc import RegistrarProcess, free_port

SERVICE = "rgbench-chk"
HEADING = "## Health checks: `registrar watch` with `registrar.check` (bench/checks_bench.py)"
PORTS = (8080, 8081, 8082, 8083)
TARGET_CPU = 3.0  # % of one core, issue 15
TARGET_RSS_MIB = 5.0  # issue 15
# an httpd on each of the 4 ports; the last one is PID 1
SERVE_4 = ("hostname > /www/index.html && for p in 8081 8082 8083; do httpd -p $p -h /www; done"
           " && exec httpd -f -p 8080 -h /www")
SERVE_OK = "hostname > /www/index.html && echo ok > /www/ok.html && exec httpd -f -p 8080 -h /www"


@dataclass(frozen=True)
class Plan:
    containers: int
    window: float
    rounds: int
    samples: int


FULL = Plan(containers=25, window=30.0, rounds=2, samples=10)
QUICK = Plan(containers=5, window=10.0, rounds=1, samples=3)


def say(message: str) -> None:
    print(f"bench checks: {message}", file=sys.stderr, flush=True)


@dataclass
class Cost:
    checked: bool
    cpu_percent: float
    rss_kib: int
    checks_per_s: float | None = None
    failing: float | None = None
    took_to_register: float = 0.0


@dataclass
class Results:
    plan: Plan
    costs: list[Cost] = field(default_factory=list)
    fail_to_gone: list[float] = field(default_factory=list)
    missed_samples: int = 0
    back_after: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.run_id = f"rgbench-chk-{secrets.token_hex(3)}"
        self.image = ""
        self._n = 0
        self.etcd: EtcdServer | None = None

    def name(self) -> str:
        self._n += 1
        return f"{self.run_id}-{self._n}"

    def agent(self, prefix: str, tag: str) -> tuple[RegistrarProcess, int]:
        assert self.etcd is not None
        port = free_port()
        proc = RegistrarProcess(
            ["watch", "--etcd", self.etcd.url, "--prefix", prefix, "--node", f"chk-{tag}",
             "--host-ip", "127.0.0.1", "--explicit", "--metrics-addr", f"127.0.0.1:{port}",
             "--log-format", "json"],
            log_dir=self.work / f"logs-{tag}",
        )
        proc.wait_for_log("docker connected", timeout=30)
        return proc, port

    # --- 1. the cost of 100 checked ports -------------------------------------------------

    def cost(self, checked: bool, round_no: int) -> Cost:
        assert self.etcd is not None
        plan = self.plan
        tag = f"{'checked' if checked else 'plain'}{round_no}"
        prefix = f"/chk-{tag}"
        labels = ["--label", f"registrar.service={SERVICE}"]
        if checked:
            labels += ["--label", "registrar.check=http:/"]
        publish = [arg for p in PORTS for arg in ("-p", f"127.0.0.1::{p}")]
        names = [self.name() for _ in range(plan.containers)]

        def start(name: str) -> None:
            docker("run", "-d", "--name", name, *labels, *publish, self.image, "sh", "-c",
                   SERVE_4)

        say(f"{tag}: {plan.containers} containers x {len(PORTS)} ports"
            + (" (registrar.check=http:/)" if checked else " (unchecked)"))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(start, names))
        keys = KeyLog(self.etcd.url, prefix + "/")
        proc, metrics_port = self.agent(prefix, tag)
        try:
            began = time.monotonic()
            want = plan.containers * len(PORTS)
            if not keys.wait(lambda k: len(k.live) >= want, timeout=60):
                raise RuntimeError(f"{tag}: {len(keys.live)} of {want} keys after 60 s; log:\n"
                                   f"{proc.logs()[-2000:]}")
            took = time.monotonic() - began
            time.sleep(3.0)
            before = scrape(metrics_port)
            cpu0 = cpu_seconds([proc.pid])
            t0 = time.monotonic()
            time.sleep(plan.window)
            cpu = cpu_seconds([proc.pid]) - cpu0
            window = time.monotonic() - t0
            after = scrape(metrics_port)
            result = Cost(checked, cpu / window * 100, rss_kib(proc.pid), took_to_register=took)
            if checked:
                done = sum(after.get(f'registrar_check_results_total{{result="{r}"}}', 0.0)
                           - before.get(f'registrar_check_results_total{{result="{r}"}}', 0.0)
                           for r in ("pass", "fail"))
                result.checks_per_s = done / window
                result.failing = after.get("registrar_failing_checks")
            say(f"{tag}: agent CPU {result.cpu_percent:.2f} % of one core over {window:.0f} s, "
                f"RSS {result.rss_kib / 1024:.1f} MiB"
                + (f", {result.checks_per_s:.1f} checks/s" if result.checks_per_s else ""))
            return result
        finally:
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
            keys.close()
            for start_at in range(0, len(names), 50):
                docker("rm", "-f", "-v", *names[start_at : start_at + 50], check=False,
                       timeout=300)

    # --- 2. a failing check to the key gone -----------------------------------------------

    def failing(self, results: Results) -> None:
        assert self.etcd is not None
        www = self.work / "www"
        www.mkdir()
        prefix = "/chk-fail"
        keys = KeyLog(self.etcd.url, prefix + "/")
        proc, _port = self.agent(prefix, "fail")
        name = self.name()
        try:
            docker("run", "-d", "--name", name, "--label", f"registrar.service={SERVICE}",
                   "--label", "registrar.check=http:/ok.html",
                   "--label", "registrar.check.interval=0.5",
                   "--label", "registrar.check.fall=2",
                   "-v", f"{www}:/www", "-p", "127.0.0.1::8080", self.image, "sh", "-c",
                   SERVE_OK)
            key = f"{prefix}/{SERVICE}/chk-fail:{name}:8080"
            if not keys.wait(lambda k: key in k.live, timeout=20):
                raise RuntimeError(f"{key} never registered; log:\n{proc.logs()[-2000:]}")
            ok = www / "ok.html"
            for i in range(self.plan.samples):
                time.sleep(1.0 + random.uniform(0, 0.5))  # a random phase of the check cycle
                failed_at = time.time()
                ok.unlink()  # 404 from now on
                if not keys.wait(lambda k: key not in k.live, timeout=10):
                    results.missed_samples += 1
                    say(f"sample {i + 1}: the key stayed")
                else:
                    results.fail_to_gone.append(keys.deleted[key] - failed_at)
                    say(f"sample {i + 1}/{self.plan.samples}: key gone "
                        f"{results.fail_to_gone[-1] * 1000:.0f} ms after the file went")
                fixed = time.time()
                ok.write_text("ok\n")
                if not keys.wait(lambda k: key in k.live, timeout=10):
                    raise RuntimeError(f"{key} never came back; log:\n{proc.logs()[-2000:]}")
                back = [e.at for e in keys.since(fixed) if e.kind == "put" and e.key == key]
                if back:
                    results.back_after.append(back[0] - fixed)
        finally:
            with contextlib.suppress(Exception):
                proc.stop(20)
            proc.cleanup()
            keys.close()
            docker("rm", "-f", "-v", name, check=False)

    def run(self) -> Results:
        results = Results(self.plan)
        self.image = ensure_busybox_image()
        self.etcd = EtcdServer(self.work / "etcd", name="chk").start()
        try:
            for round_no in range(self.plan.rounds):
                for checked in (False, True):
                    results.costs.append(self.cost(checked, round_no))
            say(f"failing HTTP check (interval 0.5 s, fall 2): {self.plan.samples} samples")
            self.failing(results)
        finally:
            with contextlib.suppress(Exception):
                remove_prefixed(self.run_id)
            with contextlib.suppress(Exception):
                self.etcd.destroy()
        return results


def rows(results: Results) -> list[Row]:
    plan = results.plan
    ports = plan.containers * len(PORTS)
    shape = f"{plan.containers} containers x {len(PORTS)} ports"
    plain = [c for c in results.costs if not c.checked]
    checked = [c for c in results.costs if c.checked]
    cpu_plain = med([c.cpu_percent for c in plain])
    cpu_checked = med([c.cpu_percent for c in checked])
    rss_plain = med([c.rss_kib / 1024 for c in plain])
    rss_checked = med([c.rss_kib / 1024 for c in checked])
    rate = med([c.checks_per_s for c in checked if c.checks_per_s is not None])
    cpu_added = None if cpu_plain is None or cpu_checked is None else cpu_checked - cpu_plain
    rss_added = None if rss_plain is None or rss_checked is None else rss_checked - rss_plain

    def by_run(values: Sequence[float], digits: int = 2) -> str:
        return ", ".join(f"{v:.{digits}f}" for v in values)

    out = [
        Row(f"agent CPU, {ports} checked ports ({shape}), median", rounded(cpu_checked, 2),
            "% of a core", "", None,
            f"utime + stime of the `registrar watch` process over {plan.window:g} s once every "
            f"key was in etcd, by run: {by_run([c.cpu_percent for c in checked])} (unchecked: "
            f"{by_run([c.cpu_percent for c in plain])}); "
            f"{'-' if rate is None else f'{rate:.1f}'} checks/s (`registrar_check_results_total`"
            "), default interval 2 s, timeout 1 s",
            baseline=rounded(cpu_plain, 2), baseline_note="unchecked"),
        Row(f"agent CPU added by {ports} checks", rounded(cpu_added, 2), "% of a core",
            f"<= {TARGET_CPU:g} % (issue 15)",
            None if cpu_added is None else cpu_added <= TARGET_CPU,
            "median checked minus median unchecked (fresh agents, the same container shapes; "
            "--resync 30 s, so about one resync in each window)"),
        Row(f"agent RSS, {ports} checked ports, median", rounded(rss_checked), "MiB", "", None,
            f"VmRSS at the end of the window, by run: "
            f"{by_run([c.rss_kib / 1024 for c in checked], 1)} (unchecked: "
            f"{by_run([c.rss_kib / 1024 for c in plain], 1)})",
            baseline=rounded(rss_plain), baseline_note="unchecked"),
        Row(f"agent RSS added by {ports} checks", rounded(rss_added), "MiB",
            f"<= +{TARGET_RSS_MIB:g} MiB (issue 15)",
            None if rss_added is None else rss_added <= TARGET_RSS_MIB,
            "median checked minus median unchecked"),
    ]
    gone = results.fail_to_gone
    p50 = med(gone)
    out.append(Row(
        "failing HTTP check → key gone, p50 (interval 0.5 s, fall 2)",
        rounded(None if p50 is None else p50 * 1000, 0), "ms", "", None,
        f"ok.html unlinked on the host (the container's /www is a bind mount) at a random phase "
        f"of the check cycle, to the key's DELETE in an etcd watch; {len(gone)} samples"
        + (f" ({results.missed_samples} where the key stayed)" if results.missed_samples else "")
        + f", p95 {(p95(gone) or 0) * 1000:.0f} ms, min {min(gone, default=0) * 1000:.0f} ms, "
        f"max {max(gone, default=0) * 1000:.0f} ms (two failed checks 0.5 s apart: between "
        f"0.5 and 1.0 s plus the checks' own time); file back → key back p50 "
        f"{(med(results.back_after) or 0) * 1000:.0f} ms (rise 1)",
    ))
    return out


def section(row_dicts: Sequence[dict[str, Any]], plan: Plan) -> str:
    out = [HEADING, ""]
    out.append(
        f"A private etcd; `registrar watch --explicit --host-ip 127.0.0.1` with metrics on; "
        f"busybox httpd containers publishing their ports on 127.0.0.1 (checks dial the "
        f"registered host and port, through docker-proxy). {plan.rounds} round(s) of a fresh "
        "agent unchecked then checked. The `before` column: the same agent with the same "
        "containers unchecked."
    )
    out.append("")
    out.extend(table(row_dicts))
    out.append("")
    return "\n".join(out)


def run(quick: bool) -> str:
    """The whole part; its markdown section."""
    plan = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="rgbench-chk-"))
    say(f"logs in {work}")
    results = Bench(plan, work).run()
    return section([asdict(r) for r in rows(results)], plan)


def main(argv: Sequence[str] | None = None) -> int:
    return part_main(argv, "python -m bench.checks_bench",
                     "5 containers, 10 s windows, one round (writes nothing)", HEADING, run)


if __name__ == "__main__":
    sys.exit(main())
