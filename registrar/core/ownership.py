"""Which keys a keeper may reconcile and delete: the two rules, as data (pure).

- `watch`: this node's instances (`{node}:{container}:{port}[:udp]`), less those of containers
  that have their own `register` sidecar (`registrar.sidecar=true`): they share the node name.
- `register`: only its own container's instances.
Nothing else is ever deleted, whatever is stored under the prefix.
"""

from __future__ import annotations

from registrar.core.names import split_instance
from registrar.typing_shim import NamedTuple


def owned_by(node: str, instance: str) -> bool:
    """Whether an instance id was written by `node` (`{node}:{container}:{port}[:udp]`)."""
    parts = split_instance(instance)
    return parts is not None and parts[0] == node and parts[2].isdigit()


class Ownership(NamedTuple):
    node: str
    container: str | None = None  # a sidecar's container name: only its keys
    sidecars: frozenset[str] = frozenset()  # watch: containers whose own sidecar owns their keys

    def owns_container(self, node: str, container: str) -> bool:
        """Whether a drain entry of `container` on `node` is this keeper's to hold and delete."""
        return self.owns(f"{node}:{container}:0")

    def owns(self, instance: str) -> bool:
        if not owned_by(self.node, instance):
            return False
        container = instance.split(":")[1]
        if self.container is not None:
            return container == self.container
        return container not in self.sidecars
