"""The summary exchange: one protocol, its format, its server and its client.

A node publishes a Bloom filter of its keys (digests and ``registry/repo:tag``);
peers fetch it over HTTP from ``GET /_mesh/v1/summary`` whenever the node's
advertised epoch (a Serf tag in its gossip metadata) moves. Everything both
ends must agree on lives in this module: the byte format, the media type, the
path, the ETag, the endpoint and the fetch.

Wire format (version 1, big-endian), 40-byte header then the bit array::

    magic "MMSF" | version u8 | k u8 | reserved u16 (0)
    epoch u64 | m (bits) u64 | count u64 | born_at_ms u64
    bits: m/8 bytes, bit i at byte i>>3, bit i&7 (least significant first)

``born_at_ms`` is the wall-clock time (ms since the Unix epoch) at which the
oldest key first published in this version arrived at the origin node; a peer
installing the summary observes ``now - born_at`` as the propagation delay.
That is only meaningful when clocks agree: all nodes of a test share one clock;
on a real cluster NTP skew (typically a few ms, occasionally much worse) adds
straight into the figure, and negative values are clamped to zero.

Version 2 is version 1 (with version byte 2) followed by the node's vouches
(see `vouches`): ``count u32`` then ``count`` x (``key u64``, ``checked u32``).
A peer asks for it by listing `MEDIA_TYPE_V2` in ``Accept``; a node that only
reads version 1 does not, and is answered version 1, so mixed versions of
meshmirror in one mesh (a rolling upgrade) keep exchanging summaries. A node
whose vouches change publishes a new epoch, like a node whose keys change.

Version 3 is version 2 (with version byte 3) whose positions use the `RANGE`
reduction (see `bloom`), so ``m`` is any multiple of 8 and the filter is sized to
9.6 bits per key at 1% instead of up to 17.5. `MEDIA_TYPE_V3` in ``Accept`` asks
for it; a node still serves versions 1 and 2 of a power-of-two filter built
beside it, to peers that do not ask for version 3.

Deltas. Between rebuilds a filter only gains bits, so a peer holding epoch E
needs only the positions set since E. A peer that lists `DELTA_MEDIA_TYPE` in
``Accept`` and sends ``If-None-Match: "E"`` gets, when the node still knows
what changed since E, a delta instead of the filter (big-endian)::

    magic "MMSD" | version u8 (1) | k u8 | reduction u8 | reserved u8 (0)
    base_epoch u64 | epoch u64 | m u64 | count u64 | born_at_ms u64
    positions u32 | position_bytes u32
    position_bytes bytes: ``positions`` LEB128 varints, the first position then
        the gap to each next one (positions strictly increasing, all below m)
    the vouch section of version 2 (the node's vouches at ``epoch``, in full)

and otherwise (E too old, or the filter rebuilt since) the whole version-3
filter. A delta is a few hundred bytes where a filter is tens of kilobytes.
Every length in it is checked against the bytes actually received before
anything is allocated. A delta never holds more than `max_delta_positions`
positions of its filter (the publisher's log keeps no more), and a receiver
reads one only against the filter it holds, so its body is bounded by
`max_delta_bytes` of *that* filter rather than by the whole-summary cap:
decoding costs tens of bytes a position in temporaries, which at the 16 MiB
cap would be most of a GiB.

HTTP: peers usually already hold the previous version, so a response carries
``ETag: "<epoch>"`` and a matching ``If-None-Match`` costs a 304 with no body.
The server sends the publisher's pre-encoded payload: serving never re-encodes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshmirror.flags import decimal
from meshmirror.routing.bloom import MASK, RANGE, BloomFilter, U64Array, check_geometry
from meshmirror.routing.vouches import MAX_VOUCHES, NO_VOUCHES, Vouches, VouchFormatError

MEDIA_TYPE = "application/vnd.meshmirror.summary.v1"
MEDIA_TYPE_V2 = "application/vnd.meshmirror.summary.v2"
MEDIA_TYPE_V3 = "application/vnd.meshmirror.summary.v3"
DELTA_MEDIA_TYPE = "application/vnd.meshmirror.summary-delta.v1"
SUMMARY_PATH = "/_mesh/v1/summary"
MAGIC = b"MMSF"
DELTA_MAGIC = b"MMSD"
VERSION = 1
VERSION_VOUCHES = 2
VERSION_RANGE = 3
DELTA_VERSION = 1
_HEADER = struct.Struct(">4sBBHQQQQ")
HEADER_SIZE = _HEADER.size
_DELTA_HEADER = struct.Struct(">4sBBBBQQQQQII")
DELTA_HEADER_SIZE = _DELTA_HEADER.size
_MASK64 = (1 << 64) - 1
# Gaps between positions are below 2^32, so a varint is at most 5 bytes.
_VARINT_MAX = 5
_MEDIA_TYPES = (MEDIA_TYPE, MEDIA_TYPE_V2, MEDIA_TYPE_V3, DELTA_MEDIA_TYPE)
# A delta carries at most one position per this many bits of its filter: about a
# quarter of the whole filter's size, past which the whole filter is the better answer.
BITS_PER_POSITION = 32


def max_delta_positions(m: int) -> int:
    """The most positions a delta of a filter of ``m`` bits carries."""
    return max(64, m // BITS_PER_POSITION)


def max_delta_bytes(m: int) -> int:
    """The largest delta body of a filter of ``m`` bits: header, varints, vouches."""
    return DELTA_HEADER_SIZE + _VARINT_MAX * max_delta_positions(m) + 4 + 12 * MAX_VOUCHES


def wall_clock_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch: the unit of ``born_at_ms`` and epochs."""
    return time.time_ns() // 1_000_000


class SummaryFormatError(ValueError):
    """Bytes that are not a well-formed summary or delta."""


def encode_positions(pos: U64Array) -> bytes:
    """Sorted unique positions as LEB128 varints of the first one and each gap."""
    if len(pos) == 0:
        return b""
    gaps: U64Array = np.diff(pos.astype(np.uint64), prepend=np.uint64(0)).astype(np.uint64)
    sizes = np.ones(len(gaps), dtype=np.int64)
    for j in range(1, _VARINT_MAX):
        sizes += gaps >= np.uint64(1 << (7 * j))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    out = np.zeros(int(sizes.sum()), dtype=np.uint8)
    for j in range(_VARINT_MAX):
        sel = sizes > j
        chunk = (gaps[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = np.where(sizes[sel] > j + 1, 0x80, 0).astype(np.uint64)
        out[starts[sel] + j] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def decode_positions(data: bytes, count: int, m: int) -> U64Array:
    """The inverse of `encode_positions`, refusing anything but ``count`` strictly
    increasing positions below ``m`` in exactly ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != count or (count and ends[-1] != len(raw) - 1) or (not count and len(raw)):
        raise SummaryFormatError(f"delta positions: {len(raw)} bytes do not hold exactly "
                                 f"{count} varints")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts + 1
    if int(sizes.max()) > _VARINT_MAX:
        raise SummaryFormatError(f"delta position varint longer than {_VARINT_MAX} bytes")
    gaps = np.zeros(count, dtype=np.uint64)
    for j in range(_VARINT_MAX):
        sel = sizes > j
        gaps[sel] |= (raw[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    if count > 1 and not bool(np.all(gaps[1:] > 0)):
        raise SummaryFormatError("delta positions are not strictly increasing")
    pos = np.cumsum(gaps, dtype=np.uint64)
    if int(pos[-1]) >= m:
        raise SummaryFormatError(f"delta position {int(pos[-1])} is outside a filter of {m} bits")
    return pos


@dataclass(frozen=True, slots=True, eq=False)
class SummaryDelta:
    """What changed in a node's filter from ``base_epoch`` to ``epoch``: the
    positions set since, and the rest of the version's header and vouches."""

    base_epoch: int
    epoch: int
    k: int
    m: int
    reduction: int
    count: int
    born_at_ms: int
    positions: U64Array = field(repr=False)
    vouches: Vouches = NO_VOUCHES

    def encode(self) -> bytes:
        pos = encode_positions(self.positions)
        header = _DELTA_HEADER.pack(DELTA_MAGIC, DELTA_VERSION, self.k, self.reduction, 0,
                                    self.base_epoch, self.epoch, self.m, self.count,
                                    self.born_at_ms, len(self.positions), len(pos))
        return header + pos + self.vouches.encode()

    @classmethod
    def decode(cls, data: bytes) -> SummaryDelta:
        """Parse a delta; SummaryFormatError says exactly what is wrong."""
        if len(data) < DELTA_HEADER_SIZE:
            raise SummaryFormatError(f"delta too short: {len(data)} bytes, the header alone "
                                     f"is {DELTA_HEADER_SIZE}")
        (magic, version, k, reduction, reserved, base, epoch, m, count, born_at, npos,
         pos_bytes) = _DELTA_HEADER.unpack_from(data)
        if magic != DELTA_MAGIC:
            raise SummaryFormatError(f"not a meshmirror delta: magic {magic!r}")
        if version != DELTA_VERSION or reserved != 0:
            raise SummaryFormatError(f"unsupported delta version {version} (reserved "
                                     f"{reserved}), this node reads {DELTA_VERSION}")
        try:
            check_geometry(m, k, reduction)
        except ValueError as err:
            raise SummaryFormatError(str(err)) from err
        if epoch <= base:
            raise SummaryFormatError(f"delta from epoch {base} to {epoch} goes backwards")
        end = DELTA_HEADER_SIZE + pos_bytes
        # Checked before decoding: a varint is at least one byte, so the counts
        # cannot promise more than the body holds.
        if npos > pos_bytes or end > len(data):
            raise SummaryFormatError(f"delta promises {npos} positions in {pos_bytes} bytes, "
                                     f"the body has {len(data) - DELTA_HEADER_SIZE}")
        if npos > max_delta_positions(m):
            raise SummaryFormatError(f"delta of {npos} positions, a filter of {m} bits sends "
                                     f"at most {max_delta_positions(m)}")
        positions = decode_positions(bytes(data[DELTA_HEADER_SIZE:end]), npos, m)
        try:
            vouches = Vouches.decode(bytes(data[end:])) or NO_VOUCHES
        except VouchFormatError as err:
            raise SummaryFormatError(str(err)) from err
        return cls(base_epoch=base, epoch=epoch, k=k, m=m, reduction=reduction, count=count,
                   born_at_ms=born_at, positions=positions, vouches=vouches)


@dataclass(frozen=True, slots=True)
class Summary:
    """One published version of a node's filter."""

    epoch: int
    k: int
    m: int
    count: int
    born_at_ms: int
    bits: bytes = field(repr=False)
    vouches: Vouches = NO_VOUCHES
    reduction: int = RANGE

    def __post_init__(self) -> None:
        check_geometry(self.m, self.k, self.reduction)
        if len(self.bits) != self.m // 8:
            raise ValueError(
                f"summary of {self.m} bits needs {self.m // 8} bytes, got {len(self.bits)}")
        for name in ("epoch", "count", "born_at_ms"):
            value = getattr(self, name)
            if not 0 <= value <= _MASK64:
                raise ValueError(f"summary {name} {value} is not an unsigned 64-bit value")

    def filter(self) -> BloomFilter:
        """A read-only filter view of the bits, for membership tests."""
        arr = np.frombuffer(self.bits, dtype=np.uint8)
        return BloomFilter(self.m, self.k, arr, self.reduction)

    def __contains__(self, key: object) -> bool:
        return key in self.filter()

    def encode(self, version: int | None = None) -> bytes:
        """`VERSION_RANGE` for a `RANGE` filter (the default for one); version 1
        (no vouches, the default) or `VERSION_VOUCHES` (with them) for a `MASK` one."""
        if version is None:
            version = VERSION_RANGE if self.reduction == RANGE else VERSION
        if (version == VERSION_RANGE) != (self.reduction == RANGE):
            raise ValueError(f"a filter with reduction {self.reduction} has no version "
                             f"{version} encoding")
        header = _HEADER.pack(MAGIC, version, self.k, 0, self.epoch, self.m, self.count,
                              self.born_at_ms)
        if version in (VERSION_VOUCHES, VERSION_RANGE):
            return header + self.bits + self.vouches.encode()
        return header + self.bits

    @classmethod
    def decode(cls, data: bytes) -> Summary:
        """Parse a version-1, -2 or -3 summary; SummaryFormatError says exactly what is
        wrong."""
        if len(data) < HEADER_SIZE:
            raise SummaryFormatError(
                f"summary too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
        magic, version, k, reserved, epoch, m, count, born_at = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SummaryFormatError(f"not a meshmirror summary: magic {magic!r}, want {MAGIC!r}")
        if version not in (VERSION, VERSION_VOUCHES, VERSION_RANGE):
            raise SummaryFormatError(f"unsupported summary version {version}, this node reads "
                                     f"{VERSION} to {VERSION_RANGE}")
        if reserved != 0:
            raise SummaryFormatError(f"reserved header field is {reserved}, want 0")
        reduction = RANGE if version == VERSION_RANGE else MASK
        try:
            check_geometry(m, k, reduction)
        except ValueError as err:
            raise SummaryFormatError(str(err)) from err
        want = HEADER_SIZE + m // 8
        vouches = NO_VOUCHES
        if version in (VERSION_VOUCHES, VERSION_RANGE):
            if len(data) < want:
                raise SummaryFormatError(
                    f"summary of m={m} bits needs at least {want} bytes, got {len(data)}")
            try:
                vouches = Vouches.decode(bytes(data[want:])) or NO_VOUCHES
            except VouchFormatError as err:
                raise SummaryFormatError(str(err)) from err
        elif len(data) != want:
            raise SummaryFormatError(
                f"summary of m={m} bits must be {want} bytes, got {len(data)}")
        return cls(epoch=epoch, k=k, m=m, count=count, born_at_ms=born_at,
                   bits=bytes(data[HEADER_SIZE:want]), vouches=vouches, reduction=reduction)


class FetchError(Exception):
    """A peer's summary response that cannot be used (status, type, size)."""


class SummaryTooLarge(FetchError):
    """A whole summary past the fetch's limit: ``size`` is its Content-Length, or the bytes
    read when the limit was passed (a lower bound)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def _too_large(message: str, is_delta: bool, size: int) -> FetchError:
    """A delta too large says nothing of the filter's size (only that the delta is
    bad: the whole filter comes next); a whole summary too large does."""
    return FetchError(message) if is_delta else SummaryTooLarge(message, size)


# What a whole summary carries besides its bits: the header and the largest vouch section.
SUMMARY_OVERHEAD = HEADER_SIZE + 4 + 12 * MAX_VOUCHES


class SummarySource(Protocol):
    """What the endpoint needs from a SummaryPublisher."""

    @property
    def current(self) -> Summary | None: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def vouched_payload(self) -> bytes:
        """The same version encoded as `VERSION_VOUCHES`."""
        ...

    @property
    def ranged_payload(self) -> bytes:
        """The same version encoded as `VERSION_RANGE`."""
        ...

    def delta_since(self, epoch: int) -> bytes | None:
        """The encoded delta from ``epoch`` to the current version, or None when
        this source cannot tell what changed since (then the whole filter goes)."""
        ...


def _held_epoch(if_none_match: str) -> int | None:
    """The one epoch a peer says it holds, from ``If-None-Match: "E"``."""
    tag = if_none_match.strip().removeprefix("W/")
    if len(tag) < 3 or tag[0] != '"' or tag[-1] != '"':
        return None
    return decimal(tag[1:-1])


def etag_for(epoch: int) -> str:
    """The ETag of a summary version: its epoch, which is unique per node."""
    return f'"{epoch}"'


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison against a comma-separated If-None-Match list."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        tag = tag.removeprefix("W/")
        if tag == etag:
            return True
    return False


def summary_route(source: SummarySource) -> Route:
    """The server side: a Starlette route serving ``source``'s current summary,
    version 2 to peers that ask for it."""

    async def summary(request: Request) -> Response:
        current = source.current
        if current is None:
            # Only before the publisher's first version; peers retry with backoff.
            return Response("summary not published yet\n", status_code=503,
                            headers={"Retry-After": "1"}, media_type="text/plain")
        payload = source.payload
        etag = etag_for(current.epoch)
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept, If-None-Match"}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        accept = request.headers.get("accept", "")
        if DELTA_MEDIA_TYPE in accept and if_none_match is not None:
            held = _held_epoch(if_none_match)
            delta = None if held is None else source.delta_since(held)
            if delta is not None:
                return Response(delta, media_type=DELTA_MEDIA_TYPE, headers=headers)
        if MEDIA_TYPE_V3 in accept:
            return Response(source.ranged_payload, media_type=MEDIA_TYPE_V3, headers=headers)
        if MEDIA_TYPE_V2 in accept:
            return Response(source.vouched_payload, media_type=MEDIA_TYPE_V2, headers=headers)
        return Response(payload, media_type=MEDIA_TYPE, headers=headers)

    return Route(SUMMARY_PATH, summary, methods=["GET"], name="mesh-summary")


async def fetch_summary(session: aiohttp.ClientSession, http_base: str, held_epoch: int | None,
                        max_bytes: int, *, delta: bool = True, held_m: int | None = None,
                        on_body: Callable[[bool, int], None] | None = None
                        ) -> Summary | SummaryDelta | None:
    """The client side: a peer's summary, a delta from ``held_epoch`` (asked for
    when ``delta`` and the held filter's size ``held_m`` is given, which bounds the
    delta's body), or None when it answers 304 for ``held_epoch``.
    ``on_body(is_delta, size)`` is told the size of every body received.

    Raises FetchError for an answer that cannot be used, SummaryFormatError for
    bytes that do not parse, and aiohttp/timeout errors for transport failures.
    """
    accept = f"{MEDIA_TYPE_V3}, {MEDIA_TYPE_V2}, {MEDIA_TYPE}"
    delta = delta and held_epoch is not None and held_m is not None
    if delta:
        accept = f"{DELTA_MEDIA_TYPE}, {accept}"
    headers = {"Accept": accept}
    if held_epoch is not None:
        headers["If-None-Match"] = etag_for(held_epoch)
    url = http_base + SUMMARY_PATH
    async with session.get(url, headers=headers) as resp:
        if resp.status == 304:
            return None
        if resp.status != 200:
            raise FetchError(f"{url} answered HTTP {resp.status}")
        if resp.content_type not in _MEDIA_TYPES:
            raise FetchError(f"{url} answered {resp.content_type!r}, want one of "
                             f"{', '.join(_MEDIA_TYPES)}")
        is_delta = resp.content_type == DELTA_MEDIA_TYPE
        if is_delta:
            if not delta or held_m is None:
                raise FetchError(f"{url} answered a delta to a request for the whole summary")
            max_bytes = min(max_bytes, max_delta_bytes(held_m))
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise _too_large(f"{url} summary of {resp.content_length} bytes exceeds the limit "
                             f"of {max_bytes}", is_delta, resp.content_length)
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(f"{url} summary exceeds {max_bytes} bytes", is_delta, len(body))
    if on_body is not None:
        on_body(is_delta, len(body))
    if is_delta:
        return SummaryDelta.decode(bytes(body))
    return Summary.decode(bytes(body))
