"""The publisher: keeps this node's Bloom summary in step with its store.

A peer must answer "does node N probably hold key K?" for a thousand nodes in
well under a millisecond, without asking N. So every node publishes a Bloom
filter of its keys and peers fetch it (see `summary`) whenever the node's
advertised epoch changes. This module decides when a new version is built and
published; `bloom` says how keys become bits, `summary` how versions travel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Set

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshmirror.routing.bloom import DIGEST_KEY, MASK, BloomFilter, check_fp_rate
from meshmirror.routing.summary import (
    VERSION,
    VERSION_RANGE,
    VERSION_VOUCHES,
    Summary,
    SummaryDelta,
    max_delta_positions,
    wall_clock_ms,
)
from meshmirror.routing.vouches import NO_VOUCHES, Vouches
from meshmirror.store.base import KeyEvent, Store

log = logging.getLogger(__name__)

U32Array = npt.NDArray[np.uint32]
I64Array = npt.NDArray[np.int64]


def _hashes(keys: Iterable[str], count: int = -1) -> I64Array:
    return np.fromiter(map(hash, keys), np.int64, count)


class KeyHashes:
    """Which keys the published filter was given, held as one sorted array of 64-bit
    hashes rather than a set of the store's strings.

    The store already holds every key string; a second set of them cost 4 MiB of
    table at 100,000 keys (plus each string's 8-byte slot), the hashes 0.8 MiB. The
    publisher only asks "already added?", "how many?" and "which differ from the
    store?", none of which needs the strings back. Python's ``hash()`` is salted per
    process, which is fine here: the hashes never leave it (the filter's positions
    come from `bloom.key_hashes`). Two of 100,000 keys share a 64-bit hash with
    probability about 3e-10; the cost would be one key counted once.
    """

    def __init__(self, keys: Collection[str] = ()) -> None:
        hashes = _hashes(keys, len(keys))
        hashes.sort()  # in place: np.unique would hold a second copy
        if len(hashes) > 1 and (hashes[1:] == hashes[:-1]).any():
            hashes = np.unique(hashes)
        self._sorted: I64Array = hashes

    def __len__(self) -> int:
        return len(self._sorted)

    def _held(self, hashes: I64Array) -> npt.NDArray[np.bool_]:
        if not len(self._sorted):
            return np.zeros(len(hashes), np.bool_)
        at = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
        held: npt.NDArray[np.bool_] = self._sorted[at] == hashes
        return held

    def add(self, keys: Iterable[str]) -> list[str]:
        """Add ``keys``; those not held before, each once."""
        keys = list(dict.fromkeys(keys))
        hashes = _hashes(keys, len(keys))
        fresh = ~self._held(hashes)
        if fresh.any():
            new = np.sort(hashes[fresh])
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
        return [key for key, f in zip(keys, fresh.tolist(), strict=True) if f]

    def discard(self, keys: Iterable[str]) -> list[str]:
        """Remove ``keys``; those that were held."""
        keys = list(dict.fromkeys(keys))
        hashes = _hashes(keys, len(keys))
        held = self._held(hashes)
        if held.any():
            self._sorted = np.setdiff1d(self._sorted, hashes[held], assume_unique=True)
        return [key for key, h in zip(keys, held.tolist(), strict=True) if h]

    def differ(self, keys: Set[str]) -> tuple[list[str], int]:
        """The store's ``keys`` not held, and how many held keys the store lacks."""
        hashes = _hashes(keys, len(keys))
        held = self._held(hashes)
        missing = [key for key, h in zip(keys, held.tolist(), strict=True) if not h]
        return missing, len(self._sorted) - int(held.sum())

    def any_new(self, keys: Set[str]) -> bool:
        """Whether ``keys`` holds a key not held here."""
        return not bool(self._held(_hashes(keys, len(keys))).all())


class DeltaLog:
    """The positions each version since the last rebuild set, so a peer holding
    any of those versions can be sent only what changed since.

    Bounded twice: at most `MAX_VERSIONS` versions, and at most one position per
    `summary.BITS_PER_POSITION` bits of the filter in all
    (`summary.max_delta_positions`, which receivers hold deltas to). The oldest versions go first;
    a peer holding one of them gets the whole filter.
    """

    MAX_VERSIONS = 256
    # Encoded deltas kept for reuse. Peers mostly hold the same previous epoch or two,
    # so a few cover a rollout; one per logged version could hold 256 deltas of up to
    # the whole log each (7.7 MiB at 100,000 keys), for any client naming old epochs.
    MAX_ENCODED = 8

    def __init__(self) -> None:
        self.base: int | None = None  # the epoch the logged versions start from
        self._versions: list[tuple[int, U32Array]] = []
        self._held = 0
        self._encoded: dict[int, bytes] = {}

    def restart(self, epoch: int) -> None:
        """A rebuilt filter: nothing before ``epoch`` can be caught up with a delta."""
        self.base = epoch
        self._versions.clear()
        self._held = 0
        self._encoded.clear()

    def append(self, epoch: int, fresh: U32Array, m: int) -> None:
        self._versions.append((epoch, fresh))
        self._held += len(fresh)
        self._encoded.clear()
        limit = max_delta_positions(m)
        while self._versions and (len(self._versions) > self.MAX_VERSIONS
                                  or self._held > limit):
            dropped, positions = self._versions.pop(0)
            self._held -= len(positions)
            self.base = dropped

    def delta(self, held: int, current: Summary) -> bytes | None:
        """The encoded delta from epoch ``held`` to ``current``; None when unknown.

        Encoded once per held epoch and version: in a rollout every peer holds
        the same previous epoch, so they all get the same bytes."""
        if held >= current.epoch:
            return None
        if held != self.base and all(epoch != held for epoch, _ in self._versions):
            return None
        cached = self._encoded.get(held)
        if cached is None:
            parts = [pos for epoch, pos in self._versions if epoch > held]
            merged = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint32)
            cached = SummaryDelta(
                base_epoch=held, epoch=current.epoch, k=current.k, m=current.m,
                reduction=current.reduction, count=current.count,
                born_at_ms=current.born_at_ms, positions=merged.astype(np.uint64),
                vouches=current.vouches).encode()
            if len(self._encoded) >= self.MAX_ENCODED:
                del self._encoded[next(iter(self._encoded))]  # the oldest encoded
            self._encoded[held] = cached
        return cached

    @property
    def encoded_bytes(self) -> int:
        """Bytes of the encoded deltas kept for reuse."""
        return sum(map(len, self._encoded.values()))


class EpochClock:
    """Epochs that only ever increase, across restarts too.

    An epoch is the wall-clock time in ms, or the previous epoch plus one when
    two versions fall in the same millisecond. A restarted node starts from the
    current time, which is past every epoch it published before (as long as the
    wall clock does not step back further than the node's downtime).
    """

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or wall_clock_ms
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, self._now_ms())
        return self._last


class SummaryMetrics:
    """The publisher's gauges and counters, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.keys = Gauge("meshmirror_summary_keys",
                          "Keys in the summary this node currently publishes", registry=registry)
        self.epoch = Gauge("meshmirror_summary_epoch",
                           "Epoch of the summary this node currently publishes", registry=registry)
        self.vouches = Gauge("meshmirror_summary_vouches",
                             "Repositories this node vouches for as public in its summary",
                             registry=registry)
        self.rebuilds = Counter("meshmirror_summary_rebuilds",
                                "Times the summary filter was rebuilt from the store's keys",
                                registry=registry)
        self.bytes = Gauge("meshmirror_summary_bytes",
                           "Encoded size of the published summary", registry=registry)
        self.fp_rate = Gauge("meshmirror_summary_estimated_fp_rate",
                             "False-positive rate implied by the published filter's fill",
                             registry=registry)
        # Spegel's names for what a node advertises; a digest key carries no registry
        # (one blob serves every registry that has it), so those are labelled registry="".
        self.tags = Gauge("meshmirror_advertised_image_tags",
                          "Image tags in the published summary, by registry",
                          ["registry"], registry=registry)
        self.content_digests = Gauge("meshmirror_advertised_content_digests",
                                     "Content digests (manifests, configs, layers) in the "
                                     "published summary", ["registry"], registry=registry)
        self.content_digests.labels("").set(0)
        self.image_digests = Gauge("meshmirror_advertised_image_digests",
                                   "Distinct image manifests the published tags point to, by "
                                   "registry", ["registry"], registry=registry)
        self._tag_registries: set[str] = set()
        self._image_registries: set[str] = set()

    def advertise(self, tag_keys: Iterable[str], digests: int) -> None:
        """Set the advertised gauges from the published tag keys (``registry/repo:tag``)
        and the count of digest keys."""
        tags: dict[str, int] = {}
        for key in tag_keys:
            registry = key.split("/", 1)[0]
            tags[registry] = tags.get(registry, 0) + 1
        # A registry whose last tag went stays at 0 rather than vanishing mid-graph.
        self._tag_registries.update(tags)
        for registry in self._tag_registries:
            self.tags.labels(registry).set(tags.get(registry, 0))
        self.content_digests.labels("").set(digests)

    def advertise_images(self, images: dict[str, set[str]]) -> None:
        """Set the image-digest gauge from what each registry's tags resolve to."""
        self._image_registries.update(images)
        for registry in self._image_registries:
            self.image_digests.labels(registry).set(len(images.get(registry, ())))


class SummaryPublisher:
    """Keeps a Bloom summary of a Store's keys current and publishes each version.

    ``start`` returns once the first version is published; the publisher is
    the `SummarySource` that `summary_route` serves. ``on_publish(summary)``
    runs on the publisher's event loop after every new version: it is how the
    node (`meshmirror.peering`) puts the ``epoch`` and ``keys`` tags into its
    gossip metadata, so peers learn that there is something new to fetch.

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
        (the filter is sized for the keys it is built with, so about 17% growth
        since the last rebuild triggers this; a rebuild costs each peer one
        whole filter instead of a delta).
    A rebuild also resynchronises with the store, so an event lost by a store's
    subscription is repaired; a periodic reconcile (``reconcile_interval_s``)
    catches the rest.

    Vouches. ``vouches()``, when given, says which repositories this node vouches
    for (see `vouches`); they ride in every version, and ``vouches_changed()``
    publishes a new one through the same debounce as a store change.

    Two filters. The published filter (`RANGE`, wire version 3) is sized to
    what the keys need; a power-of-two (`MASK`) twin of the same keys is kept
    beside it for peers that read only versions 1 and 2. Both are rebuilt
    together and share epochs.

    Deltas. The positions each version newly sets are kept in a `DeltaLog`
    (reset by every rebuild), from which ``delta_since`` answers peers that
    already hold an earlier version.

    Publication. The first change after a version starts a ``debounce_s``
    window (150 ms); everything arriving in it goes into one new version, so a
    pulled image's dozens of keys cost peers one fetch, and a change is
    published within ``debounce_s`` plus one rebuild, well inside 1 s, even
    under a continuous stream of events.
    """

    # An event adding more keys than this, and than the filter holds, is taken as a
    # rebuild from the store's keys rather than added key by key.
    LARGE_EVENT = 1024

    def __init__(self, store: Store, fp_rate: float = 0.01, *,
                 registry: CollectorRegistry | None = None,
                 on_publish: Callable[[Summary], None] | None = None,
                 debounce_s: float = 0.15,
                 rebuild_fraction: float = 0.05,
                 max_fp_factor: float = 2.0,
                 reconcile_interval_s: float = 30.0,
                 epochs: EpochClock | None = None,
                 wall_ms: Callable[[], int] | None = None,
                 vouches: Callable[[], Vouches] | None = None) -> None:
        check_fp_rate(fp_rate)
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
        self._wall_ms = wall_ms or wall_clock_ms
        self._vouches = vouches
        self.metrics = SummaryMetrics(registry if registry is not None else CollectorRegistry())

        self._keys = KeyHashes()
        # The keys that are tags, not digests: what the tag gauges and image count read,
        # kept apart so a publish never walks (or copies) 100,000 digest keys.
        self._tags: set[str] = set()
        self._filter = BloomFilter.for_capacity(0, fp_rate)
        self._legacy = BloomFilter.for_capacity(0, fp_rate, MASK)
        self._fresh: list[npt.NDArray[np.uint64]] = []
        self._rebuilt = True
        self.deltas = DeltaLog()
        self._entries_at_rebuild = 0
        self._removed_since_rebuild = 0
        self._resync = False  # keys held that the store no longer has
        # Arrival time of the oldest key not yet in a published version.
        self._pending_arrival_ms: int | None = None
        self._born_at_ms = 0
        # Events seen while a rebuild awaits store.keys(); replayed on its result.
        self._replay: list[KeyEvent] | None = None

        self._current: Summary | None = None
        self._payload = b""
        self._vouched_payload = b""
        self._ranged_payload = b""
        self._dirty = asyncio.Event()
        # Set and replaced on every version, so waiters wake exactly once per version.
        self._version_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._image_count: asyncio.Task[None] | None = None
        self.rebuilds = 0

    @property
    def current(self) -> Summary | None:
        """The latest published version; None before ``start()``."""
        return self._current

    @property
    def payload(self) -> bytes:
        """The latest version encoded, as the summary endpoint serves it."""
        return self._payload

    @property
    def vouched_payload(self) -> bytes:
        """The latest version with this node's vouches, for peers that read them."""
        return self._vouched_payload

    @property
    def ranged_payload(self) -> bytes:
        """The latest version as wire version 3: the filter `current` holds."""
        return self._ranged_payload

    def delta_since(self, epoch: int) -> bytes | None:
        """What changed since version ``epoch``, encoded; None if that is not known."""
        if self._current is None:
            return None
        return self.deltas.delta(epoch, self._current)

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
        if self._image_count is not None:
            self._tasks.append(self._image_count)
            self._image_count = None
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

    def vouches_changed(self) -> None:
        """The vouches changed: publish a new version (debounced like key changes)."""
        self._dirty.set()

    def _apply(self, event: KeyEvent) -> None:
        if self._replay is not None:
            self._replay.append(event)
        large = len(event.added) > max(len(self._keys), self.LARGE_EVENT)
        if large:
            # More keys than the filter holds (a store's first sync): the filter must be
            # rebuilt for them anyway, and adding them one by one first held every key's
            # string at once (20 MiB at 100,000 keys).
            self._resync = True
            if self._pending_arrival_ms is None:
                self._pending_arrival_ms = self._wall_ms()
            event = KeyEvent(removed=event.removed)
        changed = large
        added = self._keys.add(event.added)
        if added:
            self._tags.update(key for key in added if not DIGEST_KEY.fullmatch(key))
            self._fresh.append(self._filter.add_fresh(added))
            self._legacy.add_many(added)
            changed = True
            if self._pending_arrival_ms is None:
                self._pending_arrival_ms = self._wall_ms()
        removed = self._keys.discard(event.removed)
        if removed:
            self._tags.difference_update(removed)
            self._removed_since_rebuild += len(removed)
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
        if self._resync:
            return True
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
        self._keys = KeyHashes(keys)
        self._tags = {key for key in keys if not DIGEST_KEY.fullmatch(key)}
        self._filter = BloomFilter.build(keys, self.fp_rate)
        self._legacy = BloomFilter.build(keys, self.fp_rate, reduction=MASK)
        self._fresh.clear()
        self._rebuilt = True
        self._entries_at_rebuild = len(self._keys)
        self._removed_since_rebuild = 0
        self._resync = False
        if had.any_new(keys) and self._pending_arrival_ms is None and self._current is not None:
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
        vouches = NO_VOUCHES
        if self._vouches is not None:
            try:
                vouches = self._vouches()
            except Exception:
                log.exception("could not list vouches; publishing none")
        summary = Summary(epoch=self._epochs.next(), k=bloom.k, m=bloom.m, count=len(self._keys),
                          born_at_ms=self._born_at_ms, bits=bloom.bits.tobytes(),
                          vouches=vouches, reduction=bloom.reduction)
        legacy = Summary(epoch=summary.epoch, k=self._legacy.k, m=self._legacy.m,
                         count=summary.count, born_at_ms=summary.born_at_ms,
                         bits=self._legacy.bits.tobytes(), vouches=vouches, reduction=MASK)
        self._current = summary
        self._payload = legacy.encode(VERSION)
        self._vouched_payload = legacy.encode(VERSION_VOUCHES)
        self._ranged_payload = summary.encode(VERSION_RANGE)
        if self._rebuilt:
            self.deltas.restart(summary.epoch)
            self._rebuilt = False
        else:
            fresh = (np.unique(np.concatenate(self._fresh)) if self._fresh
                     else np.zeros(0, dtype=np.uint64))
            self.deltas.append(summary.epoch, fresh.astype(np.uint32), summary.m)
        self._fresh.clear()
        self.metrics.keys.set(summary.count)
        self.metrics.vouches.set(len(vouches))
        self.metrics.advertise(self._tags, len(self._keys) - len(self._tags))
        self._count_images_soon()
        self.metrics.epoch.set(summary.epoch)
        self.metrics.bytes.set(len(self._ranged_payload))
        self.metrics.fp_rate.set(bloom.estimated_fp_rate())
        if self._on_publish is not None:
            try:
                self._on_publish(summary)
            except Exception:
                log.exception("summary publish callback failed")
        event, self._version_event = self._version_event, asyncio.Event()
        event.set()

    def _count_images_soon(self) -> None:
        """Resolve the published tags in the background, for the image-digest gauge.

        Only a tag's resolution says which digest is an image: a digest key alone
        could be a layer. A newer version cancels the count of an older one.
        """
        if self._image_count is not None:
            self._image_count.cancel()
        self._image_count = asyncio.create_task(self._count_images(frozenset(self._tags)),
                                                name="summary-images")

    async def _count_images(self, keys: frozenset[str]) -> None:
        images: dict[str, set[str]] = {}
        for key in keys:
            registry, _, name = key.partition("/")
            repository, _, tag = name.rpartition(":")
            try:
                digest = await self._store.resolve(registry, repository, tag)
            except asyncio.CancelledError:
                raise
            except Exception:  # gone since, or unreadable: not advertised as an image
                continue
            images.setdefault(registry, set()).add(str(digest))
        self.metrics.advertise_images(images)

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
            missing, extra = self._keys.differ(keys)
            if missing or extra:
                log.warning("summary drifted from the store (%d missing, %d extra); resyncing",
                            len(missing), extra)
                # Only the store's strings say which keys are extra: a rebuild drops them.
                self._resync = bool(extra)
                self._apply(KeyEvent(added=frozenset(missing)))
                self._dirty.set()
