"""Logging on stderr: plain text, or one JSON object a line (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came in through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def iso_utc(at: float) -> str:
    """`at` (seconds since the epoch) as `datetime.fromtimestamp(at, UTC).isoformat(timespec=
    "milliseconds")` writes it, without importing `datetime` (1.6 ms of a sidecar's start)."""
    seconds = int(at)
    micros = round((at - seconds) * 1e6)  # as datetime: to the microsecond, half to even
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    millis = micros // 1000  # then truncated, as isoformat does
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}+00:00"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries are chatty at debug level; keep their warnings only.
    for noisy in ("urllib3", "docker", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
