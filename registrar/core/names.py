"""The shapes of names, shared by the command line, the keys and the labels (pure).

A name (service, version, node, container, path segment) is 1-128 characters of letters, digits,
`.`, `_` and `-`, starting with a letter or digit: it can never make a key leave its prefix.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# `--header NAME`: an HTTP header name that goes into HAProxy's config as it is (no quoting)
HEADER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


def host_port(host: str, port: object) -> str:
    """`host:port`, an IPv6 address in brackets (`[fd00::5]:8080`): the one way an address is
    written for a connection, a config or a discovery target."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_instance(instance: str) -> tuple[str, str, str] | None:
    """An instance id's node, container and port (`{node}:{container}:{port}[:udp]`), or None
    when it has not that shape. The parts are not checked: each caller has its own rule."""
    parts = instance.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "udp"):
        return None
    return parts[0], parts[1], parts[2]


def valid_instance(instance: str) -> bool:
    """An instance id as an operator may give it: names for node and container, a port 1-65535."""
    parts = split_instance(instance)
    if parts is None:
        return False
    node, container, port = parts
    return (bool(NAME_RE.fullmatch(node)) and bool(NAME_RE.fullmatch(container))
            and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535)
