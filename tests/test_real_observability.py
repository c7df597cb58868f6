"""Metrics, /healthz and logs of a real agent, after real Docker events."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Scope, healthz, metrics_flag, scrape
from tests.support.docker_env import ContainerFactory
from tests.support.etcd import EtcdServer
from tests.support.etcd_reader import EtcdReader
from tests.support.proc import wait_until

if TYPE_CHECKING:
    from tests.conftest import RegistrarFactory

SECRET = "s3cret-Pa55word"


@pytest.fixture
def scope(etcd: EtcdServer, unique: str) -> Scope:
    return Scope(prefix=f"/rgt-{unique}", node=f"node-{unique}", etcd_url=etcd.url)


def test_metrics_follow_real_events_and_json_logs_parse(
    scope: Scope, registrar: RegistrarFactory, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    flag, port = metrics_flag()
    proc = registrar([*scope.args("watch"), *flag, "--explicit", "--log-format", "json",
                      "--log-level", "debug"])
    proc.wait_for_log("docker connected", timeout=15)
    assert healthz(port) == 200
    cs = [containers(labels={"registrar.service": "web"}) for _ in range(3)]
    hostile = containers(labels={"registrar.service": "../etc"})
    keys = {scope.key("web", c.name) for c in cs}

    def owned() -> set[str]:
        return {k for k in etcd_reader.get_prefix(scope.prefix + "/") if scope.node in k}

    wait_until(lambda: owned() == keys, timeout=10)
    # The gauge equals the keys this process owns in etcd (on a shared engine, other
    # labelled containers may be registered too: compare with what etcd holds for this node).
    wait_until(lambda: scrape(port)["registrar_registered_services"] == len(owned()), timeout=5)
    samples = scrape(port)
    assert samples["registrar_registrations_total"] >= 3
    assert samples["registrar_registration_latency_seconds_count"] >= 3
    assert samples["registrar_etcd_up"] == 1
    assert samples["registrar_docker_up"] == 1
    assert samples['registrar_docker_events_total{action="start"}'] >= 4
    assert samples['registrar_rejected_containers_total{reason="invalid_service_name"}'] >= 1
    assert samples['registrar_build_info{version="0.1.0"}'] == 1
    assert samples['registrar_etcd_request_duration_seconds_count{op="lease_grant"}'] >= 1

    cs[0].stop(timeout=0)
    wait_until(lambda: scope.key("web", cs[0].name) not in owned(), timeout=5)
    wait_until(lambda: scrape(port)["registrar_registered_services"] == len(owned()), timeout=5)
    assert scrape(port)["registrar_deregistrations_total"] >= 1
    assert hostile.name  # its rejection is in the log below

    proc.terminate()
    assert proc.wait(10) == 0
    events = []
    for line in proc.logs().splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "message"} <= set(entry)
        events.append(entry)
    registered = [e for e in events if e.get("event") == "register"]
    assert {e["instance"] for e in registered} >= {k.rsplit("/", 1)[1] for k in keys}
    assert any(e.get("event") == "deregister" and e["service"] == "web" for e in events)
    assert any(e.get("event") == "reject" and e["reason"] == "invalid_service_name"
               for e in events)
    assert any(e.get("event") == "deregister_all" for e in events)


def test_the_password_never_shows(
    scope: Scope, registrar: RegistrarFactory, containers: ContainerFactory,
    etcd_reader: EtcdReader,
) -> None:
    # etcd here has no auth: the agent fails to authenticate and retries; the failure is
    # logged, and the password must appear nowhere: not in logs, not in metrics.
    flag, port = metrics_flag()
    proc = registrar([*scope.args("watch"), *flag, "--etcd-user", "root",
                      "--log-level", "debug"], env={"REGISTRAR_ETCD_PASSWORD": SECRET})
    proc.wait_for_log("docker connected", timeout=15)
    containers(labels={"registrar.service": "web"})
    wait_until(lambda: "etcd" in proc.logs(), timeout=5)
    text = "\n".join(f"{k} {v}" for k, v in scrape(port).items())
    proc.terminate()
    proc.wait(15)
    assert SECRET not in proc.logs()
    assert SECRET not in text
