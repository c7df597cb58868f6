"""Following the control entries (promotions, canary weights, maintenance, drains), for the
keeper.

One watch over those prefixes of `{control_prefix}/` (Layout.rules, taken as two key ranges:
Layout.rules_ranges says why), one thread. The keeper
itself reads the control state (with this node's keys) before it writes, so it is the one
place where the state is applied; the follower hands it every event (a watch resumed
after an outage delivers what changed meanwhile), which it applies to the state it read
(`LeaseKeeper.control_changed`), or reads again for. Neither
`{prefix}/`, nor standby, nor the routers' reports are followed: on a cluster of hundreds of
agents, every registration, every instance moved to standby by a promotion and every report
delivered to every agent was most of etcd's work (docs/scale.md); a key of this node's changed
by someone else is put right by the periodic resync, which reads this node's keys again.
"""

from __future__ import annotations

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core.layout import Layout
from registrar.core.store import Store
from registrar.metrics import Metrics
from registrar.prefix_follower import PrefixFollower


def follower(store: Store, keeper: LeaseKeeper, layout: Layout, metrics: Metrics
             ) -> PrefixFollower:
    """The control entries, followed as one (one read, one watch, one thread): every event
    goes to the keeper (`LeaseKeeper.control_changed`)."""
    made = PrefixFollower(
        store,
        layout.rules,
        name="etcd follower",
        on_snapshot=lambda _stored: keeper.request_reread(made.revision),
        on_events=keeper.control_changed,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc(),
        watch_ranges=layout.rules_ranges,  # the keeper sorts the events (`subject`)
    )
    return made
