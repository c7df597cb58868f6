"""The README's picture of the catalog page during a canary (docs/catalog.png), made again.

    .venv/bin/python -m bench.catalog_screenshot [docs/catalog.png]

A private etcd gets a small cluster's keys (a promoted version, a canary at 25 % with two
routers' reports that give it about a quarter of the traffic, a standby instance, a node in
maintenance, a drained instance with requests in flight); `registrar catalog` serves them and
headless chromium takes the picture at 1280x800.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.browser import Browser
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import RegistrarProcess, free_port, wait_until

P, C = "/services", "/registrar"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def value(service: str, node: str, version: str, port: int) -> str:
    return json.dumps({"service": service, "host": "10.0.0." + node[-1], "port": port,
                       "version": version, "node": node, "tags": [], "registered_at": now()})


def fill(r: EtcdReader) -> None:
    for i, node in enumerate(["core-01", "core-02", "core-03", "core-04"]):
        r.put(f"{P}/web/{node}:web-{i + 1}:8080", value("web", node, "3f9c2a1", 32768 + i))
    r.put(f"{P}/web/core-02:web-5:8080", value("web", "core-02", "8b41e07", 32790))
    r.put(f"{P}/web/core-04:web-6:8080", value("web", "core-04", "8b41e07", 32791))
    r.put(f"{C}/standby/web/core-03:web-0:8080", value("web", "core-03", "1d77c30", 32760))
    r.put(f"{C}/promoted/web", json.dumps({"version": "3f9c2a1", "at": now()}))
    r.put(f"{C}/weights/web", json.dumps({"version": "8b41e07", "percent": 25, "at": now()}))
    for i, node in enumerate(["core-01", "core-02", "core-03"]):
        r.put(f"{P}/api/{node}:api-{i + 1}:9000", value("api", node, "v42", 33000 + i))
    r.put(f"{C}/draining/core-03/api-3", json.dumps({"at": now()}))
    for i, node in enumerate(["core-01", "core-04"]):
        r.put(f"{P}/search/{node}:search-{i + 1}:9200", value("search", node, "2024.11",
                                                                34000 + i))
    r.put(f"{C}/maintenance/node/core-04", json.dumps({"reason": "kernel update", "at": now()}))
    r.put(f"{P}/dns/core-01:dns-1:53:udp", value("dns", "core-01", "1.9", 35353))


def report(r: EtcdReader, n: int, old: int, new: int, api: int) -> None:
    services: dict[str, Any] = {
        "web": {"3f9c2a1": {"2xx": old, "5xx": 2}, "8b41e07": {"2xx": new}},
        "api": {"v42": {"2xx": api}}, "search": {"2024.11": {"2xx": 5000}}}
    r.put(f"{C}/routers/lb-{n}", json.dumps({
        "at": now(), "applied": r.revision(), "services": services,
        "in_flight": {"api": {"core-03:api-3:9000": 3}}}))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/catalog.png")
    with tempfile.TemporaryDirectory(prefix="rgbench-shot-") as base:
        etcd = EtcdServer(Path(base) / "etcd", name="shot")
        etcd.start(timeout=30)
        r = EtcdReader(etcd.url)
        port = free_port()
        catalog = None
        try:
            fill(r)
            report(r, 1, 100000, 2000, 40000)
            report(r, 2, 90000, 1500, 35000)
            catalog = RegistrarProcess(["catalog", "--etcd", etcd.url, "--listen",
                                        f"127.0.0.1:{port}"], log_dir=Path(base))
            wait_until(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200,
                timeout=15, ignore=(OSError,))
            time.sleep(1.0)  # the next reports: the share is their difference
            report(r, 1, 102250, 2750, 42000)
            report(r, 2, 92200, 2240, 37000)
            time.sleep(1.0)
            with Browser(f"http://127.0.0.1:{port}/") as page:
                page.command("Emulation.setDeviceMetricsOverride",
                             {"width": 1280, "height": 800, "deviceScaleFactor": 1,
                              "mobile": False}, page.session)
                page.wait_for("document.body && document.body.getAttribute('data-revision')")
                time.sleep(0.5)
                page.screenshot(out)
        finally:
            if catalog is not None:
                catalog.stop()
                catalog.cleanup()
            r.close()
            etcd.destroy()
    print(out)


if __name__ == "__main__":
    main()
