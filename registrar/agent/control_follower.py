"""Following `{control_prefix}/` (promotions, canary weights, maintenance, drains) and the
keeper's own keys under `{prefix}/`, for the keeper.

One watch over both prefixes. The keeper itself reads the control state (with this node's
keys) before it writes, so it is the one place where the state is applied; the follower only
makes it re-read as soon as something that matters changed (a watch resumed after an outage
delivers what changed meanwhile). Standby keys and routers' reports, which live under the
same prefix and change often, are not a reason to read again.
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
    """`{prefix}/` and `{control_prefix}/`, followed as one (one read, one watch, one thread):
    a control entry that concerns the keeper's instances makes it read again; so does a key
    of its own changed by someone else (so a periodic resync need not read etcd)."""
    def on_events(events: list[KeyEvent]) -> None:
        keeper.notice(events)  # its keys, and its standby keys under the control prefix
        if relevant(layout, keeper, (event.key for event in events)):
            keeper.request_reread()

    return PrefixFollower(
        store,
        (layout.prefix, layout.control),
        name="etcd follower",
        on_snapshot=lambda _stored: keeper.request_reread(),
        on_events=on_events,
        on_internal_error=lambda loop: metrics.internal_errors.labels(loop=loop).inc(),
    )
