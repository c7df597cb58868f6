"""Small helpers shared by the real-tier tests of `register` and `watch`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proc import free_port


@dataclass
class Scope:
    """One test's corner of etcd: its own prefix and node name."""

    prefix: str
    node: str
    etcd_url: str

    def key(self, service: str, container: str, port: int = 8080, udp: bool = False) -> str:
        return f"{self.prefix}/{service}/{self.node}:{container}:{port}" + (":udp" if udp else "")

    def args(self, *command: str, ttl: int = 3) -> list[str]:
        return [
            *command, "--etcd", self.etcd_url, "--prefix", self.prefix, "--node", self.node,
            "--ttl", str(ttl),
        ]


def metrics_flag() -> tuple[list[str], int]:
    port = free_port()
    return ["--metrics-addr", f"127.0.0.1:{port}"], port


def scrape(port: int) -> dict[str, float]:
    """Samples of /metrics as {'name{label="v"}': value} (labels sorted)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def value_of(raw: str | None) -> dict[str, object]:
    assert raw is not None, "key missing"
    value = json.loads(raw)
    assert isinstance(value, dict)
    return value
