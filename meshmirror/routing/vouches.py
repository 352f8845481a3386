"""Vouches: which repositories a member learned, from the upstream itself, are public.

A node that joins during an upstream outage knows no repository's visibility and
(with ``--private-images-unknown deny``) would refuse every one, exactly when the
mesh should save its pulls. Its peers do know: they asked the upstream
anonymously while it answered. So each node publishes, with its summary, the
repositories it has itself heard the upstream serve without credentials, each
with the time of that answer; a node with no verdict of its own may accept them
during an outage (see `meshmirror.mirror.visibility` for who trusts what).

Compact and bounded. A vouch is a 64-bit hash of ``registry/repository`` and a
32-bit Unix time: 12 bytes on the wire and in memory (two numpy arrays per
member, searched by bisection), so whatever a member sends costs a receiver at
most `MAX_VOUCHES` x 12 bytes, and a receiver ignores vouches older than
`MAX_VOUCH_AGE`. Names are not sent: the receiver asks about a repository it
was asked for, so the hash of that name is all it needs, and no member can make
others store strings. A rogue member can vouch for anything it likes, including
a private repository; that is why vouches are trusted only in an encrypted mesh
and why the holder of a private image, which knows it is private, refuses it to
peers whatever anyone vouched. A node vouches only for what it heard from the
upstream itself, never for what it was told by peers, so one rogue vouch does
not spread through honest members.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# What one member can make another store: 512 x 12 bytes = 6 KiB.
MAX_VOUCHES = 512
# A vouch older than this is ignored: a week covers a long outage and a quiet
# repository, and keeps a repository made private long ago from being vouched for
# by a member that has not asked since.
MAX_VOUCH_AGE = 7 * 24 * 3600.0

_COUNT = struct.Struct(">I")
_ENTRY = np.dtype([("key", ">u8"), ("checked", ">u4")])
ENTRY_SIZE = _ENTRY.itemsize


class VouchFormatError(ValueError):
    """Bytes that are not a well-formed vouch section."""


def vouch_key(registry: str, repository: str) -> int:
    """The 64-bit key every node computes for a repository: a hash of its full name."""
    name = f"{registry}/{repository}".encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True, eq=False)
class Vouches:
    """One member's vouches: keys sorted and unique, each with its answer's Unix time."""

    keys: np.ndarray = field(repr=False)
    checked: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, entries: Iterable[tuple[int, float]]) -> Vouches:
        """From (key, checked Unix time) pairs: the newest `MAX_VOUCHES`, one per key."""
        newest: dict[int, int] = {}
        for key, when in entries:
            stamp = max(0, min(int(when), 0xFFFFFFFF))
            if stamp > newest.get(key, -1):
                newest[key] = stamp
        kept = sorted(newest.items(), key=lambda item: item[1], reverse=True)[:MAX_VOUCHES]
        kept.sort()
        return cls(np.array([key for key, _ in kept], dtype=np.uint64),
                   np.array([stamp for _, stamp in kept], dtype=np.uint32))

    def __len__(self) -> int:
        return len(self.keys)

    def checked_at(self, key: int) -> float | None:
        """The Unix time of this member's vouch for ``key``, if it vouches for it."""
        index = int(np.searchsorted(self.keys, np.uint64(key)))
        if index < len(self.keys) and int(self.keys[index]) == key:
            return float(self.checked[index])
        return None

    def encode(self) -> bytes:
        """``count u32`` then ``count`` x (``key u64``, ``checked u32``), big-endian."""
        entries = np.empty(len(self.keys), dtype=_ENTRY)
        entries["key"] = self.keys
        entries["checked"] = self.checked
        return _COUNT.pack(len(self.keys)) + entries.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Vouches:
        """Parse a vouch section; VouchFormatError says what is wrong with it."""
        if len(data) < _COUNT.size:
            raise VouchFormatError(f"vouch section of {len(data)} bytes has no count")
        (count,) = _COUNT.unpack_from(data)
        if count > MAX_VOUCHES:
            raise VouchFormatError(f"{count} vouches, at most {MAX_VOUCHES} are accepted")
        want = _COUNT.size + count * ENTRY_SIZE
        if len(data) != want:
            raise VouchFormatError(f"vouch section of {count} entries must be {want} bytes, "
                                   f"got {len(data)}")
        entries = np.frombuffer(data, dtype=_ENTRY, count=count, offset=_COUNT.size)
        keys = entries["key"].astype(np.uint64)
        if count > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise VouchFormatError("vouch keys are not sorted and unique")
        return cls(keys, entries["checked"].astype(np.uint32))


NO_VOUCHES = Vouches(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint32))


class VouchBook:
    """Every alive member's latest vouches, as the directory installs them.

    Bounded by construction: one `Vouches` per member (at most `MAX_VOUCHES`
    entries), replaced by the member's next summary and dropped when it leaves.
    """

    def __init__(self) -> None:
        self._members: dict[str, Vouches] = {}

    def set_vouches(self, member: str, vouches: Vouches) -> None:
        if len(vouches):
            self._members[member] = vouches
        else:
            self._members.pop(member, None)

    def drop(self, member: str) -> None:
        self._members.pop(member, None)

    def newest(self, registry: str, repository: str, now: float) -> float | None:
        """The Unix time of the newest vouch for the repository within `MAX_VOUCH_AGE`
        of ``now``, or None when nobody vouches. A date in the future (clock skew,
        or a lie) counts as ``now``: it can make a vouch no younger than fresh."""
        key = vouch_key(registry, repository)
        best: float | None = None
        for vouches in self._members.values():
            checked = vouches.checked_at(key)
            if checked is None:
                continue
            checked = min(checked, now)
            if now - checked <= MAX_VOUCH_AGE and (best is None or checked > best):
                best = checked
        return best

    def __len__(self) -> int:
        return sum(len(vouches) for vouches in self._members.values())
