"""What a Docker event means for a container's registration (pure, data in one place)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from registrar.core.containers import is_ending_signal


class Effect(enum.Enum):
    REFRESH = "refresh"  # inspect it and register it if it serves
    WITHDRAW = "withdraw"  # out of rotation now; it is stopping (stays out until it starts again)
    OUT = "out"  # out of rotation (paused, unhealthy, stopped, dead)
    GONE = "gone"  # removed: forget it entirely
    NONE = "none"


_BY_ACTION = {
    "start": Effect.REFRESH,
    "restart": Effect.REFRESH,
    "unpause": Effect.REFRESH,
    "rename": Effect.REFRESH,
    "update": Effect.REFRESH,
    "stop": Effect.WITHDRAW,
    "die": Effect.OUT,
    "oom": Effect.NONE,
    "pause": Effect.OUT,
    "destroy": Effect.GONE,
}


def effect_of(action: str, attributes: Mapping[str, str], stop_signal: str) -> Effect:
    """Maps one container event to what it means; `stop_signal` is the container's own."""
    if action == "kill":
        signal = attributes.get("signal", "")
        return Effect.WITHDRAW if is_ending_signal(signal, stop_signal) else Effect.NONE
    if action.startswith("health_status"):
        status = action.partition(":")[2].strip()
        if status == "healthy":
            return Effect.REFRESH
        if status == "unhealthy":
            return Effect.OUT
        return Effect.NONE
    return _BY_ACTION.get(action, Effect.NONE)
