"""Following promotions: `{control_prefix}/promoted/` watched, the LeaseKeeper poked.

The keeper itself reads the promotions (with this node's keys) before it writes, so it is the
one place where promotions are applied; the follower only makes it re-read as soon as one
changes (and after every reconnect: something may have changed meanwhile).
"""

from __future__ import annotations

from registrar.adapters.etcd_store import EtcdStore
from registrar.agent.lease_keeper import LeaseKeeper
from registrar.core.planner import promoted_prefix
from registrar.prefix_follower import PrefixFollower


def promotion_follower(
    store: EtcdStore, keeper: LeaseKeeper, control_prefix: str
) -> PrefixFollower:
    return PrefixFollower(
        store,
        promoted_prefix(control_prefix),
        name="promotions",
        on_snapshot=lambda _stored: keeper.request_reread(),
        on_events=lambda _events: keeper.request_reread(),
    )
