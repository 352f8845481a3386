"""A store's blobs as sorted arrays: raw digests in one buffer, a packed number each.

A store of 100,000 blobs held them in a dict from raw digest to a packed int: 5 MiB of
table, 6.3 MiB of 32-byte `bytes` objects (72 bytes each with their header) and 3 MiB of
ints, about 16 MiB of a node's 128 MiB. Here each width of digest (32 bytes for sha256,
64 for sha512) is one sorted numpy array of fixed-width byte strings beside an array
of unsigned 64-bit numbers: 40 bytes a blob, 4 MiB at 100,000. Lookups are a binary
search (a few microseconds, against the dict's fraction of one: a stat is followed by
a file open, so it does not show); the table is built once per change of what the store
holds and its digests never change after (only numbers learned later are ORed in), which
is what makes sorted arrays the right shape.

numpy's fixed-width byte strings (``S32``) compare as whole buffers but give back their
elements with trailing NUL bytes stripped, so digests are read out as buffer slices,
never as elements.

Both stores keep their blobs this way (the OCI layout's by the snapshot, containerd's by
image and their union), with a store's key set a :class:`DigestKeys` view over the table
instead of a frozenset of 100,000 strings beside it.
"""

from __future__ import annotations

import itertools
import sys
import threading
from array import array
from collections.abc import Iterable, Iterator, Set
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from meshmirror.oci import mediatypes as mt

_Table = tuple[npt.NDArray[np.bytes_], npt.NDArray[np.uint64]]
_T = TypeVar("_T")

ALGORITHMS = {32: "sha256", 64: "sha512"}  # by raw length: what Digest.parse accepts


def digest_text(raw: bytes) -> str:
    """The key (``sha256:<hex>``) of a raw digest."""
    return f"{ALGORITHMS[len(raw)]}:{raw.hex()}"


def raw_digest(key: str) -> bytes | None:
    """The raw bytes of a digest key; None for anything that is not one in canonical form."""
    algorithm, _, hex_part = key.partition(":")
    try:
        raw = bytes.fromhex(hex_part)
    except ValueError:
        return None
    # fromhex takes upper case and spaces too: only the canonical text is a key.
    if ALGORITHMS.get(len(raw)) != algorithm or raw.hex() != hex_part:
        return None
    return raw


MEDIA_BITS = 16
MEDIA_UNKNOWN = (1 << MEDIA_BITS) - 1  # past the table's bound: told as None
# What a store names at most, and the longest name: the table is never emptied, and
# media types come from manifests anyone can push, so without a bound four 3.5 MB
# manifests of distinct 1 KB types held 24.5 MiB after their images left. Real stores
# meet a dozen types, each well under RFC 6838's 255 characters.
MAX_MEDIA_TYPES = 1024
MAX_MEDIA_TYPE_LENGTH = 255


class MediaTypes:
    """Media types by number, so a blob's is one field of its packed number: a store
    meets a handful. Thread-safe, since the OCI store's loads run in threads."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._numbers: dict[str, int] = {}
        self._lock = threading.Lock()
        # Named first, so a store whose table filled up still walks every manifest.
        for known in sorted(mt.MANIFEST_TYPES | mt.INDEX_TYPES):
            self.number(known)

    def number(self, media_type: str) -> int:
        number = self._numbers.get(media_type)
        if number is None:
            if len(media_type) > MAX_MEDIA_TYPE_LENGTH:
                return MEDIA_UNKNOWN
            with self._lock:
                number = self._numbers.get(media_type)
                if number is None:
                    number = len(self._names) if len(self._names) < MAX_MEDIA_TYPES else (
                        MEDIA_UNKNOWN)
                    if number < MEDIA_UNKNOWN:
                        self._names.append(sys.intern(media_type))
                        self._numbers[self._names[-1]] = number
        return number

    def name(self, packed: int) -> str | None:
        """The media type a packed number's low bits name; None for unknown."""
        number = packed & MEDIA_UNKNOWN
        return None if number == MEDIA_UNKNOWN else self._names[number]


class PackedDigests:
    """A short list of (raw digest, number) pairs, such as a manifest's children, in three
    flat objects: as tuples of `bytes` and ints they were 11 MiB per 100,000."""

    __slots__ = ("_joined", "_values", "_widths")

    def __init__(self, pairs: Iterable[tuple[bytes, int]]) -> None:
        listed = list(pairs)
        self._widths = bytes(len(raw) for raw, _ in listed)
        self._joined = b"".join(raw for raw, _ in listed)
        self._values = array("Q", (value for _, value in listed))

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        start = 0
        for width, value in zip(self._widths, self._values, strict=True):
            yield self._joined[start:start + width], value
            start += width


class DigestTable:
    """Raw digests, each with a number (what the store packs about the blob); immutable."""

    __slots__ = ("_tables",)

    def __init__(self, tables: dict[int, _Table] | None = None) -> None:
        self._tables: dict[int, _Table] = tables or {}

    def get(self, raw: bytes) -> int | None:
        table = self._tables.get(len(raw))
        if table is None:
            return None
        digests, values = table
        at = int(np.searchsorted(digests, np.frombuffer(raw, dtype=digests.dtype)[0]))
        if at < len(digests) and digests[at:at + 1].tobytes() == raw:
            return int(values[at])
        return None

    def __contains__(self, raw: object) -> bool:
        return isinstance(raw, bytes) and self.get(raw) is not None

    def __len__(self) -> int:
        return sum(len(digests) for digests, _ in self._tables.values())

    def __iter__(self) -> Iterator[bytes]:
        for digests, _ in self._tables.values():
            yield from _raws(digests)

    def set_bits(self, raw: bytes, bits: int) -> None:
        """OR ``bits`` into a held digest's number (what a store learns later, such as a
        size): the digests, and so every key view over them, stay as they are."""
        table = self._tables.get(len(raw))
        if table is None:
            return
        digests, values = table
        at = int(np.searchsorted(digests, np.frombuffer(raw, dtype=digests.dtype)[0]))
        if at < len(digests) and digests[at:at + 1].tobytes() == raw:
            values[at] |= np.uint64(bits)

    def carry_bits(self, old: DigestTable, mask: int) -> None:
        """OR into each number here the ``mask`` bits ``old`` holds for the same digest."""
        for width, (digests, values) in self._tables.items():
            theirs = old._tables.get(width)
            if theirs is None or not len(theirs[0]) or not len(digests):
                continue
            at = np.minimum(np.searchsorted(theirs[0], digests), len(theirs[0]) - 1)
            found = theirs[0][at] == digests
            values[found] |= theirs[1][at[found]] & np.uint64(mask)

    def without(self, raw: bytes) -> DigestTable:
        """This table less one digest (a new table; this one is never changed)."""
        tables = dict(self._tables)
        table = tables.get(len(raw))
        if table is not None:
            digests, values = table
            keep = digests != np.frombuffer(raw, dtype=digests.dtype)[0]
            tables[len(raw)] = (digests[keep], values[keep])
        return DigestTable(tables)

    def same_digests(self, other: DigestTable) -> bool:
        """Whether both hold the same digests (their numbers aside)."""
        mine = {width: t[0] for width, t in self._tables.items() if len(t[0])}
        theirs = {width: t[0] for width, t in other._tables.items() if len(t[0])}
        return mine.keys() == theirs.keys() and all(
            np.array_equal(digests, theirs[width]) for width, digests in mine.items())

    def difference(self, other: DigestTable) -> Iterator[bytes]:
        """The digests here and not in ``other``, compared in C over the sorted arrays."""
        for width, (digests, _) in self._tables.items():
            theirs = other._tables.get(width)
            if theirs is None:
                yield from _raws(digests)
            else:
                yield from _raws(np.setdiff1d(digests, theirs[0], assume_unique=True))


def _raws(digests: npt.NDArray[np.bytes_]) -> Iterator[bytes]:
    width = digests.dtype.itemsize
    buffer = digests.view(np.uint8).reshape(-1).data
    for start in range(0, len(buffer), width):
        yield buffer[start:start + width].tobytes()


class DigestTableBuilder:
    """Collects (raw digest, number) pairs in flat buffers, never one object a blob, so
    building a table of 100,000 costs about what the table does; the first number given
    for a digest is the one kept."""

    __slots__ = ("_digests", "_values")

    def __init__(self) -> None:
        self._digests: dict[int, bytearray] = {}
        self._values: dict[int, array[int]] = {}

    def extend(self, table: DigestTable) -> None:
        """Add every digest of ``table`` with its number, a buffer at a time."""
        for width, (digests, values) in table._tables.items():
            if width not in self._digests:
                self._digests[width] = bytearray()
                self._values[width] = array("Q")
            self._digests[width] += digests.tobytes()
            self._values[width].frombytes(values.tobytes())

    def add(self, raw: bytes, value: int) -> None:
        width = len(raw)
        buffer = self._digests.get(width)
        if buffer is None:
            buffer = self._digests[width] = bytearray()
            self._values[width] = array("Q")
        buffer += raw
        self._values[width].append(value)

    def build(self) -> DigestTable:
        tables: dict[int, _Table] = {}
        for width, buffer in self._digests.items():
            digests = np.frombuffer(buffer, dtype=f"S{width}")
            # Stable, so among equal digests the first added comes first and is kept.
            order = np.argsort(digests, kind="stable")
            ordered = digests[order]
            first = np.ones(len(ordered), dtype=bool)
            first[1:] = ordered[1:] != ordered[:-1]
            values = np.frombuffer(self._values[width], dtype=np.uint64)[order]
            if not first.all():
                ordered, values = ordered[first], values[first]
            tables[width] = (ordered, values)
        self._digests.clear()
        self._values.clear()
        return DigestTable(tables)


class DigestKeys(Set[str]):
    """A store's key set as a view over its blob table and its tag keys, which never
    share a key: the table already holds every digest, and a frozenset of their texts
    beside it was a second 4 MiB table (and 12 MiB of text) at 100,000 keys. Digest keys
    are made on iteration; set operations between two views (a subscription's diff
    when what the store holds changed) compare the raw digests in C over the sorted
    arrays, where the element-wise walk took 350 ms at 100,000 keys."""

    __slots__ = ("_blobs", "_tags")

    def __init__(self, blobs: DigestTable, tags: frozenset[str]) -> None:
        self._blobs = blobs
        self._tags = tags

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key in self._tags:
            return True
        raw = raw_digest(key)
        return raw is not None and raw in self._blobs

    def __len__(self) -> int:
        return len(self._blobs) + len(self._tags)

    def __iter__(self) -> Iterator[str]:
        return itertools.chain(map(digest_text, self._blobs), self._tags)

    def __sub__(self, other: Set[Any]) -> Set[str]:
        if not other:  # a first event from an empty baseline: this view, not its strings
            return self
        if isinstance(other, DigestKeys):
            return frozenset(itertools.chain(
                map(digest_text, self._blobs.difference(other._blobs)),
                self._tags - other._tags))
        return frozenset(key for key in self if key not in other)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DigestKeys):
            return self._blobs.same_digests(other._blobs) and self._tags == other._tags
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like Set: unhashable

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> frozenset[_T]:
        """What set operations build: a plain frozenset, not another view."""
        return frozenset(it)
