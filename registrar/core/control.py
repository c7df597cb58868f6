"""What `{control_prefix}/` says about rotation, and the rule for each instance (pure).

Three things can hold an instance out of rotation or keep it in:
- a promotion (`promoted/{service}` = {"version": V}): instances of other versions go to standby;
- a canary step (`weights/{service}` = {"version": V, "percent": P}): V's instances stay in
  rotation beside the promoted version's, whatever the promotion says;
- maintenance (`maintenance/service/{s}`, `maintenance/instance/{s}/{i}`,
  `maintenance/node/{n}`): the instance goes to standby, whatever else holds;
- a drain (`draining/{node}/{container}`): every instance of that container goes to standby
  like maintenance (the owner keeps it only while that run of the container lasts: core.drain).
An instance comes back only when nothing holds it out.
"""

from __future__ import annotations

from collections.abc import Mapping

from registrar.core.drain import Drain, parse_drain
from registrar.core.layout import Layout, child_name, parse_key
from registrar.core.names import HEADER_RE
from registrar.core.planner import json_object, version_of
from registrar.core.store import StoredKey
from registrar.typing_shim import NamedTuple


class Canary(NamedTuple):
    """A weights key: VERSION gets `percent` % of new requests; `header` (requests whose
    header NAME is `always` go to VERSION, `never` to the others) and `sticky` (a cookie keeps
    each client on its version) for the routers; `paused` for people (ls, the catalog)."""

    version: str
    percent: int
    header: str | None = None
    sticky: bool = False
    paused: bool = False


class Control(NamedTuple):
    promotions: Mapping[str, str] = {}  # service -> version
    canaries: Mapping[str, Canary] = {}  # service -> weights key
    held_services: frozenset[str] = frozenset()
    held_instances: frozenset[tuple[str, str]] = frozenset()  # (service, instance)
    held_nodes: frozenset[str] = frozenset()
    draining: Mapping[tuple[str, str], Drain] = {}  # (node, container)

    def drained(self, instance: str) -> bool:
        """Whether a drain entry holds the container of `instance` (`node:container:port`)."""
        parts = instance.split(":")
        return len(parts) >= 2 and (parts[0], parts[1]) in self.draining

    def in_maintenance(self, service: str, instance: str) -> bool:
        return (
            service in self.held_services
            or (service, instance) in self.held_instances
            or instance.split(":", 1)[0] in self.held_nodes
        )

    def in_rotation(self, service: str, instance: str, version: str | None) -> bool:
        """Whether an instance of `service` at `version` belongs in rotation."""
        if self.in_maintenance(service, instance) or self.drained(instance):
            return False
        canary = self.canaries.get(service)
        if canary is not None and version == canary.version:
            return True
        promoted = self.promotions.get(service)
        return promoted is None or version == promoted


def parse_promotions(stored: Mapping[str, StoredKey], layout: Layout) -> dict[str, str]:
    """`{control}/promoted/{service}` = {"version": V, ...} -> {service: V}."""
    promotions = {}
    for key, item in stored.items():
        service = child_name(layout.promoted, key)
        version = version_of(item.value) if service else None
        if service and version:
            promotions[service] = version
    return promotions


def parse_canaries(stored: Mapping[str, StoredKey], layout: Layout) -> dict[str, Canary]:
    """`{control}/weights/{service}` = {"version": V, "percent": P, ...} -> {service: Canary}."""
    canaries = {}
    for key, item in stored.items():
        service = child_name(layout.weights, key)
        value = json_object(item.value) if service else None
        if not service or value is None:
            continue
        version, percent = value.get("version"), value.get("percent")
        if (isinstance(version, str) and version and isinstance(percent, int)
                and not isinstance(percent, bool) and 0 <= percent <= 100):
            header = value.get("header")
            canaries[service] = Canary(
                version, percent,
                header if isinstance(header, str) and HEADER_RE.fullmatch(header) else None,
                value.get("sticky") is True, value.get("paused") is True)
    return canaries


def parse_control(stored: Mapping[str, StoredKey], layout: Layout) -> Control:
    """The control state from a read of `{control}/` (other keys under it are ignored)."""
    base = layout.maintenance
    services = {name for key in stored if (name := child_name(f"{base}/service", key))}
    nodes = {name for key in stored if (name := child_name(f"{base}/node", key))}
    instances = {
        parsed for key in stored if (parsed := parse_key(f"{base}/instance", key)) is not None
    }
    drains = {
        parsed: parse_drain(parsed[1], item) for key, item in stored.items()
        if (parsed := layout.parse_drain(key)) is not None
    }
    return Control(
        promotions=parse_promotions(stored, layout),
        canaries=parse_canaries(stored, layout),
        held_services=frozenset(services),
        held_instances=frozenset(instances),
        held_nodes=frozenset(nodes),
        draining=drains,
    )


def place(desired: Mapping[str, str], control: Control, layout: Layout) -> dict[str, str]:
    """`desired` maps `{prefix}/{service}/{instance}` to its JSON value; the result has the same
    values, with the keys of instances held out of rotation moved to standby."""
    placed = {}
    for key, value in desired.items():
        parsed = parse_key(layout.prefix, key)
        if parsed is not None and not control.in_rotation(*parsed, version_of(value)):
            key = layout.key(*parsed, in_rotation=False)
        placed[key] = value
    return placed


def describe_changes(before: Control, after: Control) -> list[str]:
    """What changed between two control states, one phrase each (for a log line that stays
    short however many services there are)."""
    out = []
    for service in sorted(set(before.promotions) | set(after.promotions)):
        old, new = before.promotions.get(service), after.promotions.get(service)
        if old != new:
            out.append(f"{service} promoted {new}" if new else f"{service} promotion cleared")
    for service in sorted(set(before.canaries) | set(after.canaries)):
        was, now = before.canaries.get(service), after.canaries.get(service)
        if was != now:
            out.append(f"{service} canary {now.version} at {now.percent}%"
                       f"{' (paused)' if now.paused else ''}" if now
                       else f"{service} canary ended")
    for label, old_set, new_set in (
        ("maintenance on service", before.held_services, after.held_services),
        ("maintenance on node", before.held_nodes, after.held_nodes),
        ("maintenance on instance", {"/".join(i) for i in before.held_instances},
         {"/".join(i) for i in after.held_instances}),
        ("drain of", {"/".join(d) for d in before.draining},
         {"/".join(d) for d in after.draining}),
    ):
        out += [f"{label} {name}" for name in sorted(set(new_set) - set(old_set))]
        out += [f"{label} {name} lifted" for name in sorted(set(old_set) - set(new_set))]
    return out


def subject(key: str, layout: Layout) -> tuple[str | None, str | None] | None:
    """(service, node) a promotion, weights key, maintenance entry or drain is about, read by
    the same rules as `parse_control`; None for any key it would ignore (standby keys, routers'
    reports, names that break the rules)."""
    base = layout.maintenance
    for parent in (layout.promoted, layout.weights, f"{base}/service"):
        if (service := child_name(parent, key)) is not None:
            return service, None
    if (instance := parse_key(f"{base}/instance", key)) is not None:
        return instance[0], None
    if (node := child_name(f"{base}/node", key)) is not None:
        return None, node
    if (drained := layout.parse_drain(key)) is not None:
        return None, drained[0]
    return None

