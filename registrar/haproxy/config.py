"""Registrations -> backends -> HAProxy config text. Pure.

- `parse_registration`: one etcd key and value to a `Server` of a service, or a `Rejected` with
  the reason (a value that is not JSON, lacks host or port, ...).
- `build_backends`: the servers of every service named in `--bind`, sorted, with HAProxy-safe
  and stable server names derived from the instance.
- `server_weights`: the weights that give a canary's version its share of new requests.
- `render`: the built-in Jinja2 template (tcp and http mode) or the operator's.
The runtime-API side (bringing a running HAProxy to new backends without a reload) is in
`haproxy.runtime`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import jinja2

from registrar import __version__
from registrar.core.control import Canary
from registrar.core.layout import parse_key
from registrar.core.names import host_port
from registrar.core.planner import json_object
from registrar.haproxy.latency import LOG_FORMAT
from registrar.settings import Bind

SPARE_PREFIX = "_spare"  # server-template slots: _spare1, _spare2, ... (no instance starts with _)
MIN_SPARES = 32
HARD_STOP_AFTER = "30s"  # old workers of a reload get this long to finish their connections
CHECK_TIMEOUT = "250ms"  # a server check not answered by then has failed
BUILTIN_TEMPLATE = "haproxy.cfg.j2"

# HAProxy identifiers: letters, digits, '-', '_', '.', ':'. We also want an alphanumeric first.
SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")

# Reasons a key or value is skipped (label of registrar_haproxy_invalid_registrations_total).
INVALID_KEY = "invalid_key"
INVALID_JSON = "invalid_json"
MISSING_HOST_OR_PORT = "missing_host_or_port"
INVALID_HOST = "invalid_host"
INVALID_PORT = "invalid_port"


DEFAULT_WEIGHT = 100  # every server's weight without a canary (HAProxy's range is 0-256)
MAX_WEIGHT = 256


@dataclass(frozen=True, order=True)
class Server:
    name: str  # HAProxy server name, derived from the instance
    host: str  # an IP address, normalised
    port: int
    instance: str  # the key's last segment: {node}:{container_name}:{private_port}
    version: str | None = None  # the value's `version`: traffic is counted by it
    weight: int = DEFAULT_WEIGHT

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 addresses in brackets (as HAProxy's config wants them)."""
        return host_port(self.host, self.port)


@dataclass(frozen=True)
class Routed:
    """One registration as the router sees it: a server of a service."""

    service: str
    server: Server


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class Backend:
    """A service named in --bind: its frontend's addresses and its servers (sorted by name),
    and the canary in progress on it, if any (its weights key)."""

    service: str
    binds: tuple[str, ...]  # "127.0.0.1:8080", "[::1]:8080"
    servers: tuple[Server, ...]
    canary: Canary | None = None
    spare_slots: int | None = None  # --spare-slots (None: auto, see `spare_count`)

    # --- a canary's --header and --sticky (http mode; see the built-in template) ----------

    @property
    def header(self) -> str | None:
        """`--header NAME`: NAME: always goes to `{backend}_always` (the canary's version),
        NAME: never to `{backend}_never` (the others), whatever the weights."""
        return self.canary.header if self.canary is not None else None

    @property
    def sticky(self) -> bool:
        """`--sticky`: a cookie keeps each client on the server (so the version) that first
        answered it; dynamic (from the server's address and a key), so slots the runtime API
        fills get one too."""
        return self.canary is not None and self.canary.sticky

    @property
    def canary_servers(self) -> tuple[Server, ...]:
        version = self.canary.version if self.canary is not None else None
        return tuple(s for s in self.servers if version is not None and s.version == version)

    @property
    def other_servers(self) -> tuple[Server, ...]:
        return tuple(s for s in self.servers if s not in self.canary_servers)

    @property
    def cookie(self) -> str:
        return f"registrar-{self.service}"

    @property
    def cookie_key(self) -> str:
        """The same on every router: a client keeps its server whichever router it reaches."""
        return hashlib.sha256(f"registrar sticky {self.service}".encode()).hexdigest()[:16]

    @property
    def routing(self) -> tuple[object, ...]:
        """What the runtime API cannot change: the header's two backends (with their
        servers, rendered in the file) and the cookie. A change of it needs a reload."""
        if self.header is None:
            return ("sticky",) if self.sticky else ()
        return (self.header, self.sticky,
                tuple((s.name, s.address) for s in self.canary_servers),
                tuple((s.name, s.address) for s in self.other_servers))

    @property
    def frontend(self) -> str:
        return f"fe_{self.service}"

    @property
    def backend(self) -> str:
        return f"be_{self.service}"

    @property
    def spares(self) -> int:
        """Empty server slots rendered after the servers, for the runtime API to fill."""
        return spare_count(len(self.servers), self.spare_slots)

    @property
    def spare_prefix(self) -> str:
        return SPARE_PREFIX


def spare_count(servers: int, fixed: int | None = None) -> int:
    """`fixed` (--spare-slots), else as many as the servers (a deploy of as many new instances
    beside them needs no reload), and at least MIN_SPARES."""
    return fixed if fixed is not None else max(MIN_SPARES, servers)


# --- keys and values ----------------------------------------------------------------------


def server_name(instance: str) -> str:
    """A stable HAProxy-safe server name for an instance.

    Instances written by registrar (`node:container:port[:udp]`) are safe as they are and kept
    unchanged; anything else is sanitised and gets a hash of the original appended, so two
    different instances never share a name and none can look like a spare slot (`_spareN`).
    """
    if SERVER_NAME_RE.fullmatch(instance):
        return instance
    digest = hashlib.sha1(instance.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cleaned = _UNSAFE.sub("_", instance).lstrip("._:-")[:100]
    return f"{cleaned}-{digest}" if cleaned else f"x-{digest}"


def ip_of(raw: object) -> str | None:
    if not isinstance(raw, str):
        return None
    try:
        address = ipaddress.ip_address(raw.strip().strip("[]"))
    except ValueError:
        return None
    if address.is_unspecified or address.is_multicast:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def parse_registration(prefix: str, key: str, value: str) -> Routed | Rejected:
    """One key `{prefix}/{service}/{instance}` and its JSON value, or why it is skipped.

    `host` must be an IP address (a host name would make `haproxy -c` resolve it, and one bad
    name would then block every update) and `port` an integer 1-65535.
    """
    parsed = parse_key(prefix, key)
    if parsed is None:
        return Rejected(INVALID_KEY, f"not {prefix}/SERVICE/INSTANCE")
    service, instance = parsed
    data = json_object(value)
    if data is None:
        return Rejected(INVALID_JSON, "value is not a JSON object")
    if "host" not in data or "port" not in data:
        return Rejected(MISSING_HOST_OR_PORT, "value lacks host or port")
    host = ip_of(data["host"])
    if host is None:
        return Rejected(INVALID_HOST, f"host {str(data['host'])[:64]!r} is not an IP address")
    port = data["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return Rejected(INVALID_PORT, f"port {str(port)[:16]!r} is not an integer 1-65535")
    version = data.get("version")
    return Routed(service, Server(server_name(instance), host, port, instance,
                                  version if isinstance(version, str) else None))


def _bind_address(bind: Bind) -> str:
    return host_port(bind.host, bind.port)


def server_weights(servers: Sequence[Server], canary: Canary | None) -> dict[str, int]:
    """Weights (by server name) that send `canary.percent` % of new requests to the canary's
    version, evenly among its servers, and the rest evenly among the others. Without a canary,
    or without servers on both sides, every server weighs the same."""
    ours = [s.name for s in servers if canary is not None and s.version == canary.version]
    others = [s.name for s in servers if s.name not in set(ours)]
    if canary is None or not ours or not others:
        return dict.fromkeys((s.name for s in servers), DEFAULT_WEIGHT)
    # n_ours * w_ours / (n_ours * w_ours + n_others * w_others) = P / 100
    want_ours = canary.percent * len(others)
    want_others = (100 - canary.percent) * len(ours)
    scale = MAX_WEIGHT / max(want_ours, want_others)
    weights = dict.fromkeys(others, max(1, round(want_others * scale)))
    weights.update(dict.fromkeys(ours, max(1, round(want_ours * scale))))
    return weights


def build_backends(
    binds: Sequence[Bind], registrations: Iterable[Routed],
    canaries: Mapping[str, Canary] | None = None, spare_slots: int | None = None,
) -> tuple[Backend, ...]:
    """One backend per service of --bind (in the order given), with every instance's server;
    their weights follow the service's canary (`{control_prefix}/weights/SERVICE`), if any.

    A service with no registration gets an empty backend (HAProxy answers 503 / closes): the
    frontend stays, so the first instance to appear needs no reload.
    """
    return BackendCache(spare_slots).build(binds, registrations, canaries)


class BackendCache:
    """`build_backends` that remembers each service's backend and what it was built from: a
    change of one service builds that one again, the others are the same objects as before
    (so a router of a thousand services finds what changed by identity, in microseconds)."""

    def __init__(self, spare_slots: int | None = None) -> None:
        self.spare_slots = spare_slots
        self._memo: dict[str, tuple[tuple[Routed, ...], Canary | None, tuple[str, ...],
                                    Backend]] = {}

    def build(self, binds: Sequence[Bind], registrations: Iterable[Routed],
              canaries: Mapping[str, Canary] | None = None) -> tuple[Backend, ...]:
        addresses: dict[str, list[str]] = {}
        for bind in binds:
            bound = addresses.setdefault(bind.service, [])
            address = _bind_address(bind)
            if address not in bound:
                bound.append(address)
        groups: dict[str, list[Routed]] = {service: [] for service in addresses}
        for reg in registrations:
            group = groups.get(reg.service)
            if group is not None:
                group.append(reg)
        memo = {}
        for service, bound in addresses.items():
            regs, canary = tuple(groups[service]), (canaries or {}).get(service)
            made = self._memo.get(service)
            if made is None or made[0] != regs or made[1] != canary or made[2] != tuple(bound):
                made = (regs, canary, tuple(bound),
                        _backend(service, tuple(bound), regs, canary, self.spare_slots))
            memo[service] = made
        self._memo = memo
        return tuple(made[3] for made in memo.values())


def _backend(service: str, binds: tuple[str, ...], registrations: Sequence[Routed],
             canary: Canary | None, spare_slots: int | None) -> Backend:
    by_name: dict[str, Server] = {}
    for reg in registrations:
        server = reg.server
        if server.name in by_name and by_name[server.name].instance != server.instance:
            # cannot happen short of a hash collision; keep both anyway
            server = replace(server, name=f"{server.name}-{len(by_name)}")
        by_name[server.name] = server
    chosen = sorted(by_name.values())
    weights = server_weights(chosen, canary)
    weighted = tuple(s if s.weight == weights[s.name] else replace(s, weight=weights[s.name])
                     for s in chosen)
    return Backend(service, binds, weighted, canary, spare_slots)


def services_of(registrations: Iterable[Routed]) -> dict[str, list[Server]]:
    """Every valid registration by service (bound or not), for operators' templates."""
    out: dict[str, list[Server]] = {}
    for reg in registrations:
        out.setdefault(reg.service, []).append(reg.server)
    return {service: sorted(servers) for service, servers in sorted(out.items())}


# --- rendering ----------------------------------------------------------------------------


class TemplateError(Exception):
    """A template that cannot be read, parsed or rendered."""


def _environment(loader: jinja2.BaseLoader | None = None) -> jinja2.Environment:
    return jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def builtin_template_text() -> str:
    return (resources.files("registrar") / "templates" / BUILTIN_TEMPLATE).read_text("utf-8")


def load_template(path: str | None) -> jinja2.Template:
    """The operator's template at `path`, or the built-in one; TemplateError if it is broken."""
    try:
        if path is None:
            source, name = builtin_template_text(), f"<built-in {BUILTIN_TEMPLATE}>"
        else:
            with open(path, encoding="utf-8") as handle:
                source, name = handle.read(), path
        template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"line {exc.lineno}: {exc.message}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(str(exc)) from None
    template.name = name
    return template


@dataclass(frozen=True)
class RenderContext:
    """What a template sees besides the backends (see docs/routing.md)."""

    mode: str  # "tcp" or "http"
    prefix: str
    stats_socket: str | None = None  # where the built-in template puts HAProxy's stats socket
    response_timeout: float = 30.0  # http mode: HAProxy's `timeout server` (--response-timeout)
    log_socket: str | None = None  # http mode: where HAProxy sends a line per request
    check_interval: float = 0.5  # HAProxy's `inter` (--check-interval)
    extra: Mapping[str, Any] = field(default_factory=dict)


def haproxy_duration(seconds: float) -> str:
    """A duration as HAProxy reads it: whole seconds as `Ns`, else milliseconds."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def check_timings(interval: float) -> dict[str, str]:
    """`inter` (--check-interval), `fastinter` (while a server goes up or down: at most 200 ms)
    and `downinter` (while it is down: twice the interval)."""
    return {"check_inter": haproxy_duration(interval),
            "check_fastinter": haproxy_duration(min(interval, 0.2)),
            "check_downinter": haproxy_duration(2 * interval)}


def render(
    template: jinja2.Template,
    backends: Sequence[Backend],
    registrations: Iterable[Routed],
    context: RenderContext,
) -> str:
    """The config text; TemplateError when the template fails to render."""
    try:
        text = template.render(
            backends=list(backends),
            services=services_of(registrations),
            mode=context.mode,
            prefix=context.prefix,
            stats_socket=context.stats_socket,
            hard_stop_after=HARD_STOP_AFTER,
            check_timeout=CHECK_TIMEOUT,
            response_timeout=f"{round(context.response_timeout * 1000)}ms",
            **check_timings(context.check_interval),
            log_socket=context.log_socket,
            log_format=LOG_FORMAT,
            default_weight=DEFAULT_WEIGHT,
            version=__version__,
            **context.extra,
        )
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    return text if text.endswith("\n") else text + "\n"
