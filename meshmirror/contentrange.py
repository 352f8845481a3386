"""The ``Content-Range`` of a 206 (RFC 9110 section 14.4): one writer, one parser.

The registry writes it, and three readers trust it to place a peer's or an upstream's
bytes at an offset of a blob (a resumed peer hop, an upstream resume, a rollout
stripe): a value read loosely puts bytes in the wrong place, which the digest then
catches only after the whole blob has been moved. So the parser is strict, and every
reader uses the same one:

- the unit is ``bytes`` in any case (RFC 9110 section 14.1: range unit names are
  case-insensitive, so an upstream may send ``Bytes``), followed by one space and
  nothing else of whitespace;
- positions and the total are ASCII digits (``re``'s ``\\d`` also takes other
  scripts' digits, which ``int`` reads), at most 19 of them, so every value fits a
  signed 64-bit integer as Go peers require;
- ``first <= last``, and a known total is past ``last``: RFC 9110 calls anything
  else invalid;
- the total is a number or ``*`` (unknown), which the result says as None.

The unsatisfied form ``bytes */<size>`` of a 416 is no 206's header and does not parse.

It is a leaf module because the readers sit in layers that may not import each other
(`registry` and `upstream`; `mirror` above both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTENT_RANGE = re.compile(r"(?ai:bytes) ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


class ContentRangeError(ValueError):
    """A Content-Range header that is absent or not a valid ``bytes first-last/total``."""


@dataclass(frozen=True, slots=True)
class ContentRange:
    """Bytes ``first`` to ``last`` (inclusive) of a ``total``-byte blob (None: unknown)."""

    first: int
    last: int
    total: int | None

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise ContentRangeError(f"range {self.first}-{self.last}: want 0 <= first <= last")
        if self.total is not None and self.total <= self.last:
            raise ContentRangeError(f"range ending at {self.last} of a {self.total}-byte blob")

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def header(self) -> str:
        """The header value."""
        return f"bytes {self.first}-{self.last}/{'*' if self.total is None else self.total}"


def parse_content_range(value: str | None) -> ContentRange:
    """The range a 206's ``Content-Range`` header value says it carries.

    Raises ContentRangeError, with the value (shortened) in its message, when the
    header is missing or is not strictly ``bytes first-last/total``.
    """
    if value is None:
        raise ContentRangeError("no Content-Range")
    match = _CONTENT_RANGE.fullmatch(value)
    if match is None:
        raise ContentRangeError(f"Content-Range {value[:80]!r}: want bytes first-last/total")
    total = match.group(3)
    try:
        return ContentRange(int(match.group(1)), int(match.group(2)),
                            None if total == "*" else int(total))
    except ContentRangeError as err:
        raise ContentRangeError(f"Content-Range {value[:80]!r}: {err}") from None
