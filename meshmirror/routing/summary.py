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

HTTP: peers usually already hold the previous version, so a response carries
``ETag: "<epoch>"`` and a matching ``If-None-Match`` costs a 304 with no body.
The server sends the publisher's pre-encoded payload: serving never re-encodes.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshmirror.routing.bloom import BloomFilter, check_geometry
from meshmirror.routing.vouches import NO_VOUCHES, Vouches, VouchFormatError

MEDIA_TYPE = "application/vnd.meshmirror.summary.v1"
MEDIA_TYPE_V2 = "application/vnd.meshmirror.summary.v2"
SUMMARY_PATH = "/_mesh/v1/summary"
MAGIC = b"MMSF"
VERSION = 1
VERSION_VOUCHES = 2
_HEADER = struct.Struct(">4sBBHQQQQ")
HEADER_SIZE = _HEADER.size
_MASK64 = (1 << 64) - 1


def wall_clock_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch: the unit of ``born_at_ms`` and epochs."""
    return time.time_ns() // 1_000_000


class SummaryFormatError(ValueError):
    """Bytes that are not a well-formed version-1 summary."""


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

    def __post_init__(self) -> None:
        check_geometry(self.m, self.k)
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
        return BloomFilter(self.m, self.k, arr)

    def __contains__(self, key: object) -> bool:
        return key in self.filter()

    def encode(self, version: int = VERSION) -> bytes:
        """Version 1 (no vouches) or `VERSION_VOUCHES` (with them)."""
        header = _HEADER.pack(MAGIC, version, self.k, 0, self.epoch, self.m, self.count,
                              self.born_at_ms)
        if version == VERSION_VOUCHES:
            return header + self.bits + self.vouches.encode()
        return header + self.bits

    @classmethod
    def decode(cls, data: bytes) -> Summary:
        """Parse a version-1 or -2 summary; SummaryFormatError says exactly what is wrong."""
        if len(data) < HEADER_SIZE:
            raise SummaryFormatError(
                f"summary too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
        magic, version, k, reserved, epoch, m, count, born_at = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SummaryFormatError(f"not a meshmirror summary: magic {magic!r}, want {MAGIC!r}")
        if version not in (VERSION, VERSION_VOUCHES):
            raise SummaryFormatError(f"unsupported summary version {version}, this node reads "
                                     f"{VERSION} and {VERSION_VOUCHES}")
        if reserved != 0:
            raise SummaryFormatError(f"reserved header field is {reserved}, want 0")
        try:
            check_geometry(m, k)
        except ValueError as err:
            raise SummaryFormatError(str(err)) from err
        want = HEADER_SIZE + m // 8
        vouches = NO_VOUCHES
        if version == VERSION_VOUCHES:
            if len(data) < want:
                raise SummaryFormatError(
                    f"summary of m={m} bits needs at least {want} bytes, got {len(data)}")
            try:
                vouches = Vouches.decode(bytes(data[want:]))
            except VouchFormatError as err:
                raise SummaryFormatError(str(err)) from err
        elif len(data) != want:
            raise SummaryFormatError(
                f"summary of m={m} bits must be {want} bytes, got {len(data)}")
        return cls(epoch=epoch, k=k, m=m, count=count, born_at_ms=born_at,
                   bits=bytes(data[HEADER_SIZE:want]), vouches=vouches)


class FetchError(Exception):
    """A peer's summary response that cannot be used (status, type, size)."""


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
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept"}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        if MEDIA_TYPE_V2 in request.headers.get("accept", ""):
            return Response(source.vouched_payload, media_type=MEDIA_TYPE_V2, headers=headers)
        return Response(payload, media_type=MEDIA_TYPE, headers=headers)

    return Route(SUMMARY_PATH, summary, methods=["GET"], name="mesh-summary")


async def fetch_summary(session: aiohttp.ClientSession, http_base: str, held_epoch: int | None,
                        max_bytes: int) -> Summary | None:
    """The client side: a peer's summary, or None when it answers 304 for ``held_epoch``.

    Raises FetchError for an answer that cannot be used, SummaryFormatError for
    bytes that do not parse, and aiohttp/timeout errors for transport failures.
    """
    headers = {"Accept": f"{MEDIA_TYPE_V2}, {MEDIA_TYPE}"}
    if held_epoch is not None:
        headers["If-None-Match"] = etag_for(held_epoch)
    url = http_base + SUMMARY_PATH
    async with session.get(url, headers=headers) as resp:
        if resp.status == 304:
            return None
        if resp.status != 200:
            raise FetchError(f"{url} answered HTTP {resp.status}")
        if resp.content_type not in (MEDIA_TYPE, MEDIA_TYPE_V2):
            raise FetchError(f"{url} answered {resp.content_type!r}, want {MEDIA_TYPE_V2} "
                             f"or {MEDIA_TYPE}")
        if resp.content_length is not None and resp.content_length > max_bytes:
            raise FetchError(f"{url} summary of {resp.content_length} bytes exceeds the limit")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"{url} summary exceeds {max_bytes} bytes")
    return Summary.decode(bytes(body))
