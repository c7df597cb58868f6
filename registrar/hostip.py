"""The host's primary IPv4 address: the source address of its default route."""

from __future__ import annotations

import socket


def primary_ipv4() -> str:
    # connect() on a UDP socket sends nothing; it only asks the kernel which source address
    # the default route would use.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
