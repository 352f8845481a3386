"""A store's blobs as sorted arrays: raw digests in one buffer, a packed number each.

A store of 100,000 blobs held them in a dict from raw digest to a packed int: 5 MiB of
table, 6.3 MiB of 32-byte `bytes` objects (72 bytes each with their header) and 3 MiB of
ints, about 16 MiB of a node's 128 MiB. Here each width of digest (32 bytes for sha256,
64 for sha512) is one sorted numpy array of fixed-width byte strings beside an array
of unsigned 64-bit numbers: 40 bytes a blob, 4 MiB at 100,000. Lookups are a binary
search (a few microseconds, against the dict's fraction of one: a stat is followed by
a file open, so it does not show); the table is built once per change of what the store
holds and never mutated, which is what makes sorted arrays the right shape.

numpy's fixed-width byte strings (``S32``) compare as whole buffers but give back their
elements with trailing NUL bytes stripped, so digests are read out as buffer slices,
never as elements.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

_Table = tuple[npt.NDArray[np.bytes_], npt.NDArray[np.uint64]]


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

    def same_digests(self, other: DigestTable) -> bool:
        """Whether both hold the same digests (their numbers aside)."""
        return self._tables.keys() == other._tables.keys() and all(
            np.array_equal(digests, other._tables[width][0])
            for width, (digests, _) in self._tables.items())

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
