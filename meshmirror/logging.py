"""Structured JSON logs on stderr, one object per line.

Operators feed node logs to a collector; one JSON object per line with stable
field names can be filtered (``status >= 400``, ``handler == "blob"``) without
regexes. Structured fields travel in ``extra={"fields": {...}}`` so call sites
stay plain stdlib logging.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Final

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: time, level, logger, message, then its fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                entry.setdefault(str(key), value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"), ensure_ascii=False)


class _MeshmirrorHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we installed, so configuring twice replaces rather than duplicates."""


def parse_level(name: str) -> int:
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}: want one of {', '.join(LEVELS)}") from None


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send every logger's records (ours, Hypercorn's) through one JSON handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _MeshmirrorHandler):
            root.removeHandler(handler)
    handler = _MeshmirrorHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
