"""Realistic `docker inspect` documents, as plain dicts, for the fast tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CONTAINER_ID = "3984b4c68fd0" + "5c1e8d7a2b9f" * 4 + "0a1b"  # 64 hex digits
IMAGE_ID = "sha256:" + "d2a6b7c4e1f0" * 5 + "9a8b"

Ports = Mapping[str, Sequence[Mapping[str, str]] | None]


def published(host_port: int, host_ip: str = "0.0.0.0", ipv6: bool = True) -> list[dict[str, str]]:
    """Docker's bindings for `-p host_port:...`: one for 0.0.0.0 and one for :: (dual stack)."""
    bindings = [{"HostIp": host_ip, "HostPort": str(host_port)}]
    if ipv6 and host_ip == "0.0.0.0":
        bindings.append({"HostIp": "::", "HostPort": str(host_port)})
    return bindings


def inspect_doc(
    name: str = "web-1",
    image: str = "example/web:abc123",
    *,
    cid: str = CONTAINER_ID,
    labels: Mapping[str, str] | None = None,
    env: Sequence[str] | Mapping[str, str] | None = None,
    ports: Ports | None = None,
    exposed: Sequence[str] | None = None,
    network: str = "bridge",
    running: bool = True,
    paused: bool = False,
    healthcheck: Sequence[str] | None = None,
    health: str | None = None,
    stop_signal: str | None = None,
) -> dict[str, Any]:
    """The JSON of `docker inspect NAME` (one element), trimmed to what matters plus noise."""
    if ports is None:
        ports = {"8080/tcp": published(32768)}
    if isinstance(env, Mapping):
        env = [f"{key}={value}" for key, value in env.items()]
    specs = exposed if exposed is not None else list(ports)
    exposed_ports: dict[str, dict[str, Any]] = {spec: {} for spec in specs}
    config: dict[str, Any] = {
        "Hostname": cid[:12],
        "Domainname": "",
        "User": "",
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "ExposedPorts": exposed_ports,
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "Env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            *(env or []),
        ],
        "Cmd": ["httpd", "-f", "-p", "8080"],
        "Image": image,
        "Volumes": None,
        "WorkingDir": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": dict(labels or {}),
    }
    if stop_signal is not None:
        config["StopSignal"] = stop_signal
    if healthcheck is not None:
        config["Healthcheck"] = {"Test": list(healthcheck), "Interval": 1_000_000_000}
    state: dict[str, Any] = {
        "Status": "paused" if paused else ("running" if running else "exited"),
        "Running": running,
        "Paused": paused,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": 4242 if running else 0,
        "ExitCode": 0,
        "Error": "",
        "StartedAt": "2015-07-20T12:00:00.123456789Z",
        "FinishedAt": "0001-01-01T00:00:00Z",
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
    port_bindings = {  # what was asked for (`-p`); Docker reports the result in NetworkSettings
        spec: [{"HostIp": "", "HostPort": bindings[0]["HostPort"]}]
        for spec, bindings in ports.items()
        if bindings
    }
    return {
        "Id": cid,
        "Created": "2015-07-20T11:59:58.987654321Z",
        "Path": "httpd",
        "Args": ["-f", "-p", "8080"],
        "State": state,
        "Image": IMAGE_ID,
        "ResolvConfPath": f"/var/lib/docker/containers/{cid}/resolv.conf",
        "Name": "/" + name,
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "HostConfig": {
            "NetworkMode": network,
            "PortBindings": port_bindings,
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "AutoRemove": False,
            "PublishAllPorts": False,
        },
        "Config": config,
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": "5a8d" * 16,
            "Ports": {} if network == "host" else {k: (list(v) if v else None)
                                                   for k, v in ports.items()},
            "IPAddress": "" if network == "host" else "172.17.0.2",
            "Networks": {network: {"IPAddress": "" if network == "host" else "172.17.0.2"}},
        },
    }
