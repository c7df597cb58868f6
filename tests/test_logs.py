"""Times written and read without `datetime` on a sidecar's start, checked against it: the JSON
log line's (registrar.logs.iso_utc) and a container engine's (timestamps.engine_time_ns)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from registrar.core import timestamps
from registrar.logs import JsonFormatter, iso_utc


@given(st.floats(min_value=0, max_value=2**33, allow_nan=False)
       | st.integers(0, 2**33).map(lambda s: s + 0.9999995)
       | st.integers(0, 2**33).map(lambda s: s + 0.0005))
def test_iso_utc_writes_what_datetime_writes(at: float) -> None:
    assert iso_utc(at) == datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def test_a_json_line_carries_the_time_level_message_and_fields() -> None:
    record = logging.LogRecord("registrar.x", logging.INFO, __file__, 1, "hello %s", ("you",),
                               None)
    record.created = 1_764_912_345.678
    record.event = "greet"
    line = json.loads(JsonFormatter().format(record))
    assert line == {"time": "2025-12-05T05:25:45.678+00:00", "level": "info",
                    "logger": "registrar.x", "message": "hello you", "event": "greet"}


def test_now_is_what_rfc3339_writes_of_this_moment() -> None:
    before = timestamps.rfc3339(datetime.now(UTC))
    written = timestamps.now()
    after = timestamps.rfc3339(datetime.now(UTC))
    assert before <= written <= after
    assert timestamps.rfc3339(timestamps.parse(written)) == written


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30)),
       st.integers(0, 999_999_999), st.integers(-14 * 60, 14 * 60), st.booleans())
def test_engine_time_ns_reads_what_docker_and_podman_write(
    at: datetime, nanos: int, offset_minutes: int, zulu: bool,
) -> None:
    """Docker's StartedAt (UTC, Z, nanoseconds) and Podman's (an offset), as Go writes them."""
    zone = UTC if zulu else timezone(timedelta(minutes=offset_minutes))
    local = at.replace(microsecond=0, tzinfo=zone)
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{nanos:09d}".rstrip("0").rstrip(".")) + (
        "Z" if zulu else local.strftime("%z")[:3] + ":" + local.strftime("%z")[3:])
    expected = int(local.timestamp()) * 1_000_000_000 + nanos
    assert timestamps.engine_time_ns(text) == (expected if expected > 0 else None)


def test_engine_time_ns_refuses_what_is_no_engine_time() -> None:
    assert timestamps.engine_time_ns("0001-01-01T00:00:00Z") is None  # never started
    assert timestamps.engine_time_ns("") is None
    assert timestamps.engine_time_ns("2026-12-05 08:55:51Z") is None
    assert timestamps.engine_time_ns("2026-13-05T08:55:51Z") is None
    assert timestamps.engine_time_ns("2026-12-05T08:55:51.5Z") == 1_796_460_951_500_000_000
