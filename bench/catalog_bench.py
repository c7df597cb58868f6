"""`registrar catalog` under load: answer times, memory, and how fast the page follows etcd.

    .venv/bin/python -m bench.catalog_bench [--sizes 140,10000] [--changes 10]

For each size: a private etcd, that many instances written straight to it (services of 10
instances each at 140, of 100 at 10,000, two versions each, a promotion, a canary and one
router report covering every service), then `registrar catalog` started and, once it holds
them all:
- `/v1/catalog` and `/v1/sd/prometheus`: 20 GETs each at a standing revision (median, p95), and
  10 `/v1/catalog` GETs each right after a put (a new revision: the catalog is built anew);
- the catalog's VmRSS;
- the page in headless chromium, and 10 changes put in etcd, each timed
  until the page shows the new revision (p50, max).
Prints one table; nothing is written elsewhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.browser import Browser
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

PREFIX, CONTROL = "/bench", "/bench-ctl"
AT = "2015-07-20T12:00:00Z"


def fill(reader: EtcdReader, size: int) -> None:
    per_service = 10 if size <= 1000 else 100
    services: dict[str, dict[str, dict[str, int]]] = {}
    for n in range(size):
        service, i = f"svc{n // per_service:03d}", n % per_service
        version = "v2" if i % 5 == 0 else "v1"
        node = f"core-{i % 18:02d}"
        reader.put(f"{PREFIX}/{service}/{node}:{service}-{i}:8080", json.dumps({
            "service": service, "host": "10.0.0.5", "port": 30000 + i, "node": node,
            "container_id": "0" * 64, "container_name": f"{service}-{i}", "private_port": 8080,
            "protocol": "tcp", "image": f"example/{service}:{version}", "version": version,
            "tags": ["bench"], "registered_at": AT, "metrics_path": "/metrics"}))
        services.setdefault(service, {"v1": {"2xx": 900}, "v2": {"2xx": 100}})
    reader.put(f"{CONTROL}/promoted/svc000", json.dumps({"version": "v1", "at": AT}))
    reader.put(f"{CONTROL}/weights/svc001", json.dumps({"version": "v2", "percent": 10,
                                                        "at": AT}))
    reader.put(f"{CONTROL}/routers/lb-1", json.dumps({"at": AT, "services": services,
                                                      "applied": 1}))


def get(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = answer.read()
    return time.perf_counter() - started, body


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{statistics.median(values) * 1000:.1f} / {p95 * 1000:.1f}"


def measure(size: int, changes: int, browser: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rgbench-cat-") as base:
        etcd = EtcdServer(Path(base) / "etcd", name="rgbench-cat")
        etcd.start(timeout=30)
        reader = EtcdReader(etcd.url)
        port = free_port()
        catalog: RegistrarProcess | None = None
        try:
            started = time.monotonic()
            fill(reader, size)
            filled = time.monotonic() - started
            catalog = RegistrarProcess(["catalog", "--etcd", etcd.url, "--prefix", PREFIX,
                                        "--control-prefix", CONTROL,
                                        "--listen", f"127.0.0.1:{port}"],
                                       log_dir=Path(base) / "logs")
            url = f"http://127.0.0.1:{port}"

            def count() -> int:
                body = json.loads(get(url + "/v1/catalog")[1])
                return sum(len(s["instances"]) for s in body["services"].values())

            seen: list[int] = []

            def complete() -> bool:
                seen.append(count())
                return seen[-1] == size

            wait_until(complete, timeout=120, interval=0.2, ignore=(OSError,),
                       message=lambda: f"{size} instances never all in the catalog "
                       f"(counts seen {seen[-5:]}); its log:\n"
                       + (catalog.logs()[-2000:] if catalog else ""))
            standing = [get(url + "/v1/catalog")[0] for _ in range(20)]
            sd = [get(url + "/v1/sd/prometheus")[0] for _ in range(20)]
            fresh = []
            for n in range(10):
                revision = reader.put(f"{CONTROL}/maintenance/node/bench-{n}",
                                      json.dumps({"at": AT}))
                elapsed, body = get(f"{url}/v1/catalog?index={revision - 1}")
                fresh.append(elapsed)
                assert json.loads(body)["revision"] >= revision
            metrics = get(url + "/metrics")[1].decode().splitlines()
            builds = {line.split()[0]: float(line.split()[1]) for line in metrics
                      if line.startswith("registrar_catalog_build_seconds_")}
            result: dict[str, Any] = {
                "build_ms": 1000 * builds["registrar_catalog_build_seconds_sum"]
                / max(1.0, builds["registrar_catalog_build_seconds_count"]),
                "size": size, "filled_s": filled, "catalog": ms(standing), "sd": ms(sd),
                "catalog_after_put": ms(fresh), "sd_bytes": len(get(url + "/v1/sd/prometheus")[1]),
                "rss_mib": rss_mib(catalog.pid),
            }
            if browser:
                result["page"] = page_latency(url, reader, changes)
            return result
        finally:
            if catalog is not None:
                catalog.stop(15)
                catalog.cleanup()
            reader.close()
            etcd.destroy()


def page_latency(url: str, reader: EtcdReader, changes: int) -> str:
    latencies = []
    with Browser(url + "/") as page:
        page.wait_for("document.body && document.body.getAttribute('data-revision')", 30)
        for n in range(changes):
            seen = page.evaluate("document.body.getAttribute('data-revision')")
            time.sleep(0.3)
            started = time.monotonic()
            reader.put(f"{CONTROL}/maintenance/instance/svc000/core-00:svc000-{n}:8080",
                       json.dumps({"reason": "bench", "at": AT}))
            page.wait_for(f"document.body.getAttribute('data-revision') != '{seen}'", 10)
            latencies.append(time.monotonic() - started)
    return (f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms over {changes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="140,10000")
    parser.add_argument("--changes", type=int, default=10)
    args = parser.parse_args()
    rows = [measure(int(s), args.changes, browser=True)
            for s in args.sizes.split(",")]
    print("| instances | /v1/catalog ms (median / p95) | after a put | build ms (mean) "
          "| /v1/sd/prometheus ms | sd bytes | RSS MiB | page follows etcd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['catalog']} | {r['catalog_after_put']} | {r['build_ms']:.1f} "
              f"| {r['sd']} | {r['sd_bytes']} | {r['rss_mib']:.1f} | {r.get('page', '-')} |")


if __name__ == "__main__":
    main()
