"""The Docker adapter: inspect, list and follow container events, behind a small interface.

Two API clients, as the SDK needs: one for the long-lived events stream, one for inspects.
Every Docker or transport error becomes `DockerUnavailable`; a missing container is `None`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from registrar.core.containers import ContainerInfo, exposed_ports, parse_inspect

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


class DockerUnavailable(Exception):
    """Docker could not be reached (daemon down, socket cut, timeout)."""


def _errors() -> tuple[type[BaseException], ...]:
    import docker.errors
    import requests.exceptions

    return (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class DockerSource:
    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT) -> None:
        self._url = url
        self._timeout = timeout
        self._api: Any = None
        self._stream: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        import docker

        try:
            return docker.APIClient(base_url=self._url, timeout=self._timeout, version="auto")
        except _errors() as exc:
            raise DockerUnavailable(f"{self._url}: {exc}") from None

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = self._client()
        return self._api

    def inspect(self, container: str) -> ContainerInfo | None:
        import docker.errors

        try:
            data = self.api.inspect_container(container)
            info = parse_inspect(data)
            if info.host_network and not info.exposed:
                info = replace(info, exposed=self._image_exposed(str(data.get("Image") or "")))
            return info
        except docker.errors.NotFound:
            return None
        except _errors() as exc:
            self._api = None
            raise DockerUnavailable(f"inspect {container[:64]}: {exc}") from None

    def _image_exposed(self, image: str) -> tuple[tuple[int, str], ...]:
        """Podman leaves a host-network container's ExposedPorts empty: its image has them."""
        import docker.errors

        try:
            config = self.api.inspect_image(image).get("Config") or {}
        except docker.errors.NotFound:
            return ()
        return exposed_ports(config.get("ExposedPorts"))

    def running(self) -> list[ContainerInfo]:
        """Every running container, inspected (those gone meanwhile are left out)."""
        try:
            summaries = self.api.containers(filters={"status": "running"})
        except _errors() as exc:
            self._api = None
            raise DockerUnavailable(f"list containers: {exc}") from None
        found = []
        for summary in summaries:
            info = self.inspect(summary["Id"])
            if info is not None:
                found.append(info)
        return found

    def open_events(
        self, since: str | None, filters: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subscribes now to container events from `since` on; iterate to read them.

        The iterator ends when the connection drops or `close_events` is called.
        """
        try:
            client = self._client()
            stream = client.events(
                since=since, decode=True, filters={"type": "container", **(filters or {})}
            )
        except _errors() as exc:
            raise DockerUnavailable(f"events: {exc}") from None
        with self._lock:
            self._stream = stream
        return self._iterate(client, stream)

    def _iterate(self, client: Any, stream: Any) -> Iterator[dict[str, Any]]:
        try:
            yield from stream
        except _errors() as exc:
            raise DockerUnavailable(f"events stream: {exc}") from None
        finally:
            with self._lock:
                self._stream = None
            client.close()

    def close_events(self) -> None:
        """Ends a running events iteration from another thread."""
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already closed by the peer
                log.debug("closing the events stream failed", exc_info=True)

    def close(self) -> None:
        self.close_events()
        if self._api is not None:
            self._api.close()
            self._api = None
