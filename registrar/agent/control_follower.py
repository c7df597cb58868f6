"""Following the control entries (promotions, canary weights, maintenance, drains), for the
keeper.

One watch over those prefixes of `{control_prefix}/` (Layout.rules, taken as two key ranges:
Layout.rules_ranges says why), one thread. The keeper
itself reads the control state (with this node's keys) before it writes, so it is the one
place where the state is applied; the follower only tells it what changed (a watch resumed
after an outage delivers what changed meanwhile): it reads again as soon as something that
matters to it changed, and remembers which other services' entries did, so that a first
instance of one of those (and only of those) is read for first. Neither
`{prefix}/`, nor standby, nor the routers' reports are followed: on a cluster of hundreds of
agents, every registration, every instance moved to standby by a promotion and every report
delivered to every agent was most of etcd's work (docs/scale.md); a key of this node's changed
by someone else is put right by the periodic resync, which reads this node's keys again.
"""

from __future__ import annotations

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core.control import subject
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, Store
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower


def follower(store: Store, keeper: LeaseKeeper, layout: Layout, metrics: Metrics
             ) -> PrefixFollower:
    """The control entries, followed as one (one read, one watch, one thread): what each
    event is about goes to the keeper (`LeaseKeeper.control_changed`)."""
    def on_events(events: list[KeyEvent]) -> None:
        keeper.control_changed((*about, event.revision) for event in events
                               if (about := subject(event.key, layout)) is not None)

    made = PrefixFollower(
        store,
        layout.rules,
        name="etcd follower",
        on_snapshot=lambda _stored: keeper.request_reread(made.revision),
        on_events=on_events,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc(),
        watch_ranges=layout.rules_ranges,  # `subject` sorts the events
    )
    return made
