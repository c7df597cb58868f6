"""The JSON log line's time, written without `datetime` (registrar.logs.iso_utc)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

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
