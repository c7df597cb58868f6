"""ReplayFilter: events delivered again by a resumed stream are dropped, late ones never."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from registrar.core.replay import RESUME_OVERLAP_NS, ReplayFilter, event_time_nano, identity

BASE = 1_700_000_000_000_000_000


def event(action: str, cid: str, at: int, **attributes: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "timeNano": at,
            "Actor": {"ID": cid, "Attributes": {"name": cid, **attributes}}}


def test_an_event_stamped_earlier_than_one_seen_is_still_new() -> None:
    # Docker's stream, seen on a busy engine: c2's kill arrives after c1's start, 14 ms older.
    f = ReplayFilter()
    assert f.first_time(event("start", "c1", BASE + 14_000_000))
    assert f.first_time(event("kill", "c2", BASE, signal="15"))
    assert f.first_time(event("start", "c3", BASE + 1))


def test_a_resumed_stream_replays_exactly_what_was_seen() -> None:
    f = ReplayFilter()
    seen = [event("start", f"c{i}", BASE + i * 1_000_000) for i in range(10)]
    for e in seen:
        assert f.first_time(e)
    resume = f.resume_from()
    assert resume is not None and resume <= BASE  # the whole recent past comes again
    missed = event("die", "c3", BASE + 5_500_000)  # happened while the stream was down
    replay = sorted([*seen, missed], key=lambda e: e["timeNano"])
    fresh = [e for e in replay if f.first_time(e)]
    assert fresh == [missed]


def test_same_time_same_container_different_signal_or_status_are_two_events() -> None:
    f = ReplayFilter()
    assert f.first_time(event("kill", "c1", BASE, signal="1"))
    assert f.first_time(event("kill", "c1", BASE, signal="15"))
    assert not f.first_time(event("kill", "c1", BASE, signal="15"))
    assert f.first_time(event("health_status", "c1", BASE, health_status="healthy"))
    assert f.first_time(event("health_status", "c1", BASE, health_status="unhealthy"))


def test_an_old_event_of_a_container_is_a_replay_even_once_its_identity_is_forgotten() -> None:
    # Podman re-sends old events when its events file rotates
    f = ReplayFilter(keep_ns=1, max_kept=2)
    old_start = event("start", "c1", BASE)
    assert f.first_time(old_start)
    assert f.first_time(event("kill", "c1", BASE + 60 * 10**9, signal="15"))
    for i in range(5):
        f.first_time(event("start", f"other{i}", BASE + 61 * 10**9))
    assert not f.first_time(old_start)
    # ... but a container's own events a little out of order still pass
    assert f.first_time(event("die", "c1", BASE + 60 * 10**9 - 5_000_000))


def test_resume_point_and_memory_bound() -> None:
    f = ReplayFilter(max_kept=100)
    assert f.resume_from() is None
    for i in range(1000):
        f.first_time(event("start", f"c{i}", BASE + i))
    assert f.resume_from() == BASE + 999 - RESUME_OVERLAP_NS
    assert len(f._seen) <= 100


def test_old_identities_are_forgotten_once_far_behind() -> None:
    f = ReplayFilter()
    f.first_time(event("start", "old", BASE))
    f.first_time(event("start", "new", BASE + 10 * RESUME_OVERLAP_NS))
    assert identity(event("start", "old", BASE)) not in f._seen


def test_time_falls_back_to_seconds() -> None:
    assert event_time_nano({"time": 1_700_000_000}) == 1_700_000_000 * 10**9
    assert event_time_nano({"timeNano": 5}) == 5
    assert event_time_nano({}) == 0
    assert event_time_nano({"timeNano": "x", "time": True}) == 0


@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["start", "kill", "die"]),
                          st.integers(0, 10**8)), max_size=60))
def test_any_order_every_distinct_event_passes_once(items: list[tuple[int, str, int]]) -> None:
    f = ReplayFilter()
    events = [event(action, f"c{n}", BASE + at) for n, action, at in items]
    passed = [e for e in events if f.first_time(e)]
    distinct = {identity(e) for e in events}
    assert len(passed) == len(distinct)
    assert not any(f.first_time(e) for e in events)  # a replay of all of it: nothing new
