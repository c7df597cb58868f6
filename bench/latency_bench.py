"""What counting response times costs the router: `registrar haproxy` (http mode) in front of
two busybox httpd serving a static file, loaded with `wrk`, its CPU time read from /proc.

    .venv/bin/python -m bench.latency_bench [--seconds 8] [--connections 1 4]

Twice: with the built-in template (HAProxy logs every request to the router, which counts it
into the histogram) and with a `--template` copy of it without the `log` line (nothing to
count). Each run prints the requests/s wrk got, the router's CPU (% of one core), that CPU per
1,000 requests/s, and how many responses the histogram holds against wrk's count. The cost of
counting is the difference between the two per 1,000 requests/s (target < 5 %). Not part of
`make bench` (bench/parts.py): run it alone. Needs etcd, haproxy, busybox and wrk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from registrar.haproxy.config import builtin_template_text
from tests.helpers import scrape
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import free_port, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, its finished children included (HAProxy is not one: it
    runs under setpriv, a child whose times are its own)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def httpd(root: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h",
                             str(root)])


def run_once(work: Path, etcd_url: str, template: Path | None, seconds: float,
             connections: int) -> dict[str, float]:
    port, metrics_port = free_port(), free_port()
    args = [sys.executable, "-m", "registrar", "haproxy", "--etcd", etcd_url, "--prefix", "/lb",
            "--control-prefix", "/lbctl", "--node", "bench", "--bind", f"web=127.0.0.1:{port}",
            "--mode", "http", "--config", str(work / f"haproxy-{port}.cfg"),
            "--metrics-addr", f"127.0.0.1:{metrics_port}"]
    if template is not None:
        args += ["--template", str(template)]
    router = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).status == 200, timeout=20,
                   ignore=(OSError,))
        time.sleep(2)  # at rest before measuring
        idle_before = cpu_seconds(router.pid)
        time.sleep(seconds)
        idle = (cpu_seconds(router.pid) - idle_before) / seconds
        before = cpu_seconds(router.pid)
        started = time.monotonic()
        out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s",
                              url], capture_output=True, text=True, check=True).stdout
        elapsed = time.monotonic() - started
        busy = (cpu_seconds(router.pid) - before) / elapsed
        match = re.search(r"(\d+) requests in", out)
        if match is None:
            raise RuntimeError(f"wrk said:\n{out}")
        requests = int(match.group(1))
        time.sleep(2.5)  # the last lines read, the last poll made
        scraped = scrape(metrics_port)
        counted = sum(v for k, v in scraped.items()
                      if k.startswith("registrar_haproxy_response_seconds_count"))
        dropped = scraped.get("registrar_haproxy_log_dropped_total", 0.0)
        rate = requests / seconds
        return {"rate": rate, "idle_cpu": idle * 100, "cpu": busy * 100,
                "cpu_per_1000": (busy - idle) * 100 / (rate / 1000), "requests": requests,
                "counted": counted, "dropped": dropped}
    finally:
        router.terminate()
        router.wait(20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    opts = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk missing: apt-get install -y wrk", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="rg-latency-bench-"))
    etcd = EtcdServer(work / "etcd", name="lat").start()
    servers = []
    try:
        for i, version in enumerate(("v1", "v2")):
            root = work / f"www-{i}"
            root.mkdir()
            (root / "index.html").write_text(f"{version}\n")
            p = free_port()
            servers.append(httpd(root, p))
            with EtcdReader(etcd.url) as etcd_reader:
                etcd_reader.put(f"/lb/web/bench:web-{i}:8080",
                                {"host": "127.0.0.1", "port": p, "version": version})
        silent = work / "no-log.cfg.j2"
        silent.write_text("\n".join(line for line in builtin_template_text().splitlines()
                                    if "log {{ log_socket }}" not in line) + "\n")
        print("template   conns  req/s  router CPU %  idle %  CPU % per 1,000 req/s (busy-idle)"
              "  histogram/requests  dropped")
        for connections in opts.connections:
            for name, template in (("built-in", None), ("no log", silent)):
                r = run_once(work, etcd.url, template, opts.seconds, connections)
                print(f"{name:9}  {connections:5}  {r['rate']:5.0f}  {r['cpu']:12.1f}  "
                      f"{r['idle_cpu']:6.1f}  {r['cpu_per_1000']:24.2f}  "
                      f"{r['counted']:.0f}/{r['requests']}  {r['dropped']:.0f}", flush=True)
    finally:
        for server in servers:
            server.terminate()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
