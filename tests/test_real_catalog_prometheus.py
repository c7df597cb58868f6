"""A real Prometheus discovers the apps through `registrar catalog` (http_sd_configs over HTTPS
with basic auth), with the scrape config we ship (units/prometheus/, also in the README):
containers labelled `registrar.metrics=/metrics`, registered by a real `registrar watch`, are
scraped with the `__meta_registrar_*` labels relabelled, and a stopped one leaves."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import Scope
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.proc import free_port, wait_until
from tests.support.tls import CertificateAuthority

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

ROOT = Path(__file__).resolve().parent.parent
SCRAPE = ROOT / "units" / "prometheus" / "registrar-catalog-scrape.yml"
METRICS_APP = ("sh -c 'mkdir -p /www && printf \"# TYPE app_info gauge\\napp_info 1\\n\" "
               "> /www/metrics && exec httpd -f -p 8080 -h /www'")


def test_the_readme_shows_the_scrape_config_we_ship() -> None:
    shipped = SCRAPE.read_text()
    config = shipped[shipped.index("scrape_configs:"):]
    assert config in (ROOT / "README.md").read_text()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def targets(port: int) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/targets?state=active"
    with urllib.request.urlopen(url, timeout=3) as answer:
        body = json.loads(answer.read())
    return [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == "registrar-apps"]


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=3) as answer:
        result: list[dict[str, Any]] = json.loads(answer.read())["data"]["result"]
    return result


def test_prometheus_discovers_and_scrapes_the_apps(
        registrar: RegistrarFactory, containers: ContainerFactory, etcd: EtcdServer,
        prometheus: list[subprocess.Popen[bytes]], tmp_path: Path, unique: str) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: `make setup` installs Debian's prometheus package"
    ca = CertificateAuthority(tmp_path / "pki", "rgt-sd-ca")
    cert = ca.issue("catalog", server=True)
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    control = ["--control-prefix", f"/rgt-{unique}-ctl"]
    agent = registrar([*scope.args("watch"), *control, "--explicit", "--metrics-addr",
                       "127.0.0.1:0"])
    catalog_port = free_port()
    catalog = registrar("catalog", "--etcd", etcd.url, "--prefix", scope.prefix, *control,
                        "--listen", f"127.0.0.1:{catalog_port}", "--catalog-user", "prometheus",
                        "--catalog-cert", str(cert.cert), "--catalog-key", str(cert.key),
                        env={"REGISTRAR_CATALOG_PASSWORD": "sd-s3cret"})
    agent.wait_for_log("docker connected", timeout=15)
    catalog.wait_for_log("registrar catalog on", timeout=15)

    service = f"app-{unique[:8]}"
    labels = {"registrar.service": service, "registrar.metrics": "/metrics",
              "registrar.version": "v1", "registrar.tags": "scrape"}
    apps = [containers(labels=labels, command=METRICS_APP) for _ in range(2)]

    # the config we ship, pointed at this catalog, with its password and CA
    (tmp_path / "password").write_text("sd-s3cret")
    config = (SCRAPE.read_text()
              .replace("https://catalog.example:9479", f"https://127.0.0.1:{catalog_port}")
              .replace("/etc/prometheus/registrar-catalog.password", str(tmp_path / "password"))
              .replace("/etc/prometheus/registrar-catalog-ca.pem", str(ca.cert))
              .replace("scrape_interval: 15s", "scrape_interval: 1s"))
    interval = re.search(r"refresh_interval: (\d+)s", config)
    assert interval is not None
    refresh = float(interval.group(1))
    (tmp_path / "prometheus.yml").write_text(config)
    prom_port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus.append(subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True))

    def logs() -> str:
        return (tmp_path / "prometheus.log").read_text()[-3000:]

    def up_targets() -> list[dict[str, Any]]:
        return [t for t in targets(prom_port) if t["health"] == "up"]

    wait_until(lambda: len(up_targets()) == 2, timeout=60, interval=0.5, ignore=(OSError,),
               message=lambda: "Prometheus never scraped both apps: " + logs())
    found = up_targets()
    by_instance = {t["labels"]["instance"]: t for t in found}
    assert set(by_instance) == {f"{scope.node}:{c.name}:8080" for c in apps}
    for app in apps:
        target = by_instance[f"{scope.node}:{app.name}:8080"]
        assert target["labels"] | {"job": "registrar-apps"} == {
            "job": "registrar-apps", "instance": f"{scope.node}:{app.name}:8080",
            "service": service, "version": "v1", "node": scope.node, "state": "rotation"}
        assert target["discoveredLabels"]["__meta_registrar_tags"] == ",scrape,"
        assert target["discoveredLabels"]["__address__"] == f"127.0.0.1:{app.port(8080)}"
        assert target["scrapeUrl"] == f"http://127.0.0.1:{app.port(8080)}/metrics"
    wait_until(lambda: len([r for r in query(prom_port, 'app_info{job="registrar-apps"}')
                            if r["metric"].get("service") == service]) == 2,
               timeout=20, interval=0.5, ignore=(OSError,))
    assert all(r["value"][1] == "1" for r in query(prom_port, 'up{job="registrar-apps"}'))

    # a new container: a target within refresh_interval, plus the 5 s for which Prometheus'
    # discovery manager holds back target updates (its fixed throttle)
    started = time.monotonic()
    third = containers(labels=labels, command=METRICS_APP)
    wait_until(lambda: any(t["labels"]["instance"].endswith(f":{third.name}:8080")
                           for t in targets(prom_port)),
               timeout=refresh + 10, interval=0.1, ignore=(OSError,))
    appeared = time.monotonic() - started
    print(f"container start -> target in Prometheus: {appeared:.2f}s "
          f"(refresh_interval {refresh:g}s)")
    assert appeared < refresh + 5 + 2

    # a stopped one leaves the targets
    apps[0].stop(timeout=0)
    wait_until(lambda: all(not t["labels"]["instance"].endswith(f":{apps[0].name}:8080")
                           for t in targets(prom_port)),
               timeout=refresh + 10, interval=0.2, ignore=(OSError,))
    assert len(targets(prom_port)) == 2
    assert catalog.stop() == 0 and agent.stop() == 0
