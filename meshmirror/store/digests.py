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
import weakref
from array import array
from collections.abc import Iterable, Iterator, Set
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from meshmirror.oci import mediatypes as mt

_Table = tuple[npt.NDArray[np.bytes_], npt.NDArray[np.uint64]]
_Counts = npt.NDArray[np.uint32]
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

    def __len__(self) -> int:
        return len(self._widths)

    def __eq__(self, other: object) -> bool:
        """The same pairs: a re-walked image whose record equals the one held moves
        nothing."""
        if not isinstance(other, PackedDigests):
            return NotImplemented
        return other is self or (self._joined == other._joined and self._widths == other._widths
                                 and self._values == other._values)

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, raw: object) -> bool:
        """A search of the joined buffer (in C), each hit checked to start a digest of
        that width: asking every image whether it holds a deleted blob is one of these
        per image, 1,000 of them well under a millisecond."""
        if not isinstance(raw, bytes) or not raw:
            return False
        at = self._joined.find(raw)
        while at >= 0:
            start = 0
            for width in self._widths:
                if start >= at:
                    if start == at and width == len(raw):
                        return True
                    break
                start += width
            at = self._joined.find(raw, at + 1)
        return False


class DigestTable:
    """Raw digests, each with a number (what the store packs about the blob); immutable."""

    __slots__ = ("__weakref__", "_step", "_tables")

    def __init__(self, tables: dict[int, _Table] | None = None) -> None:
        self._tables: dict[int, _Table] = tables or {}
        self._step: _Step | None = None  # set by DigestUnion on the tables it makes

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

    def same_digests(self, other: DigestTable) -> bool:
        """Whether both hold the same digests (their numbers aside)."""
        if other is self:
            return True
        mine = {width: t[0] for width, t in self._tables.items() if len(t[0])}
        theirs = {width: t[0] for width, t in other._tables.items() if len(t[0])}
        return mine.keys() == theirs.keys() and all(
            np.array_equal(digests, theirs[width]) for width, digests in mine.items())

    def difference(self, other: DigestTable) -> Iterator[bytes]:
        """The digests here and not in ``other``."""
        return self.changes(other)[0]

    def changes(self, old: DigestTable) -> tuple[Iterator[bytes], Iterator[bytes]]:
        """The digests here and not in ``old``, and those in ``old`` and not here: from the
        steps a `DigestUnion` took from ``old`` to here when it did (what moved, 0.1 ms),
        else from one search over the sorted arrays, where a width whose array both share
        costs nothing (np.setdiff1d, both ways, sorted both arrays twice: 20-30 ms at
        100,000 keys on the event loop; this search 2-3)."""
        steps = self._steps_since(old)
        if steps is not None:
            return _compose(steps)
        added: list[npt.NDArray[np.bytes_]] = []
        removed: list[npt.NDArray[np.bytes_]] = []
        for width in sorted(self._tables.keys() | old._tables.keys()):
            mine = self._tables.get(width)
            theirs = old._tables.get(width)
            if theirs is None:
                assert mine is not None
                added.append(mine[0])
            elif mine is None:
                removed.append(theirs[0])
            elif mine[0] is not theirs[0]:
                at, held = _locate(mine[0], theirs[0])
                added.append(mine[0][~held])
                kept = np.zeros(len(theirs[0]), dtype=bool)
                kept[at[held]] = True
                removed.append(theirs[0][~kept])
        return (itertools.chain.from_iterable(map(_raws, added)),
                itertools.chain.from_iterable(map(_raws, removed)))

    def _steps_since(self, old: DigestTable) -> list[_Step] | None:
        """The steps by which a union made this table from ``old``, oldest first; None
        when it did not, or when that was longer ago than its steps are kept."""
        steps: list[_Step] = []
        step = self._step
        while step is not None:
            steps.append(step)
            if step.before() is old:
                return steps[::-1]
            step = step.previous
        return None


# How far back a union's steps are kept: a subscriber a few events behind (a burst of
# image events during a pull) walks them; past these the search is cheaper.
_MAX_STEPS = 16
_MAX_MOVED = 4096


class _Step:
    """What a `DigestUnion` replacement added to and removed from the table before it,
    and the step before that: a subscription one or a few events behind (the
    publisher's, on each image event) gets its diff from the few digests that moved
    instead of a search over every digest, 2-3 ms at 100,000 keys against 0.1. The
    tables themselves are held weakly, so a step costs what moved, never a table; only
    the last `_MAX_STEPS` (and `_MAX_MOVED` digests) stay linked."""

    __slots__ = ("added", "before", "previous", "removed", "size")

    def __init__(self, before: DigestTable, added: list[npt.NDArray[np.bytes_]],
                 removed: list[npt.NDArray[np.bytes_]]) -> None:
        self.before = weakref.ref(before)
        self.added = added
        self.removed = removed
        self.size = sum(map(len, added)) + sum(map(len, removed))
        self.previous = before._step
        step, kept, moved = self, 1, self.size
        while step.previous is not None:
            kept += 1
            moved += step.previous.size
            if kept > _MAX_STEPS or moved > _MAX_MOVED:
                step.previous = None
                break
            step = step.previous


def _compose(steps: list[_Step]) -> tuple[Iterator[bytes], Iterator[bytes]]:
    """The digests added and removed over ``steps`` in order, a digest removed and
    added back (or the other way) being neither."""
    added: set[bytes] = set()
    removed: set[bytes] = set()
    for step in steps:
        for raw in itertools.chain.from_iterable(map(_raws, step.added)):
            if raw in removed:
                removed.discard(raw)
            else:
                added.add(raw)
        for raw in itertools.chain.from_iterable(map(_raws, step.removed)):
            if raw in added:
                added.discard(raw)
            else:
                removed.add(raw)
    return iter(added), iter(removed)


def _locate(keys: npt.NDArray[np.bytes_], digests: npt.NDArray[np.bytes_]
            ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Where each of ``keys`` (sorted, unique) would go in the sorted ``digests``, and
    whether it is there.

    A binary search over 32-byte strings and their comparison as strings took 3 ms for
    100,000 keys; over their first 8 bytes as numbers (in the same order, being
    big-endian) and a comparison 8 bytes at a time, 1.5. Random digests almost never
    share those 8 bytes; where a key is not the digest its prefix led to but has its
    prefix (which a crafted image could arrange), that key is searched again in full:
    the answer, and the place a missing key goes, are exact either way.
    """
    if len(keys) < 64 or not len(digests) or keys.dtype.itemsize % 8:
        # Few keys: the prefix arrays cost more than they save (and a digest's width is
        # always a multiple of 8 bytes, but a lookup may be given any).
        at = np.searchsorted(digests, keys)
        return at, _same(keys, digests, at)
    theirs = _prefixes(digests)
    mine = _prefixes(keys)
    if len(keys) * 8 < len(digests):
        at = np.searchsorted(theirs, mine)
    else:
        # Of about equal length (two views of one store): where each would go is its
        # rank among both less its rank among ``keys``, from a stable sort of the two
        # runs (one merge: 0.5 ms against the search's 1.2). Stable, so a key comes
        # before a digest with its prefix, as searchsorted's left side has it.
        both = np.argsort(np.concatenate((mine, theirs)), kind="stable")
        rank = np.empty_like(both)
        rank[both] = np.arange(len(both))
        at = rank[:len(keys)] - np.arange(len(keys))
    held = _same(keys, digests, at)
    # A key not found where a digest with its prefix is: the one it is, or the place it
    # goes, is among those with that prefix, which only a full search tells.
    again = np.flatnonzero(~held & (at < len(digests))
                           & (theirs[np.minimum(at, len(digests) - 1)] == mine))
    if len(again):
        at[again] = np.searchsorted(digests, keys[again])
        held[again] = _same(keys[again], digests, at[again])
    return at, held


def _same(keys: npt.NDArray[np.bytes_], digests: npt.NDArray[np.bytes_],
          at: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Whether each key is the digest at its position (none is past the end)."""
    same = at < len(digests)
    if not len(digests):
        return same
    if keys.dtype.itemsize % 8:
        same[same] = digests[at[same]] == keys[same]
        return same
    words = keys.dtype.itemsize // 8
    mine = np.ascontiguousarray(keys).view(np.uint64).reshape(-1, words)
    theirs = np.take(np.ascontiguousarray(digests).view(np.uint64).reshape(-1, words),
                     np.minimum(at, len(digests) - 1), axis=0)
    for column in range(words):  # column by column: a row-wise all() was 6 times slower
        same &= mine[:, column] == theirs[:, column]
    return same


def _prefixes(digests: npt.NDArray[np.bytes_]) -> npt.NDArray[np.uint64]:
    """Each digest's first 8 bytes as a number, ordered as the digests are."""
    words = np.ascontiguousarray(digests).view(">u8").reshape(len(digests), -1)
    return words[:, 0].astype(np.uint64)


def _raws(digests: npt.NDArray[np.bytes_]) -> Iterator[bytes]:
    width = digests.dtype.itemsize
    buffer = digests.view(np.uint8).reshape(-1).data
    for start in range(0, len(buffer), width):
        yield buffer[start:start + width].tobytes()


class DigestSet:
    """Raw digests collected only to be asked about (containerd's content listing, which
    a full sync checks each walked blob against), sorted in place in the buffer they
    were collected in: 3.2 MiB at 100,000 digests, where a `DigestTable` built from
    them (numbers, a sort order, copies) took three times that at its peak."""

    __slots__ = ("_buffers", "_sorted")

    def __init__(self) -> None:
        self._buffers: dict[int, bytearray] = {}
        self._sorted: dict[int, npt.NDArray[np.bytes_]] | None = None

    def add(self, raw: bytes) -> None:
        if self._sorted is not None:
            raise ValueError("a DigestSet is sealed by its first lookup")
        buffer = self._buffers.get(len(raw))
        if buffer is None:
            buffer = self._buffers[len(raw)] = bytearray()
        buffer += raw

    def __contains__(self, raw: object) -> bool:
        if not isinstance(raw, bytes):
            return False
        if self._sorted is None:
            self._sorted = {}
            for width, buffer in self._buffers.items():
                digests = np.frombuffer(buffer, dtype=f"S{width}")
                digests.sort()  # in the bytearray itself: no copy
                self._sorted[width] = digests
        held = self._sorted.get(len(raw))
        if held is None or not len(held):
            return False
        at = int(np.searchsorted(held, np.frombuffer(raw, dtype=held.dtype)[0]))
        return at < len(held) and held[at:at + 1].tobytes() == raw


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

    def extend_packed(self, packed: PackedDigests, skip: Set[bytes] = frozenset()) -> None:
        """Add each pair of ``packed`` but those in ``skip``: whole buffers at once when
        it holds digests of one width and skips none (a manifest's children, always)."""
        widths = packed._widths
        if not skip and widths and widths.count(widths[0]) == len(widths):
            width = widths[0]
            if width not in self._digests:
                self._digests[width] = bytearray()
                self._values[width] = array("Q")
            self._digests[width] += packed._joined
            self._values[width].extend(packed._values)
            return
        for raw, value in packed:
            if raw not in skip:
                self.add(raw, value)

    def add(self, raw: bytes, value: int) -> None:
        width = len(raw)
        buffer = self._digests.get(width)
        if buffer is None:
            buffer = self._digests[width] = bytearray()
            self._values[width] = array("Q")
        buffer += raw
        self._values[width].append(value)

    def build(self) -> DigestTable:
        return self.build_counted()[0]

    def build_counted(self) -> tuple[DigestTable, dict[int, _Counts]]:
        """The table, and how many times each of its digests was added (what a
        `DigestUnion` starts from)."""
        tables: dict[int, _Table] = {}
        counts: dict[int, _Counts] = {}
        for width, buffer in self._digests.items():
            digests = np.frombuffer(buffer, dtype=f"S{width}")
            # Stable, so among equal digests the first added comes first and is kept.
            order = np.argsort(digests, kind="stable")
            ordered = digests[order]
            first = np.ones(len(ordered), dtype=bool)
            first[1:] = ordered[1:] != ordered[:-1]
            values = np.frombuffer(self._values[width], dtype=np.uint64)[order]
            del order
            if first.all():
                counts[width] = np.ones(len(ordered), dtype=np.uint32)
            else:
                ordered, values = ordered[first], values[first]
                starts = np.flatnonzero(first)
                # Written into the counts in place: a whole int64 temporary at 100,000
                # digests raised the build's peak by another 0.8 MB.
                counts[width] = held = np.empty(len(starts), dtype=np.uint32)
                np.subtract(starts[1:], starts[:-1], out=held[:-1], casting="unsafe")
                held[-1] = len(first) - starts[-1]
            tables[width] = (ordered, values)
        self._digests.clear()
        self._values.clear()
        return DigestTable(tables), counts


class DigestUnion:
    """The union of tables that each change whole (containerd's images), with how many
    of them hold each digest, so that replacing one costs what it holds and one move of
    the arrays. Rebuilt from every image after each image event, the union took tens of
    ms at 100,000 keys (a sort of all of them) on the event loop that serves requests.

    The table handed out is never changed but by `DigestTable.set_bits`: a change of
    digests makes new arrays, so a key view over an earlier table (a subscriber's
    baseline) still holds what it held, and each new table records the step it came by
    (see `_Step`), which `DigestTable.changes` then walks instead of searching. The
    counts, 4 bytes a digest, are the union's own and change in place.
    """

    __slots__ = ("_counts", "_table")

    def __init__(self, tables: Iterable[DigestTable] | DigestTableBuilder = ()) -> None:
        """From the members' tables, or from a builder holding what they add up to
        (digests added once per member that holds them)."""
        if isinstance(tables, DigestTableBuilder):
            builder = tables
        else:
            builder = DigestTableBuilder()
            for table in tables:
                builder.extend(table)
        self._table, self._counts = builder.build_counted()

    @property
    def table(self) -> DigestTable:
        return self._table

    def replace(self, old: DigestTable | None, new: DigestTable | None) -> None:
        """Count one member's ``new`` table in and its ``old`` one out. A digest the union
        gains takes its number from ``new``; one it already held keeps its own, with the
        bits learned since (first seen wins, as in the builder)."""
        if old is new:  # the same table again: nothing to count
            return
        before = {} if old is None else old._tables
        after = {} if new is None else new._tables
        changed = dict(self._table._tables)
        added: list[npt.NDArray[np.bytes_]] = []
        removed: list[npt.NDArray[np.bytes_]] = []
        for width in sorted(before.keys() | after.keys()):
            mine = before.get(width)
            theirs = after.get(width)
            if mine is not None and theirs is not None:
                gone = mine[0][~_locate(mine[0], theirs[0])[1]]
                fresh = ~_locate(theirs[0], mine[0])[1]
                came, came_values = theirs[0][fresh], theirs[1][fresh]
            elif mine is not None:
                gone, came, came_values = mine[0], mine[0][:0], mine[1][:0]
            else:
                assert theirs is not None
                gone, (came, came_values) = theirs[0][:0], theirs
            if len(gone) or len(came):
                self._apply(changed, width, gone, came, came_values, added, removed)
        if added or removed:
            table = DigestTable(changed)
            table._step = _Step(self._table, added, removed)
            self._table = table

    def _apply(self, tables: dict[int, _Table], width: int, gone: npt.NDArray[np.bytes_],
               came: npt.NDArray[np.bytes_], came_values: npt.NDArray[np.uint64],
               added: list[npt.NDArray[np.bytes_]], removed: list[npt.NDArray[np.bytes_]]
               ) -> None:
        """Count ``gone`` out of and ``came`` into one width's arrays, both sorted and
        unique; writes a new pair into ``tables``, and what left the union or arrived
        into ``removed`` and ``added``, when digests did."""
        digests, values = tables.get(width) or (came[:0], came_values[:0])
        counts = self._counts.get(width, np.zeros(0, dtype=np.uint32))
        before = digests
        if len(gone):
            at, held = _locate(gone, digests)
            at = at[held]
            counts[at] -= 1
            empty = at[counts[at] == 0]
            if len(empty):
                removed.append(digests[empty])
                digests, values = np.delete(digests, empty), np.delete(values, empty)
                counts = np.delete(counts, empty)
        if len(came):
            at, held = _locate(came, digests)
            counts[at[held]] += 1
            if not held.all():
                at, new = at[~held], ~held
                added.append(came[new])
                digests = np.insert(digests, at, came[new])
                values = np.insert(values, at, came_values[new])
                counts = np.insert(counts, at, np.uint32(1))
        self._counts[width] = counts
        if digests is not before:
            if len(digests):
                tables[width] = (digests, values)
            else:
                tables.pop(width, None)
                del self._counts[width]


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

    def changes(self, old: Set[str]) -> tuple[Set[str], Set[str]]:
        """``(self - old, old - self)``; between two views over tables from one search
        (what a subscription reports when the store's key set changed)."""
        if not isinstance(old, DigestKeys) or not old:
            return self - old, old - self
        added, removed = self._blobs.changes(old._blobs)
        return (frozenset(itertools.chain(map(digest_text, added), self._tags - old._tags)),
                frozenset(itertools.chain(map(digest_text, removed), old._tags - self._tags)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DigestKeys):
            return self._blobs.same_digests(other._blobs) and self._tags == other._tags
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like Set: unhashable

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> frozenset[_T]:
        """What set operations build: a plain frozenset, not another view."""
        return frozenset(it)
