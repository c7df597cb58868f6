"""The seam between the loops and Docker: what the watcher and the commands ask of a container
source, and the one error it raises.

The loops are typed against `ContainerSource`, not against the adapter, so that the real client
(`registrar.adapters.docker_source.DockerSource`, Docker's Engine API over its socket) and the
fast tier's in-memory fake (`tests.fakes.FakeDocker`) are checked by mypy against the same
calls. It holds exactly the calls the project makes; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from registrar.core.containers import ContainerInfo
from registrar.typing_shim import Any, Protocol


class DockerUnavailable(Exception):
    """Docker could not be reached or answered with an error (daemon down, socket cut, timeout,
    HTTP 5xx): the caller retries later. The message is one line."""


class ContainerSource(Protocol):
    def inspect(self, container: str) -> ContainerInfo | None:
        """The container (name or id) as it is now; None when it does not exist."""
        ...

    def running(self) -> list[ContainerInfo]:
        """Every running container, inspected (those gone meanwhile are left out)."""
        ...

    def open_events(
        self, since: str | None, filters: Mapping[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subscribes now to container events from `since` (`SECONDS.NANOS`, None: from now)
        on, with extra filters (e.g. `{"container": ID}`); iterate to read them. Returns once
        subscribed; the iterator ends when the connection drops or `close_events` is called."""
        ...

    def close_events(self) -> None:
        """Ends a running (or opening) events iteration, from any thread."""
        ...

    def close(self) -> None:
        """Releases every connection."""
        ...
