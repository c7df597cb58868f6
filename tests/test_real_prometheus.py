"""A real Prometheus scrapes the agent; the alert rules we ship pass promtool."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest

from tests.helpers import Scope, metrics_flag
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import free_port, wait_until

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "units" / "prometheus" / "registrar-alerts.yml"


@pytest.mark.real  # runs promtool: not in the fast tier
def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make setup` installs Debian's prometheus package"
    result = subprocess.run([promtool, "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(1 for line in RULES.read_text().splitlines() if line.strip().startswith("- alert:"))
    assert rules >= 10
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_alert_rules_name_only_metrics_registrar_has() -> None:
    """A renamed metric must not leave an alert that can never fire."""
    from registrar.metrics import Metrics

    names = {metric.name for metric in Metrics().registry.collect()}
    names |= {f"{name}_total" for name in names}
    used = set(re.findall(r"\bregistrar_[a-z_]+", RULES.read_text()))
    assert used and used <= names, sorted(used - names)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: `make setup` installs Debian's prometheus package"
    procs: list[tuple[subprocess.Popen[bytes], BinaryIO]] = []

    def start(target_port: int) -> int:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n  - job_name: registrar\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append((proc, log))
        return port

    yield start
    for proc, log in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=3) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_prometheus_reads_registered_services(
    prometheus: Callable[[int], int], registrar: RegistrarFactory, containers: ContainerFactory,
    etcd: EtcdServer, etcd_reader: EtcdReader, unique: str,
) -> None:
    scope = Scope(f"/rgt-{unique}", f"node-{unique}", etcd.url)
    flag, metrics_port = metrics_flag()
    agent = registrar([*scope.args("watch"), *flag, "--explicit"])
    agent.wait_for_log("docker connected", timeout=15)
    cs = [containers(labels={"registrar.service": "web"}) for _ in range(2)]
    wait_until(lambda: all(etcd_reader.get(scope.key("web", c.name)) for c in cs), timeout=10)

    prom_port = prometheus(metrics_port)

    def registered() -> float | None:
        result = query(prom_port, 'registrar_registered_services{job="registrar"}')
        if not result:
            return None
        value = result[0]["value"]
        assert isinstance(value, list)
        return float(value[1])

    # On a shared dev engine other labelled containers may count too: compare with etcd.
    def owned() -> int:
        return sum(1 for k in etcd_reader.get_prefix(scope.prefix + "/") if scope.node in k)

    wait_until(lambda: registered() == owned() >= 2, timeout=60, interval=0.5,
               ignore=(OSError,), message="Prometheus never read the gauge")
    before = owned()
    cs[0].stop(timeout=0)
    wait_until(lambda: etcd_reader.get(scope.key("web", cs[0].name)) is None, timeout=5)
    wait_until(lambda: registered() == owned() == before - 1, timeout=30, interval=0.5,
               ignore=(OSError,), message="Prometheus never saw the deregistration")
    assert query(prom_port, 'registrar_etcd_up{job="registrar"}')[0]["value"][1] == "1"  # type: ignore[index]
    rules = query(prom_port, "ALERTS")
    assert all(alert["metric"]["alertname"] != "RegistrarEtcdUnreachable"  # type: ignore[index]
               for alert in rules)
