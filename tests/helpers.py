"""Small helpers shared by the real-tier tests of `register` and `watch`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tests.support.proc import free_port, wait_until

REQUESTS = "registrar_etcd_request_duration_seconds_count"


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


def etcd_requests(port: int, op: str | None = None) -> float:
    """How many etcd requests of `op` (every op when None) the process has made, answered or
    not: each one is observed in `registrar_etcd_request_duration_seconds`."""
    prefix = f'{REQUESTS}{{op="{op}"}}' if op else REQUESTS + "{"
    return sum(v for k, v in scrape(port).items() if k.startswith(prefix))


def reconciles(port: int) -> float:
    return scrape(port).get("registrar_reconciles_total", 0.0)


def resynced(port: int, times: int = 1, timeout: float | None = None) -> None:
    """Waits until the agent of metrics `port` has done `times` full reconciles that began
    after this call (`registrar_reconciles_total`), and started the next one: by then the
    keeper has long written what the `times`-th decided (it takes milliseconds; a resync
    interval, a second or more, passed since)."""
    start = reconciles(port)
    wanted = start + times + 1
    wait_until(lambda: reconciles(port) >= wanted,
               timeout=timeout if timeout is not None else 5 + 3 * times,
               message=lambda: f"{times} reconcile(s) never came: {reconciles(port)} of "
               f"{wanted}")


def holds(check: Callable[[], object], seconds: float, what: str,
          interval: float = 0.2) -> None:
    """Asserts that `check()` is truthy at every poll for `seconds`: for the tests whose point
    is a duration (longer than a TTL, a whole alarm), checked all along, not only at the end."""
    end = time.monotonic() + seconds
    while True:
        assert check(), f"{what}: no longer true after {seconds - (end - time.monotonic()):.1f} s"
        if time.monotonic() >= end:
            return
        time.sleep(min(interval, max(0.0, end - time.monotonic())))


def actions_since_start(docker_url: str, container: str, until: str = "die",
                        timeout: float = 10.0) -> list[str]:
    """The actions of `container`'s events from a stream opened only now from its start
    (State.StartedAt, as a sidecar opens its first), read until `until` or `timeout`."""
    import threading

    from registrar.adapters.docker_source import DockerSource
    from registrar.core import timestamps

    source = DockerSource(docker_url, env={}, timeout=30)
    actions: list[str] = []
    try:
        info = source.inspect(container)
        started = timestamps.engine_time_ns(info.started_at) if info else None
        assert info is not None and started is not None, (container, info)
        events = source.open_events(timestamps.since(started), {"container": info.id})

        def read() -> None:
            for event in events:
                actions.append(str(event.get("Action") or event.get("status")))
                if actions[-1] == until:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
    finally:
        source.close_events()
        source.close()
    return actions
