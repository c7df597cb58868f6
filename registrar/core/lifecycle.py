"""What a container event means for its registration (pure, data in one place).

Podman's Docker-compatible service (4.3) differs from Docker: it says `remove` where Docker
says `destroy`; its health events are a bare `health_status`, sent at every check, whose
`HealthStatus` field is the state *before* that check ran, and the state is saved only after
the check's `exec_died`: so both are "inspect now", and the inspected state decides. It sends
no `kill` when a stop begins: there an instance leaves rotation at `die`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from registrar.core.containers import is_ending_signal


class Effect(enum.Enum):
    START = "start"  # (re)started: inspect it, register it if it serves; no longer stopping
    REFRESH = "refresh"  # inspect it and register it if it serves (healthy, unpaused, renamed)
    WITHDRAW = "withdraw"  # starts stopping: out now, and out until it starts again
    OUT = "out"  # out of rotation (paused, unhealthy)
    DIED = "died"  # out of rotation and no longer running (a sidecar's container is gone)
    RECHECK = "recheck"  # inspect it if it has a health check (Podman: a check just ended)
    GONE = "gone"  # removed: forget it entirely
    NONE = "none"


_BY_ACTION = {
    "start": Effect.START,
    "restart": Effect.START,
    "unpause": Effect.REFRESH,
    "rename": Effect.REFRESH,
    "update": Effect.REFRESH,
    "stop": Effect.WITHDRAW,
    "die": Effect.DIED,
    "exec_died": Effect.RECHECK,  # Podman
    "oom": Effect.NONE,
    "pause": Effect.OUT,
    "destroy": Effect.GONE,
    "remove": Effect.GONE,  # Podman, where it says "remove" instead of "destroy"
}
_BY_HEALTH = {
    "healthy": Effect.REFRESH,
    "unhealthy": Effect.OUT,
    "starting": Effect.NONE,
    "": Effect.REFRESH,  # the state is not in the event (Podman): inspect it
}


# Docker's `network` events, about the container in their `container` attribute: its addresses
# changed (registrar.network registers the address on one network: read it again).
_BY_NETWORK_ACTION = {"connect": Effect.REFRESH, "disconnect": Effect.REFRESH}


def network_effect(action: str) -> Effect:
    """What a `network` event means for the container it names."""
    return _BY_NETWORK_ACTION.get(action, Effect.NONE)


def effect_of(action: str, attributes: Mapping[str, str], stop_signal: str) -> Effect:
    """Maps one container event to what it means; `stop_signal` is the container's own."""
    if action == "kill":
        signal = attributes.get("signal", "")
        return Effect.WITHDRAW if is_ending_signal(signal, stop_signal) else Effect.NONE
    head, _colon, status = action.partition(":")
    if head.strip() == "health_status":
        return _BY_HEALTH.get(status.strip().lower(), Effect.NONE)
    return _BY_ACTION.get(action, Effect.NONE)
