"""Parsing of flag values, shared by every command that takes them.

A leaf module: it imports nothing of meshmirror, so the command line, the
node builder and the containerd commands can all use it without importing
each other.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence


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
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from ``4Gi``, ``4GiB``, ``512M`` or ``1073741824``: the forms a Helm value or a
    person would write (Ki/Mi/Gi are powers of 1024, K/M/G of 1000)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4Gi or 512MiB, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]
