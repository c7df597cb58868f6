"""Maintenance entries (pure): what each one holds out, read from the keys under
`{control_prefix}/maintenance/` (README, "Maintenance")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from registrar.core.layout import Layout, child_name, parse_key
from registrar.core.planner import json_object
from registrar.core.store import StoredKey


@dataclass(frozen=True)
class Target:
    """What one maintenance entry holds out."""

    service: str | None = None
    instance: str | None = None
    node: str | None = None

    def key(self, layout: Layout) -> str:
        base = layout.maintenance
        if self.node is not None:
            return f"{base}/node/{self.node}"
        if self.instance is not None:
            return f"{base}/instance/{self.service}/{self.instance}"
        return f"{base}/service/{self.service}"

    def matches(self, service: str, instance: str) -> bool:
        if self.node is not None:
            return instance.split(":", 1)[0] == self.node
        return service == self.service and self.instance in (None, instance)

    def __str__(self) -> str:
        if self.node is not None:
            return f"node {self.node}"
        if self.instance is not None:
            return f"instance {self.service}/{self.instance}"
        return f"service {self.service}"


def entries(stored: Mapping[str, StoredKey], layout: Layout) -> dict[Target, dict[str, str]]:
    """The maintenance entries in force: target -> {"reason", "at"} (as stored, or "?")."""
    found: dict[Target, dict[str, str]] = {}
    base = layout.maintenance
    for key, item in stored.items():
        target = None
        if (service := child_name(f"{base}/service", key)) is not None:
            target = Target(service=service)
        elif (node := child_name(f"{base}/node", key)) is not None:
            target = Target(node=node)
        elif (parsed := parse_key(f"{base}/instance", key)) is not None:
            target = Target(service=parsed[0], instance=parsed[1])
        if target is not None:
            value = json_object(item.value) or {}
            found[target] = {"reason": str(value.get("reason", "")),
                              "at": str(value.get("at", "?"))}
    return found

