"""Settings: one pure function from argv and environment to a frozen object.

Precedence is flag > environment (`REGISTRAR_<FLAG>`) > default, for every flag; the flags
themselves are declared once, in `registrar.flags.FLAGS`. `Settings` holds what every command
shares and, in its command's own slot, one small settings type for the command that runs
(`AgentSettings` for watch and register, `ListSettings`, `HAProxySettings`, `PromoteSettings`,
`MaintSettings`, `DrainSettings`, `CatalogSettings`). Every value is validated here, once; a bad
one raises `SettingsError` naming the flag, which the CLI prints as a single line before exiting
with status 2. The files that flags name (TLS, the template) are read by the adapters that use
them (`registrar.cli.read_files`): this module does no I/O.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

from registrar.core.names import (
    FALSE_WORDS,
    HEADER_RE,
    NAME_RE,
    TRUE_WORDS,
    host_port,
    valid_instance,
)
from registrar.flags import (
    COMMON,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_DOCKER,
    DEFAULT_HAPROXY_CONFIG,
    DEFAULT_LS_TIMEOUT,
    DEFAULT_METRICS_ADDR,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_ROUTER_METRICS_ADDR,
    DEFAULT_SIDECAR_METRICS_ADDR,
    DEFAULT_WAIT,
    FLAGS,
    STEERING,
    Flag,
    SettingsError,
    parse_args,
)
from registrar.typing_shim import Any, NamedTuple

__all__ = [  # what the rest of the package imports from here
    "DEFAULT_DOCKER", "NAME_RE", "AgentSettings", "Bind", "CanarySettings", "CatalogSettings",
    "DrainSettings", "EtcdEndpoint", "EtcdSettings", "HAProxySettings", "ListSettings",
    "MaintSettings", "PromoteSettings", "Settings", "SettingsError", "parse_settings",
]

HAPROXY_MODES = ("tcp", "http")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _repr_without_password(record: EtcdSettings | CatalogSettings) -> str:
    shown = (f"{name}={value!r}" for name, value in zip(record._fields, record, strict=True)
             if name != "password")
    return f"{type(record).__name__}({', '.join(shown)})"


class EtcdEndpoint(NamedTuple):
    host: str
    port: int
    secure: bool

    def __str__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{host_port(self.host, self.port)}"


class EtcdSettings(NamedTuple):
    endpoints: tuple[EtcdEndpoint, ...]
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None  # never in the repr
    timeout: float = 2.0

    def __repr__(self) -> str:
        return _repr_without_password(self)


# --- one settings type per command --------------------------------------------------------


class AgentSettings(NamedTuple):
    """`watch` (the host agent) and `register CONTAINER` (a sidecar)."""

    container: str | None = None  # register: the container, by name or id
    wait: float = DEFAULT_WAIT  # register: how long it may take to exist and run
    explicit: bool = False  # watch: only containers with a service label
    network: str | None = None  # as if every container had registrar.network


class ListSettings(NamedTuple):
    service: str | None = None
    json: bool = False
    timeout: float = DEFAULT_LS_TIMEOUT  # how long to retry etcd through transient errors


class Bind(NamedTuple):
    service: str
    host: str
    port: int


class HAProxySettings(NamedTuple):
    binds: tuple[Bind, ...]
    mode: str = "tcp"
    config: str = DEFAULT_HAPROXY_CONFIG
    template: str | None = None
    haproxy_bin: str = "haproxy"
    reload_cmd: str | None = None
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT  # http mode: HAProxy's timeout server
    check_interval: float = DEFAULT_CHECK_INTERVAL  # HAProxy's health checks of each server
    spare_slots: int | None = None  # empty server slots per backend (None: auto)
    # --bind-file: its binds are added to `binds` when the file is read (`cli.read_files`)
    bind_file: str | None = None


class CanarySettings(NamedTuple):
    steps: tuple[int, ...]  # percentages, increasing, each 1..99
    interval: float = 30.0
    max_error_rate: float = 0.01
    min_requests: int = 20
    max_p99_ms: float | None = None
    max_latency_ratio: float | None = None
    gate: str | None = None  # a URL POSTed before each step and before the promotion
    header: str | None = None  # requests with NAME: always / never go to VERSION / the others
    sticky: bool = False  # a cookie keeps each client on the version that first answered it

    @property
    def needs_http(self) -> str | None:
        """The first flag given that needs routers in http mode (None: none)."""
        for flag, given in (("--max-p99", self.max_p99_ms is not None),
                            ("--max-latency-ratio", self.max_latency_ratio is not None),
                            ("--header", self.header is not None), ("--sticky", self.sticky)):
            if given:
                return flag
        return None


class PromoteSettings(NamedTuple):
    service: str
    version: str | None  # None with --clear and with --pause/--resume/--abort
    clear: bool = False
    min_instances: int = 1
    timeout: float = 30.0
    canary: CanarySettings | None = None
    steer: str | None = None  # "pause", "resume" or "abort": the canary of SERVICE in progress


class MaintSettings(NamedTuple):
    action: str  # "enable", "disable" or "list"
    service: str | None = None
    instance: str | None = None  # as in its key: node:container:port[:udp]
    node: str | None = None
    reason: str = ""
    timeout: float = 30.0


class DrainSettings(NamedTuple):
    container: str  # as in its instances' keys: the container's name
    node: str
    timeout: float = 30.0
    undo: bool = False


class CatalogSettings(NamedTuple):
    listen: tuple[str, int] = ("127.0.0.1", 9479)
    user: str | None = None
    password: str | None = None  # never in the repr
    cert: str | None = None
    key: str | None = None

    def __repr__(self) -> str:
        return _repr_without_password(self)


class Settings(NamedTuple):
    """What every command shares, and the running command's own settings in its slot (the
    others are None)."""

    command: str
    etcd: EtcdSettings
    prefix: str
    control_prefix: str
    ttl: int
    host_ip: str | None
    node: str
    docker_url: str
    metrics_addr: tuple[str, int] | None
    drain: float  # --drain's seconds (the `drain` command's settings are `drain_cmd`)
    resync: int
    log_format: str
    log_level: str
    agent: AgentSettings | None = None  # watch, register
    ls: ListSettings | None = None
    haproxy: HAProxySettings | None = None
    promote: PromoteSettings | None = None
    maint: MaintSettings | None = None
    drain_cmd: DrainSettings | None = None
    catalog: CatalogSettings | None = None

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        """The files the flags name, as (flag, path): read by the adapters that use them."""
        named = [("--etcd-ca", self.etcd.ca), ("--etcd-cert", self.etcd.cert),
                 ("--etcd-key", self.etcd.key)]
        if self.haproxy is not None:
            named += [("--template", self.haproxy.template),
                      ("--bind-file", self.haproxy.bind_file)]
        if self.catalog is not None:
            named += [("--catalog-cert", self.catalog.cert), ("--catalog-key", self.catalog.key)]
        return tuple((flag, path) for flag, path in named if path is not None)


# --- resolving ----------------------------------------------------------------------------


class Args:
    """One command's values, each through its row of the flag table: flag, else environment,
    else the table's default. An empty value of an `optional` flag counts as not given."""

    def __init__(self, command: str, parsed: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.command = command
        self.parsed = parsed
        self._env = env
        self._common = {f.name: f for f in FLAGS if COMMON in f.commands}
        self._own = {f.name: f for f in FLAGS if command in f.commands}

    def row(self, name: str, common: bool = False) -> Flag:
        return self._common[name] if common else self._own.get(name) or self._common[name]

    def given(self, name: str, *, common: bool = False) -> str | None:
        """The value given by the flag, else by its variable; None when neither gave one."""
        row = self.row(name, common)
        env = self._env.get(row.env_name) if row.env_name else None
        for candidate in (self.parsed.get(row.attr), env):
            if candidate is None or (candidate == "" and row.optional):
                continue
            return str(candidate)
        return None

    def get(self, name: str, default: str | None = None, *, common: bool = False) -> str | None:
        """The value given, else `default`, else the table's default."""
        value = self.given(name, common=common)
        if value is not None:
            return value
        return default if default is not None else self.row(name, common).default

    def text(self, name: str, *, common: bool = False) -> str:
        """A value with a default in the table: never None."""
        return self.get(name, common=common) or ""


def parse_settings(
    argv: Sequence[str], env: Mapping[str, str], hostname: str = "localhost"
) -> Settings:
    """Turns argv (without the program name) and the environment into Settings; `hostname` is
    the default of --node (the caller reads it: this function does no I/O)."""
    parsed = parse_args(list(argv))
    command = parsed["command"]
    args = Args(command, parsed, env)
    etcd = _etcd(args)
    prefix, control = _prefixes(args)
    node = args.get("--node", common=True) or hostname
    if not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, got {node!r}")
    host_ip = args.get("--host-ip", common=True) or env.get("COREOS_PRIVATE_IPV4") or None
    if host_ip is not None:
        host_ip = _ip("--host-ip", host_ip)
    default_metrics = {
        "register": DEFAULT_SIDECAR_METRICS_ADDR,
        "haproxy": DEFAULT_ROUTER_METRICS_ADDR,
    }.get(command, DEFAULT_METRICS_ADDR)
    log_format, log_level = _logging(args)
    own = _COMMANDS[command](args, hostname)
    return Settings(
        command=command,
        etcd=etcd,
        prefix=prefix,
        control_prefix=control,
        ttl=_int("--ttl", args.text("--ttl", common=True), 2),
        host_ip=host_ip,
        node=node,
        docker_url=args.get("--docker", common=True) or env.get("DOCKER_HOST") or DEFAULT_DOCKER,
        metrics_addr=_metrics_addr(args.get("--metrics-addr", default_metrics) or ""),
        drain=_seconds("--drain", args.text("--drain", common=True)),
        resync=_int("--resync", args.text("--resync", common=True), 0),
        log_format=log_format,
        log_level=log_level,
        **own,
    )


def _logging(args: Args) -> tuple[str, str]:
    log_format = args.text("--log-format").lower()
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"--log-format: must be text or json, got {log_format!r}")
    log_level = args.text("--log-level").lower()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")
    return log_format, log_level


def _etcd(args: Args) -> EtcdSettings:
    endpoints = _endpoints(args.text("--etcd"))
    ca, cert, key = args.get("--etcd-ca"), args.get("--etcd-cert"), args.get("--etcd-key")
    if (cert is None) != (key is None):
        raise SettingsError("--etcd-cert and --etcd-key: give both or neither")
    if (ca or cert) and not all(ep.secure for ep in endpoints):
        flag = "--etcd-ca" if ca else "--etcd-cert"
        raise SettingsError(
            f"{flag}: TLS files are given but --etcd has http:// endpoints; use https:// for all"
        )
    user, password = args.get("--etcd-user"), args.get("--etcd-password")
    if (user is None) != (password is None):
        raise SettingsError(
            "--etcd-user: needs a password (REGISTRAR_ETCD_PASSWORD) and the other way round"
        )
    return EtcdSettings(endpoints=endpoints, ca=ca, cert=cert, key=key, user=user,
                        password=password)


def _prefixes(args: Args) -> tuple[str, str]:
    prefix = _path_prefix("--prefix", args.text("--prefix"))
    control = _path_prefix("--control-prefix", args.text("--control-prefix"))
    if (prefix + "/").startswith(control + "/") or (control + "/").startswith(prefix + "/"):
        raise SettingsError(
            f"--control-prefix: {control!r} and --prefix {prefix!r} must not contain each other"
        )
    return prefix, control


# --- each command's own settings, in its slot of Settings ----------------------------------


def _agent(args: Args, hostname: str) -> dict[str, Any]:
    network = args.get("--network")
    if network is not None and not NAME_RE.fullmatch(network):
        raise SettingsError(f"--network: must match {NAME_RE.pattern}, got {network!r}")
    container = args.parsed.get("container")
    if container is not None and not container.strip():
        raise SettingsError("CONTAINER: must not be empty")
    watch = args.command == "watch"
    return {"agent": AgentSettings(
        container=container,
        wait=DEFAULT_WAIT if watch else _seconds("--wait", args.text("--wait")),
        explicit=watch and _bool("--explicit", args.text("--explicit")),
        network=network,
    )}


def _ls(args: Args, hostname: str) -> dict[str, Any]:
    return {"ls": ListSettings(
        service=args.parsed.get("service"),
        json=_bool("--json", args.text("--json")),
        timeout=_seconds("--timeout", args.text("--timeout")),
    )}


def _haproxy(args: Args, hostname: str) -> dict[str, Any]:
    raw_binds: list[str] = list(args.parsed.get("bind") or [])
    if not raw_binds:
        raw_binds = [b for b in (args.get("--bind") or "").split(",") if b.strip()]
    binds = [parse_bind("--bind", raw) for raw in raw_binds]
    bind_file = args.get("--bind-file")
    if not binds and bind_file is None:
        raise SettingsError(NO_BIND)
    mode = args.text("--mode").lower()
    if mode not in HAPROXY_MODES:
        raise SettingsError(f"--mode: must be tcp or http, got {mode!r}")
    response_timeout = _seconds("--response-timeout", args.text("--response-timeout"))
    if response_timeout <= 0:
        raise SettingsError("--response-timeout: must be above 0 seconds")
    check_interval = _seconds("--check-interval", args.text("--check-interval"))
    if not 0.1 <= check_interval <= 3600:
        raise SettingsError("--check-interval: must be between 0.1 and 3600 seconds")
    raw_spares = args.text("--spare-slots").strip().lower()
    spare_slots = None if raw_spares == "auto" else _int("--spare-slots", raw_spares, 1)
    return {"haproxy": HAProxySettings(
        binds=tuple(binds),
        mode=mode,
        config=args.get("--config") or DEFAULT_HAPROXY_CONFIG,
        template=args.get("--template"),
        haproxy_bin=args.get("--haproxy-bin") or "haproxy",
        reload_cmd=args.get("--reload-cmd"),
        response_timeout=response_timeout,
        check_interval=check_interval,
        spare_slots=spare_slots,
        bind_file=bind_file,
    )}


NO_BIND = "--bind: give at least one SERVICE=ADDR:PORT (or --bind-file)"


def parse_bind(flag: str, raw: str) -> Bind:
    """`SERVICE=ADDR:PORT` (of --bind, or a line of --bind-file: `flag` names it)."""
    service, sep, addr = raw.strip().partition("=")
    host, colon, port_text = addr.rpartition(":")
    if not sep or not colon or not (port_text.isascii() and port_text.isdigit()) or not (
        0 < int(port_text) < 65536
    ):
        raise SettingsError(f"{flag}: must be SERVICE=ADDR:PORT, got {raw!r}")
    if not NAME_RE.fullmatch(service):
        raise SettingsError(f"{flag}: bad service name {service!r}")
    return Bind(service, host.strip("[]") or "0.0.0.0", int(port_text))


def _promote(args: Args, hostname: str) -> dict[str, Any]:
    service = str(args.parsed.get("service") or "")
    if not NAME_RE.fullmatch(service):
        raise SettingsError(f"SERVICE: must match {NAME_RE.pattern}, got {service!r}")
    clear = _bool("--clear", args.text("--clear"))
    version = args.parsed.get("version")
    if clear and version is not None:
        raise SettingsError("--clear: takes no VERSION")
    steer = _steer(args.parsed, clear, version)
    if not clear and version is None and steer is None:
        raise SettingsError("VERSION: required (or --clear)")
    if version is not None and not NAME_RE.fullmatch(version):
        raise SettingsError(f"VERSION: must match {NAME_RE.pattern}, got {version!r}")
    canary = _canary(args)
    if canary is not None and clear:
        raise SettingsError("--canary: not with --clear")
    if canary is not None and steer is not None:
        raise SettingsError(f"--{steer}: not with --canary")
    return {"promote": PromoteSettings(
        service=service,
        version=version,
        clear=clear,
        min_instances=_int("--min-instances", args.text("--min-instances"), 1),
        timeout=_seconds("--timeout", args.text("--timeout")),
        canary=canary,
        steer=steer,
    )}


_CANARY_FLAGS = ("--interval", "--max-error-rate", "--min-requests", "--max-p99",
                 "--max-latency-ratio", "--gate", "--header", "--sticky")


def _steer(parsed: Mapping[str, Any], clear: bool, version: str | None) -> str | None:
    """`--pause`, `--resume` or `--abort` (flags only: one action of one command, never from
    the environment), alone: no VERSION, no --clear, no --canary."""
    given = [word for word in STEERING if parsed.get(f"steer_{word}")]
    if not given:
        return None
    flag = f"--{given[0]}"
    if len(given) > 1:
        raise SettingsError(f"{flag}: one of --pause, --resume and --abort at a time")
    if version is not None or clear:
        raise SettingsError(f"{flag}: takes SERVICE alone (no VERSION, no --clear)")
    for other in ("--canary", *_CANARY_FLAGS):
        if other.lstrip("-").replace("-", "_") in parsed:
            raise SettingsError(f"{flag}: not with {other}")
    return given[0]


def _canary(args: Args) -> CanarySettings | None:
    raw = args.get("--canary")
    if raw is None:
        for flag in _CANARY_FLAGS:
            if args.given(flag) is not None:
                raise SettingsError(f"{flag}: only with --canary")
        return None
    steps = []
    for part in raw.split(","):
        text = part.strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 99:
            raise SettingsError(f"--canary: percentages 1..99, got {part!r} in {raw!r}")
        steps.append(int(text))
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise SettingsError(f"--canary: percentages must increase, got {raw!r}")
    interval = _seconds("--interval", args.text("--interval"))
    if interval <= 0:
        raise SettingsError(f"--interval: must be a number of seconds > 0, got {interval:g}")
    rate_raw = args.text("--max-error-rate")
    try:
        rate = float(rate_raw.strip())
    except ValueError:
        rate = float("nan")
    if not 0 <= rate <= 1:
        raise SettingsError(f"--max-error-rate: must be a number 0..1, got {rate_raw!r}")
    return CanarySettings(
        steps=tuple(steps), interval=interval, max_error_rate=rate,
        min_requests=_int("--min-requests", args.text("--min-requests"), 1),
        max_p99_ms=_above("--max-p99", args.get("--max-p99"), 0, "milliseconds"),
        max_latency_ratio=_above("--max-latency-ratio", args.get("--max-latency-ratio"), 1,
                                 "ratio"),
        gate=_gate(args.get("--gate")),
        header=_header(args.get("--header")),
        sticky=_bool("--sticky", args.text("--sticky")),
    )


def _above(flag: str, raw: str | None, minimum: float, what: str) -> float | None:
    """A finite number above `minimum`, or None when not given."""
    if raw is None:
        return None
    try:
        number = float(raw.strip())
    except ValueError:
        number = float("nan")
    if not minimum < number < float("inf"):
        raise SettingsError(f"{flag}: must be a {what} > {minimum:g}, got {raw!r}")
    return number


def _gate(raw: str | None) -> str | None:
    if raw is None:
        return None
    url = raw.strip()
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(f"--gate: malformed URL {raw!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
            ch.isspace() or not ch.isprintable() for ch in url):
        raise SettingsError(f"--gate: must be an http:// or https:// URL, got {raw!r}")
    return url


def _header(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not HEADER_RE.fullmatch(raw):
        raise SettingsError(f"--header: must be a header name matching {HEADER_RE.pattern}, "
                            f"got {raw!r}")
    return raw


def _maint(args: Args, hostname: str) -> dict[str, Any]:
    parsed = args.parsed
    action = parsed.get("action") or "list"
    if action not in ("enable", "disable", "list"):
        raise SettingsError(f"maint: enable or disable, got {action!r}")
    service, node = parsed.get("service"), parsed.get("maint_node")
    instance = parsed.get("instance")
    timeout = _seconds("--timeout", args.text("--timeout"))
    if action == "list":
        if service or node or instance:
            raise SettingsError("maint: SERVICE, --instance and --node need enable or disable")
        return {"maint": MaintSettings("list", timeout=timeout)}
    if (service is None) == (node is None):
        raise SettingsError(f"maint {action}: give SERVICE or --node NODE (one of them)")
    if service is not None and not NAME_RE.fullmatch(service):
        raise SettingsError(f"SERVICE: must match {NAME_RE.pattern}, got {service!r}")
    if node is not None and not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match {NAME_RE.pattern}, got {node!r}")
    if instance is not None:
        if service is None:
            raise SettingsError("--instance: needs SERVICE")
        if not valid_instance(instance):
            raise SettingsError("--instance: must be NODE:CONTAINER:PORT or "
                                f"NODE:CONTAINER:PORT:udp, got {instance!r}")
    reason = parsed.get("reason") or ""
    if len(reason) > 500 or any(not ch.isprintable() for ch in reason):
        raise SettingsError("--reason: at most 500 printable characters")
    return {"maint": MaintSettings(action, service=service, instance=instance, node=node,
                                   reason=reason, timeout=timeout)}


def _drain(args: Args, hostname: str) -> dict[str, Any]:
    """`--node` and `--undo` are flags only: REGISTRAR_NODE is an agent's own identity."""
    container = str(args.parsed.get("container") or "")
    if not NAME_RE.fullmatch(container):
        raise SettingsError(f"CONTAINER: must match {NAME_RE.pattern}, got {container!r}")
    node = args.parsed.get("drain_node") or hostname
    if not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match {NAME_RE.pattern}, got {node!r}")
    undo = args.parsed.get("undo") is not None
    return {"drain_cmd": DrainSettings(container, node,
                                       _seconds("--timeout", args.text("--timeout")), undo)}


def _catalog(args: Args, hostname: str) -> dict[str, Any]:
    raw = args.text("--listen")
    listen = _metrics_addr(raw, "--listen")
    if listen is None:
        raise SettingsError(f"--listen: must be ADDR:PORT with a port 1-65535, got {raw!r}")
    user, password = args.get("--catalog-user"), args.get("--catalog-password")
    if user is not None and (not user.isprintable() or ":" in user):
        raise SettingsError("--catalog-user: printable, without ':'")
    if (user is None) != (password is None):
        raise SettingsError("--catalog-user: needs a password (REGISTRAR_CATALOG_PASSWORD) "
                            "and the other way round")
    cert, key = args.get("--catalog-cert"), args.get("--catalog-key")
    if (cert is None) != (key is None):
        raise SettingsError("--catalog-cert and --catalog-key: give both or neither")
    return {"catalog": CatalogSettings(listen=listen, user=user, password=password, cert=cert,
                                       key=key)}


_COMMANDS = {"watch": _agent, "register": _agent, "ls": _ls, "haproxy": _haproxy,
             "promote": _promote, "maint": _maint, "drain": _drain, "catalog": _catalog}


# --- the values' shapes ---------------------------------------------------------------------


# A dotted IPv4 address, already in the form ipaddress writes (no leading zeros), read without
# it (1 ms of a sidecar's start, which `--host-ip` makes); anything else goes through it.
PLAIN_IPV4_RE = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                           r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def _ip(flag: str, raw: str) -> str:
    if PLAIN_IPV4_RE.fullmatch(raw.strip()):
        return raw.strip()
    import ipaddress

    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise SettingsError(f"{flag}: not an IP address: {raw!r}") from None


def _int(flag: str, raw: str, minimum: int) -> int:
    try:
        number = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{flag}: must be an integer >= {minimum}, got {raw!r}") from None
    if number < minimum:
        raise SettingsError(f"{flag}: must be an integer >= {minimum}, got {raw!r}")
    return number


def _seconds(flag: str, raw: str) -> float:
    try:
        number = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{flag}: must be a number of seconds >= 0, got {raw!r}") from None
    if not number >= 0 or number == float("inf"):
        raise SettingsError(f"{flag}: must be a number of seconds >= 0, got {raw!r}")
    return number


def _bool(flag: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{flag}: must be true or false, got {raw!r}")


def _path_prefix(flag: str, raw: str) -> str:
    path = raw.rstrip("/")
    if not raw.startswith("/") or not path:
        raise SettingsError(f"{flag}: must be a path starting with / (not /), got {raw!r}")
    segments = path[1:].split("/")
    if any(not NAME_RE.fullmatch(seg) for seg in segments):
        raise SettingsError(
            f"{flag}: each path segment must match [A-Za-z0-9][A-Za-z0-9._-]*, got {raw!r}"
        )
    return path


# `scheme://host[:port][/]`, the usual shape of an etcd endpoint, read without urllib.parse (it
# and the ipaddress module it imports are 2.4 ms of a sidecar's start); anything else goes
# through urlsplit, whose rules and messages stay the reference.
PLAIN_ENDPOINT_RE = re.compile(
    r"(https?)://(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z._-]+)(?::([0-9]{1,5}))?/?")


def _endpoints(raw: str) -> tuple[EtcdEndpoint, ...]:
    endpoints = []
    for item in raw.split(","):
        url = item.strip()
        if not url:
            raise SettingsError(f"--etcd: empty endpoint in {raw!r}")
        plain = PLAIN_ENDPOINT_RE.fullmatch(url)
        if plain and int(plain[3] or 0) <= 65535:
            endpoints.append(EtcdEndpoint(plain[2].strip("[]").lower(), int(plain[3] or 0) or 2379,
                                          plain[1] == "https"))
            continue
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise SettingsError(f"--etcd: malformed URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise SettingsError(f"--etcd: {url!r} must start with http:// or https://")
        if not parts.hostname:
            raise SettingsError(f"--etcd: {url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise SettingsError(f"--etcd: {url!r} must be scheme://host[:port] only")
        endpoints.append(EtcdEndpoint(parts.hostname, port or 2379, parts.scheme == "https"))
    return tuple(endpoints)


def _metrics_addr(raw: str, flag: str = "--metrics-addr") -> tuple[str, int] | None:
    host, sep, port_text = raw.strip().rpartition(":")
    # isascii(): "²" passes isdigit() but not int()
    if not sep or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise SettingsError(f"{flag}: must be HOST:PORT (port 0-65535), got {raw!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise SettingsError(
            f"{flag}: an IPv6 host goes in brackets ([::1]:PORT), got {raw!r}"
        )
    host = host.strip("[]") or "0.0.0.0"
    if any(ch.isspace() or ch in "/@" for ch in host):
        raise SettingsError(f"{flag}: bad host in {raw!r}")
    port = int(port_text)
    return None if port == 0 else (host, port)
