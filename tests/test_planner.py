"""plan_changes: only the differences between what should be in etcd and what is (pure)."""

from __future__ import annotations

import pytest

from registrar.core.planner import Changes, plan_changes
from registrar.core.store import StoredKey

LEASE = 0x1234
A, B, C = "/services/web/n1:a:8080", "/services/web/n1:b:8080", "/services/api/n1:c:9090"


def test_nothing_to_do() -> None:
    changes = plan_changes({A: "va", B: "vb"}, {A: StoredKey("va", LEASE),
                                                B: StoredKey("vb", LEASE)}, LEASE)
    assert changes == Changes()
    assert not changes
    assert not plan_changes({}, {}, LEASE)


def test_missing_key_is_put() -> None:
    changes = plan_changes({A: "va", B: "vb"}, {A: StoredKey("va", LEASE)}, LEASE)
    assert dict(changes.puts) == {B: "vb"}
    assert changes.deletes == ()
    assert changes


def test_changed_value_is_put() -> None:
    changes = plan_changes({A: "new"}, {A: StoredKey("old", LEASE)}, LEASE)
    assert dict(changes.puts) == {A: "new"} and changes.deletes == ()


@pytest.mark.parametrize("other_lease", [0, LEASE + 1])
def test_key_on_another_lease_is_put_again(other_lease: int) -> None:
    """A key left by a previous run (or written without a lease) must be bound to ours."""
    changes = plan_changes({A: "va"}, {A: StoredKey("va", other_lease)}, LEASE)
    assert dict(changes.puts) == {A: "va"} and changes.deletes == ()


def test_extra_key_is_deleted() -> None:
    changes = plan_changes({A: "va"}, {A: StoredKey("va", LEASE), C: StoredKey("vc", 99)}, LEASE)
    assert dict(changes.puts) == {} and changes.deletes == (C,)


def test_everything_at_once_is_sorted() -> None:
    desired = {C: "vc2", A: "va", B: "vb"}
    actual = {
        A: StoredKey("va", LEASE),  # unchanged
        C: StoredKey("vc", LEASE),  # changed
        "/services/z/n1:z:1": StoredKey("vz", LEASE),  # gone
        "/services/y/n1:y:1": StoredKey("vy", 7),  # gone, other lease
    }
    changes = plan_changes(desired, actual, LEASE)
    assert list(changes.puts) == sorted([B, C])
    assert dict(changes.puts) == {B: "vb", C: "vc2"}
    assert changes.deletes == ("/services/y/n1:y:1", "/services/z/n1:z:1")


def test_only_actual_keys_are_ever_deleted() -> None:
    """`actual` holds only this node's keys; nothing else can appear among the deletes."""
    actual = {A: StoredKey("va", LEASE)}
    for desired in ({}, {B: "vb"}, {A: "va"}):
        assert set(plan_changes(desired, actual, LEASE).deletes) <= set(actual)


def test_the_one_timestamp_format_round_trips() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from registrar.core import timestamps

    at = datetime(2015, 7, 20, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert timestamps.rfc3339(at) == "2015-07-20T12:00:00Z"
    assert timestamps.parse("2015-07-20T12:00:00Z") == at.astimezone(UTC)
    assert timestamps.parse(timestamps.now()) <= datetime.now(UTC)
