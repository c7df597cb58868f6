"""The one timestamp format of keys and values (RFC 3339, UTC, whole seconds), written and read
in one place."""

from __future__ import annotations

from datetime import UTC, datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime(FORMAT)


def now() -> str:
    """This moment, as the values under the prefixes write it."""
    return rfc3339(datetime.now(UTC))


def parse(text: str) -> datetime:
    """A timestamp as written by `rfc3339` (ValueError for anything else)."""
    return datetime.strptime(text, FORMAT).replace(tzinfo=UTC)
