"""Following the control entries (promotions, canary weights, maintenance, drains), for the
keeper.

One watch over those prefixes of `{control_prefix}/` (Layout.rules, taken as two key ranges:
Layout.rules_ranges says why), one thread. The keeper
itself reads the control state (with this node's keys) before it writes, so it is the one
place where the state is applied; the follower only makes it re-read as soon as something that
matters changed (a watch resumed after an outage delivers what changed meanwhile). Neither
`{prefix}/`, nor standby, nor the routers' reports are followed: on a cluster of hundreds of
agents, every registration, every instance moved to standby by a promotion and every report
delivered to every agent was most of etcd's work (docs/scale.md); a key of this node's changed
by someone else is put right by the periodic resync, which reads this node's keys again.
"""

from __future__ import annotations

from collections.abc import Iterable

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core.control import subject
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, Store
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower


def relevant(layout: Layout, keeper: LeaseKeeper, keys: Iterable[str]) -> bool:
    """Whether any of `keys` is a control entry that can move one of the keeper's instances."""
    for key in keys:
        about = subject(key, layout)
        if about is not None and keeper.concerns(*about):
            return True
    return False


def follower(store: Store, keeper: LeaseKeeper, layout: Layout, metrics: Metrics
             ) -> PrefixFollower:
    """The control entries, followed as one (one read, one watch, one thread): an entry that
    concerns the keeper's instances makes it read again."""
    def on_events(events: list[KeyEvent]) -> None:
        if relevant(layout, keeper, (event.key for event in events)):
            keeper.request_reread(max(event.revision for event in events))

    made = PrefixFollower(
        store,
        layout.rules,
        name="etcd follower",
        on_snapshot=lambda _stored: keeper.request_reread(made.revision),
        on_events=on_events,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc(),
        watch_ranges=layout.rules_ranges,  # `relevant` sorts the events
    )
    return made
