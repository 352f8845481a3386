"""Bloom filters whose positions any peer computes the same way.

Hashing is deterministic across processes and machines (Python's ``hash()`` is
salted per process and must never be used): a digest key is already a uniform
hash, so its own bytes are used; any other key is hashed with sha256. The first
16 bytes give two 64-bit values ``h1``, ``h2`` (``h2`` forced odd), and bit
``i`` of ``k`` comes from the 64-bit sum ``x = h1 + i*h2`` (Kirsch-Mitzenmacher
double hashing), reduced to ``[0, m)`` one of two ways:

* `RANGE` (the default): Lemire's multiply-shift, ``((x >> 32) * m) >> 32``.
  Any ``m`` that is a multiple of 8 works, so a filter is sized to exactly what
  its keys need (9.6 bits per key at 1%) instead of the next power of two, which
  cost 10.5-17.5 bits per key; it is one multiply and one shift, as fast as a mask.
* `MASK` (the original, wire versions 1 and 2): ``x & (m - 1)`` with ``m`` a
  power of two. Still built and served for peers that only read those versions.

Either way a key's positions in *any* filter come from one hash, which lets the
router test a key against many peers' filters at once.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Iterable

import numpy as np
import numpy.typing as npt

_MASK64 = (1 << 64) - 1

MIN_BITS = 1 << 10
# 2^32 bits = 512 MiB: far beyond any real node (50,000 keys need 2^19 bits) but
# a hard ceiling so a hostile header cannot make a peer allocate without bound.
MAX_BITS = 1 << 32
MAX_K = 32
# Sized for at least this many keys so an empty or tiny store does not rebuild
# on every few additions.
MIN_CAPACITY = 256

# How a 64-bit hash sum becomes a position in [0, m): see the module docstring.
MASK = 0
RANGE = 1
REDUCTIONS = (MASK, RANGE)
RANGE_MARGIN = 1.04
BUILD_BATCH = 16_384

U8Array = npt.NDArray[np.uint8]


# Exactly the digests Digest.parse accepts; matched here without building a
# Digest because hashing every key of a 50,000-key store is the build's hot loop.
DIGEST_KEY = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def key_seed(key: str) -> bytes:
    """16 uniformly distributed bytes for ``key``: a digest's own, else sha256's."""
    if DIGEST_KEY.fullmatch(key):
        return bytes.fromhex(key[7:39])
    return hashlib.sha256(key.encode("utf-8")).digest()[:16]


def key_hashes(key: str) -> tuple[int, int]:
    """The two 64-bit hashes every filter position of ``key`` derives from."""
    raw = key_seed(key)
    return int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:16], "little") | 1


def positions(h1: int, h2: int, k: int, m: int, reduction: int = RANGE) -> list[int]:
    """Bit positions of a key in a filter of ``m`` bits."""
    sums = [(h1 + i * h2) & _MASK64 for i in range(k)]
    if reduction == MASK:
        mask = m - 1
        return [x & mask for x in sums]
    return [((x >> 32) * m) >> 32 for x in sums]


U64Array = npt.NDArray[np.uint64]


def reduce_sums(sums: U64Array, m: U64Array | np.uint64, reduction: int) -> U64Array:
    """Vectorised `positions`: 64-bit hash sums to positions in filters of ``m`` bits.

    ``(x >> 32) * m`` fits in 64 bits because ``m <= 2^32``, so numpy's uint64
    arithmetic computes Lemire's reduction exactly."""
    if reduction == MASK:
        result: U64Array = sums & (m - np.uint64(1))
    else:
        result = ((sums >> np.uint64(32)) * m) >> np.uint64(32)
    return result


def optimal_k(fp_rate: float) -> int:
    """Hash count for a target false-positive rate: ceil(log2(1/p)), 7 for 1%."""
    check_fp_rate(fp_rate)
    return max(1, min(MAX_K, math.ceil(-math.log2(fp_rate))))


def bits_for(capacity: int, fp_rate: float, reduction: int = RANGE) -> int:
    """Bit count holding ``capacity`` keys at ``fp_rate`` or better.

    The optimum is n*ln(1/p)/ln(2)^2 (9.6 bits per key at 1%). `RANGE` filters
    take it plus `RANGE_MARGIN`, rounded up to whole 64-bit words: at the bare
    optimum the rate is p only on average (about 1.0% at 1%, with k rounded up
    to 7), and ``fp_rate`` is meant as a ceiling, so 4% more bits (10.0 per key)
    bring it to about 0.83%. `MASK` filters round up to a power of two, which
    costs up to 2x.
    """
    check_fp_rate(fp_rate)
    n = max(capacity, MIN_CAPACITY)
    ideal = n * math.log(1 / fp_rate) / (math.log(2) ** 2)
    if reduction == MASK:
        m = 1 << max(0, math.ceil(math.log2(ideal)))
    else:
        m = 64 * math.ceil(ideal * RANGE_MARGIN / 64)
    return max(MIN_BITS, min(MAX_BITS, m))


def check_fp_rate(fp_rate: float) -> None:
    if not 0 < fp_rate < 1:
        raise ValueError(f"false-positive rate must be between 0 and 1 exclusive, got {fp_rate}")


def check_geometry(m: int, k: int, reduction: int = RANGE) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown position reduction {reduction}")
    if reduction == MASK and (m < 8 or m > MAX_BITS or m & (m - 1)):
        raise ValueError(f"filter size m={m} is not a power of two from 8 to {MAX_BITS}")
    if m < 8 or m > MAX_BITS or m % 8:
        raise ValueError(f"filter size m={m} is not a multiple of 8 from 8 to {MAX_BITS}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"hash count k={k} out of range 1-{MAX_K}")


class BloomFilter:
    """A mutable Bloom filter of ``m`` bits and ``k`` hashes; see the module docstring
    for ``reduction``."""

    __slots__ = ("_bits", "k", "m", "reduction")

    def __init__(self, m: int, k: int, bits: U8Array | None = None,
                 reduction: int = RANGE) -> None:
        check_geometry(m, k, reduction)
        self.m = m
        self.k = k
        self.reduction = reduction
        if bits is None:
            self._bits: U8Array = np.zeros(m // 8, dtype=np.uint8)
        else:
            if bits.shape != (m // 8,) or bits.dtype != np.uint8:
                raise ValueError(f"bit array must be {m // 8} uint8 values")
            self._bits = bits

    @classmethod
    def for_capacity(cls, capacity: int, fp_rate: float = 0.01,
                     reduction: int = RANGE) -> BloomFilter:
        return cls(bits_for(capacity, fp_rate, reduction), optimal_k(fp_rate),
                   reduction=reduction)

    @classmethod
    def build(cls, keys: Iterable[str], fp_rate: float = 0.01,
              capacity: int | None = None, reduction: int = RANGE) -> BloomFilter:
        """A filter holding ``keys``, sized for ``capacity`` (default: their count)."""
        # A store's key set may make its keys' text as it is walked (the OCI store
        # does): a list of them would hold 12 MiB more at 100,000 keys, so a
        # collection is walked once, in `add_many`'s batches.
        key_list = keys if isinstance(keys, Collection) else list(keys)
        bloom = cls.for_capacity(len(key_list) if capacity is None else capacity, fp_rate,
                                 reduction)
        bloom.add_many(key_list)
        return bloom

    @property
    def bits(self) -> U8Array:
        """The live bit array (not a copy); bit i at byte i>>3, bit i&7."""
        return self._bits

    def add(self, key: str) -> None:
        h1, h2 = key_hashes(key)
        for pos in positions(h1, h2, self.k, self.m, self.reduction):
            self._bits[pos >> 3] |= np.uint8(1 << (pos & 7))

    def key_positions(self, keys: Iterable[str]) -> U64Array:
        """Every bit position of ``keys`` (k per key, unsorted, with repeats)."""
        seeds = b"".join([key_seed(key) for key in keys])
        if not seeds:
            return np.zeros(0, dtype=np.uint64)
        hashes = np.frombuffer(seeds, dtype="<u8").astype(np.uint64).reshape(-1, 2)
        hashes[:, 1] |= np.uint64(1)
        steps = np.arange(self.k, dtype=np.uint64)
        # uint64 arithmetic wraps modulo 2^64, exactly as ``positions`` masks it.
        sums = hashes[:, :1] + steps[None, :] * hashes[:, 1:2]
        return reduce_sums(sums, np.uint64(self.m), self.reduction).ravel()

    def add_many(self, keys: Iterable[str]) -> None:
        """Add keys in vectorised passes; hashing is the only per-key Python work.

        Passes of `BUILD_BATCH` keys: a node's 100,000 keys in one pass would
        need ~20 MiB of temporaries (hash sums, positions) at start, a large
        share of a 128 MiB budget; in batches they stay under 2 MiB."""
        flags = np.zeros(self.m, dtype=np.bool_)
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == BUILD_BATCH:
                flags[self.key_positions(batch)] = True
                batch.clear()
        if batch:
            flags[self.key_positions(batch)] = True
        self._bits |= np.packbits(flags, bitorder="little")

    def add_fresh(self, keys: Iterable[str]) -> U64Array:
        """Add keys and return the positions that were clear before, sorted: what a
        peer holding the previous bits needs to catch up (a delta)."""
        pos = np.unique(self.key_positions(keys))
        if len(pos) == 0:
            return pos
        byte, bit = pos >> np.uint64(3), (pos & np.uint64(7)).astype(np.uint8)
        fresh: U64Array = pos[(self._bits[byte] >> bit) & 1 == 0]
        self.set_positions(fresh)
        return fresh

    def set_positions(self, pos: U64Array) -> None:
        """Set the given bit positions (all below ``m``): a peer's delta applied."""
        np.bitwise_or.at(self._bits, pos >> np.uint64(3),
                         np.left_shift(1, pos & np.uint64(7)).astype(np.uint8))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h1, h2 = key_hashes(key)
        bits = self._bits
        return all(bits[pos >> 3] >> (pos & 7) & 1
                   for pos in positions(h1, h2, self.k, self.m, self.reduction))

    def bits_set(self) -> int:
        return int(np.bitwise_count(self._bits).sum())

    def fill_ratio(self) -> float:
        return self.bits_set() / self.m

    def estimated_fp_rate(self) -> float:
        """The false-positive rate implied by the share of bits set: fill^k."""
        return float(self.fill_ratio() ** self.k)

    def copy(self) -> BloomFilter:
        return BloomFilter(self.m, self.k, self._bits.copy(), self.reduction)


