"""Bloom-filter summaries of a node's keys, their wire format and their publisher.

A peer must answer "does node N probably hold key K?" for a thousand nodes in
well under a millisecond, without asking N. So every node publishes a Bloom
filter of its keys (digests and ``registry/repo:tag``) and peers fetch it over
HTTP whenever the node's advertised epoch changes.

Hashing is deterministic across processes and machines (Python's ``hash()`` is
salted per process and must never be used): a digest key is already a uniform
hash, so its own bytes are used; any other key is hashed with sha256. The first
16 bytes give two 64-bit values ``h1``, ``h2`` (``h2`` forced odd), and bit
``i`` of ``k`` is ``(h1 + i*h2) mod m`` (Kirsch-Mitzenmacher double hashing).
Filter sizes are powers of two, so ``mod m`` is a mask of the same 64-bit sum:
a key's positions in *any* filter size come from one hash, which lets the
router test a key against many peers' filters at once.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshmirror.store.base import KeyEvent, Store

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.meshmirror.summary.v1"
# Where a node serves its summary to peers (registry/summary_endpoint.py).
SUMMARY_PATH = "/_mesh/v1/summary"
MAGIC = b"MMSF"
VERSION = 1
_HEADER = struct.Struct(">4sBBHQQQQ")
HEADER_SIZE = _HEADER.size
_MASK64 = (1 << 64) - 1

MIN_BITS = 1 << 10
# 2^32 bits = 512 MiB: far beyond any real node (50,000 keys need 2^19 bits) but
# a hard ceiling so a hostile header cannot make a peer allocate without bound.
MAX_BITS = 1 << 32
MAX_K = 32
# Sized for at least this many keys so an empty or tiny store does not rebuild
# on every few additions.
MIN_CAPACITY = 256

U8Array = npt.NDArray[np.uint8]


class SummaryFormatError(ValueError):
    """Bytes that are not a well-formed version-1 summary."""


# Exactly the digests Digest.parse accepts; matched here without building a
# Digest because hashing every key of a 50,000-key store is the build's hot loop.
_DIGEST_KEY = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def key_seed(key: str) -> bytes:
    """16 uniformly distributed bytes for ``key``: a digest's own, else sha256's."""
    if _DIGEST_KEY.fullmatch(key):
        return bytes.fromhex(key[7:39])
    return hashlib.sha256(key.encode("utf-8")).digest()[:16]


def key_hashes(key: str) -> tuple[int, int]:
    """The two 64-bit hashes every filter position of ``key`` derives from."""
    raw = key_seed(key)
    return int.from_bytes(raw[0:8], "little"), int.from_bytes(raw[8:16], "little") | 1


def positions(h1: int, h2: int, k: int, m: int) -> list[int]:
    """Bit positions of a key in a filter of ``m`` bits (a power of two)."""
    mask = m - 1
    return [((h1 + i * h2) & _MASK64) & mask for i in range(k)]


def optimal_k(fp_rate: float) -> int:
    """Hash count for a target false-positive rate: ceil(log2(1/p)), 7 for 1%."""
    _check_fp_rate(fp_rate)
    return max(1, min(MAX_K, math.ceil(-math.log2(fp_rate))))


def bits_for(capacity: int, fp_rate: float) -> int:
    """Power-of-two bit count holding ``capacity`` keys at ``fp_rate`` or better.

    The optimum is n*ln(1/p)/ln(2)^2 (9.6 bits per key at 1%); rounding up to a
    power of two costs up to 2x memory but lets every filter share one hash.
    """
    _check_fp_rate(fp_rate)
    n = max(capacity, MIN_CAPACITY)
    ideal = n * math.log(1 / fp_rate) / (math.log(2) ** 2)
    m = 1 << max(0, math.ceil(math.log2(ideal)))
    return max(MIN_BITS, min(MAX_BITS, m))


def _check_fp_rate(fp_rate: float) -> None:
    if not 0 < fp_rate < 1:
        raise ValueError(f"false-positive rate must be between 0 and 1 exclusive, got {fp_rate}")


def _check_geometry(m: int, k: int) -> None:
    if m < 8 or m > MAX_BITS or m & (m - 1):
        raise ValueError(f"filter size must be a power of two from 8 to {MAX_BITS} bits, got {m}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"hash count must be 1-{MAX_K}, got {k}")


class BloomFilter:
    """A mutable Bloom filter of ``m`` bits (a power of two) and ``k`` hashes."""

    __slots__ = ("_bits", "k", "m")

    def __init__(self, m: int, k: int, bits: U8Array | None = None) -> None:
        _check_geometry(m, k)
        self.m = m
        self.k = k
        if bits is None:
            self._bits: U8Array = np.zeros(m // 8, dtype=np.uint8)
        else:
            if bits.shape != (m // 8,) or bits.dtype != np.uint8:
                raise ValueError(f"bit array must be {m // 8} uint8 values")
            self._bits = bits

    @classmethod
    def for_capacity(cls, capacity: int, fp_rate: float = 0.01) -> BloomFilter:
        return cls(bits_for(capacity, fp_rate), optimal_k(fp_rate))

    @classmethod
    def build(cls, keys: Iterable[str], fp_rate: float = 0.01,
              capacity: int | None = None) -> BloomFilter:
        """A filter holding ``keys``, sized for ``capacity`` (default: their count)."""
        key_list = list(keys)
        bloom = cls.for_capacity(len(key_list) if capacity is None else capacity, fp_rate)
        bloom.add_many(key_list)
        return bloom

    @property
    def bits(self) -> U8Array:
        """The live bit array (not a copy); bit i at byte i>>3, bit i&7."""
        return self._bits

    def add(self, key: str) -> None:
        h1, h2 = key_hashes(key)
        for pos in positions(h1, h2, self.k, self.m):
            self._bits[pos >> 3] |= np.uint8(1 << (pos & 7))

    def add_many(self, keys: Iterable[str]) -> None:
        """Add keys in one vectorised pass; hashing is the only per-key Python work."""
        seeds = b"".join([key_seed(key) for key in keys])
        if not seeds:
            return
        hashes = np.frombuffer(seeds, dtype="<u8").astype(np.uint64).reshape(-1, 2)
        hashes[:, 1] |= np.uint64(1)
        steps = np.arange(self.k, dtype=np.uint64)
        # uint64 arithmetic wraps modulo 2^64, exactly as ``positions`` masks it.
        pos = (hashes[:, :1] + steps[None, :] * hashes[:, 1:2]) & np.uint64(self.m - 1)
        flags = np.zeros(self.m, dtype=np.bool_)
        flags[pos.ravel()] = True
        self._bits |= np.packbits(flags, bitorder="little")

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h1, h2 = key_hashes(key)
        bits = self._bits
        return all(bits[pos >> 3] >> (pos & 7) & 1 for pos in positions(h1, h2, self.k, self.m))

    def bits_set(self) -> int:
        return int(np.bitwise_count(self._bits).sum())

    def fill_ratio(self) -> float:
        return self.bits_set() / self.m

    def estimated_fp_rate(self) -> float:
        """The false-positive rate implied by the share of bits set: fill^k."""
        return float(self.fill_ratio() ** self.k)

    def copy(self) -> BloomFilter:
        return BloomFilter(self.m, self.k, self._bits.copy())


@dataclass(frozen=True, slots=True)
class Summary:
    """One published version of a node's filter."""

    epoch: int
    k: int
    m: int
    count: int
    born_at_ms: int
    bits: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_geometry(self.m, self.k)
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

    def encode(self) -> bytes:
        header = _HEADER.pack(MAGIC, VERSION, self.k, 0, self.epoch, self.m, self.count,
                              self.born_at_ms)
        return header + self.bits

    @classmethod
    def decode(cls, data: bytes) -> Summary:
        """Parse a version-1 summary; SummaryFormatError says exactly what is wrong."""
        if len(data) < HEADER_SIZE:
            raise SummaryFormatError(
                f"summary too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
        magic, version, k, reserved, epoch, m, count, born_at = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SummaryFormatError(f"not a meshmirror summary: magic {magic!r}, want {MAGIC!r}")
        if version != VERSION:
            raise SummaryFormatError(
                f"unsupported summary version {version}, this node reads {VERSION}")
        if reserved != 0:
            raise SummaryFormatError(f"reserved header field is {reserved}, want 0")
        if not 1 <= k <= MAX_K:
            raise SummaryFormatError(f"hash count k={k} out of range 1-{MAX_K}")
        if m < 8 or m > MAX_BITS or m & (m - 1):
            raise SummaryFormatError(
                f"filter size m={m} is not a power of two from 8 to {MAX_BITS}")
        want = HEADER_SIZE + m // 8
        if len(data) != want:
            raise SummaryFormatError(
                f"summary of m={m} bits must be {want} bytes, got {len(data)}")
        return cls(epoch=epoch, k=k, m=m, count=count, born_at_ms=born_at,
                   bits=bytes(data[HEADER_SIZE:]))


class EpochClock:
    """Epochs that only ever increase, across restarts too.

    An epoch is the wall-clock time in ms, or the previous epoch plus one when
    two versions fall in the same millisecond. A restarted node starts from the
    current time, which is past every epoch it published before (as long as the
    wall clock does not step back further than the node's downtime).
    """

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or _wall_ms
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, self._now_ms())
        return self._last


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SummaryMetrics:
    """The publisher's gauges and counters, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.keys = Gauge("meshmirror_summary_keys",
                          "Keys in the summary this node currently publishes", registry=registry)
        self.epoch = Gauge("meshmirror_summary_epoch",
                           "Epoch of the summary this node currently publishes", registry=registry)
        self.rebuilds = Counter("meshmirror_summary_rebuilds",
                                "Times the summary filter was rebuilt from the store's keys",
                                registry=registry)
        self.bytes = Gauge("meshmirror_summary_bytes",
                           "Encoded size of the published summary", registry=registry)
        self.fp_rate = Gauge("meshmirror_summary_estimated_fp_rate",
                             "False-positive rate implied by the published filter's fill",
                             registry=registry)


class SummaryPublisher:
    """Keeps a Bloom summary of a Store's keys current and publishes each version.

    Wiring (the node)::

        publisher = SummaryPublisher(store, fp_rate=args.summary_fp_rate,
                                     registry=metrics_registry, on_publish=set_tags)
        await publisher.start()          # first version is published before this returns
        app routes += summary_routes(publisher)
        ...
        await publisher.close()

    ``on_publish(summary)`` runs on the publisher's event loop after every new
    version; the node sets its metadata tags ``epoch`` and ``keys`` from it.

    Rebuild policy. A Bloom filter cannot delete, so an added key is OR-ed into
    the current filter at once (cheap: k bit sets) while a removed key stays in
    the bits and only leaves the key set. The filter is rebuilt from
    ``store.keys()`` when either
      * removals since the last rebuild exceed ``rebuild_fraction`` (5%) of the
        entries the filter was built with: each stale key is a guaranteed false
        positive that costs a peer a wasted request; Summary Cache (Fan et al.,
        2000) found rebuilding after 1-10% of entries changed keeps that cost
        small, and 5% sits in that range; or
      * the fill pushes the estimated false-positive rate past 2x the target,
        i.e. the store has grown past the capacity the filter was sized for
        (power-of-two sizing leaves up to 2x headroom, so growth rarely
        triggers this).
    A rebuild also resynchronises with the store, so an event lost by a store's
    subscription is repaired; a periodic reconcile (``reconcile_interval_s``)
    catches the rest.

    Publication. The first change after a version starts a ``debounce_s``
    window (150 ms); everything arriving in it goes into one new version, so a
    pulled image's dozens of keys cost peers one fetch, and a change is
    published within ``debounce_s`` plus one rebuild, well inside 1 s, even
    under a continuous stream of events.
    """

    def __init__(self, store: Store, fp_rate: float = 0.01, *,
                 registry: CollectorRegistry | None = None,
                 on_publish: Callable[[Summary], None] | None = None,
                 debounce_s: float = 0.15,
                 rebuild_fraction: float = 0.05,
                 max_fp_factor: float = 2.0,
                 reconcile_interval_s: float = 30.0,
                 epochs: EpochClock | None = None,
                 wall_ms: Callable[[], int] | None = None) -> None:
        _check_fp_rate(fp_rate)
        if debounce_s < 0 or rebuild_fraction <= 0 or max_fp_factor <= 1:
            raise ValueError("debounce_s >= 0, rebuild_fraction > 0 and max_fp_factor > 1 required")
        self._store = store
        self.fp_rate = fp_rate
        self._on_publish = on_publish
        self._debounce_s = debounce_s
        self._rebuild_fraction = rebuild_fraction
        self._max_fp_factor = max_fp_factor
        self._reconcile_interval_s = reconcile_interval_s
        self._epochs = epochs or EpochClock()
        self._wall_ms = wall_ms or _wall_ms
        self.metrics = SummaryMetrics(registry if registry is not None else CollectorRegistry())

        self._keys: set[str] = set()
        self._filter = BloomFilter.for_capacity(0, fp_rate)
        self._entries_at_rebuild = 0
        self._removed_since_rebuild = 0
        # Arrival time of the oldest key not yet in a published version.
        self._pending_arrival_ms: int | None = None
        self._born_at_ms = 0
        # Events seen while a rebuild awaits store.keys(); replayed on its result.
        self._replay: list[KeyEvent] | None = None

        self._current: Summary | None = None
        self._payload = b""
        self._dirty = asyncio.Event()
        # Set and replaced on every version, so waiters wake exactly once per version.
        self._version_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.rebuilds = 0

    @property
    def current(self) -> Summary | None:
        """The latest published version; None before ``start()``."""
        return self._current

    @property
    def payload(self) -> bytes:
        """The latest version encoded, as the summary endpoint serves it."""
        return self._payload

    async def start(self) -> None:
        """Subscribe to the store, publish the first version and keep publishing."""
        if self._tasks:
            raise RuntimeError("publisher already started")
        events = self._store.subscribe()
        # Subscribe before reading keys: an event racing the snapshot is replayed
        # on top of it, and replaying adds/removes in order is idempotent.
        self._replay = []
        consumer = asyncio.create_task(self._consume(events), name="summary-consume")
        self._tasks.append(consumer)
        await asyncio.sleep(0)
        await self._rebuild()
        self._publish()
        self._tasks.append(asyncio.create_task(self._publish_loop(), name="summary-publish"))
        if self._reconcile_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._reconcile_loop(), name="summary-reconcile"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_for(self, predicate: Callable[[Summary], bool]) -> Summary:
        """The first published version satisfying ``predicate``; bound it with asyncio.timeout."""
        while self._current is None or not predicate(self._current):
            await self._version_event.wait()
        return self._current

    def _apply(self, event: KeyEvent) -> None:
        if self._replay is not None:
            self._replay.append(event)
        changed = False
        for key in event.added:
            if key not in self._keys:
                self._keys.add(key)
                self._filter.add(key)
                changed = True
                if self._pending_arrival_ms is None:
                    self._pending_arrival_ms = self._wall_ms()
        for key in event.removed:
            if key in self._keys:
                self._keys.discard(key)
                self._removed_since_rebuild += 1
                changed = True
        if changed:
            self._dirty.set()

    async def _consume(self, events: AsyncIterator[KeyEvent]) -> None:
        try:
            async for event in events:
                self._apply(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store subscription failed; the periodic reconcile will resync")
        finally:
            # Let the store drop the subscription now rather than when collected.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def _needs_rebuild(self) -> bool:
        if self._removed_since_rebuild > self._rebuild_fraction * max(self._entries_at_rebuild, 1):
            return True
        return self._filter.estimated_fp_rate() > self._max_fp_factor * self.fp_rate

    async def _rebuild(self) -> None:
        """Replace the filter with one built from the store's keys, sized for them."""
        if self._replay is None:
            self._replay = []
        try:
            keys = await self._store.keys()
        except BaseException:
            self._replay = None
            raise
        replay, self._replay = self._replay, None
        had = self._keys
        self._keys = set(keys)
        self._filter = BloomFilter.build(self._keys, self.fp_rate)
        self._entries_at_rebuild = len(self._keys)
        self._removed_since_rebuild = 0
        if self._keys - had and self._pending_arrival_ms is None and self._current is not None:
            # Keys whose events were lost arrive now, as far as anyone can tell.
            self._pending_arrival_ms = self._wall_ms()
        for event in replay:
            self._apply(event)
        self.rebuilds += 1
        self.metrics.rebuilds.inc()

    def _publish(self) -> None:
        if self._pending_arrival_ms is not None:
            self._born_at_ms = self._pending_arrival_ms
            self._pending_arrival_ms = None
        bloom = self._filter
        summary = Summary(epoch=self._epochs.next(), k=bloom.k, m=bloom.m, count=len(self._keys),
                          born_at_ms=self._born_at_ms, bits=bloom.bits.tobytes())
        self._current = summary
        self._payload = summary.encode()
        self.metrics.keys.set(summary.count)
        self.metrics.epoch.set(summary.epoch)
        self.metrics.bytes.set(len(self._payload))
        self.metrics.fp_rate.set(bloom.estimated_fp_rate())
        if self._on_publish is not None:
            try:
                self._on_publish(summary)
            except Exception:
                log.exception("summary publish callback failed")
        event, self._version_event = self._version_event, asyncio.Event()
        event.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce_s)
            self._dirty.clear()
            if self._needs_rebuild():
                try:
                    await self._rebuild()
                except Exception:
                    log.exception("summary rebuild failed; publishing the incremental filter")
            self._publish()

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval_s)
            try:
                keys = await self._store.keys()
            except Exception:
                log.exception("summary reconcile could not read the store's keys")
                continue
            missing = keys - self._keys
            extra = self._keys - keys
            if missing or extra:
                log.warning("summary drifted from the store (%d missing, %d extra); resyncing",
                            len(missing), len(extra))
                self._apply(KeyEvent(added=frozenset(missing), removed=frozenset(extra)))
