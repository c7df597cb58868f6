"""What registrar needs to know of one container, parsed from Docker's inspect data (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from registrar.typing_shim import Any, NamedTuple

# Signals that end a process (INT, QUIT, KILL, TERM), as normalize_signal() gives them: a
# `kill` event with one of these (or the container's own StopSignal) means "starts stopping".
ENDING_SIGNALS = frozenset({"2", "3", "9", "15"})
UNSPECIFIED_IPS = frozenset({"", "0.0.0.0", "::"})


class PortBinding(NamedTuple):
    private_port: int
    protocol: str  # "tcp" or "udp"
    host_port: int
    host_ip: str  # as Docker reports it; "" / 0.0.0.0 / :: mean all interfaces


class ContainerInfo(NamedTuple):
    id: str
    name: str
    image: str
    labels: Mapping[str, str] = {}
    env: Mapping[str, str] = {}
    ports: tuple[PortBinding, ...] = ()
    exposed: tuple[tuple[int, str], ...] = ()  # (port, protocol) from EXPOSE / --expose
    host_network: bool = False
    running: bool = True
    paused: bool = False
    has_healthcheck: bool = False
    health: str | None = None  # "starting", "healthy", "unhealthy" or None
    stop_signal: str = "SIGTERM"
    started_at: str = ""  # State.StartedAt: tells one run of the container from the next
    # name -> (IPv4 address, global IPv6 address) on each network it is attached to ("" if none)
    networks: Mapping[str, tuple[str, str]] = {}

    @property
    def serving(self) -> bool:
        """Whether the container should be in rotation right now, by its own state."""
        if not self.running or self.paused:
            return False
        return not self.has_healthcheck or self.health == "healthy"


def normalize_signal(signal: str) -> str:
    """'SIGTERM', 'TERM', '15' -> '15'; 'SIGRTMIN+3' -> '37' (unknown names kept, upper-cased).

    Docker reports signals as Linux numbers, which is what Python's `signal` knows here.
    """
    import signal as signals

    text = signal.strip().upper()
    if text.isascii() and text.isdigit():
        return str(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    name, plus, offset = text.partition("+")
    known = signals.Signals.__members__.get(name)
    if known is None or (plus and not (offset.isascii() and offset.isdigit())):
        return text
    return str(int(known) + (int(offset) if plus else 0))


def is_ending_signal(signal: str, stop_signal: str) -> bool:
    number = normalize_signal(signal)
    return number in ENDING_SIGNALS or number == normalize_signal(stop_signal)


def _env_map(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or []:
        key, _, val = item.partition("=")
        env[key] = val
    return env


def _split_port(spec: str) -> tuple[int, str] | None:
    port_text, _, proto = spec.partition("/")
    if not (port_text.isascii() and port_text.isdigit()):  # not "²": isdigit() but no int()
        return None
    return int(port_text), (proto or "tcp").lower()


def _bindings(ports: Mapping[str, Any] | None) -> tuple[PortBinding, ...]:
    """One binding per (private port, protocol): Docker lists 0.0.0.0 and :: separately."""
    found: dict[tuple[int, str], PortBinding] = {}
    for spec, bindings in sorted((ports or {}).items()):
        parsed = _split_port(spec)
        if parsed is None or not bindings:
            continue
        private_port, proto = parsed
        if proto not in ("tcp", "udp"):
            continue  # SCTP: no key suffix of its own, and nothing routes it
        candidates = []
        for binding in bindings:
            host_port = str(binding.get("HostPort") or "")
            if host_port.isascii() and host_port.isdigit() and int(host_port) > 0:
                candidates.append(PortBinding(private_port, proto, int(host_port),
                                              str(binding.get("HostIp") or "")))
        if candidates:
            # Prefer an IPv4 binding; keep Docker's order otherwise.
            candidates.sort(key=lambda b: ":" in b.host_ip)
            found[(private_port, proto)] = candidates[0]
    return tuple(found.values())


def exposed_ports(spec: Mapping[str, Any] | None) -> tuple[tuple[int, str], ...]:
    """`Config.ExposedPorts` ({"8080/tcp": {}}) of a container or an image."""
    exposed = []
    for item in sorted(spec or {}):
        parsed = _split_port(item)
        if parsed is not None:
            exposed.append(parsed)
    return tuple(exposed)


def _networks(networks: object) -> dict[str, tuple[str, str]]:
    """`NetworkSettings.Networks`: each network's IPv4 `IPAddress` and `GlobalIPv6Address`."""
    found = {}
    for name, attached in (networks.items() if isinstance(networks, dict) else ()):
        if isinstance(name, str) and isinstance(attached, dict):
            found[name] = (str(attached.get("IPAddress") or ""),
                           str(attached.get("GlobalIPv6Address") or ""))
    return found


def parse_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    """Builds a ContainerInfo from the JSON of `docker inspect` (one container)."""
    config = data.get("Config") or {}
    state = data.get("State") or {}
    host_config = data.get("HostConfig") or {}
    network = data.get("NetworkSettings") or {}
    health = state.get("Health") or {}
    healthcheck = config.get("Healthcheck") or {}
    test = healthcheck.get("Test") or []
    return ContainerInfo(
        id=str(data.get("Id", "")),
        name=str(data.get("Name", "")).lstrip("/"),
        image=str(config.get("Image") or data.get("Image") or ""),
        labels=dict(config.get("Labels") or {}),
        env=_env_map(config.get("Env")),
        ports=_bindings(network.get("Ports")),
        exposed=exposed_ports(config.get("ExposedPorts")),
        host_network=host_config.get("NetworkMode") == "host",
        running=bool(state.get("Running")) and not bool(state.get("Restarting")),
        paused=bool(state.get("Paused")),
        has_healthcheck=bool(test) and test[0] != "NONE",
        health=health.get("Status") or None,
        stop_signal=str(config.get("StopSignal") or "SIGTERM"),
        started_at=str(state.get("StartedAt") or ""),
        networks=_networks(network.get("Networks")),
    )
