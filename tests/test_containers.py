"""parse_inspect: from `docker inspect` JSON to ContainerInfo (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from registrar.core.containers import (
    ContainerInfo,
    PortBinding,
    is_ending_signal,
    normalize_signal,
    parse_inspect,
)
from tests.inspect_data import CONTAINER_ID, inspect_doc, published


def test_basic_fields() -> None:
    info = parse_inspect(inspect_doc(
        "web-1", "example/web:abc123", labels={"registrar.service": "web"},
        env=["SERVICE_TAGS=blue", "EMPTY=", "NOEQUALS", "URL=http://x/?a=b"],
    ))
    assert info.id == CONTAINER_ID
    assert info.name == "web-1"  # Docker's leading "/" is gone
    assert info.image == "example/web:abc123"  # Config.Image, not the sha256 of the image
    assert info.labels == {"registrar.service": "web"}
    assert info.env["SERVICE_TAGS"] == "blue"
    assert info.env["EMPTY"] == ""
    assert info.env["NOEQUALS"] == ""
    assert info.env["URL"] == "http://x/?a=b"  # split at the first "=" only
    assert info.running and not info.paused and not info.host_network
    assert info.serving


def test_dual_stack_binding_is_one_port() -> None:
    """Docker lists 0.0.0.0 and :: separately for one `-p`: that is one registration."""
    info = parse_inspect(inspect_doc(ports={"8080/tcp": published(32768)}))
    assert info.ports == (PortBinding(8080, "tcp", 32768, "0.0.0.0"),)


def test_ipv6_listed_first_still_gives_the_ipv4_binding() -> None:
    ports = {"8080/tcp": [{"HostIp": "::", "HostPort": "32768"},
                          {"HostIp": "0.0.0.0", "HostPort": "32768"}]}
    info = parse_inspect(inspect_doc(ports=ports))
    assert info.ports == (PortBinding(8080, "tcp", 32768, "0.0.0.0"),)


def test_several_ports_udp_and_unpublished() -> None:
    ports = {
        "8080/tcp": published(32768),
        "53/udp": published(32769),
        "9090/tcp": None,  # EXPOSEd, not published
        "9091/tcp": [],
        "7000/tcp": [{"HostIp": "0.0.0.0", "HostPort": ""}],  # no host port: not published
    }
    info = parse_inspect(inspect_doc(ports=ports))
    assert set(info.ports) == {
        PortBinding(8080, "tcp", 32768, "0.0.0.0"),
        PortBinding(53, "udp", 32769, "0.0.0.0"),
    }
    assert len(info.ports) == 2


def test_specific_host_ip_is_kept() -> None:
    info = parse_inspect(inspect_doc(ports={"8080/tcp": published(8000, "10.1.2.3")}))
    assert info.ports == (PortBinding(8080, "tcp", 8000, "10.1.2.3"),)


def test_no_ports_at_all() -> None:
    empty: tuple[dict[str, Any] | None, ...] = ({}, None)
    for ports in empty:
        doc = inspect_doc(ports={})
        doc["NetworkSettings"]["Ports"] = ports
        doc["Config"]["ExposedPorts"] = None
        info = parse_inspect(doc)
        assert info.ports == () and info.exposed == ()


def test_host_network_uses_exposed_ports() -> None:
    doc = inspect_doc(network="host", ports={}, exposed=["8080/tcp", "5353/udp", "9000"])
    info = parse_inspect(doc)
    assert info.host_network
    assert info.ports == ()
    assert sorted(info.exposed) == [(5353, "udp"), (8080, "tcp"), (9000, "tcp")]


@pytest.mark.parametrize(
    ("healthcheck", "health", "has", "serving"),
    [
        (None, None, False, True),
        (["NONE"], None, False, True),  # HEALTHCHECK NONE / --no-healthcheck
        (["CMD-SHELL", "wget -q localhost:8080"], "starting", True, False),
        (["CMD", "true"], "healthy", True, True),
        (["CMD", "true"], "unhealthy", True, False),
        ([], None, False, True),
    ],
)
def test_healthcheck(
    healthcheck: list[str] | None, health: str | None, has: bool, serving: bool
) -> None:
    info = parse_inspect(inspect_doc(healthcheck=healthcheck, health=health))
    assert info.has_healthcheck is has
    assert info.health == health
    assert info.serving is serving


def test_paused_is_running_but_not_serving() -> None:
    info = parse_inspect(inspect_doc(paused=True))
    assert info.running and info.paused
    assert not info.serving


def test_stopped_and_restarting_are_not_running() -> None:
    assert not parse_inspect(inspect_doc(running=False)).serving
    doc = inspect_doc()
    doc["State"]["Restarting"] = True
    info = parse_inspect(doc)
    assert not info.running and not info.serving


def test_stop_signal() -> None:
    assert parse_inspect(inspect_doc()).stop_signal == "SIGTERM"
    assert parse_inspect(inspect_doc(stop_signal="SIGUSR1")).stop_signal == "SIGUSR1"
    assert parse_inspect(inspect_doc(stop_signal="10")).stop_signal == "10"


def test_missing_sections_do_not_crash() -> None:
    info = parse_inspect({"Id": "x"})
    assert info == ContainerInfo(id="x", name="", image="", running=False)


@pytest.mark.parametrize("port", ["²", "8080²", "٣", "-1", "0x50", "", "80 "])
def test_odd_port_specs_are_skipped_not_a_crash(port: str) -> None:
    """Unicode digits pass str.isdigit() but not int(): must not take the agent down."""
    doc = inspect_doc(ports={f"{port}/tcp": published(32768), "8080/tcp": [
        {"HostIp": "0.0.0.0", "HostPort": "²"}, {"HostIp": "0.0.0.0", "HostPort": "32770"}]})
    doc["Config"]["ExposedPorts"][f"{port}/udp"] = {}
    info = parse_inspect(doc)
    assert PortBinding(8080, "tcp", 32770, "0.0.0.0") in info.ports
    for binding in info.ports:
        assert 0 < binding.private_port < 65536 and 0 < binding.host_port < 65536


@pytest.mark.parametrize(
    ("signal", "number"),
    [("SIGTERM", "15"), ("TERM", "15"), ("15", "15"), ("sigterm", "15"), (" KILL ", "9"),
     ("SIGUSR1", "10"), ("USR1", "10"), ("010", "10"), ("SIGHUP", "1")],
)
def test_normalize_signal(signal: str, number: str) -> None:
    assert normalize_signal(signal) == number


@pytest.mark.parametrize(
    ("signal", "stop_signal", "ending"),
    [
        ("15", "SIGTERM", True),
        ("SIGINT", "SIGTERM", True),
        ("3", "SIGTERM", True),
        ("9", "SIGTERM", True),
        ("1", "SIGTERM", False),
        ("10", "SIGTERM", False),
        ("10", "SIGUSR1", True),
        ("SIGUSR1", "10", True),
        ("28", "SIGWINCH", True),  # httpd's STOPSIGNAL
        ("12", "SIGUSR1", False),
    ],
)
def test_is_ending_signal(signal: str, stop_signal: str, ending: bool) -> None:
    assert is_ending_signal(signal, stop_signal) is ending
