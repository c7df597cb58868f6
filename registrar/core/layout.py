"""Where things are kept in etcd (README, "Keys and values"): every key built and parsed in one
place (pure).

- `{prefix}/{service}/{instance}`: an instance in rotation (bound to its agent's lease).
- `{control}/standby/{service}/{instance}`: the same instance held out of rotation.
- `{control}/promoted/{service}`, `{control}/weights/{service}`: a promotion, a canary step.
- `{control}/maintenance/service/{service}`, `.../instance/{service}/{instance}`,
  `.../node/{node}`: maintenance entries (no lease).
- `{control}/routers/{node}`: a router's traffic report (bound to the router's lease).
- `{control}/canary/{service}/owner`: the running canary command's claim on the service's
  weights key (bound to that command's lease: it goes when the command dies);
  `{control}/canary/{service}/request`: a `promote SERVICE --pause|--resume|--abort` waiting
  for the canary to act on it (the canary deletes it once it did: the acknowledgement).
- `{control}/draining/{node}/{container}`: a drain of one container's instances (bound to the
  `drain` command's lease, then to its owner's: see core.drain).
"""

from __future__ import annotations

from collections.abc import Iterable

from registrar.core.names import NAME_RE
from registrar.typing_shim import NamedTuple


def parse_key(prefix: str, key: str) -> tuple[str, str] | None:
    """'{prefix}/{service}/{instance}' -> (service, instance), or None if not one of these."""
    if not key.startswith(prefix + "/"):
        return None
    rest = key[len(prefix) + 1 :]
    service, sep, instance = rest.partition("/")
    if not sep or not instance or "/" in instance or not NAME_RE.fullmatch(service):
        return None
    return service, instance


def child_name(base: str, key: str) -> str | None:
    """The last segment of `{base}/{name}` when it is a valid name (one segment deep)."""
    name = key[len(base) + 1 :] if key.startswith(base + "/") else ""
    return name if NAME_RE.fullmatch(name) else None


# Every kind of entry under `{control}/` (the names of the Layout properties below).
_CONTROL_KINDS = ("standby", "promoted", "weights", "maintenance", "routers", "canary",
                  "draining")


class Layout(NamedTuple):
    prefix: str
    control: str

    @property
    def standby(self) -> str:
        return f"{self.control}/standby"

    @property
    def promoted(self) -> str:
        return f"{self.control}/promoted"

    @property
    def weights(self) -> str:
        return f"{self.control}/weights"

    @property
    def maintenance(self) -> str:
        return f"{self.control}/maintenance"

    @property
    def routers(self) -> str:
        return f"{self.control}/routers"

    @property
    def canary(self) -> str:
        return f"{self.control}/canary"

    @property
    def draining(self) -> str:
        return f"{self.control}/draining"

    @property
    def rules(self) -> tuple[str, ...]:
        """The control entries that can move an agent's instances (promotions, canary weights,
        maintenance, drains): what an agent reads and follows of `{control}/`, and nothing
        of the routers' reports, the canaries' claims or other nodes' standby keys, which
        change often and concern it not (on a cluster of a thousand agents, every report
        sent to every agent would be most of etcd's work)."""
        return (self.promoted, self.weights, self.maintenance, self.draining)

    @property
    def rules_ranges(self) -> tuple[tuple[str, str], ...]:
        """What a watch of `rules` takes: as few key ranges as cover them and none of the other
        entries of `{control}/` (`[start, end)`; keys of no kind that sort between two rules,
        which registrar never writes, come too and are ignored). Two, not four: etcd's JSON
        gateway reads the first 512 bytes of a watch's body before it answers the first
        creation, and a creation further in is lost when that answer wins the race (measured
        on etcd 3.4: 3 to 6 streams of 150 lost one beyond 512 bytes, none below; four
        prefixes under `/registrar` took 543)."""
        names = sorted(_CONTROL_KINDS)
        wanted = {rule.rpartition("/")[2] for rule in self.rules}
        ranges: list[tuple[str, str]] = []
        run: list[str] = []
        for name in [*names, ""]:
            if name in wanted:
                run.append(name)
                continue
            if run:
                ranges.append((f"{self.control}/{run[0]}/", f"{self.control}/{run[-1]}0"))
                run = []
        return tuple(ranges)

    def own_starts(self, node: str, services: Iterable[str]) -> list[str]:
        """Where `node`'s instances of `services` are, in rotation and on standby: the start of
        each of their keys (`{prefix}/{service}/{node}:`; instance ids begin with the node)."""
        return [f"{base}/{service}/{node}:" for service in sorted(services)
                for base in (self.prefix, self.standby)]

    def drain_key(self, node: str, container: str) -> str:
        return f"{self.draining}/{node}/{container}"

    def parse_drain(self, key: str) -> tuple[str, str] | None:
        """(node, container) of a drain entry, or None (names that break the rule too)."""
        parsed = parse_key(self.draining, key)
        if parsed is None or not NAME_RE.fullmatch(parsed[1]):
            return None
        return parsed

    def key(self, service: str, instance: str, in_rotation: bool = True) -> str:
        return f"{self.prefix if in_rotation else self.standby}/{service}/{instance}"

    def parse(self, key: str) -> tuple[str, str, bool] | None:
        """(service, instance, in rotation) of a key in rotation or on standby, else None."""
        parsed = parse_key(self.prefix, key)
        if parsed is not None:
            return parsed[0], parsed[1], True
        parsed = parse_key(self.standby, key)
        if parsed is not None:
            return parsed[0], parsed[1], False
        return None

    def in_rotation(self, key: str) -> bool:
        return key.startswith(self.prefix + "/")

    def twin(self, key: str) -> str:
        """The same instance's key on the other side (rotation <-> standby)."""
        if key.startswith(self.standby + "/"):
            return self.prefix + key[len(self.standby) :]
        if key.startswith(self.prefix + "/"):
            return self.standby + key[len(self.prefix) :]
        return key
