"""HTTP Range requests for blobs (RFC 9110 section 14), single ranges only.

containerd sends exactly one form, ``bytes=<n>-``, to resume a body that was
cut short; other clients send ``bytes=a-b`` or ``bytes=-n``. Decisions, per
RFC 9110:

- a unit other than ``bytes`` is ignored (14.2: an origin server MUST ignore a
  unit it does not understand), so the whole blob is served with 200;
- several ranges in one header are ignored too (14.2: a server MAY ignore
  Range). Answering them needs multipart/byteranges, which no registry client
  asks for, and a 200 with the whole blob is always a correct answer;
- a ``bytes=`` header that does not parse is answered 416 rather than ignored:
  a client that asked for part of a blob and got all of it would silently
  write the wrong bytes at its offset, so a clear error is safer;
- ranges starting at or past the end, and ``bytes=-0``, are unsatisfiable: 416
  with ``Content-Range: bytes */<size>``.

Parsing (`parse_range`) and resolving against the blob's size
(`RangeSpec.resolve`) are separate so a fallback that learns the size only
from a peer can resolve the same request with the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshmirror.contentrange import ContentRange

# 19 digits keeps every value inside a signed 64-bit integer, as Go clients
# and servers require, and far from Python's int-from-string digit limit.
_FIRST_LAST_RE = re.compile(r"([0-9]{1,19})-([0-9]{1,19})?")
_SUFFIX_RE = re.compile(r"-([0-9]{1,19})")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_LENGTH_MAX = 1024


class RangeError(ValueError):
    """A Range the registry answers with 416."""


class MalformedRangeError(RangeError):
    """A ``bytes=`` Range header that is not valid syntax."""


class UnsatisfiableRangeError(RangeError):
    """A well-formed range that selects no byte of the blob."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A resolved range: ``length`` bytes from ``offset`` of a ``size``-byte blob."""

    offset: int
    length: int
    size: int

    @property
    def last(self) -> int:
        return self.offset + self.length - 1

    def content_range(self) -> str:
        return ContentRange(self.offset, self.last, self.size).header()


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """One requested range before the blob's size is known.

    ``first``/``last`` are the positions of ``bytes=first-last`` (``last`` None
    for ``bytes=first-``); ``suffix`` is n of ``bytes=-n``.
    """

    first: int | None = None
    last: int | None = None
    suffix: int | None = None

    def __post_init__(self) -> None:
        if (self.first is None) == (self.suffix is None):
            raise ValueError("a range has either a first position or a suffix length")
        if self.suffix is not None and self.last is not None:
            raise ValueError("a suffix range has no last position")
        for value in (self.first, self.last, self.suffix):
            if value is not None and value < 0:
                raise ValueError("range positions are non-negative")
        if self.first is not None and self.last is not None and self.last < self.first:
            raise ValueError("last position before first")

    def header(self) -> str:
        """The spec as a Range header value, for forwarding to another server."""
        if self.suffix is not None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.first}-{'' if self.last is None else self.last}"

    def resolve(self, size: int) -> ByteRange | None:
        """The bytes this spec selects from a ``size``-byte blob.

        None means the whole (empty) blob with 200: a suffix range of an empty
        blob is satisfiable but has no expressible Content-Range.
        """
        if self.suffix is not None:
            if self.suffix == 0:
                raise UnsatisfiableRangeError("bytes=-0 selects nothing")
            if size == 0:
                return None
            offset = max(0, size - self.suffix)
            return ByteRange(offset, size - offset, size)
        assert self.first is not None
        if self.first >= size:
            raise UnsatisfiableRangeError(f"range starts at {self.first}, blob has {size} bytes")
        last = size - 1 if self.last is None else min(self.last, size - 1)
        return ByteRange(self.first, last - self.first + 1, size)


def parse_range(value: str | None) -> RangeSpec | None:
    """The single byte range a Range header asks for, or None to serve everything.

    Raises MalformedRangeError for a ``bytes=`` header that does not parse.
    """
    if value is None:
        return None
    if len(value) > _HEADER_LENGTH_MAX:
        raise MalformedRangeError("Range header too long")
    unit, eq, range_set = value.strip().partition("=")
    unit = unit.strip()
    if unit.lower() != "bytes":
        if eq and _TOKEN_RE.fullmatch(unit):
            return None  # a unit we do not understand: RFC 9110 says ignore it
        raise MalformedRangeError(f"invalid Range header {value[:80]!r}: want bytes=...")
    specs = [part.strip(" \t") for part in range_set.split(",")]
    specs = [part for part in specs if part]
    if not specs:
        raise MalformedRangeError(f"invalid Range header {value[:80]!r}: no range given")
    if len(specs) > 1:
        return None  # several ranges: ignored, see the module docstring
    spec = specs[0]
    match = _FIRST_LAST_RE.fullmatch(spec)
    if match is not None:
        first = int(match.group(1))
        last = None if match.group(2) is None else int(match.group(2))
        if last is not None and last < first:
            raise MalformedRangeError(f"invalid range {spec!r}: last position before first")
        return RangeSpec(first=first, last=last)
    match = _SUFFIX_RE.fullmatch(spec)
    if match is not None:
        return RangeSpec(suffix=int(match.group(1)))
    raise MalformedRangeError(f"invalid range {spec[:80]!r}: want a-b, a- or -n")
