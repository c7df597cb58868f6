"""Registrations -> backends -> HAProxy config text, and the runtime-API plan. Pure.

- `parse_registration`: one etcd key and value to a `Server` of a service, or a `Rejected` with
  the reason (a value that is not JSON, lacks host or port, ...).
- `build_backends`: the servers of every service named in `--bind`, sorted, with HAProxy-safe
  and stable server names derived from the instance.
- `render`: the built-in Jinja2 template (tcp and http mode) or the operator's.
- `plan_runtime`: how to bring a running HAProxy from one set of servers to another with the
  runtime API only (server slots: `set server ... addr/state`), or None when that needs a reload.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2

from registrar import __version__
from registrar.settings import NAME_RE, Bind

SPARE_PREFIX = "_spare"  # server-template slots: _spare1, _spare2, ... (no instance starts with _)
MIN_SPARES = 32
HARD_STOP_AFTER = "30s"  # old workers of a reload get this long to finish their connections
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


@dataclass(frozen=True, order=True)
class Server:
    name: str  # HAProxy server name, derived from the instance
    host: str  # an IP address, normalised
    port: int
    instance: str  # the key's last segment: {node}:{container_name}:{private_port}

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 addresses in brackets (as HAProxy's config wants them)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Registration:
    service: str
    server: Server


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class Backend:
    """A service named in --bind: its frontend's addresses and its servers (sorted by name)."""

    service: str
    binds: tuple[str, ...]  # "127.0.0.1:8080", "[::1]:8080"
    servers: tuple[Server, ...]

    @property
    def frontend(self) -> str:
        return f"fe_{self.service}"

    @property
    def backend(self) -> str:
        return f"be_{self.service}"

    @property
    def spares(self) -> int:
        """Empty server slots rendered after the servers, for the runtime API to fill."""
        return spare_count(len(self.servers))

    @property
    def spare_prefix(self) -> str:
        return SPARE_PREFIX


def spare_count(servers: int) -> int:
    return max(MIN_SPARES, servers)


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


def _host(raw: object) -> str | None:
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


def parse_registration(prefix: str, key: str, value: str) -> Registration | Rejected:
    """One key `{prefix}/{service}/{instance}` and its JSON value, or why it is skipped.

    `host` must be an IP address (a host name would make `haproxy -c` resolve it, and one bad
    name would then block every update) and `port` an integer 1-65535.
    """
    rest = key[len(prefix) + 1 :] if key.startswith(prefix + "/") else ""
    service, _, instance = rest.partition("/")
    if not NAME_RE.fullmatch(service) or not instance or "/" in instance:
        return Rejected(INVALID_KEY, f"not {prefix}/SERVICE/INSTANCE")
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return Rejected(INVALID_JSON, "value is not JSON")
    if not isinstance(data, dict):
        return Rejected(INVALID_JSON, "value is not a JSON object")
    if "host" not in data or "port" not in data:
        return Rejected(MISSING_HOST_OR_PORT, "value lacks host or port")
    host = _host(data["host"])
    if host is None:
        return Rejected(INVALID_HOST, f"host {str(data['host'])[:64]!r} is not an IP address")
    port = data["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return Rejected(INVALID_PORT, f"port {str(port)[:16]!r} is not an integer 1-65535")
    return Registration(service, Server(server_name(instance), host, port, instance))


def _bind_address(bind: Bind) -> str:
    return f"[{bind.host}]:{bind.port}" if ":" in bind.host else f"{bind.host}:{bind.port}"


def build_backends(
    binds: Sequence[Bind], registrations: Iterable[Registration]
) -> tuple[Backend, ...]:
    """One backend per service of --bind (in the order given), with every instance's server.

    A service with no registration gets an empty backend (HAProxy answers 503 / closes): the
    frontend stays, so the first instance to appear needs no reload.
    """
    order: list[str] = []
    addresses: dict[str, list[str]] = {}
    for bind in binds:
        if bind.service not in addresses:
            order.append(bind.service)
            addresses[bind.service] = []
        address = _bind_address(bind)
        if address not in addresses[bind.service]:
            addresses[bind.service].append(address)
    servers: dict[str, dict[str, Server]] = {service: {} for service in order}
    for reg in registrations:
        if reg.service not in servers:
            continue
        by_name = servers[reg.service]
        name = reg.server.name
        if name in by_name and by_name[name].instance != reg.server.instance:
            # cannot happen short of a hash collision; keep both anyway
            name = f"{name}-{len(by_name)}"
        by_name[name] = Server(name, reg.server.host, reg.server.port, reg.server.instance)
    return tuple(
        Backend(service, tuple(addresses[service]), tuple(sorted(servers[service].values())))
        for service in order
    )


def services_of(registrations: Iterable[Registration]) -> dict[str, list[Server]]:
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
    extra: Mapping[str, Any] = field(default_factory=dict)


def render(
    template: jinja2.Template,
    backends: Sequence[Backend],
    registrations: Iterable[Registration],
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
            version=__version__,
            **context.extra,
        )
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    return text if text.endswith("\n") else text + "\n"


# --- the runtime API ----------------------------------------------------------------------


@dataclass(frozen=True)
class LiveBackend:
    """The server slots a running HAProxy has in one backend, and what each one serves.

    `slots` maps a server name to the server it routes to (None: in maintenance, free).
    `free` lists the free slots in the order they are to be reused: never-used spares first,
    then the slots freed longest ago (an instance that just left may still be draining).
    """

    backend: str
    slots: Mapping[str, Server | None]
    free: tuple[str, ...]

    def model(self) -> frozenset[tuple[str, str, int]]:
        return frozenset(
            (s.instance, s.host, s.port) for s in self.slots.values() if s is not None
        )


Live = Mapping[str, LiveBackend]  # service -> its live backend


def fresh_layout(backends: Sequence[Backend]) -> dict[str, LiveBackend]:
    """The slots a config rendered from `backends` by the built-in template starts with."""
    layout = {}
    for b in backends:
        slots: dict[str, Server | None] = {s.name: s for s in b.servers}
        spares = [f"{SPARE_PREFIX}{i}" for i in range(1, b.spares + 1)]
        slots.update(dict.fromkeys(spares))
        layout[b.service] = LiveBackend(b.backend, slots, tuple(spares))
    return layout


def model_of(backends: Sequence[Backend]) -> dict[str, frozenset[tuple[str, str, int]]]:
    return {b.service: frozenset((s.instance, s.host, s.port) for s in b.servers) for b in backends}


def live_model(live: Live) -> dict[str, frozenset[tuple[str, str, int]]]:
    return {service: lb.model() for service, lb in live.items()}


@dataclass(frozen=True)
class SlotState:
    """What `show servers state` must say about a slot after the commands ran."""

    backend: str
    slot: str
    server: Server | None  # None: in maintenance


@dataclass(frozen=True)
class RuntimePlan:
    commands: tuple[str, ...]  # runtime API commands, in order (adds first, then removals)
    expect: tuple[SlotState, ...]
    live: dict[str, LiveBackend]  # the slots once the commands ran

    @property
    def empty(self) -> bool:
        return not self.commands


def plan_runtime(live: Live, backends: Sequence[Backend]) -> RuntimePlan | None:
    """Commands that turn `live` into `backends` without a reload; None when a reload is needed
    (a backend added or removed, or not enough free slots)."""
    if set(live) != {b.service for b in backends}:
        return None
    adds: list[str] = []
    removals: list[str] = []
    expect: list[SlotState] = []
    new_live: dict[str, LiveBackend] = {}
    for b in backends:
        current = live[b.service]
        slots = dict(current.slots)
        free = list(current.free)
        where = {s.instance: name for name, s in slots.items() if s is not None}
        wanted = {s.instance: s for s in b.servers}
        be = current.backend
        freed: list[str] = []
        for instance, name in sorted(where.items()):
            if instance not in wanted:
                removals.append(f"set server {be}/{name} state maint")
                expect.append(SlotState(be, name, None))
                slots[name] = None
                freed.append(name)
        for instance, server in sorted(wanted.items()):
            held = where.get(instance)
            if held is not None:
                old = slots[held]
                if old is not None and (old.host, old.port) != (server.host, server.port):
                    adds.append(f"set server {be}/{held} addr {server.host} port {server.port}")
                    expect.append(SlotState(be, held, server))
                    slots[held] = server
                continue
            if not free:
                return None
            slot = free.pop(0)
            adds.append(f"set server {be}/{slot} addr {server.host} port {server.port}")
            adds.append(f"set server {be}/{slot} state ready")
            expect.append(SlotState(be, slot, server))
            slots[slot] = server
        new_live[b.service] = LiveBackend(be, slots, tuple(free + freed))
    return RuntimePlan(tuple(adds + removals), tuple(expect), new_live)


def check_slots(state_lines: str, expect: Iterable[SlotState]) -> list[str]:
    """Mismatches between `show servers state` output and what the plan expects ([] if none)."""
    seen: dict[tuple[str, str], tuple[str, int, int]] = {}
    for line in state_lines.splitlines():
        fields = line.split()
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ... srv_port (18)
        if len(fields) < 19 or line.startswith("#") or not fields[0].isdigit():
            continue
        try:
            seen[(fields[1], fields[3])] = (fields[4], int(fields[6]), int(fields[18]))
        except ValueError:
            continue
    problems = []
    for want in expect:
        got = seen.get((want.backend, want.slot))
        if got is None:
            problems.append(f"{want.backend}/{want.slot}: no such server")
            continue
        addr, admin, port = got
        in_maint = bool(admin & 0x01)
        if want.server is None:
            if not in_maint:
                problems.append(f"{want.backend}/{want.slot}: not in maintenance")
            continue
        if in_maint:
            problems.append(f"{want.backend}/{want.slot}: still in maintenance")
        if _host(addr) != want.server.host or port != want.server.port:
            problems.append(
                f"{want.backend}/{want.slot}: at {addr}:{port}, not {want.server.address}"
            )
    return problems
