"""Shared test servers for the scale part: one process listening on many loopback ports.

    python -m bench.scale_listener PORT=LABEL [PORT=LABEL ...]

Every connection on PORT gets one HTTP/1.0 answer, 200 with the body `sim PORT LABEL` (what the
client load's "NODE NAME VERSION" expects), then is closed; a connection that sends nothing (a
layer-4 health check) is closed quietly. Thousands of registrations point at a few of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys


async def _answer(label: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  ) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                             asyncio.TimeoutError):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        if head:
            body = label.encode() + b"\n"
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
    writer.close()


async def _serve(labels: dict[int, str]) -> None:
    servers = []
    for port, label in labels.items():
        text = f"sim {port} {label}"

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         text: str = text) -> None:
            await _answer(text, reader, writer)

        servers.append(await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024))
    print("listening", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


OPEN_FILES = 262_144  # HAProxy with 1,000 frontends and 10,000 servers asks for ~34,000


def raise_open_files() -> int:
    """The open-file limit of this process and of everything it starts (the scale part's
    simulated hosts, etcd, the routers and their HAProxy, these listeners): as high as root may
    set it, else the hard limit. The new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, OPEN_FILES),) * 2)
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str]) -> int:
    raise_open_files()
    labels = {int(port): label for port, _, label in (a.partition("=") for a in argv)}
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
