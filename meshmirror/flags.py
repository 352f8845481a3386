"""Parsing of flag values, shared by every command that takes them.

A leaf module: it imports nothing of meshmirror, so the command line and the
config dataclasses of every command can use it without importing each other.
Parsers raise ``ValueError`` with a message that shows a good value; the
command line adds the flag's name and turns it into a `UsageError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
    """A flag value that cannot work; printed as one line with exit code 2."""


def split_list(values: Sequence[str] | None) -> list[str]:
    """Flatten a repeatable flag whose values may also be comma-separated."""
    out: list[str] = []
    for value in values or ():
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``4Gi``, ``4GiB``, ``512M`` or ``1073741824``: the forms a Helm value or a
    person would write (Ki/Mi/Gi are powers of 1024, K/M/G of 1000)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise ValueError("expected a size such as 4Gi or 512MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def format_size(size: int) -> str:
    """The shortest exact binary form of ``size`` that `parse_size` reads back (4Gi, 512Mi)."""
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if size and size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(size)


# Go's time.ParseDuration units, so a value written for Spegel or a Go tool reads the same.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from a Go duration (``20ms``, ``1.5s``, ``1m30s``, ``500us``) or plain
    seconds (``0.1``), the two forms a person or a Helm value would write."""
    stripped = text.strip()
    example = "expected a duration such as 100ms, 1.5s or 0.1 (seconds)"
    try:
        seconds = float(stripped)
    except ValueError:
        pass
    else:
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(example)
        return seconds
    if not stripped:
        raise ValueError(example)
    total, pos = 0.0, 0
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if match is None:
            raise ValueError(example)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total


def format_duration(seconds: float) -> str:
    """``0.1`` as ``100ms``, ``5.0`` as ``5s``: how help text shows a default."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def field_default(owner: type, name: str) -> Any:
    """The default of dataclass ``owner``'s field ``name``, written there once.

    Read through `dataclasses.fields` because a slots dataclass keeps no class
    attribute holding the default; a ``default_factory`` is called.
    """
    for item in dataclasses.fields(owner):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            raise TypeError(f"{owner.__name__}.{name} has no default")
    raise AttributeError(f"{owner.__name__} has no field {name!r}")


_DECIMAL = re.compile(r"[0-9]{1,19}")


def decimal(text: str | None) -> int | None:
    """``text`` as a non-negative integer of ASCII digits (at most 19: an int64), else None.

    For numbers that other nodes and clients write (tags, ETags, headers):
    `str.isdigit` also takes digits that `int` refuses ("\\xb2") and lengths past
    `int`'s limit, and the `ValueError` then ends a request, or a task, instead.
    """
    return int(text) if text is not None and _DECIMAL.fullmatch(text) else None
