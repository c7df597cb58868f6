"""The one timestamp format of keys and values (RFC 3339, UTC, whole seconds), written and read
in one place. `now()` takes no `datetime` (1.6 ms of a sidecar's start: its module defines
the whole pure-Python implementation before the C one replaces it)."""

from __future__ import annotations

import re
import time

from registrar.typing_shim import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(at: datetime) -> str:
    from datetime import UTC

    return at.astimezone(UTC).strftime(FORMAT)


def now() -> str:
    """This moment, as the values under the prefixes write it."""
    return time.strftime(FORMAT, time.gmtime())


def parse(text: str) -> datetime:
    """A timestamp as written by `rfc3339` (ValueError for anything else)."""
    from datetime import UTC, datetime

    return datetime.strptime(text, FORMAT).replace(tzinfo=UTC)


# A container engine's time (State.StartedAt): RFC 3339 with nanoseconds and Z (Docker) or an
# offset (Podman gives local time).
_ENGINE_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                          r"(?:Z|([+-])(\d\d):(\d\d))")


def engine_time_ns(text: str) -> int | None:
    """A container engine's RFC 3339 time in nanoseconds since the epoch, as its events'
    `since` takes it; None for anything else, or for a time not after the epoch (Docker's
    zero time of a container never started). No `datetime`: this is on a sidecar's start."""
    match = _ENGINE_TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    offset = 0
    if match[8]:
        offset = (int(match[9]) * 60 + int(match[10])) * 60 * (-1 if match[8] == "-" else 1)
    seconds = (_days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
               - offset)
    nanos = int((match[7] or "").ljust(9, "0"))
    total = seconds * 1_000_000_000 + nanos
    return total if total > 0 else None


def since(ns: int) -> str:
    """Nanoseconds since the epoch as an events stream's `since` ("seconds.nanoseconds")."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}"


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to that proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468
