"""Which Docker events a resumed stream delivers a second time (pure).

Docker's events stream is not in timestamp order across containers: on a busy engine an event
can carry a `timeNano` some milliseconds older than one already delivered. So "older than the
newest seen" does not mean "seen": only a resumed stream replays, and only what it resumes
from. The stream is resumed a little before the newest event seen (`resume_from`), and exactly
the events seen already are recognised by their identity and dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from registrar.typing_shim import Any

# An event of a container this much older than the newest applied for that container is a
# replay whatever its identity: Podman re-sends old events when its events file rotates, older
# than any window of identities. (One container's events are never that far out of order.)
STALE_FOR_CONTAINER_NS = 1_000_000_000
# A resumed stream starts this long before the newest event seen: an event that was still on
# its way (stamped earlier than one already delivered) when the stream broke comes again.
RESUME_OVERLAP_NS = 2_000_000_000
# Identities are kept while they are this close to the newest event (and at most MAX_KEPT of
# them): enough for any replay, which never reaches further back than RESUME_OVERLAP_NS.
KEEP_NS = 2 * RESUME_OVERLAP_NS
MAX_KEPT = 8192
MAX_CONTAINERS = 16384  # containers whose newest event time is kept

Identity = tuple[int, str, str, str]


def event_time_nano(event: Mapping[str, Any]) -> int:
    """`timeNano`, else `time` (seconds) in nanoseconds, else 0."""
    nano = event.get("timeNano")
    if isinstance(nano, int) and not isinstance(nano, bool) and nano > 0:
        return nano
    seconds = event.get("time")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        return int(seconds * 1_000_000_000)
    return 0


def identity(event: Mapping[str, Any]) -> Identity:
    """What tells two events apart: time, container, action and the attributes that vary
    between otherwise equal events (a kill's signal, a health status)."""
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    detail = f"{attributes.get('signal', '')}|{attributes.get('health_status', '')}"
    return (
        event_time_nano(event),
        str(actor.get("ID") or event.get("id") or ""),
        str(event.get("Action") or event.get("status") or ""),
        detail,
    )


class ReplayFilter:
    """Remembers the identities of recent events (and each container's newest event time);
    `first_time` is False for a replayed one."""

    def __init__(self, keep_ns: int = KEEP_NS, max_kept: int = MAX_KEPT) -> None:
        self._keep_ns = keep_ns
        self._max_kept = max_kept
        self._seen: set[Identity] = set()
        self._order: deque[Identity] = deque()
        self._newest_of: dict[str, int] = {}  # container -> its newest timeNano seen
        self.newest = 0  # the newest timeNano seen

    def resume_from(self) -> int | None:
        """The `since` (in ns) for a stream opened again; None before any event."""
        if not self.newest:
            return None
        return max(1, self.newest - RESUME_OVERLAP_NS)

    def first_time(self, event: Mapping[str, Any]) -> bool:
        ident = identity(event)
        at, container = ident[0], ident[1]
        if ident in self._seen or at < self._newest_of.get(container, 0) - STALE_FOR_CONTAINER_NS:
            return False
        self._newest_of[container] = max(at, self._newest_of.get(container, 0))
        if len(self._newest_of) > MAX_CONTAINERS:  # containers come and go: forget the oldest
            oldest = min(self._newest_of, key=self._newest_of.__getitem__)
            del self._newest_of[oldest]
        self._seen.add(ident)
        self._order.append(ident)
        self.newest = max(self.newest, ident[0])
        while self._order and (
            len(self._order) > self._max_kept or self._order[0][0] < self.newest - self._keep_ns
        ):
            self._seen.discard(self._order.popleft())
        return True
