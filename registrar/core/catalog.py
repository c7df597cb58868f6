"""The catalog: what `{prefix}/` and `{control_prefix}/` say about the cluster, as one model (pure).

`registrar catalog` serves it three ways (the JSON of `/v1/catalog`, Prometheus' HTTP service
discovery, the page), so every rule is here, once, over plain data:

- An instance is a key in rotation (`{prefix}/{service}/{instance}`) or on standby
  (`{control}/standby/...`); its `state` is the first that applies of `draining` (an entry
  `{control}/draining/{node}/{container}` for its node and container), `maintenance` (an entry
  that holds it out, by `core.control`'s rules), `standby` (held out by a promotion: its key is
  on standby), else `rotation`. When both keys of one instance stand for a moment (a move
  between the two), the one in rotation is what clients are sent to, so it wins.
- Traffic sums every router's cumulative counters (`core.canary`'s reading of a report);
  `in_flight` sums the routers' `in_flight` for the instance.
- `share` is each version's percent of the service's responses over the last SHARE_WINDOW
  seconds: the increase between the newest look at the reports at least that old (or the oldest
  kept) and now, by `core.canary.traffic`'s rules (a restarted router's counters, a vanished
  one's). The looks are kept by `remember`, on the caller's clock.
- Values are anyone's input: a value that is not a JSON object is skipped, a field of the wrong
  type is left out (null), nothing is trusted to be escaped by anyone else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from registrar.core.canary import (
    Counts,
    Report,
    Traffic,
    parse_report,
    restarted,
)
from registrar.core.control import Control, parse_control, parse_promotions
from registrar.core.layout import Layout, child_name, parse_key
from registrar.core.names import NAME_RE, host_port
from registrar.core.naming import valid_metrics_path
from registrar.core.planner import json_object
from registrar.core.store import StoredKey

SHARE_WINDOW = 30.0
STATES = ("draining", "maintenance", "standby", "rotation")
TRAFFIC_FIELDS = ("2xx", "3xx", "4xx", "5xx", "other", "tcp", "connection_errors")


@dataclass(frozen=True, slots=True)
class Entry:
    """One instance's stored value, read once (the server keeps these by key).

    `head` and `tail` are its JSON in `/v1/catalog` around `state` and `in_flight`, encoded
    once here: at 10,000 instances, encoding every value again at each new revision took
    longer than the rest of the answer."""

    service: str
    instance: str
    in_rotation: bool
    host: str | None
    port: int | None
    version: str | None
    node: str | None
    tags: tuple[str, ...]
    registered_at: str | None
    metrics_path: str | None
    held: tuple[str, str]  # (node, container) of the instance id, as drains name them
    head: str = ""
    tail: str = ""
    sd_head: str = ""  # its target group, around the state
    sd_tail: str = ""


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slow x 10,000 instances
class Instance:
    entry: Entry
    state: str
    in_flight: int

    def as_json(self) -> dict[str, Any]:
        e = self.entry
        return {"instance": e.instance, "host": e.host, "port": e.port, "version": e.version,
                "node": e.node, "state": self.state, "tags": list(e.tags),
                "registered_at": e.registered_at, "in_flight": self.in_flight}

    def encode(self) -> str:
        """`json.dumps(self.as_json())`, compact, from the entry's pieces."""
        return f'{self.entry.head}"{self.state}",{self.entry.tail}{self.in_flight}}}'


@dataclass(frozen=True)
class CanaryView:
    version: str
    percent: int
    at: str | None
    paused: bool

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "percent": self.percent, "at": self.at,
                "paused": self.paused}


@dataclass(frozen=True)
class Service:
    promoted: str | None = None
    canary: CanaryView | None = None
    instances: tuple[Instance, ...] = ()
    traffic: Mapping[str, Counts] = field(default_factory=dict)
    share: Mapping[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "canary": self.canary.as_json() if self.canary else None,
            "instances": [i.as_json() for i in self.instances],
            "traffic": self._traffic_json(),
            "share": dict(sorted(self.share.items())),
        }

    def encode(self) -> str:
        """`json.dumps(self.as_json())`, compact."""
        head = _dumps({"promoted": self.promoted,
                       "canary": self.canary.as_json() if self.canary else None})
        rest = _dumps({"traffic": self._traffic_json(), "share": dict(sorted(self.share.items()))})
        return (f'{head[:-1]},"instances":[{",".join(i.encode() for i in self.instances)}],'
                f'{rest[1:]}')

    def _traffic_json(self) -> dict[str, dict[str, int]]:
        return {v: dict(zip(TRAFFIC_FIELDS, c.as_tuple(), strict=True))
                for v, c in sorted(self.traffic.items())}


@dataclass(frozen=True)
class Catalog:
    revision: int
    services: Mapping[str, Service]
    routers: Mapping[str, Mapping[str, Any]]
    maintenance: tuple[Mapping[str, Any], ...]

    def as_json(self, stale_seconds: float | None = None) -> dict[str, Any]:
        """`stale_seconds`: how long etcd has been unreachable (None: it answers)."""
        out: dict[str, Any] = {"revision": self.revision, "stale": stale_seconds is not None}
        if stale_seconds is not None:
            out["stale_seconds"] = round(stale_seconds, 1)
        out["services"] = {name: s.as_json() for name, s in self.services.items()}
        out["routers"] = {node: dict(r) for node, r in self.routers.items()}
        out["maintenance"] = [dict(m) for m in self.maintenance]
        return out

    def encode(self, stale_seconds: float | None = None) -> bytes:
        """`json.dumps(self.as_json(stale_seconds))`, compact, in a fraction of its time."""
        out: dict[str, Any] = {"revision": self.revision, "stale": stale_seconds is not None}
        if stale_seconds is not None:
            out["stale_seconds"] = round(stale_seconds, 1)
        out["routers"] = {node: dict(r) for node, r in self.routers.items()}
        out["maintenance"] = [dict(m) for m in self.maintenance]
        head = _dumps({k: out.pop(k) for k in ("revision", "stale", "stale_seconds")
                       if k in out})
        services = ",".join(f"{_dumps(name)}:{s.encode()}" for name, s in self.services.items())
        return f'{head[:-1]},"services":{{{services}}},{_dumps(out)[1:]}'.encode()


# --- reading values ------------------------------------------------------------------------


def _str(value: object, limit: int = 1024) -> str | None:
    return value if isinstance(value, str) and len(value) <= limit else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def entry(layout: Layout, key: str, raw: str) -> Entry | None:
    """The instance a key in rotation or on standby holds, or None (another key, not JSON)."""
    parsed = layout.parse(key)
    value = json_object(raw) if parsed is not None else None
    if parsed is None or value is None:
        return None
    service, instance, in_rotation = parsed
    port = _count(value.get("port"))
    tags = value.get("tags")
    metrics_path = value.get("metrics_path")
    node, _, rest = instance.partition(":")
    e = Entry(
        service=service, instance=instance, in_rotation=in_rotation,
        host=_str(value.get("host"), 256),
        port=port if port is not None and 0 < port < 65536 else None,
        version=_str(value.get("version"), 128),
        node=_str(value.get("node"), 128),
        tags=tuple(t for t in tags if isinstance(t, str) and len(t) <= 128)[:32]
        if isinstance(tags, list) else (),
        registered_at=_str(value.get("registered_at"), 64),
        metrics_path=metrics_path if valid_metrics_path(metrics_path) else None,
        held=(node, rest.partition(":")[0]),
    )
    pieces = Instance(e, "", 0).as_json()
    head = _dumps({k: pieces[k] for k in ("instance", "host", "port", "version", "node")})
    tail = _dumps({"tags": pieces["tags"], "registered_at": pieces["registered_at"]})
    e = replace(e, head=f'{head[:-1]},"state":', tail=f'{tail[1:-1]},"in_flight":')
    group = target_group(e, "")
    if group is not None:
        labels = group["labels"]
        names = list(labels)
        cut = names.index("__meta_registrar_state")
        before = _dumps({n: labels[n] for n in names[:cut]})
        after = _dumps({n: labels[n] for n in names[cut + 1:]})
        e = replace(e, sd_head=f'{{"targets":{_dumps(group["targets"])},"labels":{before[:-1]},'
                    '"__meta_registrar_state":', sd_tail=f",{after[1:]}}}")
    return e


def entries(layout: Layout, stored: Mapping[str, str]) -> dict[str, Entry]:
    """Every instance among `stored` (keys of both prefixes mixed), by key."""
    return {key: e for key, raw in stored.items() if (e := entry(layout, key, raw)) is not None}


def _canaries(control: Mapping[str, str], layout: Layout) -> dict[str, CanaryView]:
    out = {}
    for key, raw in control.items():
        service = child_name(layout.weights, key)
        value = json_object(raw) if service else None
        if service is None or value is None:
            continue
        version, percent = _str(value.get("version"), 128), _count(value.get("percent"))
        if version and percent is not None and percent <= 100:
            out[service] = CanaryView(version, percent, _str(value.get("at"), 64),
                                      value.get("paused") is True)
    return out


def _maintenance(control: Mapping[str, str], layout: Layout) -> tuple[dict[str, Any], ...]:
    base = layout.maintenance
    found = []
    for key, raw in control.items():
        kind = name = None
        if (service := child_name(f"{base}/service", key)) is not None:
            kind, name = "service", service
        elif (held := parse_key(f"{base}/instance", key)) is not None:
            kind, name = "instance", f"{held[0]}/{held[1]}"
        elif (node := child_name(f"{base}/node", key)) is not None:
            kind, name = "node", node
        if kind is None:
            continue
        value = json_object(raw) or {}
        found.append({"kind": kind, "name": name, "reason": _str(value.get("reason")) or "",
                      "at": _str(value.get("at"), 64)})
    return tuple(sorted(found, key=lambda m: (m["kind"], m["name"])))


def _draining(control: Mapping[str, str], layout: Layout) -> set[tuple[str, str]]:
    """(node, container) of every drain entry."""
    held = set()
    for key in control:
        parsed = parse_key(layout.draining, key)
        if parsed is not None and NAME_RE.fullmatch(parsed[1]):
            held.add(parsed)
    return held


def _routers(control: Mapping[str, str], layout: Layout) -> tuple[
    dict[str, Report], dict[str, dict[str, Any]], dict[tuple[str, str], int]
]:
    """Reports by router, what the JSON says of each ({at, applied}), and in-flight sums by
    (service, instance)."""
    reports: dict[str, Report] = {}
    views: dict[str, dict[str, Any]] = {}
    in_flight: dict[tuple[str, str], int] = {}
    for key, raw in control.items():
        node = child_name(layout.routers, key)
        value = json_object(raw) if node else None
        report = parse_report(raw) if value is not None else None
        if node is None or value is None or report is None:
            continue
        reports[node] = report
        views[node] = {"at": _str(value.get("at"), 64), "applied": _count(value.get("applied"))}
        flights = value.get("in_flight")
        for service, by_instance in (flights.items() if isinstance(flights, dict) else ()):
            for instance, n in (by_instance.items() if isinstance(by_instance, dict) else ()):
                if _count(n) is not None:
                    in_flight[(service, instance)] = in_flight.get((service, instance), 0) + n
    return reports, views, in_flight


def _state(e: Entry, control: Control | None, draining: set[tuple[str, str]]) -> str:
    """`control`: None when no maintenance entry stands (the common case, and 10,000 calls)."""
    if draining and e.held in draining:
        return "draining"
    if control is not None and control.in_maintenance(e.service, e.instance):
        return "maintenance"
    return "rotation" if e.in_rotation else "standby"


# --- the share of the traffic --------------------------------------------------------------

Look = tuple[float, Mapping[str, Report]]


def remember(history: tuple[Look, ...], now: float, reports: Mapping[str, Report],
             window: float = SHARE_WINDOW) -> tuple[Look, ...]:
    """The looks kept for `share`: this one added, and of those older than the window only
    the newest (the baseline the window starts from)."""
    looks = (*history, (now, reports))
    old = [i for i, (t, _) in enumerate(looks) if t <= now - window]
    return looks[old[-1]:] if old else looks


def _answered(history: tuple[Look, ...], now: float,
              window: float) -> dict[str, dict[str, int]]:
    """Responses (or sessions) by service and version over the window, summed over routers:
    `core.canary.traffic`'s reading (a router with no earlier look counts nothing, a restarted
    one counts from zero), with each router's restart judged once, not once per version."""
    if not history:
        return {}
    start = next((r for t, r in reversed(history) if t <= now - window), history[0][1])
    end = history[-1][1]
    out: dict[str, dict[str, int]] = {}
    for router in sorted(set(start) & set(end)):
        before, after = start[router], end[router]
        fresh = restarted(before, after)
        for service, versions in after.services.items():
            for version, counts in versions.items():
                grown = counts if fresh else counts.minus(before.counts(service, version)
                                                          or Counts())
                n = Traffic.of(grown).answered
                if n:
                    by_version = out.setdefault(service, {})
                    by_version[version] = by_version.get(version, 0) + n
    return out


def _shares(answered: Mapping[str, int]) -> dict[str, float]:
    total = sum(answered.values())
    return {v: round(100.0 * n / total, 1) for v, n in answered.items() if n} if total else {}


# --- the whole ------------------------------------------------------------------------------


def _by_service(instances: Mapping[str, Entry], rules: Control,
                draining: set[tuple[str, str]],
                in_flight: Mapping[tuple[str, str], int]) -> dict[str, list[Instance]]:
    chosen: dict[tuple[str, str], Entry] = {}
    for e in instances.values():
        seen = chosen.get((e.service, e.instance))
        if seen is None or (e.in_rotation and not seen.in_rotation):
            chosen[(e.service, e.instance)] = e
    held = rules if (rules.held_services or rules.held_instances or rules.held_nodes) else None
    by_service: dict[str, list[Instance]] = {}
    for (service, instance), e in sorted(chosen.items()):
        by_service.setdefault(service, []).append(
            Instance(e, _state(e, held, draining), in_flight.get((service, instance), 0)))
    return by_service


def _totals(reports: Mapping[str, Report]) -> dict[str, dict[str, Counts]]:
    totals: dict[str, dict[str, Counts]] = {}
    for report in reports.values():
        for service, by_version in report.services.items():
            for version, counts in by_version.items():
                before = totals.setdefault(service, {}).get(version, Counts())
                totals[service][version] = Counts(*(
                    a + b for a, b in zip(before.as_tuple(), counts.as_tuple(), strict=True)))
    return totals


def build(layout: Layout, instances: Mapping[str, Entry], control: Mapping[str, str],
          revision: int, history: tuple[Look, ...] = (), now: float = 0.0,
          window: float = SHARE_WINDOW) -> Catalog:
    """The catalog from the instances (`entries`), the keys under `{control}/` (key -> value),
    the revision they were read at, and the looks at the routers' reports (`remember`)."""
    control = {key: raw for key, raw in control.items()
               if not key.startswith(layout.standby + "/")}
    stored = {key: StoredKey(raw, 0) for key, raw in control.items()}
    rules = parse_control(stored, layout)
    promotions = parse_promotions(stored, layout)
    canaries = _canaries(control, layout)
    draining = _draining(control, layout)
    reports, routers, in_flight = _routers(control, layout)

    by_service = _by_service(instances, rules, draining, in_flight)
    totals = _totals(reports)
    names = sorted(set(by_service) | set(promotions) | set(canaries) | set(totals))
    answered = _answered(history, now, window)
    services = {
        name: Service(
            promoted=promotions.get(name), canary=canaries.get(name),
            instances=tuple(by_service.get(name, ())), traffic=totals.get(name, {}),
            share=_shares(answered.get(name, {})))
        for name in names
    }
    return Catalog(revision, services, dict(sorted(routers.items())),
                   _maintenance(control, layout))


def reports_of(layout: Layout, control: Mapping[str, str]) -> dict[str, Report]:
    """The routers' reports among the keys under `{control}/`, for `remember`."""
    return _routers({k: v for k, v in control.items()
                     if k.startswith(layout.routers + "/")}, layout)[0]


# --- Prometheus HTTP service discovery -----------------------------------------------------


def target(host: str, port: int) -> str:
    return host_port(host, port)


def target_group(e: Entry, state: str) -> dict[str, Any] | None:
    """An instance's `http_sd_configs` target group, or None when it has no address."""
    if e.host is None or e.port is None:
        return None
    labels = {
        "__meta_registrar_service": e.service,
        "__meta_registrar_version": e.version or "",
        "__meta_registrar_node": e.node or e.held[0],
        "__meta_registrar_instance": e.instance,
        "__meta_registrar_state": state,
        "__meta_registrar_tags": "," + "".join(f"{t}," for t in e.tags) if e.tags else ",,",
    }
    if e.metrics_path is not None:
        labels["__metrics_path__"] = e.metrics_path
    return {"targets": [target(e.host, e.port)], "labels": labels}


def _selected(catalog: Catalog, service: str | None, metrics_only: bool) -> Iterable[Instance]:
    for name, view in catalog.services.items():
        if service is not None and name != service:
            continue
        for inst in view.instances:
            e = inst.entry
            if e.host is not None and e.port is not None and not (
                    metrics_only and e.metrics_path is None):
                yield inst


def prometheus_targets(catalog: Catalog, service: str | None = None,
                       metrics_only: bool = False) -> list[dict[str, Any]]:
    """`http_sd_configs` target groups: one per instance (every state) that has an address."""
    return [group for inst in _selected(catalog, service, metrics_only)
            if (group := target_group(inst.entry, inst.state)) is not None]


def encode_targets(catalog: Catalog, service: str | None = None,
                   metrics_only: bool = False) -> bytes:
    """`json.dumps(prometheus_targets(...))`, compact, from each entry's encoded pieces."""
    groups = ",".join(f'{i.entry.sd_head}"{i.state}"{i.entry.sd_tail}'
                      for i in _selected(catalog, service, metrics_only))
    return f"[{groups}]".encode()
