"""Prometheus in the cluster's ops namespace, scraping every agent, router and etcd member.

The config is generated (JSON, which Prometheus reads as YAML). The test process queries it
through a forwarder (``Prometheus.query``), never dialling the cluster's addresses itself.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import NetnsForwarder
from .procs import NsProcess

PROMETHEUS_BIN = shutil.which("prometheus") or "prometheus"
PORT = 9090


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    # (address "IP:PORT", labels)
    targets: Sequence[tuple[str, dict[str, str]]]


def render_config(jobs: Sequence[ScrapeJob], interval: str = "2s") -> str:
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job.name,
                "scrape_timeout": interval,
                "static_configs": [
                    {"targets": [addr], "labels": labels} for addr, labels in job.targets
                ],
            }
            for job in jobs
        ],
    }
    return json.dumps(config, indent=1) + "\n"


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """``start()`` runs it in ``ns`` on ``ip:9090``; ``query(expr)``, ``value(expr)``,
    ``targets()``, ``wait_ready()``. ``url_from_root``: its web UI / API on 127.0.0.1."""

    def __init__(self, ns: str, ip: str, base_dir: Path, jobs: Sequence[ScrapeJob],
                 interval: str = "2s") -> None:  # fmt: skip
        self.ns = ns
        self.ip = ip
        self.dir = base_dir
        self.jobs = list(jobs)
        self.interval = interval
        self.config_path = base_dir / "prometheus.json"
        self.proc: NsProcess | None = None
        self.forwarder: NetnsForwarder | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{PORT}"

    def start(self) -> NsProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.jobs, self.interval))
        self.proc = NsProcess(
            self.ns,
            [
                PROMETHEUS_BIN,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--storage.tsdb.retention.time=1d",
                f"--web.listen-address={self.address}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            log_path=self.dir / "prometheus.log",
            cwd=self.dir,
            name="prometheus",
        )
        self.forwarder = NetnsForwarder(self.ns, self.ip, PORT)
        return self.proc

    @property
    def url_from_root(self) -> str:
        if self.forwarder is None:
            raise PrometheusError("prometheus not started")
        return self.forwarder.url

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        url = self.url_from_root + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url_from_root}/-/ready", timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc is not None and not self.proc.alive:
                raise PrometheusError(f"prometheus exited:\n{self.proc.logs()[-2000:]}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready within {timeout} s")
            time.sleep(0.2)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """``/api/v1/query``: the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {data}")
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a query that gives one sample (None when it gives none)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} gave {len(result)} samples; wrap it in sum()")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/targets", {"state": "active"})
        active: list[dict[str, Any]] = data["data"]["activeTargets"]
        return active

    def reload(self) -> None:
        self.config_path.write_text(render_config(self.jobs, self.interval))
        req = urllib.request.Request(f"{self.url_from_root}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        if self.proc is not None:
            self.proc.stop(5)
