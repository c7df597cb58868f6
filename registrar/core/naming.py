"""From one container to its registrations: names, keys and values (pure).

Labels and environment are somebody else's input: every name that ends up in a key is checked
against NAME_RE, so no label can make a key leave `{prefix}/`. A container with any bad name
is refused whole, with a reason that is logged and counted; so is one with a bad check label
(`invalid_check`, see `core.checks`) or a bad metrics path (`invalid_metrics`). Each
registration carries its port's `CheckSpec` (None: unchecked), which is not part of the stored
value; `metrics_path` is, for a port with a `registrar.metrics` label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from registrar.core.containers import UNSPECIFIED_IPS, ContainerInfo
from registrar.core.names import NAME_RE, TRUE_WORDS
from registrar.typing_shim import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from registrar.core.checks import Checks, CheckSpec

MAX_TAGS = 32
MAX_VALUE_BYTES = 4096
VERSION_MAX = 128
MAX_METRICS_PATH = 1024
_METRICS_LABEL = re.compile(r"registrar\.(?:([0-9]{1,5})\.)?metrics")
# The characters of a URL path (RFC 3986's pchar and "/"): no query, no fragment, no space.
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        "/-._~%!$&'()*+,;=:@")


class Registration(NamedTuple):
    key: str
    service: str
    instance: str
    value: Mapping[str, Any]
    check: CheckSpec | None = None  # how registrar checks this port; never in the value

    def encoded(self) -> str:
        return json.dumps(self.value, sort_keys=True, separators=(",", ":"))


class Outcome(NamedTuple):
    """What to register for one container; `rejected` is a reason when it is refused."""

    registrations: tuple[Registration, ...] = ()
    rejected: str | None = None
    detail: str = ""
    skipped: str | None = None  # not an error: ignored, no port, not explicit...


class NamingContext(NamedTuple):
    prefix: str
    node: str
    host_ip: str | None  # --host-ip / $COREOS_PRIVATE_IPV4
    default_ip: str  # the host's primary IPv4
    explicit: bool = False
    sidecar: bool = False  # `register`: the named container is registered even under --explicit
    network: str | None = None  # --network: as if every container attached to it had the label


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def image_base(image: str) -> str:
    """'registry:5000/team/web:abc123' -> 'web'; 'web@sha256:..' -> 'web'."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def image_tag(image: str) -> str:
    ref, _, digest = image.partition("@")
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        return last.split(":", 1)[1]
    if digest:
        return digest.split(":", 1)[-1][:12]
    return "latest"


def instance_id(node: str, container_name: str, private_port: int, protocol: str) -> str:
    instance = f"{node}:{container_name}:{private_port}"
    return instance + ":udp" if protocol == "udp" else instance


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUE_WORDS


def _registrator(container: ContainerInfo, name: str) -> str | None:
    if name in container.labels:
        return container.labels[name]
    return container.env.get(name)


def _tags(container: ContainerInfo) -> tuple[list[str], str | None]:
    raw = container.labels.get("registrar.tags")
    if raw is None:
        raw = _registrator(container, "SERVICE_TAGS")
    if not raw:
        return [], None
    tags = [tag.strip() for tag in raw.split(",") if tag.strip()]
    if len(tags) > MAX_TAGS:
        return [], f"more than {MAX_TAGS} tags"
    for tag in tags:
        if not valid_name(tag):
            return [], f"tag {tag[:64]!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
    return tags, None


def _version(container: ContainerInfo) -> tuple[str, str | None]:
    version = container.labels.get("registrar.version")
    if version is None:
        version = image_tag(container.image)
        if not valid_name(version):  # image tags may start with "_"; keep them, bounded
            version = version[:VERSION_MAX]
        return version, None
    if not valid_name(version):
        return "", f"registrar.version {version[:64]!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
    return version, None


class Address(NamedTuple):
    """Where a container's ports are dialled, from its labels: `registrar.network` (its own
    address on that network, the private ports) or `registrar.ip` (this host for every port)."""

    host: str
    on_network: bool


def _address(container: ContainerInfo, ctx: NamingContext) -> Address | Outcome | None:
    """The container's Address (None: the usual host IP and published ports), or the Outcome
    rejecting it (`invalid_address`)."""
    import ipaddress

    network = container.labels.get("registrar.network")
    if network is not None and network not in container.networks:
        return Outcome(rejected="invalid_address",
                       detail=f"registrar.network {network[:64]!r}: not attached to it")
    if network is None and ctx.network in container.networks:
        network = ctx.network  # --network: only for containers attached to it
    if network is not None:
        attached = container.networks[network]
        host = attached[0] or attached[1]
        if not host:
            return Outcome(rejected="invalid_address",
                           detail=f"no address on network {network[:64]!r}")
        return Address(host, on_network=True)
    ip = container.labels.get("registrar.ip")
    if ip is None:
        return None
    try:
        return Address(str(ipaddress.ip_address(ip.strip())), on_network=False)
    except ValueError:
        return Outcome(rejected="invalid_address",
                       detail=f"registrar.ip {ip[:64]!r} is not an IP address")


def _ports(container: ContainerInfo, ctx: NamingContext,
           address: Address | None = None) -> list[tuple[int, str, str, int]]:
    """(private port, protocol, host, host port) of each port to register."""
    if address is not None and address.on_network:
        private = {(b.private_port, b.protocol) for b in container.ports} | {
            (port, proto) for port, proto in container.exposed if proto in ("tcp", "udp")}
        return [(port, proto, address.host, port) for port, proto in sorted(private)]
    if container.host_network:
        host_address = address.host if address else ctx.host_ip or ctx.default_ip
        return [(port, proto, host_address, port) for port, proto in container.exposed]
    result = []
    for binding in container.ports:
        if address is not None:
            host = address.host
        elif ctx.host_ip is not None:
            host = ctx.host_ip
        elif binding.host_ip in UNSPECIFIED_IPS:
            host = ctx.default_ip
        else:
            host = binding.host_ip
        result.append((binding.private_port, binding.protocol, host, binding.host_port))
    return result


def valid_metrics_path(path: object) -> bool:
    """A path to scrape: starts with `/`, the characters of a URL path, at most 1024."""
    return (isinstance(path, str) and 0 < len(path) <= MAX_METRICS_PATH and path[0] == "/"
            and all(ch in _PATH_CHARS for ch in path))


def _metrics_paths(container: ContainerInfo) -> tuple[dict[int | None, str], str | None]:
    """`registrar.metrics` (key None) and `registrar.<port>.metrics` (key the port), or why
    one is bad."""
    paths: dict[int | None, str] = {}
    for label, path in container.labels.items():
        match = _METRICS_LABEL.fullmatch(label)
        if match is None:
            continue
        if not valid_metrics_path(path):
            return {}, f"{label} {path[:64]!r} is not a path of at most {MAX_METRICS_PATH} URL " \
                "characters starting with /"
        paths[int(match.group(1)) if match.group(1) else None] = path
    return paths, None


def has_sidecar(container: ContainerInfo) -> bool:
    """`registrar.sidecar=true`: a `register` sidecar owns this container's keys, not `watch`."""
    return _truthy(container.labels.get("registrar.sidecar"))


def _service_name(container: ContainerInfo, ctx: NamingContext, private_port: int,
                  several: bool) -> str | Outcome | None:
    """The service of one port (None: none under --explicit), or the Outcome rejecting the
    container: labels first, then Registrator's names, then the image's base name."""
    service = container.labels.get(f"registrar.{private_port}.service")
    if service is None:
        service = container.labels.get("registrar.service")
    if service is None:
        service = _registrator(container, f"SERVICE_{private_port}_NAME")
    if service is None:
        service = _registrator(container, "SERVICE_NAME")
    if service is not None:
        if valid_name(service):
            return service
        return Outcome(rejected="invalid_service_name",
                       detail=f"service {service[:64]!r} for port {private_port}")
    if ctx.explicit and not ctx.sidecar:
        return None
    derived = image_base(container.image) + (f"-{private_port}" if several else "")
    if not valid_name(derived):
        return Outcome(rejected="invalid_image_name",
                       detail=f"service name {derived[:64]!r} derived from the image")
    return derived


def may_ask_for_checks(labels: Mapping[str, str]) -> bool:
    """Whether a label could ask for a check (`registrar.check`, `registrar.<port>.check`;
    `core.checks` reads them). Most containers have none: `core.checks` is imported only for
    one that does, which keeps it (3 ms) off a sidecar's way to its first put. Without such a
    label `parse_checks` asks for nothing (the `registrar.check.<number>` labels alone are
    ignored), so this looser test decides nothing of its own."""
    return any(name.startswith("registrar.") and name.endswith(".check") for name in labels)


def registrations_for(
    container: ContainerInfo, ctx: NamingContext, registered_at: str
) -> Outcome:
    """The registrations of one running container, or why it gets none."""
    if not ctx.sidecar and has_sidecar(container):
        return Outcome(skipped="registered by its own sidecar (registrar.sidecar)")
    # An explicit registrar.ignore (true or false) wins over Registrator's SERVICE_IGNORE.
    ignore = container.labels.get("registrar.ignore")
    if _truthy(ignore) or (ignore is None and _registrator(container, "SERVICE_IGNORE")):
        return Outcome(skipped="ignored by label")
    address = _address(container, ctx)
    if isinstance(address, Outcome):
        return address
    ports = _ports(container, ctx, address)
    if not ports:
        return Outcome(skipped="no published port")
    if not valid_name(container.name):
        return Outcome(rejected="invalid_container_name", detail=f"name {container.name[:64]!r}")

    tags, tag_error = _tags(container)
    if tag_error:
        return Outcome(rejected="invalid_tags", detail=tag_error)
    version, version_error = _version(container)
    if version_error:
        return Outcome(rejected="invalid_version", detail=version_error)
    checks: Checks | None = None
    if may_ask_for_checks(container.labels):
        from registrar.core.checks import InvalidCheck, parse_checks

        try:
            checks = parse_checks(container.labels)
        except InvalidCheck as exc:
            return Outcome(rejected="invalid_check", detail=str(exc))
    metrics_paths, metrics_error = _metrics_paths(container)
    if metrics_error:
        return Outcome(rejected="invalid_metrics", detail=metrics_error)

    several = len(ports) > 1
    registrations = []
    for private_port, proto, host, host_port in ports:
        if _registrator(container, f"SERVICE_{private_port}_IGNORE"):
            continue
        service = _service_name(container, ctx, private_port, several)
        if isinstance(service, Outcome):
            return service
        if service is None:
            continue
        instance = instance_id(ctx.node, container.name, private_port, proto)
        value = {
            "service": service, "host": host, "port": host_port, "node": ctx.node,
            "container_id": container.id, "container_name": container.name,
            "private_port": private_port, "protocol": proto, "image": container.image[:512],
            "version": version, "tags": tags, "registered_at": registered_at,
        }
        metrics_path = metrics_paths.get(private_port, metrics_paths.get(None))
        if metrics_path is not None:
            value["metrics_path"] = metrics_path
        registration = Registration(f"{ctx.prefix}/{service}/{instance}", service, instance,
                                    value,
                                    checks.for_port(private_port, proto) if checks else None)
        if len(registration.encoded()) > MAX_VALUE_BYTES:
            return Outcome(rejected="value_too_large", detail=f"port {private_port}")
        registrations.append(registration)
    if not registrations:
        why = "no service label (--explicit)" if ctx.explicit else "all ports ignored"
        return Outcome(skipped=why)
    return Outcome(registrations=tuple(registrations))
