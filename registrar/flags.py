"""The one table of the command line: every command, its positionals and its flags (pure).

`FLAGS` is the only place a flag is declared: its name, metavar, help, default, which commands
take it, and whether `REGISTRAR_<FLAG>` sets it too. The parser is built from it (`build_parser`),
the settings resolve their values through it (`Args` in `registrar.settings`), and a fast test
checks the README's option tables against it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from registrar import __version__
from registrar.typing_shim import Any, NamedTuple, NoReturn

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
DEFAULT_RESPONSE_TIMEOUT = 30.0
DEFAULT_CHECK_INTERVAL = 0.5
DEFAULT_CATALOG_LISTEN = "127.0.0.1:9479"
STEERING = ("pause", "resume", "abort")  # promote SERVICE --pause | --resume | --abort

COMMON = "*"  # `Flag.commands`: every command (and the top level: `registrar --etcd URL watch`)


class SettingsError(Exception):
    """A bad flag or environment value; the message names the flag."""


class Flag(NamedTuple):
    name: str  # "--etcd"
    help: str
    commands: tuple[str, ...] = (COMMON,)
    metavar: str | None = None  # None: the name without dashes, upper-cased
    # The value when neither the flag nor its variable is given (None: not given, or worked out)
    default: str | None = None
    # An empty value counts as not given (flags whose default is "none" or worked out): a unit's
    # `--host-ip=${COREOS_PRIVATE_IPV4}` with the variable unset falls back to the default. For
    # the others an empty value is an error, named.
    optional: bool = False
    kind: str = "value"  # "value", "switch" (on when given), "append" (repeatable), "action"
    env: bool = True  # REGISTRAR_<FLAG> sets it too (False: the flag alone)
    dest: str | None = None  # argparse's name, when two commands give the flag two meanings

    @property
    def attr(self) -> str:
        return self.dest or self.name.lstrip("-").replace("-", "_")

    @property
    def env_name(self) -> str | None:
        return "REGISTRAR_" + self.name.lstrip("-").replace("-", "_").upper() if self.env else None

    def takes(self, command: str) -> bool:
        return COMMON in self.commands or command in self.commands



FLAGS: tuple[Flag, ...] = (
    # --- every command ---
    Flag("--etcd", f"comma-separated etcd endpoints, http:// or https:// (default {DEFAULT_ETCD})",
         default=DEFAULT_ETCD),
    Flag("--etcd-ca", "CA certificate file for https:// endpoints", optional=True),
    Flag("--etcd-cert", "client certificate file (with --etcd-key)", optional=True),
    Flag("--etcd-key", "client key file (with --etcd-cert)", optional=True),
    Flag("--etcd-user", "etcd user name (password from REGISTRAR_ETCD_PASSWORD)", optional=True),
    Flag("--etcd-password",
         "etcd password; prefer the REGISTRAR_ETCD_PASSWORD environment variable", optional=True),
    Flag("--prefix", f"key prefix, must start with / (default {DEFAULT_PREFIX})",
         default=DEFAULT_PREFIX),
    Flag("--control-prefix", "where promotions and standby instances are kept, outside --prefix "
         f"(default {DEFAULT_CONTROL_PREFIX})", default=DEFAULT_CONTROL_PREFIX),
    Flag("--ttl",
         f"lease TTL in seconds, integer >= 2; heartbeats every TTL/3 (default {DEFAULT_TTL})",
         default=str(DEFAULT_TTL)),
    Flag("--host-ip", "address written for published ports (default: $COREOS_PRIVATE_IPV4, else "
         "the port's own HostIp when specific, else the host's primary IPv4)", optional=True),
    Flag("--node", "this host's identity in keys (default: the host name)", optional=True),
    Flag("--docker", f"Docker endpoint (default: $DOCKER_HOST, else {DEFAULT_DOCKER})",
         optional=True),
    Flag("--metrics-addr", "HOST:PORT for /metrics and /healthz; port 0 disables (default "
         f"{DEFAULT_METRICS_ADDR} for watch, {DEFAULT_ROUTER_METRICS_ADDR} for haproxy, off for "
         "register)"),
    Flag("--drain", "on SIGTERM, after deregistering, wait at most this long until every live "
         "router has applied it with nothing in flight (the whole time when no router reports; "
         "default 0)", default="0"),
    Flag("--resync", "seconds between full reconciles against Docker, 0 turns it off (default "
         f"{DEFAULT_RESYNC})", default=str(DEFAULT_RESYNC)),
    Flag("--log-format", "text or json, on stderr (default text)", default="text"),
    Flag("--log-level", "debug, info, warning or error (default info)", default="info"),
    # --- watch, register ---
    Flag("--explicit", "only register containers that carry a service label", ("watch",),
         kind="switch", default="false"),
    Flag("--network", "register each container attached to Docker network NAME at its address "
         "there and its private ports (its registrar.network label wins)", ("watch", "register"),
         metavar="NAME", optional=True),
    Flag("--wait", f"how long to wait for the container to exist and run (default "
         f"{DEFAULT_WAIT:g})", ("register",), metavar="SECONDS", default=f"{DEFAULT_WAIT:g}"),
    # --- ls ---
    Flag("--json", "one JSON object a line: the stored value plus its key", ("ls",),
         kind="switch", default="false"),
    Flag("--timeout", "how long to retry reading etcd through transient errors "
         f"(default {DEFAULT_LS_TIMEOUT:g})", ("ls",), metavar="SECONDS",
         default=f"{DEFAULT_LS_TIMEOUT:g}"),
    # --- haproxy ---
    Flag("--bind", "a frontend for SERVICE on ADDR:PORT; repeat for several (env: "
         "comma-separated)", ("haproxy",), metavar="SERVICE=ADDR:PORT", kind="append"),
    Flag("--bind-file", "more binds, one SERVICE=ADDR:PORT a line (# comments): for hundreds "
         "of services", ("haproxy",), metavar="PATH", optional=True),
    Flag("--mode", "tcp or http (default tcp)", ("haproxy",), metavar="MODE", default="tcp"),
    Flag("--config", f"where the rendered config is written (default {DEFAULT_HAPROXY_CONFIG})",
         ("haproxy",), metavar="PATH", default=DEFAULT_HAPROXY_CONFIG),
    Flag("--template", "a Jinja2 template replacing the built-in one", ("haproxy",),
         metavar="PATH", optional=True),
    Flag("--haproxy-bin", "the HAProxy binary (default: haproxy from PATH)", ("haproxy",),
         metavar="PATH", default="haproxy"),
    Flag("--reload-cmd", "do not run HAProxy; run CMD after each new config", ("haproxy",),
         metavar="CMD", optional=True),
    Flag("--check-interval", f"how often HAProxy checks each server (default "
         f"{DEFAULT_CHECK_INTERVAL:g}; a server that stops answering leaves rotation after 2 "
         "failed checks, sooner on failed traffic); raise it for thousands of servers "
         "(docs/scale.md)", ("haproxy",), metavar="SECONDS",
         default=f"{DEFAULT_CHECK_INTERVAL:g}"),
    Flag("--spare-slots", "empty server slots per backend, filled through the runtime API "
         "without a reload (default auto: as many as the backend has servers, at least 32); "
         "fewer for thousands of servers, where each slot costs HAProxy memory and a file "
         "descriptor (docs/scale.md)", ("haproxy",), metavar="N", default="auto"),
    Flag("--response-timeout", "http mode: how long a server may take to send response headers "
         f"before an idempotent request is retried on another (default "
         f"{DEFAULT_RESPONSE_TIMEOUT:g})", ("haproxy",), metavar="SECONDS",
         default=f"{DEFAULT_RESPONSE_TIMEOUT:g}"),
    # --- promote ---
    Flag("--clear", "remove the promotion: every running version registers again", ("promote",),
         kind="switch", default="false"),
    Flag("--min-instances", "refuse unless at least N instances of VERSION are registered "
         "(default 1)", ("promote",), metavar="N", default="1"),
    Flag("--timeout", "how long to wait for the rotation to match; with --canary, how long a "
         "step may be prolonged for want of traffic (default 30)", ("promote",),
         metavar="SECONDS", default="30"),
    Flag("--canary", "send VERSION these percentages of new requests, one step each "
         "(increasing, 1..99), judged by the routers' traffic; promote when every step passed, "
         "roll back at the first that failed", ("promote",), metavar="P1,P2,..."),
    Flag("--interval", "how long each canary step lasts before it is judged (default 30)",
         ("promote",), metavar="SECONDS", default="30"),
    Flag("--max-error-rate", "a step fails when VERSION's error rate over it is above R "
         "(0..1, default 0.01)", ("promote",), metavar="R", default="0.01"),
    Flag("--min-requests", "a step is judged once VERSION answered at least N requests in it "
         "(default 20)", ("promote",), metavar="N", default="20"),
    Flag("--max-p99", "a step also fails when VERSION's 99th percentile response time over it "
         "is above MS milliseconds (http-mode routers)", ("promote",), metavar="MS"),
    Flag("--max-latency-ratio", "a step also fails when VERSION's p99 is above R (> 1) times "
         "the other versions' over the same step (http-mode routers)", ("promote",),
         metavar="R"),
    Flag("--gate", "POST the last step's figures as JSON to URL before each step and before "
         "the promotion; anything but a 2xx within 10 s rolls back", ("promote",),
         metavar="URL"),
    Flag("--header", "while the canary runs, requests with header NAME: always go to VERSION, "
         "NAME: never to the other versions (http-mode routers)", ("promote",), metavar="NAME"),
    Flag("--sticky", "while the canary runs, a client keeps the version that first answered it "
         "(an HAProxy cookie; http-mode routers)", ("promote",), kind="switch",
         default="false"),
    Flag("--pause", "hold the canary of SERVICE in progress at its weights (no VERSION)",
         ("promote",), kind="action", env=False, dest="steer_pause"),
    Flag("--resume", "start its current step again, a whole new interval (no VERSION)",
         ("promote",), kind="action", env=False, dest="steer_resume"),
    Flag("--abort", "roll it back at once (no VERSION)", ("promote",), kind="action", env=False,
         dest="steer_abort"),
    # --- maint ---
    Flag("--instance", "one instance of SERVICE, as in its key: NODE:CONTAINER:PORT[:udp]",
         ("maint",), metavar="INSTANCE", env=False),
    Flag("--node", "every instance on NODE (instead of SERVICE)", ("maint",), metavar="NODE",
         env=False, dest="maint_node"),
    Flag("--reason", "why, shown by `registrar maint` and `ls`", ("maint",), metavar="TEXT",
         env=False, default=""),
    Flag("--timeout", "how long to wait until the rotation matches (default 30)", ("maint",),
         metavar="SECONDS", default="30"),
    # --- drain ---
    Flag("--timeout", "how long to wait for the owner and the routers (default 30)", ("drain",),
         metavar="SECONDS", default="30"),
    Flag("--node", "the node the container runs on, as its agent's --node (default: the host "
         "name)", ("drain",), metavar="NAME", env=False, dest="drain_node"),
    Flag("--undo", "bring a drained container that still runs back into rotation", ("drain",),
         kind="switch", env=False),
    # --- catalog ---
    Flag("--listen", f"where it serves HTTP (default {DEFAULT_CATALOG_LISTEN})", ("catalog",),
         metavar="ADDR:PORT", default=DEFAULT_CATALOG_LISTEN),
    Flag("--catalog-user", "HTTP basic auth user on every path but /healthz", ("catalog",),
         metavar="USER", optional=True),
    Flag("--catalog-password", "its password; prefer REGISTRAR_CATALOG_PASSWORD", ("catalog",),
         metavar="PASSWORD", optional=True),
    Flag("--catalog-cert", "serve HTTPS with this certificate (with --catalog-key)",
         ("catalog",), metavar="FILE", optional=True),
    Flag("--catalog-key", "the certificate's private key (with --catalog-cert)", ("catalog",),
         metavar="FILE", optional=True),
)


def flags_of(command: str) -> Iterator[Flag]:
    """The flags `command` takes, each name once: its own before the common one of that name."""
    own = [f for f in FLAGS if command in f.commands]
    names = {f.name for f in own}
    yield from own
    yield from (f for f in FLAGS if COMMON in f.commands and f.name not in names)


def flag(command: str, name: str) -> Flag:
    return next(f for f in flags_of(command) if f.name == name)


class Positional(NamedTuple):
    dest: str
    metavar: str
    help: str
    optional: bool = False


class Command(NamedTuple):
    name: str
    help: str
    description: str
    positionals: tuple[Positional, ...] = ()
    common_first: bool = False  # in --help, the common flags before the command's own


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command(
        "watch", "host agent: register every eligible container on this host",
        "Host agent: follows Docker's events and keeps etcd in step with the containers running "
        "on this host. Runs until SIGTERM/SIGINT.", common_first=True),
    Command(
        "register", "sidecar: register one container until it stops",
        "Sidecar for one container (name or id), started from an app unit's ExecStartPost. "
        "Registers its published ports, deregisters and exits 0 when it stops.",
        (Positional("container", "CONTAINER", "container name or id"),)),
    Command(
        "ls", "list registrations under the prefix",
        "Lists registrations under the prefix: service, instance, host:port, version, node, "
        "age.", (Positional("service", "SERVICE", "only this service", optional=True),)),
    Command(
        "haproxy", "route traffic: keep an HAProxy in step with the registrations",
        "Watches the prefix, renders HAProxy's config, checks it with `haproxy -c`, installs it "
        "atomically and reloads HAProxy (which it runs itself in master-worker mode, unless "
        "--reload-cmd is given)."),
    Command(
        "promote", "make VERSION the only version of SERVICE in rotation, cluster-wide",
        "Records a promotion under --control-prefix; every agent and sidecar moves instances of "
        "other versions to standby (their containers keep running), so promoting the old "
        "version again is an instant rollback.",
        (Positional("service", "SERVICE", "the service name"),
         Positional("version", "VERSION", "the version to promote", optional=True))),
    Command(
        "maint", "take instances, services or nodes out of rotation without stopping them",
        "`maint enable SERVICE [--instance INSTANCE]` or `maint enable --node NODE` takes them "
        "out of rotation (every agent moves their keys to standby), `maint disable ...` brings "
        "them back, `maint` alone lists what is held out. Entries are keys without a lease: "
        "they outlive agents and reboots until disabled.",
        (Positional("action", "enable|disable",
                    "enable or disable an entry (none: list the entries)", optional=True),
         Positional("service", "SERVICE", "the service", optional=True))),
    Command(
        "drain", "take one container's instances out of rotation and wait until the routers are "
        "idle on them (a unit's first ExecStop=)",
        "Writes a drain entry for CONTAINER; whoever owns its keys (the host agent or its "
        "sidecar) holds its instances out of rotation while this run of the container lasts. "
        "Returns once every live router has applied that and has nothing in flight on them. "
        "--undo brings a drained container that still runs back.",
        (Positional("container", "CONTAINER", "the container's name"),)),
    Command(
        "catalog", "serve the whole prefix read-only: JSON, Prometheus discovery, a live page",
        "Follows --prefix and --control-prefix and serves, from memory, /v1/catalog (JSON, with "
        "?index= blocking queries), /v1/sd/prometheus (Prometheus http_sd_configs), a live page "
        "at /, /metrics and /healthz."),
)}


# --- the parser ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: one line, our format."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, given the terminal's width. Left to itself it imports shutil
    (and bz2, lzma and zlib with it: 3 ms of a sidecar's start) to ask, at every add_argument."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it: $COLUMNS, stdout's, 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):  # not a terminal, or closed
        return 80


def _add(parser: argparse.ArgumentParser, flag: Flag) -> None:
    if flag.kind == "action":
        parser.add_argument(flag.name, dest=flag.attr, action="store_true", help=flag.help)
        return
    extra: dict[str, Any] = {"dest": flag.attr, "default": argparse.SUPPRESS, "help": flag.help}
    if flag.kind == "switch":
        parser.add_argument(flag.name, action="store_const", const="true", **extra)
        return
    metavar = flag.metavar or flag.name.lstrip("-").replace("-", "_").upper()
    action = "append" if flag.kind == "append" else "store"
    parser.add_argument(flag.name, metavar=metavar, action=action, **extra)


def _add_command(sub: Any, command: Command) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.description,
                            formatter_class=_Formatter)
    for positional in command.positionals:
        parser.add_argument(positional.dest, metavar=positional.metavar, help=positional.help,
                            **({"nargs": "?"} if positional.optional else {}))
    own = [f for f in FLAGS if command.name in f.commands]
    names = {f.name for f in own}
    common = [f for f in FLAGS if COMMON in f.commands and f.name not in names]
    for each in (common + own) if command.common_first else (own + common):
        _add(parser, each)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) the top level with one command's subparser: a
    sidecar starts once per container, and building every command's parser cost it ~10 ms."""
    parser = _Parser(
        prog="registrar",
        formatter_class=_Formatter,
        description=(
            "Registers the published ports of Docker containers in etcd v3, each key bound to a "
            "lease kept alive by heartbeats, and removes them the moment a container stops. "
            "Every flag can also be set as REGISTRAR_<FLAG> in the environment "
            "(flag > environment > default)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"registrar {__version__}")
    for each in FLAGS:  # `registrar --etcd URL watch` works too
        if COMMON in each.commands:
            _add(parser, each)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, command in COMMANDS.items():
        if only is None or only == name:
            _add_command(sub, command)
    return parser


def parse_args(argv: list[str]) -> dict[str, Any]:
    """argv as argparse reads it. The command's own parser when argv names one (the first word
    that is a command's name); whatever it refuses is parsed again by the whole parser, whose
    answer stands (a flag's value that happens to be a command's name cannot mislead it)."""
    named = next((word for word in argv if word in COMMANDS), None)
    if named is not None:
        try:
            return vars(build_parser(named).parse_args(argv))
        except SettingsError:
            pass
    parser = build_parser()
    try:
        return vars(parser.parse_args(argv))
    except SettingsError as exc:
        # argparse complains of the missing COMMAND before an unknown option: name the option.
        known = {o for action in parser._actions for o in action.option_strings}
        unknown = [a for a in argv if a.startswith("-") and a.split("=", 1)[0] not in known]
        if unknown and "COMMAND" in str(exc):
            raise SettingsError(f"unrecognized arguments: {' '.join(unknown)}") from None
        raise
