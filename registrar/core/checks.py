"""registrar's own health checks, the pure half: labels -> specs, rise/fall, HTTP bytes.

Three things, none of which does I/O (the loop that dials is `registrar.agent.checker`):

- `parse_checks(labels)`: a container's check labels (`registrar.check`,
  `registrar.<private_port>.check`, `registrar.check.interval|timeout|rise|fall`) become a
  `Checks`, whose `for_port(private_port)` is that port's `CheckSpec` or None. Labels are
  somebody else's input: anything that is not exactly what the README's check labels allow raises
  `InvalidCheck` naming the label, and the container is rejected (`invalid_check`) rather than
  checked in a way its owner did not ask for. The numbers are read only when there is a check
  label at all: without one they are ignored (README, "Health checks").
- The rise/fall state machine: `after(state, passed, spec)` and `in_rotation(state)`. A port
  starts out of rotation, enters after `rise` passes in a row, leaves after `fall` failures in a
  row, and needs `rise` passes again to come back.
- The HTTP check's bytes: `http_request(host, port, path)` and `http_verdict(first_bytes)`.

Decisions the README's table leaves open:
- Numbers are plain decimals (`2`, `0.5`, `.5`): no sign, exponent, `nan` or `inf`, no
  surrounding spaces; an interval is at most MAX_INTERVAL (an hour), so a typo cannot switch a
  check off in practice. rise/fall are plain integers.
- An unknown `registrar.check.<word>` label (a typo such as `registrar.check.intervall`) is a
  bad check label when the container has a check: silently using the default instead would
  check it in a way its owner did not ask for.
- Only TCP ports are checked: neither a TCP connect nor an HTTP GET says anything of a UDP
  service, so UDP ports of a checked container are registered unchecked.
- HTTP paths are limited to what may stand in a request line: RFC 3986 path and query
  characters, `%XX` escapes, at most MAX_PATH characters, no fragment, not starting `//`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from registrar.core.names import host_port

CHECK_LABEL = "registrar.check"
NUMBER_LABELS = ("interval", "timeout", "rise", "fall")  # registrar.check.<word>
DEFAULT_INTERVAL = 2.0
MIN_INTERVAL = 0.2
MAX_INTERVAL = 3600.0
MAX_DEFAULT_TIMEOUT = 1.0
DEFAULT_RISE = 1
DEFAULT_FALL = 2
MAX_COUNT = 100
MAX_PATH = 1024
MAX_STATUS_LINE = 512  # bytes of an answer without a line end: not an HTTP answer

_PORT_CHECK = re.compile(r"registrar\.([0-9]{1,5})\.check", re.ASCII)
_DECIMAL = re.compile(r"[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9}", re.ASCII)
_INTEGER = re.compile(r"[0-9]{1,3}", re.ASCII)
# RFC 3986 pchar and "/" "?" (a query is fine); no "#", space, quote, backslash or control
_PATH = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*", re.ASCII)
_STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: [^\r\n]*)?\r?", re.ASCII)

Kind = Literal["tcp", "http"]


class InvalidCheck(ValueError):
    """A check label that is not one the README's table allows; `label` is its name."""

    def __init__(self, label: str, problem: str) -> None:
        super().__init__(f"{label[:64]}: {problem}")
        self.label = label[:64]


@dataclass(frozen=True)
class CheckSpec:
    """How one port is checked. `path` is the HTTP path (None for a TCP check)."""

    kind: Kind
    path: str | None
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_INTERVAL / 2
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL

    def __post_init__(self) -> None:
        # parse_checks only builds valid specs; this catches a spec built by hand (a test)
        problems = [
            what for what, bad in (
                ("kind", self.kind not in ("tcp", "http")),
                ("path", (self.path is None) != (self.kind == "tcp")
                 or (self.path is not None and not valid_path(self.path))),
                ("interval", not MIN_INTERVAL <= self.interval <= MAX_INTERVAL),
                ("timeout", not 0 < self.timeout <= self.interval),
                ("rise", not 1 <= self.rise <= MAX_COUNT),
                ("fall", not 1 <= self.fall <= MAX_COUNT),
            ) if bad
        ]
        if problems:
            raise ValueError(f"bad CheckSpec ({', '.join(problems)}): {self!r}")


@dataclass(frozen=True)
class Checks:
    """The checks of one container: a default for every TCP port and per-port overrides."""

    default: CheckSpec | None = None
    per_port: Mapping[int, CheckSpec] = field(default_factory=dict)

    def for_port(self, private_port: int, protocol: str = "tcp") -> CheckSpec | None:
        if protocol != "tcp":
            return None
        return self.per_port.get(private_port, self.default)


NO_CHECKS = Checks()


@dataclass(frozen=True)
class Target:
    """What the checker dials for one registered port: the registered host and port."""

    host: str
    port: int
    spec: CheckSpec


# --- labels -----------------------------------------------------------------------------


def valid_path(path: str) -> bool:
    # "//host/x" is a URL written where a path was meant; some servers read it as one
    return (len(path) <= MAX_PATH and not path.startswith("//")
            and _PATH.fullmatch(path) is not None)


def _decimal(label: str, text: str) -> float:
    if _DECIMAL.fullmatch(text) is None:
        raise InvalidCheck(label, f"{text[:32]!r} is not a number of seconds (like 2 or 0.5)")
    return float(text)  # at most 9 + 9 digits: always finite, never huge


def _count(label: str, text: str) -> int:
    if _INTEGER.fullmatch(text) is None or not 1 <= int(text) <= MAX_COUNT:
        raise InvalidCheck(label, f"{text[:32]!r} is not an integer from 1 to {MAX_COUNT}")
    return int(text)


def _kind(label: str, text: str) -> tuple[Kind, str | None]:
    if text == "tcp":
        return "tcp", None
    scheme, colon, path = text.partition(":")
    if scheme != "http" or not colon:
        raise InvalidCheck(label, f"{text[:64]!r} is neither 'tcp' nor 'http:PATH'")
    if not path.startswith("/"):
        raise InvalidCheck(label, f"path {path[:64]!r} does not start with '/'")
    if not valid_path(path):
        raise InvalidCheck(label, f"path {path[:64]!r} is not a plain URL path of at most "
                                  f"{MAX_PATH} characters (no spaces, controls or '#')")
    return "http", path


def _timing(labels: Mapping[str, str]) -> tuple[float, float, int, int]:
    interval = DEFAULT_INTERVAL
    name = f"{CHECK_LABEL}.interval"
    if name in labels:
        interval = _decimal(name, labels[name])
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise InvalidCheck(name, f"{interval:g} is not from {MIN_INTERVAL:g} to "
                                     f"{MAX_INTERVAL:g} seconds")
    timeout = min(interval / 2, MAX_DEFAULT_TIMEOUT)
    name = f"{CHECK_LABEL}.timeout"
    if name in labels:
        timeout = _decimal(name, labels[name])
        if not 0 < timeout <= interval:
            raise InvalidCheck(name, f"{timeout:g} is not more than 0 and at most the "
                                     f"interval ({interval:g}s)")
    rise = DEFAULT_RISE
    name = f"{CHECK_LABEL}.rise"
    if name in labels:
        rise = _count(name, labels[name])
    fall = DEFAULT_FALL
    name = f"{CHECK_LABEL}.fall"
    if name in labels:
        fall = _count(name, labels[name])
    return interval, timeout, rise, fall


def parse_checks(labels: Mapping[str, str]) -> Checks:
    """The checks a container's labels ask for (NO_CHECKS without a check label); raises
    InvalidCheck on any bad check label."""
    kinds: dict[int | None, str] = {}
    numbers: list[str] = []
    for name in labels:
        if name == CHECK_LABEL:
            kinds[None] = name
        elif name.startswith(CHECK_LABEL + "."):
            numbers.append(name)
        elif (match := _PORT_CHECK.fullmatch(name)) is not None:
            kinds[int(match.group(1))] = name
    if not kinds:
        return NO_CHECKS  # the numbers alone ask for nothing: ignored
    for name in sorted(numbers):
        if name[len(CHECK_LABEL) + 1 :] not in NUMBER_LABELS:
            raise InvalidCheck(name, "unknown check setting (interval, timeout, rise, fall)")
    interval, timeout, rise, fall = _timing(labels)
    specs: dict[int | None, CheckSpec] = {}
    for port, name in sorted(kinds.items(), key=lambda item: item[1]):
        kind, path = _kind(name, labels[name])
        specs[port] = CheckSpec(kind, path, interval, timeout, rise, fall)
    default = specs.pop(None, None)
    per_port = {port: spec for port, spec in specs.items() if port is not None}
    return Checks(default=default, per_port=per_port)


# --- rise and fall ------------------------------------------------------------------------


class Phase(enum.Enum):
    OUT = "out"  # not in rotation: counting passes toward `rise`
    IN = "in"  # in rotation: counting failures toward `fall`


@dataclass(frozen=True)
class CheckState:
    """One port's place: its phase, and how many results in a row went against it."""

    phase: Phase = Phase.OUT
    streak: int = 0  # passes in a row while OUT, failures in a row while IN


INITIAL = CheckState()

def _rise(spec: CheckSpec) -> int:
    return spec.rise


def _fall(spec: CheckSpec) -> int:
    return spec.fall


# phase -> (the result that counts toward leaving it, how many in a row it takes, where it
# leads); the other result resets the streak.
TRANSITIONS: Mapping[Phase, tuple[bool, Callable[[CheckSpec], int], Phase]] = {
    Phase.OUT: (True, _rise, Phase.IN),
    Phase.IN: (False, _fall, Phase.OUT),
}


def after(state: CheckState, passed: bool, spec: CheckSpec) -> CheckState:
    """The state after one check result."""
    counts, needed, leads_to = TRANSITIONS[state.phase]
    if passed != counts:
        return CheckState(state.phase, 0)
    streak = state.streak + 1
    if streak >= needed(spec):
        return CheckState(leads_to, 0)
    return CheckState(state.phase, streak)


def in_rotation(state: CheckState) -> bool:
    return state.phase is Phase.IN


# --- HTTP ---------------------------------------------------------------------------------

NOT_HTTP = 0  # http_status: the answer is not an HTTP status line


def _host_header(host: str, port: int) -> str:
    return host_port(host.replace("%", "%25"), port)  # IPv6: a zone's "%" escaped (RFC 6874)


def http_request(host: str, port: int, path: str) -> bytes:
    """The GET of an HTTP check. HTTP/1.0, so no server answers with 1xx or chunks first;
    `Connection: close` because only the status line is read."""
    if not valid_path(path):
        raise ValueError(f"not a checkable path: {path[:64]!r}")
    if not host or any(c in host for c in " \r\n\t/[]") or not host.isascii():
        raise ValueError(f"not a host address: {host[:64]!r}")
    return (
        f"GET {path} HTTP/1.0\r\n"
        f"Host: {_host_header(host, port)}\r\n"
        "User-Agent: registrar-check\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


def http_status(first_bytes: bytes) -> int | None:
    """The status code of an answer's first bytes; None while its first line is incomplete;
    NOT_HTTP when that line is not an HTTP status line (or too long to be one)."""
    line, newline, _rest = first_bytes.partition(b"\n")
    if not newline:
        return None if len(first_bytes) < MAX_STATUS_LINE else NOT_HTTP
    if len(line) >= MAX_STATUS_LINE:
        return NOT_HTTP
    match = _STATUS_LINE.fullmatch(line)
    return int(match.group(1)) if match is not None else NOT_HTTP


def http_verdict(first_bytes: bytes) -> bool | None:
    """Whether an answer passes (2xx or 3xx); None: not enough bytes yet to tell. An answer
    that ends before its first line is complete has failed: the caller decides that."""
    status = http_status(first_bytes)
    if status is None:
        return None
    return 200 <= status < 400
