"""A tiny Docker Engine API client over a unix socket (stdlib only).

Used for the calls a cluster makes many times (ping, tag, create + start + inspect): a CLI
process per call costs ~50 ms of CPU, which adds up at hundreds of containers on 2 cores.
Everything else goes through the docker CLI (``Host.docker``).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from tests.support.docker_env import DockerError

API = "/v1.41"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class DockerAPI:
    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        url = API + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        conn = _UnixHTTPConnection(self.socket_path, timeout or self.timeout)
        try:
            headers = {"Connection": "close"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 204, 304),
        timeout: float | None = None,
    ) -> Any:
        """The decoded JSON answer (None when empty); DockerError on another status."""
        status, data = self.request(method, path, body, query, timeout)
        if status not in ok:
            raise DockerError(
                f"{method} {path} on {self.socket_path}: {status} {data.decode(errors='replace')}"
            )
        return json.loads(data) if data.strip() else None

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            status, body = self.request("GET", "/_ping", timeout=timeout)
        except OSError:
            return False
        return status == 200 and body.strip() == b"OK"

    def tag(self, image: str, repo: str, tag: str) -> None:
        self.call("POST", f"/images/{image}/tag", query={"repo": repo, "tag": tag})

    def image_exists(self, image: str) -> bool:
        status, _ = self.request("GET", f"/images/{image}/json")
        return status == 200

    def run(
        self,
        name: str,
        image: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        publish: Mapping[str, str] | None = None,
        host_config: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``docker run -d``: create, start, inspect. ``publish`` maps a container port
        ("8080/tcp") to the host address to publish it on (a free host port each)."""
        publish = dict(publish or {})
        body: dict[str, Any] = {
            "Image": image,
            "Cmd": list(cmd),
            "Env": [f"{k}={v}" for k, v in (env or {}).items()],
            "Labels": dict(labels or {}),
            "ExposedPorts": {p: {} for p in publish},
            "HostConfig": {
                "PortBindings": {p: [{"HostIp": ip, "HostPort": ""}] for p, ip in publish.items()},
                **dict(host_config or {}),
            },
            **dict(config or {}),
        }
        created = self.call("POST", "/containers/create", body, query={"name": name})
        cid = str(created["Id"])
        self.call("POST", f"/containers/{cid}/start")
        info: dict[str, Any] = self.call("GET", f"/containers/{cid}/json")
        return info

    def inspect(self, container: str) -> dict[str, Any]:
        info: dict[str, Any] = self.call("GET", f"/containers/{container}/json")
        return info

    def stop(self, container: str, timeout: int = 1) -> None:
        self.call("POST", f"/containers/{container}/stop", query={"t": str(timeout)},
                  timeout=timeout + 60)  # fmt: skip

    def kill(self, container: str, signal: str = "KILL") -> None:
        self.call("POST", f"/containers/{container}/kill", query={"signal": signal})

    def start(self, container: str) -> None:
        self.call("POST", f"/containers/{container}/start")

    def remove(self, container: str, force: bool = True) -> None:
        self.call(
            "DELETE",
            f"/containers/{container}",
            query={"force": "1" if force else "0", "v": "1"},
            ok=(200, 204, 404),
        )

    def containers(self, all: bool = True) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call(
            "GET", "/containers/json", query={"all": "1" if all else "0"}
        )
        return out
