"""Settings: one pure function from argv and environment to a frozen object.

Precedence is flag > environment (`REGISTRAR_<FLAG>`) > default, for every flag. Every value is
validated here, once; a bad one raises `SettingsError` naming the flag, which the CLI prints as a
single line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

from registrar import __version__

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# `--header NAME`: an HTTP header name that goes into HAProxy's config as it is (no quoting)
HEADER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
STEERING = ("pause", "resume", "abort")  # promote SERVICE --pause | --resume | --abort

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_PREFIX = "/services"
DEFAULT_CONTROL_PREFIX = "/registrar"
DEFAULT_TTL = 15
DEFAULT_DOCKER = "unix:///var/run/docker.sock"
DEFAULT_METRICS_ADDR = "0.0.0.0:9477"
# Sidecars share the host's network namespace with each other; one fixed port would clash.
DEFAULT_SIDECAR_METRICS_ADDR = "0.0.0.0:0"
# `haproxy` often runs on a host with the agent, on the host's network: its own port.
DEFAULT_ROUTER_METRICS_ADDR = "0.0.0.0:9478"
DEFAULT_RESYNC = 30
DEFAULT_WAIT = 60.0
DEFAULT_LS_TIMEOUT = 10.0
DEFAULT_HAPROXY_CONFIG = "/etc/haproxy/haproxy.cfg"
DEFAULT_CATALOG_LISTEN = "127.0.0.1:9479"
HAPROXY_MODES = ("tcp", "http")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


# Flags whose default is "none" or worked out: an empty value means "not given".
OPTIONAL_FLAGS = frozenset({
    "--host-ip", "--node", "--docker", "--etcd-ca", "--etcd-cert", "--etcd-key", "--etcd-user",
    "--etcd-password", "--template", "--reload-cmd", "--catalog-user", "--catalog-password",
    "--catalog-cert", "--catalog-key", "--network", "--bind-file",
})


class SettingsError(Exception):
    """A bad flag or environment value; the message names the flag."""


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int
    secure: bool

    def __str__(self) -> str:
        scheme = "https" if self.secure else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[EtcdEndpoint, ...]
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 2.0


@dataclass(frozen=True)
class Settings:
    command: str
    etcd: EtcdSettings
    prefix: str
    control_prefix: str
    ttl: int
    host_ip: str | None
    node: str
    docker_url: str
    metrics_addr: tuple[str, int] | None
    drain: float
    resync: int
    explicit: bool
    log_format: str
    log_level: str
    container: str | None = None
    wait: float = DEFAULT_WAIT
    service: str | None = None
    json: bool = False
    timeout: float = DEFAULT_LS_TIMEOUT  # ls: how long to retry etcd through transient errors
    haproxy: HAProxySettings | None = None
    promote: PromoteSettings | None = None
    maint: MaintSettings | None = None
    drain_cmd: DrainSettings | None = None  # `drain` (`drain` itself is --drain's seconds)
    catalog: CatalogSettings | None = None
    network: str | None = None  # watch, register: as if every container had registrar.network


@dataclass(frozen=True)
class Bind:
    service: str
    host: str
    port: int


DEFAULT_RESPONSE_TIMEOUT = 30.0
DEFAULT_CHECK_INTERVAL = 0.5


@dataclass(frozen=True)
class HAProxySettings:
    binds: tuple[Bind, ...]
    mode: str = "tcp"
    config: str = DEFAULT_HAPROXY_CONFIG
    template: str | None = None
    haproxy_bin: str = "haproxy"
    reload_cmd: str | None = None
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT  # http mode: HAProxy's timeout server
    check_interval: float = DEFAULT_CHECK_INTERVAL  # HAProxy's health checks of each server
    spare_slots: int | None = None  # empty server slots per backend (None: auto)


@dataclass(frozen=True)
class CanarySettings:
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


@dataclass(frozen=True)
class PromoteSettings:
    service: str
    version: str | None  # None with --clear and with --pause/--resume/--abort
    clear: bool = False
    min_instances: int = 1
    timeout: float = 30.0
    canary: CanarySettings | None = None
    steer: str | None = None  # "pause", "resume" or "abort": the canary of SERVICE in progress


@dataclass(frozen=True)
class MaintSettings:
    action: str  # "enable", "disable" or "list"
    service: str | None = None
    instance: str | None = None  # as in its key: node:container:port[:udp]
    node: str | None = None
    reason: str = ""
    timeout: float = 30.0


@dataclass(frozen=True)
class DrainSettings:
    container: str  # as in its instances' keys: the container's name
    node: str
    timeout: float = 30.0
    undo: bool = False


@dataclass(frozen=True)
class CatalogSettings:
    listen: tuple[str, int] = ("127.0.0.1", 9479)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    cert: str | None = None
    key: str | None = None


# --- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: one line, our format."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


_COMMON_HELP = {
    "--etcd": f"comma-separated etcd endpoints, http:// or https:// (default {DEFAULT_ETCD})",
    "--etcd-ca": "CA certificate file for https:// endpoints",
    "--etcd-cert": "client certificate file (with --etcd-key)",
    "--etcd-key": "client key file (with --etcd-cert)",
    "--etcd-user": "etcd user name (password from REGISTRAR_ETCD_PASSWORD)",
    "--etcd-password": "etcd password; prefer the REGISTRAR_ETCD_PASSWORD environment variable",
    "--prefix": f"key prefix, must start with / (default {DEFAULT_PREFIX})",
    "--control-prefix": (
        "where promotions and standby instances are kept, outside --prefix "
        f"(default {DEFAULT_CONTROL_PREFIX})"
    ),
    "--ttl": f"lease TTL in seconds, integer >= 2; heartbeats every TTL/3 (default {DEFAULT_TTL})",
    "--host-ip": (
        "address written for published ports (default: $COREOS_PRIVATE_IPV4, else the port's "
        "own HostIp when specific, else the host's primary IPv4)"
    ),
    "--node": "this host's identity in keys (default: the host name)",
    "--docker": f"Docker endpoint (default: $DOCKER_HOST, else {DEFAULT_DOCKER})",
    "--metrics-addr": (
        f"HOST:PORT for /metrics and /healthz; port 0 disables (default {DEFAULT_METRICS_ADDR} "
        f"for watch, {DEFAULT_ROUTER_METRICS_ADDR} for haproxy, off for register)"
    ),
    "--drain": (
        "on SIGTERM, after deregistering, wait at most this long until every live router has "
        "applied it with nothing in flight (the whole time when no router reports; default 0)"
    ),
    "--resync": (
        f"seconds between full reconciles against Docker, 0 turns it off (default {DEFAULT_RESYNC})"
    ),
    "--log-format": "text or json, on stderr (default text)",
    "--log-level": "debug, info, warning or error (default info)",
}


def _add_common(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for flag, help_text in _COMMON_HELP.items():
        if flag in skip:
            continue
        metavar = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, metavar=metavar, default=argparse.SUPPRESS, help=help_text)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) the top level with one command's subparser: a
    sidecar starts once per container, and building every command's parser cost it ~10 ms."""
    parser = _Parser(
        prog="registrar",
        description=(
            "Registers the published ports of Docker containers in etcd v3, each key bound to a "
            "lease kept alive by heartbeats, and removes them the moment a container stops. "
            "Every flag can also be set as REGISTRAR_<FLAG> in the environment "
            "(flag > environment > default)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"registrar {__version__}")
    _add_common(parser)  # `registrar --etcd URL watch` works too
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, add in COMMANDS.items():
        if only is None or only == name:
            add(sub)
    return parser


def _add_watch(sub: Any) -> None:
    watch = sub.add_parser(
        "watch",
        help="host agent: register every eligible container on this host",
        description="Host agent: follows Docker's events and keeps etcd in step with the "
        "containers running on this host. Runs until SIGTERM/SIGINT.",
    )
    _add_common(watch)
    watch.add_argument(
        "--explicit",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="only register containers that carry a service label",
    )
    _add_network(watch)


def _add_register(sub: Any) -> None:
    register = sub.add_parser(
        "register",
        help="sidecar: register one container until it stops",
        description="Sidecar for one container (name or id), started from an app unit's "
        "ExecStartPost. Registers its published ports, deregisters and exits 0 when it stops.",
    )
    register.add_argument("container", metavar="CONTAINER", help="container name or id")
    _add_network(register)
    register.add_argument(
        "--wait",
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help=f"how long to wait for the container to exist and run (default {DEFAULT_WAIT:g})",
    )
    _add_common(register)


def _add_ls(sub: Any) -> None:
    ls = sub.add_parser(
        "ls",
        help="list registrations under the prefix",
        description="Lists registrations under the prefix: service, instance, host:port, "
        "version, node, age.",
    )
    ls.add_argument("service", metavar="SERVICE", nargs="?", help="only this service")
    ls.add_argument(
        "--json",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="one JSON object a line: the stored value plus its key",
    )
    ls.add_argument("--timeout", metavar="SECONDS", default=argparse.SUPPRESS,
                    help="how long to retry reading etcd through transient errors "
                    f"(default {DEFAULT_LS_TIMEOUT:g})")
    _add_common(ls)


def _add_haproxy(sub: Any) -> None:
    haproxy = sub.add_parser(
        "haproxy",
        help="route traffic: keep an HAProxy in step with the registrations",
        description="Watches the prefix, renders HAProxy's config, checks it with `haproxy -c`, "
        "installs it atomically and reloads HAProxy (which it runs itself in master-worker "
        "mode, unless --reload-cmd is given).",
    )
    haproxy.add_argument(
        "--bind", metavar="SERVICE=ADDR:PORT", action="append", default=argparse.SUPPRESS,
        help="a frontend for SERVICE on ADDR:PORT; repeat for several (env: comma-separated)",
    )
    haproxy.add_argument(
        "--bind-file", metavar="PATH", default=argparse.SUPPRESS,
        help="more binds, one SERVICE=ADDR:PORT a line (# comments): for hundreds of services",
    )
    haproxy.add_argument("--mode", metavar="MODE", default=argparse.SUPPRESS,
                         help="tcp or http (default tcp)")
    haproxy.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                         help="where the rendered config is written "
                         f"(default {DEFAULT_HAPROXY_CONFIG})")
    haproxy.add_argument("--template", metavar="PATH", default=argparse.SUPPRESS,
                         help="a Jinja2 template replacing the built-in one")
    haproxy.add_argument("--haproxy-bin", metavar="PATH", default=argparse.SUPPRESS,
                         help="the HAProxy binary (default: haproxy from PATH)")
    haproxy.add_argument("--reload-cmd", metavar="CMD", default=argparse.SUPPRESS,
                         help="do not run HAProxy; run CMD after each new config")
    haproxy.add_argument(
        "--check-interval", metavar="SECONDS", default=argparse.SUPPRESS,
        help="how often HAProxy checks each server (default 0.5; a server that stops answering "
        "leaves rotation after 2 failed checks, sooner on failed traffic); raise it for "
        "thousands of servers (docs/scale.md)")
    haproxy.add_argument(
        "--spare-slots", metavar="N", default=argparse.SUPPRESS,
        help="empty server slots per backend, filled through the runtime API without a reload "
        "(default auto: as many as the backend has servers, at least 32); fewer for thousands "
        "of servers, where each slot costs HAProxy memory and a file descriptor (docs/scale.md)")
    haproxy.add_argument("--response-timeout", metavar="SECONDS", default=argparse.SUPPRESS,
                         help="http mode: how long a server may take to send response headers "
                         "before an idempotent request is retried on another "
                         f"(default {DEFAULT_RESPONSE_TIMEOUT:g})")
    _add_common(haproxy)


def _add_promote(sub: Any) -> None:
    promote = sub.add_parser(
        "promote",
        help="make VERSION the only version of SERVICE in rotation, cluster-wide",
        description="Records a promotion under --control-prefix; every agent and sidecar moves "
        "instances of other versions to standby (their containers keep running), so promoting "
        "the old version again is an instant rollback.",
    )
    promote.add_argument("service", metavar="SERVICE", help="the service name")
    promote.add_argument("version", metavar="VERSION", nargs="?", help="the version to promote")
    promote.add_argument("--clear", action="store_const", const="true",
                         default=argparse.SUPPRESS,
                         help="remove the promotion: every running version registers again")
    promote.add_argument("--min-instances", metavar="N", default=argparse.SUPPRESS,
                         help="refuse unless at least N instances of VERSION are registered "
                         "(default 1)")
    promote.add_argument("--timeout", metavar="SECONDS", default=argparse.SUPPRESS,
                         help="how long to wait for the rotation to match; with --canary, how "
                         "long a step may be prolonged for want of traffic (default 30)")
    promote.add_argument("--canary", metavar="P1,P2,...", default=argparse.SUPPRESS,
                         help="send VERSION these percentages of new requests, one step each "
                         "(increasing, 1..99), judged by the routers' traffic; promote when "
                         "every step passed, roll back at the first that failed")
    promote.add_argument("--interval", metavar="SECONDS", default=argparse.SUPPRESS,
                         help="how long each canary step lasts before it is judged (default 30)")
    promote.add_argument("--max-error-rate", metavar="R", default=argparse.SUPPRESS,
                         help="a step fails when VERSION's error rate over it is above R "
                         "(0..1, default 0.01)")
    promote.add_argument("--min-requests", metavar="N", default=argparse.SUPPRESS,
                         help="a step is judged once VERSION answered at least N requests in it "
                         "(default 20)")
    promote.add_argument("--max-p99", metavar="MS", default=argparse.SUPPRESS,
                         help="a step also fails when VERSION's 99th percentile response time "
                         "over it is above MS milliseconds (http-mode routers)")
    promote.add_argument("--max-latency-ratio", metavar="R", default=argparse.SUPPRESS,
                         help="a step also fails when VERSION's p99 is above R (> 1) times the "
                         "other versions' over the same step (http-mode routers)")
    promote.add_argument("--gate", metavar="URL", default=argparse.SUPPRESS,
                         help="POST the last step's figures as JSON to URL before each step and "
                         "before the promotion; anything but a 2xx within 10 s rolls back")
    promote.add_argument("--header", metavar="NAME", default=argparse.SUPPRESS,
                         help="while the canary runs, requests with header NAME: always go to "
                         "VERSION, NAME: never to the other versions (http-mode routers)")
    promote.add_argument("--sticky", action="store_const", const="true",
                         default=argparse.SUPPRESS,
                         help="while the canary runs, a client keeps the version that first "
                         "answered it (an HAProxy cookie; http-mode routers)")
    for word, what in (("pause", "hold the canary of SERVICE in progress at its weights"),
                       ("resume", "start its current step again, a whole new interval"),
                       ("abort", "roll it back at once")):
        promote.add_argument(f"--{word}", dest=f"steer_{word}", action="store_true",
                             help=f"{what} (no VERSION)")
    _add_common(promote)


def _add_maint(sub: Any) -> None:
    maint = sub.add_parser(
        "maint",
        help="take instances, services or nodes out of rotation without stopping them",
        description="`maint enable SERVICE [--instance INSTANCE]` or `maint enable --node "
        "NODE` takes them out of rotation (every agent moves their keys to standby), "
        "`maint disable ...` brings them back, `maint` alone lists what is held out. Entries "
        "are keys without a lease: they outlive agents and reboots until disabled.",
    )
    maint.add_argument("action", metavar="enable|disable", nargs="?",
                       help="enable or disable an entry (none: list the entries)")
    maint.add_argument("service", metavar="SERVICE", nargs="?", help="the service")
    maint.add_argument("--instance", metavar="INSTANCE", default=argparse.SUPPRESS,
                       help="one instance of SERVICE, as in its key: NODE:CONTAINER:PORT[:udp]")
    maint.add_argument("--node", dest="maint_node", metavar="NODE", default=argparse.SUPPRESS,
                       help="every instance on NODE (instead of SERVICE)")
    maint.add_argument("--reason", metavar="TEXT", default=argparse.SUPPRESS,
                       help="why, shown by `registrar maint` and `ls`")
    maint.add_argument("--timeout", metavar="SECONDS", default=argparse.SUPPRESS,
                       help="how long to wait until the rotation matches (default 30)")
    _add_common(maint, skip=("--node",))  # here --node names the node held out


def _add_drain(sub: Any) -> None:
    drain = sub.add_parser(
        "drain",
        help="take one container's instances out of rotation and wait until the routers are "
        "idle on them (a unit's first ExecStop=)",
        description="Writes a drain entry for CONTAINER; whoever owns its keys (the host agent "
        "or its sidecar) holds its instances out of rotation while this run of the container "
        "lasts. Returns once every live router has applied that and has nothing in flight on "
        "them. --undo brings a drained container that still runs back.",
    )
    drain.add_argument("container", metavar="CONTAINER", help="the container's name")
    drain.add_argument("--timeout", metavar="SECONDS", default=argparse.SUPPRESS,
                       help="how long to wait for the owner and the routers (default 30)")
    drain.add_argument("--node", dest="drain_node", metavar="NAME", default=argparse.SUPPRESS,
                       help="the node the container runs on, as its agent's --node (default: "
                       "the host name)")
    drain.add_argument("--undo", action="store_const", const="true", default=argparse.SUPPRESS,
                       help="bring a drained container that still runs back into rotation")
    _add_common(drain, skip=("--node",))  # here --node names the container's node, flag only




def _add_network(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", metavar="NAME", default=argparse.SUPPRESS,
                        help="register each container attached to Docker network NAME at its "
                        "address there and its private ports (its registrar.network label wins)")


def _add_catalog(sub: Any) -> None:
    catalog = sub.add_parser(
        "catalog",
        help="serve the whole prefix read-only: JSON, Prometheus discovery, a live page",
        description="Follows --prefix and --control-prefix and serves, from memory, "
        "/v1/catalog (JSON, with ?index= blocking queries), /v1/sd/prometheus (Prometheus "
        "http_sd_configs), a live page at /, /metrics and /healthz.",
    )
    catalog.add_argument("--listen", metavar="ADDR:PORT", default=argparse.SUPPRESS,
                         help=f"where it serves HTTP (default {DEFAULT_CATALOG_LISTEN})")
    catalog.add_argument("--catalog-user", metavar="USER", default=argparse.SUPPRESS,
                         help="HTTP basic auth user on every path but /healthz")
    catalog.add_argument("--catalog-password", metavar="PASSWORD", default=argparse.SUPPRESS,
                         help="its password; prefer REGISTRAR_CATALOG_PASSWORD")
    catalog.add_argument("--catalog-cert", metavar="FILE", default=argparse.SUPPRESS,
                         help="serve HTTPS with this certificate (with --catalog-key)")
    catalog.add_argument("--catalog-key", metavar="FILE", default=argparse.SUPPRESS,
                         help="the certificate's private key (with --catalog-cert)")
    _add_common(catalog)


COMMANDS: dict[str, Callable[[Any], None]] = {
    "watch": _add_watch,
    "register": _add_register,
    "ls": _add_ls,
    "haproxy": _add_haproxy,
    "promote": _add_promote,
    "maint": _add_maint,
    "drain": _add_drain,
    "catalog": _add_catalog,
}


# --- resolving and validating -------------------------------------------------------------


def _resolver(
    args: Mapping[str, Any], env: Mapping[str, str]
) -> Callable[[str, str | None], str | None]:
    def value(flag: str, default: str | None) -> str | None:
        """Flag, else environment, else default.

        For flags whose default is "none" or worked out (OPTIONAL_FLAGS) an empty value counts
        as not given: a unit's `--host-ip=${COREOS_PRIVATE_IPV4}` with the variable unset falls
        back to the default. For the others an empty value is an error, named.
        """
        attr = flag.lstrip("-").replace("-", "_")
        env_name = "REGISTRAR_" + attr.upper()
        candidates = [args.get(attr), env.get(env_name)]
        for candidate in candidates:
            if candidate is None or (candidate == "" and flag in OPTIONAL_FLAGS):
                continue
            return str(candidate)
        return default

    return value


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


def _endpoints(raw: str) -> tuple[EtcdEndpoint, ...]:
    endpoints = []
    for item in raw.split(","):
        url = item.strip()
        if not url:
            raise SettingsError(f"--etcd: empty endpoint in {raw!r}")
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


def _readable(flag: str, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise SettingsError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None
    return path


def _pem(flag: str, path: str | None, kind: str) -> str | None:
    """A readable PEM file holding a certificate (`kind` "cert") or an unencrypted private key
    ("key"): gRPC would only fail later, at every connection, with a vaguer error."""
    if _readable(flag, path) is None or path is None:
        return None
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 20).decode("ascii", "replace")
    except OSError as exc:
        raise SettingsError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None
    if kind == "cert" and "-----BEGIN CERTIFICATE-----" not in text:
        raise SettingsError(f"{flag}: {path!r} is not a PEM certificate (BEGIN CERTIFICATE)")
    if kind == "key":
        if "ENCRYPTED" in text:
            raise SettingsError(f"{flag}: {path!r} is encrypted; give an unencrypted PEM key")
        if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            raise SettingsError(f"{flag}: {path!r} is not a PEM private key (BEGIN PRIVATE KEY)")
    return path


def _check_tls(ca: str | None, cert: str | None, key: str | None) -> None:
    """The CA parses as certificates, and the client key belongs to the client certificate.
    (`ssl` only when there is a file to check: it costs every process ~4 MiB and ~10 ms.)"""
    if ca is None and (cert is None or key is None):
        return
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise SettingsError(f"--etcd-ca: {ca!r} holds no valid certificate: {exc}") from None
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key, password=lambda: b"")
        except ssl.SSLError as exc:
            mismatch = "KEY_VALUES_MISMATCH" in str(exc) or "values mismatch" in str(exc)
            why = "the key does not belong to the certificate" if mismatch else str(exc)
            raise SettingsError(f"--etcd-cert/--etcd-key: {why}") from None


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


def parse_settings(
    argv: Sequence[str], env: Mapping[str, str], hostname: str = "localhost"
) -> Settings:
    """Turns argv (without the program name) and the environment into Settings; `hostname` is
    the default of --node (the caller reads it: this function does no I/O)."""
    args = _parse_args(argv)
    command = args["command"]
    value = _resolver(args, env)
    etcd = _etcd(value)
    prefix, control = _prefixes(value)
    node = value("--node", None) or hostname
    if not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, got {node!r}")

    host_ip = value("--host-ip", None) or env.get("COREOS_PRIVATE_IPV4") or None
    if host_ip is not None:
        host_ip = _ip("--host-ip", host_ip)

    default_metrics = {
        "register": DEFAULT_SIDECAR_METRICS_ADDR,
        "haproxy": DEFAULT_ROUTER_METRICS_ADDR,
    }.get(command, DEFAULT_METRICS_ADDR)
    log_format, log_level = _logging(value)

    haproxy = _haproxy(args, value) if command == "haproxy" else None
    promote = _promote(args, value) if command == "promote" else None
    maint = _maint(args, value) if command == "maint" else None
    drain_cmd = _drain(args, value, hostname) if command == "drain" else None
    catalog = _catalog(value) if command == "catalog" else None
    network = value("--network", None) if command in ("watch", "register") else None
    if network is not None and not NAME_RE.fullmatch(network):
        raise SettingsError(f"--network: must match {NAME_RE.pattern}, got {network!r}")

    container = args.get("container")
    if container is not None and not container.strip():
        raise SettingsError("CONTAINER: must not be empty")

    return Settings(
        command=command,
        etcd=etcd,
        prefix=prefix,
        control_prefix=control,
        ttl=_int("--ttl", value("--ttl", str(DEFAULT_TTL)) or "", 2),
        host_ip=host_ip,
        node=node,
        docker_url=value("--docker", None) or env.get("DOCKER_HOST") or DEFAULT_DOCKER,
        metrics_addr=_metrics_addr(value("--metrics-addr", default_metrics) or ""),
        drain=_seconds("--drain", value("--drain", "0") or ""),
        resync=_int("--resync", value("--resync", str(DEFAULT_RESYNC)) or "", 0),
        explicit=command == "watch" and _bool("--explicit", value("--explicit", "false") or ""),
        log_format=log_format,
        log_level=log_level,
        container=container,
        wait=(_seconds("--wait", value("--wait", str(DEFAULT_WAIT)) or "")
              if command == "register" else DEFAULT_WAIT),
        service=args.get("service"),
        json=command == "ls" and _bool("--json", value("--json", "false") or ""),
        timeout=(_seconds("--timeout", value("--timeout", str(DEFAULT_LS_TIMEOUT)) or "")
                 if command == "ls" else DEFAULT_LS_TIMEOUT),
        haproxy=haproxy,
        promote=promote,
        maint=maint,
        drain_cmd=drain_cmd,
        catalog=catalog,
        network=network,
    )


Resolve = Callable[[str, str | None], str | None]


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    # The command's own parser when argv names one (the first word that is a command's name);
    # whatever it refuses is parsed again by the whole parser, whose answer stands (a flag's
    # value that happens to be a command's name cannot mislead it).
    named = next((word for word in argv if word in COMMANDS), None)
    if named is not None:
        try:
            return vars(build_parser(named).parse_args(list(argv)))
        except SettingsError:
            pass
    parser = build_parser()
    try:
        return vars(parser.parse_args(list(argv)))
    except SettingsError as exc:
        # argparse complains of the missing COMMAND before an unknown option: name the option.
        known = {o for action in parser._actions for o in action.option_strings}
        unknown = [a for a in argv if a.startswith("-") and a.split("=", 1)[0] not in known]
        if unknown and "COMMAND" in str(exc):
            raise SettingsError(f"unrecognized arguments: {' '.join(unknown)}") from None
        raise


def _logging(value: Resolve) -> tuple[str, str]:
    log_format = (value("--log-format", "text") or "").lower()
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"--log-format: must be text or json, got {log_format!r}")
    log_level = (value("--log-level", "info") or "").lower()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")
    return log_format, log_level


def _etcd(value: Resolve) -> EtcdSettings:
    etcd_raw = value("--etcd", DEFAULT_ETCD) or ""
    endpoints = _endpoints(etcd_raw)
    ca = _pem("--etcd-ca", value("--etcd-ca", None) or None, "cert")
    cert = _pem("--etcd-cert", value("--etcd-cert", None) or None, "cert")
    key = _pem("--etcd-key", value("--etcd-key", None) or None, "key")
    if (cert is None) != (key is None):
        raise SettingsError("--etcd-cert and --etcd-key: give both or neither")
    if (ca or cert) and not all(ep.secure for ep in endpoints):
        flag = "--etcd-ca" if ca else "--etcd-cert"
        raise SettingsError(
            f"{flag}: TLS files are given but --etcd has http:// endpoints; use https:// for all"
        )
    _check_tls(ca, cert, key)
    user = value("--etcd-user", None) or None
    password = value("--etcd-password", None) or None
    if (user is None) != (password is None):
        raise SettingsError(
            "--etcd-user: needs a password (REGISTRAR_ETCD_PASSWORD) and the other way round"
        )
    return EtcdSettings(
        endpoints=endpoints,
        ca=ca,
        cert=cert,
        key=key,
        user=user,
        password=password,
    )


def _prefixes(value: Resolve) -> tuple[str, str]:
    prefix = _path_prefix("--prefix", value("--prefix", DEFAULT_PREFIX) or "")
    control = _path_prefix(
        "--control-prefix", value("--control-prefix", DEFAULT_CONTROL_PREFIX) or ""
    )
    if (prefix + "/").startswith(control + "/") or (control + "/").startswith(prefix + "/"):
        raise SettingsError(
            f"--control-prefix: {control!r} and --prefix {prefix!r} must not contain each other"
        )
    return prefix, control


def _haproxy(args: Mapping[str, Any], value: Callable[[str, str | None], str | None]) -> (
    HAProxySettings
):
    raw_binds: list[str] = list(args.get("bind") or [])
    if not raw_binds:
        raw_binds = [b for b in (value("--bind", "") or "").split(",") if b.strip()]
    binds = [_bind("--bind", raw) for raw in raw_binds]
    bind_file = value("--bind-file", None) or None
    if bind_file is not None:
        binds += _bind_file(bind_file)
    if not binds:
        raise SettingsError("--bind: give at least one SERVICE=ADDR:PORT (or --bind-file)")
    mode = (value("--mode", "tcp") or "").lower()
    if mode not in HAPROXY_MODES:
        raise SettingsError(f"--mode: must be tcp or http, got {mode!r}")
    template = value("--template", None) or None
    _readable("--template", template)
    response_timeout = _seconds(
        "--response-timeout", value("--response-timeout", f"{DEFAULT_RESPONSE_TIMEOUT:g}") or "")
    if response_timeout <= 0:
        raise SettingsError("--response-timeout: must be above 0 seconds")
    check_interval = _seconds(
        "--check-interval", value("--check-interval", f"{DEFAULT_CHECK_INTERVAL:g}") or "")
    if not 0.1 <= check_interval <= 3600:
        raise SettingsError("--check-interval: must be between 0.1 and 3600 seconds")
    raw_spares = (value("--spare-slots", "auto") or "").strip().lower()
    spare_slots = None if raw_spares == "auto" else _int("--spare-slots", raw_spares, 1)
    return HAProxySettings(
        binds=tuple(binds),
        mode=mode,
        config=value("--config", DEFAULT_HAPROXY_CONFIG) or DEFAULT_HAPROXY_CONFIG,
        template=template,
        haproxy_bin=value("--haproxy-bin", "haproxy") or "haproxy",
        reload_cmd=value("--reload-cmd", None) or None,
        response_timeout=response_timeout,
        check_interval=check_interval,
        spare_slots=spare_slots,
    )


def _bind(flag: str, raw: str) -> Bind:
    service, sep, addr = raw.strip().partition("=")
    host, colon, port_text = addr.rpartition(":")
    if not sep or not colon or not (port_text.isascii() and port_text.isdigit()) or not (
        0 < int(port_text) < 65536
    ):
        raise SettingsError(f"{flag}: must be SERVICE=ADDR:PORT, got {raw!r}")
    if not NAME_RE.fullmatch(service):
        raise SettingsError(f"{flag}: bad service name {service!r}")
    return Bind(service, host.strip("[]") or "0.0.0.0", int(port_text))


def _bind_file(path: str) -> list[Bind]:
    """`--bind-file`: one SERVICE=ADDR:PORT a line; blank lines and `#` comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--bind-file: cannot read {path}: {exc}") from None
    binds = []
    for number, line in enumerate(lines, 1):
        text = line.partition("#")[0].strip()
        if text:
            binds.append(_bind(f"--bind-file {path} line {number}", text))
    return binds


def _promote(args: Mapping[str, Any], value: Callable[[str, str | None], str | None]) -> (
    PromoteSettings
):
    service = str(args.get("service") or "")
    if not NAME_RE.fullmatch(service):
        raise SettingsError(f"SERVICE: must match {NAME_RE.pattern}, got {service!r}")
    clear = _bool("--clear", value("--clear", "false") or "")
    version = args.get("version")
    if clear and version is not None:
        raise SettingsError("--clear: takes no VERSION")
    steer = _steer(args, clear, version)
    if not clear and version is None and steer is None:
        raise SettingsError("VERSION: required (or --clear)")
    if version is not None and not NAME_RE.fullmatch(version):
        raise SettingsError(f"VERSION: must match {NAME_RE.pattern}, got {version!r}")
    canary = _canary(value)
    if canary is not None and clear:
        raise SettingsError("--canary: not with --clear")
    if canary is not None and steer is not None:
        raise SettingsError(f"--{steer}: not with --canary")
    return PromoteSettings(
        service=service,
        version=version,
        clear=clear,
        min_instances=_int("--min-instances", value("--min-instances", "1") or "", 1),
        timeout=_seconds("--timeout", value("--timeout", "30") or ""),
        canary=canary,
        steer=steer,
    )


def _steer(args: Mapping[str, Any], clear: bool, version: str | None) -> str | None:
    """`--pause`, `--resume` or `--abort` (flags only: one action of one command, never from
    the environment), alone: no VERSION, no --clear, no --canary."""
    given = [word for word in STEERING if args.get(f"steer_{word}")]
    if not given:
        return None
    flag = f"--{given[0]}"
    if len(given) > 1:
        raise SettingsError(f"{flag}: one of --pause, --resume and --abort at a time")
    if version is not None or clear:
        raise SettingsError(f"{flag}: takes SERVICE alone (no VERSION, no --clear)")
    for other in ("canary", "interval", "max_error_rate", "min_requests", "max_p99",
                  "max_latency_ratio", "gate", "header", "sticky"):
        if other in args:
            raise SettingsError(f"{flag}: not with --{other.replace('_', '-')}")
    return given[0]


def _canary(value: Callable[[str, str | None], str | None]) -> CanarySettings | None:
    raw = value("--canary", None)
    if raw is None:
        for flag in ("--interval", "--max-error-rate", "--min-requests", "--max-p99",
                     "--max-latency-ratio", "--gate", "--header", "--sticky"):
            if value(flag, None) is not None:
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
    interval = _seconds("--interval", value("--interval", "30") or "")
    if interval <= 0:
        raise SettingsError(f"--interval: must be a number of seconds > 0, got {interval:g}")
    rate_raw = value("--max-error-rate", "0.01") or ""
    try:
        rate = float(rate_raw.strip())
    except ValueError:
        rate = float("nan")
    if not 0 <= rate <= 1:
        raise SettingsError(f"--max-error-rate: must be a number 0..1, got {rate_raw!r}")
    return CanarySettings(
        steps=tuple(steps), interval=interval, max_error_rate=rate,
        min_requests=_int("--min-requests", value("--min-requests", "20") or "", 1),
        max_p99_ms=_above("--max-p99", value("--max-p99", None), 0, "milliseconds"),
        max_latency_ratio=_above("--max-latency-ratio", value("--max-latency-ratio", None), 1,
                                 "ratio"),
        gate=_gate(value("--gate", None)),
        header=_header(value("--header", None)),
        sticky=_bool("--sticky", value("--sticky", "false") or ""),
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


def _maint(args: Mapping[str, Any], value: Callable[[str, str | None], str | None]) -> (
    MaintSettings
):
    action = args.get("action") or "list"
    if action not in ("enable", "disable", "list"):
        raise SettingsError(f"maint: enable or disable, got {action!r}")
    service, node = args.get("service"), args.get("maint_node")
    instance = args.get("instance")
    timeout = _seconds("--timeout", value("--timeout", "30") or "")
    if action == "list":
        if service or node or instance:
            raise SettingsError("maint: SERVICE, --instance and --node need enable or disable")
        return MaintSettings("list", timeout=timeout)
    if (service is None) == (node is None):
        raise SettingsError(f"maint {action}: give SERVICE or --node NODE (one of them)")
    if service is not None and not NAME_RE.fullmatch(service):
        raise SettingsError(f"SERVICE: must match {NAME_RE.pattern}, got {service!r}")
    if node is not None and not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match {NAME_RE.pattern}, got {node!r}")
    if instance is not None:
        if service is None:
            raise SettingsError("--instance: needs SERVICE")
        if not _valid_instance(instance):
            raise SettingsError("--instance: must be NODE:CONTAINER:PORT or "
                                f"NODE:CONTAINER:PORT:udp, got {instance!r}")
    reason = args.get("reason") or ""
    if len(reason) > 500 or any(not ch.isprintable() for ch in reason):
        raise SettingsError("--reason: at most 500 printable characters")
    return MaintSettings(action, service=service, instance=instance, node=node,
                         reason=reason, timeout=timeout)


def _drain(args: Mapping[str, Any], value: Resolve, hostname: str) -> DrainSettings:
    """`--node` and `--undo` are flags only: REGISTRAR_NODE is an agent's own identity."""
    container = str(args.get("container") or "")
    if not NAME_RE.fullmatch(container):
        raise SettingsError(f"CONTAINER: must match {NAME_RE.pattern}, got {container!r}")
    node = args.get("drain_node") or hostname
    if not NAME_RE.fullmatch(node):
        raise SettingsError(f"--node: must match {NAME_RE.pattern}, got {node!r}")
    undo = args.get("undo") is not None
    return DrainSettings(container, node, _seconds("--timeout", value("--timeout", "30") or ""),
                         undo)


def _catalog(value: Resolve) -> CatalogSettings:
    raw = value("--listen", DEFAULT_CATALOG_LISTEN) or ""
    listen = _metrics_addr(raw, "--listen")
    if listen is None:
        raise SettingsError(f"--listen: must be ADDR:PORT with a port 1-65535, got {raw!r}")
    user = value("--catalog-user", None)
    password = value("--catalog-password", None)
    if user is not None and (not user.isprintable() or ":" in user):
        raise SettingsError("--catalog-user: printable, without ':'")
    if (user is None) != (password is None):
        raise SettingsError("--catalog-user: needs a password (REGISTRAR_CATALOG_PASSWORD) "
                            "and the other way round")
    cert = _pem("--catalog-cert", value("--catalog-cert", None), "cert")
    key = _pem("--catalog-key", value("--catalog-key", None), "key")
    if (cert is None) != (key is None):
        raise SettingsError("--catalog-cert and --catalog-key: give both or neither")
    if cert is not None and key is not None:
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise SettingsError(f"--catalog-cert/--catalog-key: {exc}") from None
    return CatalogSettings(listen=listen, user=user, password=password, cert=cert, key=key)


def _valid_instance(instance: str) -> bool:
    parts = instance.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "udp"):
        return False
    node, container, port = parts[:3]
    return (bool(NAME_RE.fullmatch(node)) and bool(NAME_RE.fullmatch(container))
            and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535)


def _ip(flag: str, raw: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise SettingsError(f"{flag}: not an IP address: {raw!r}") from None
