"""Addresses from labels (pure): `registrar.ip`, `registrar.network` and `--network`, read from
Docker's inspect data (`NetworkSettings.Networks`); bad ones reject the container."""

from __future__ import annotations

from typing import Any

import pytest

from registrar.core.containers import parse_inspect
from registrar.core.naming import NamingContext, Outcome, registrations_for
from tests.inspect_data import inspect_doc, published

NOW = "2015-07-20T12:00:00Z"
OVERLAY = {"IPAddress": "10.20.0.7", "GlobalIPv6Address": ""}


def outcome(networks: dict[str, dict[str, str]] | None = None, network: str | None = None,
            **doc: Any) -> Outcome:
    data = inspect_doc(**doc)
    if networks is not None:
        data["NetworkSettings"]["Networks"].update(networks)
    ctx = NamingContext(prefix="/services", node="core-01", host_ip=None,
                        default_ip="10.0.0.5", network=network)
    return registrations_for(parse_inspect(data), ctx, NOW)


def addresses(result: Outcome) -> dict[str, tuple[str, int]]:
    assert result.rejected is None, (result.rejected, result.detail)
    return {r.instance: (r.value["host"], r.value["port"]) for r in result.registrations}


def test_the_inspect_data_gives_each_networks_addresses() -> None:
    data = inspect_doc()
    data["NetworkSettings"]["Networks"]["ov"] = {"IPAddress": "",
                                                 "GlobalIPv6Address": "fd00::7"}
    assert parse_inspect(data).networks == {"bridge": ("172.17.0.2", ""), "ov": ("", "fd00::7")}


def test_registrar_ip_is_the_host_of_every_published_port() -> None:
    ports = {"8080/tcp": published(32768), "53/udp": published(32769)}
    assert addresses(outcome(labels={"registrar.ip": "192.168.7.9"}, ports=ports)) == {
        "core-01:web-1:8080": ("192.168.7.9", 32768),
        "core-01:web-1:53:udp": ("192.168.7.9", 32769)}
    assert addresses(outcome(labels={"registrar.ip": " fd00::0005 "})) == {
        "core-01:web-1:8080": ("fd00::5", 32768)}


def test_registrar_network_registers_the_address_there_and_private_ports() -> None:
    result = outcome({"ov": OVERLAY}, labels={"registrar.network": "ov",
                                              "registrar.ip": "192.168.7.9"},
                     ports={"8080/tcp": None}, exposed=["8080/tcp", "9090/tcp"])
    assert addresses(result) == {"core-01:web-1:8080": ("10.20.0.7", 8080),
                                 "core-01:web-1:9090": ("10.20.0.7", 9090)}
    v6 = outcome({"ov": {"IPAddress": "", "GlobalIPv6Address": "fd00::7"}},
                 labels={"registrar.network": "ov"})
    assert addresses(v6) == {"core-01:web-1:8080": ("fd00::7", 8080)}


def test_the_network_flag_for_containers_attached_to_it_only() -> None:
    assert addresses(outcome({"ov": OVERLAY}, network="ov")) == {
        "core-01:web-1:8080": ("10.20.0.7", 8080)}
    assert addresses(outcome(network="ov")) == {"core-01:web-1:8080": ("10.0.0.5", 32768)}
    # its own label wins over the flag
    both = outcome({"ov": OVERLAY, "other": {"IPAddress": "10.30.0.2"}}, network="other",
                   labels={"registrar.network": "ov"})
    assert addresses(both) == {"core-01:web-1:8080": ("10.20.0.7", 8080)}


@pytest.mark.parametrize(("labels", "networks"), [
    ({"registrar.ip": "not-an-ip"}, None),
    ({"registrar.ip": "10.0.0.256"}, None),
    ({"registrar.ip": ""}, None),
    ({"registrar.network": "ov"}, None),  # not attached to it
    ({"registrar.network": "ov"}, {"ov": {"IPAddress": "", "GlobalIPv6Address": ""}}),
])
def test_a_bad_address_rejects_the_container(labels: dict[str, str],
                                             networks: dict[str, dict[str, str]] | None) -> None:
    result = outcome(networks, labels=labels)
    assert result.registrations == () and result.rejected == "invalid_address"
    assert result.detail


def test_the_network_flag_and_its_environment() -> None:
    from registrar.settings import SettingsError, parse_settings

    watch = parse_settings(["watch", "--network", "ov"], {}, "n").agent
    assert watch is not None and watch.network == "ov"
    sidecar = parse_settings(["register", "web-1"], {"REGISTRAR_NETWORK": "ov"}, "n").agent
    assert sidecar is not None and sidecar.network == "ov"
    assert parse_settings(["ls"], {"REGISTRAR_NETWORK": "ov"}, "n").agent is None  # no network
    with pytest.raises(SettingsError, match=r"^--network"):
        parse_settings(["watch", "--network", "a/b"], {}, "n")
