"""Who has key K? Candidate peers for a key, best first.

The mirror asks ``router.candidates(key, limit)`` for every request it cannot
serve locally, so the answer must cost microseconds with a thousand peers. Two
implementations share one ranking:

* ``BloomRouter`` matches a key against every peer's Bloom summary. Peers'
  filters (any sizes, both reductions) lie end to end in one uint8 buffer; a
  key's k hash sums are reduced against every peer's size at once, so one
  lookup is a few array operations on k*peers values and a gather of k*peers
  bytes, not a Python loop over peers.
* ``InMemoryRouter`` holds an explicit key -> peers map: exact answers for
  tests and for callers that know the truth.

Who is left out: a peer whose circuit is open (``trip``: it stalled, timed
out or sent bad bytes) for a cooling period that doubles with each consecutive
trip (5 s up to 5 min) and ends early on a success; and a peer whose filter
would match more than half of all keys (every bit set, or nearly): such a
filter says nothing, so the peer is no candidate for any key until it
publishes a useful one.

Ranking (``_Health``): the rest whose filter matches, ordered by
  0. (one level below not penalised and not demoted) in this node's zone: a
     router given its ``zone`` asks a holder in another zone, or in none
     advertised, only after every same-zone holder, since cross-zone traffic is
     billed in every cloud; a same-zone holder is preferred even with up to a
     hundred requests in flight;
  1. not penalised: a peer that errored, or whose circuit has just closed
     again, is pushed below every healthy one for a cooling period that doubles
     with each consecutive failure (1 s up to 60 s) and ends on the first success;
  2. not demoted: a peer whose learned false-positive rate (404s for keys its
     filter claimed, time-decayed) is far above what its filter's fill ratio
     makes likely, or above one half whatever its filter, is asked after the
     peers whose filters tell the truth;
  3. fewest requests in flight (spreads a burst of pulls across holders);
  4. recent history: an EWMA of latency inflated by EWMAs of the error and
     false-positive rates, in half-octave buckets so peers of similar speed tie;
  5. ties broken at random, so equal peers share load.
A peer with no history yet ranks as fast, so new peers get tried.

The `PeerDirectory` installs peers' summaries; the mirror sees a router only as
a `PeerRanking` (routing/ranking.py): it asks ``candidates``, brackets each peer
request with ``begin``/``end`` (in-flight accounting, which ranking step 3
reads) and tells every request's ``outcome`` (a 404's time counts like a
success's), which becomes a ``report`` or a ``trip`` here.

All methods are synchronous and not thread-safe: call them from the registry's
event loop.
"""

from __future__ import annotations

import abc
import math
import mmap
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Histogram

from meshmirror.routing.bloom import MASK, MAX_K, key_hashes
from meshmirror.routing.ranking import Outcome
from meshmirror.routing.summary import Summary, SummaryDelta

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_LOOKUP_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 10e-3, 0.1)
_EMPTY: IntArray = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer the mirror can ask: its mesh node name, its registry's base URL and
    its zone ("" when it advertises none)."""

    name: str
    http_base: str
    zone: str = ""


class _Health:
    """Per-peer load and history in flat arrays indexed by slot, ranked in bulk.

    Arrays rather than per-peer objects so a key held by all 1,000 peers is
    ranked with a few numpy operations instead of a thousand Python ones.
    """

    ALPHA = 0.3
    PENALTY_BASE_S = 1.0
    PENALTY_MAX_S = 60.0
    CIRCUIT_BASE_S = 5.0
    CIRCUIT_MAX_S = 300.0
    # False-positive learning: outcomes fade with this time constant; the rate is
    # taken over at least FP_PRIOR outcomes, so one unlucky 404 demotes nobody.
    FP_DECAY_S = 60.0
    FP_PRIOR = 5.0
    # Demoted when the learned rate exceeds both of these: a floor, and a multiple
    # of the rate the peer's own filter makes likely.
    FP_DEMOTE_FLOOR = 0.2
    FP_DEMOTE_FACTOR = 10.0
    # ...and always past this: a filter nearly half full (k=1, or a peer claiming
    # what it lacks) makes 404s "likely", and without a cap its peer was never
    # demoted, answered first (its 404s are fast) and delayed every pull.
    FP_DEMOTE_CAP = 0.5
    _ARRAYS = ("in_flight", "latency", "errors", "false_pos", "penalty_until", "strikes",
               "bucket", "static_score", "circuit_until", "trips", "fp_seen", "fp_count",
               "fp_at", "expected_fp", "cross_zone")
    # Above any realistic in-flight count (1e6 each), below demotion and penalties.
    CROSS_ZONE = 1e8

    def __init__(self, clock: Callable[[], float], rng: np.random.Generator,
                 zone: str = "") -> None:
        self._clock = clock
        self._rng = rng
        self.zone = zone
        self.slot_of: dict[str, int] = {}
        self.peer_at: list[Peer | None] = []
        self._free: list[int] = []
        self._size = 0
        self.in_flight: IntArray = _EMPTY.copy()
        self.latency: FloatArray = np.zeros(0)
        self.errors: FloatArray = np.zeros(0)
        self.false_pos: FloatArray = np.zeros(0)
        self.penalty_until: FloatArray = np.zeros(0)
        self.strikes: IntArray = _EMPTY.copy()
        self.bucket: FloatArray = np.zeros(0)
        # in_flight * 1e6 + bucket, kept current so a lookup gathers one array.
        self.static_score: FloatArray = np.zeros(0)
        self.circuit_until: FloatArray = np.zeros(0)
        self.trips: IntArray = _EMPTY.copy()
        # Time-decayed counts of answers to keys the filter claimed, and of 404s
        # among them, as of fp_at; expected_fp is what the filter makes likely.
        self.fp_seen: FloatArray = np.zeros(0)
        self.fp_count: FloatArray = np.zeros(0)
        self.fp_at: FloatArray = np.zeros(0)
        self.expected_fp: FloatArray = np.zeros(0)
        # CROSS_ZONE for a peer outside this node's zone, else 0.
        self.cross_zone: FloatArray = np.zeros(0)

    def _grow(self) -> None:
        new = max(16, self._size * 2)
        for name in self._ARRAYS:
            old = getattr(self, name)
            arr = np.zeros(new, dtype=old.dtype)
            arr[: self._size] = old
            setattr(self, name, arr)
        self.peer_at.extend([None] * (new - self._size))
        self._free.extend(range(new - 1, self._size - 1, -1))
        self._size = new

    def add(self, peer: Peer) -> int:
        """The peer's slot; an existing name keeps its slot and history."""
        slot = self.slot_of.get(peer.name)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self.slot_of[peer.name] = slot
            for name in self._ARRAYS:
                getattr(self, name)[slot] = 0
        self.peer_at[slot] = peer
        self.cross_zone[slot] = self.CROSS_ZONE if self.zone and peer.zone != self.zone else 0.0
        return slot

    def remove(self, name: str) -> int | None:
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.peer_at[slot] = None
            self._free.append(slot)
        return slot

    def rank(self, slots: IntArray, limit: int) -> list[Peer]:
        if limit <= 0 or len(slots) == 0:
            return []
        now = self._clock()
        slots = slots[self.circuit_until[slots] <= now]
        if len(slots) == 0:
            return []
        score = self.static_score[slots] + self.cross_zone[slots] + self._rng.random(len(slots))
        score[self.penalty_until[slots] > now] += 1e12
        # Only peers with a 404 on record can be demoted: most have none, and the
        # decay arithmetic over every match was a third of a popular key's lookup.
        suspects = np.flatnonzero(self.fp_count[slots])
        if len(suspects):
            score[suspects[self._demoted(slots[suspects], now)]] += 1e9
        if len(slots) > limit:
            best = np.argpartition(score, limit - 1)[:limit]
            slots, score = slots[best], score[best]
        ordered = slots[np.argsort(score)]
        return [peer for peer in (self.peer_at[s] for s in ordered.tolist()) if peer is not None]

    def begin(self, name: str) -> None:
        slot = self.slot_of.get(name)
        if slot is not None:
            self.in_flight[slot] += 1
            self._rescore(slot)

    def end(self, name: str) -> None:
        slot = self.slot_of.get(name)
        if slot is not None and self.in_flight[slot] > 0:
            self.in_flight[slot] -= 1
            self._rescore(slot)

    def _demoted(self, slots: IntArray, now: float) -> npt.NDArray[np.bool_]:
        """Which of ``slots`` answer 404 far more often than their filters make likely."""
        fade = np.exp(-(now - self.fp_at[slots]) / self.FP_DECAY_S)
        rate = self.fp_count[slots] * fade / np.maximum(self.fp_seen[slots] * fade,
                                                        self.FP_PRIOR)
        bound = np.maximum(self.FP_DEMOTE_FLOOR, np.minimum(
            self.FP_DEMOTE_CAP, self.FP_DEMOTE_FACTOR * self.expected_fp[slots]))
        result: npt.NDArray[np.bool_] = rate > bound
        return result

    def false_positive_rate(self, name: str) -> float:
        """The learned rate of 404s for keys the peer's filter claimed (0 for unknown peers)."""
        slot = self.slot_of.get(name)
        if slot is None:
            return 0.0
        return float(self.fp_count[slot] / max(float(self.fp_seen[slot]), self.FP_PRIOR))

    def _learn(self, slot: int, false_positive: bool) -> None:
        now = self._clock()
        fade = math.exp(-max(0.0, now - self.fp_at[slot]) / self.FP_DECAY_S)
        self.fp_seen[slot] = self.fp_seen[slot] * fade + 1
        self.fp_count[slot] = self.fp_count[slot] * fade + float(false_positive)
        self.fp_at[slot] = now

    def report(self, name: str, ok: bool, latency_s: float, false_positive: bool) -> None:
        slot = self.slot_of.get(name)
        if slot is None:
            return
        if not math.isfinite(latency_s) or latency_s < 0:
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency_s}")
        if ok or false_positive:
            self._learn(slot, false_positive)
        a = self.ALPHA
        self.latency[slot] = latency_s if self.latency[slot] == 0 else (
            (1 - a) * self.latency[slot] + a * latency_s)
        self.false_pos[slot] = (1 - a) * self.false_pos[slot] + a * float(false_positive)
        # A false positive is the filter's expected 1%, not the peer misbehaving.
        failed = not ok and not false_positive
        self.errors[slot] = (1 - a) * self.errors[slot] + a * float(failed)
        if failed:
            self.strikes[slot] += 1
            cooldown = min(self.PENALTY_MAX_S,
                           self.PENALTY_BASE_S * 2.0 ** (int(self.strikes[slot]) - 1))
            self.penalty_until[slot] = max(self.penalty_until[slot], self._clock() + cooldown)
        elif ok:
            self.strikes[slot] = 0
            self.penalty_until[slot] = 0.0
            self.trips[slot] = 0
            self.circuit_until[slot] = 0.0
        self._rebucket(slot)

    def penalise(self, name: str, cooldown_s: float) -> None:
        slot = self.slot_of.get(name)
        if slot is not None:
            self.strikes[slot] += 1
            self.penalty_until[slot] = max(self.penalty_until[slot], self._clock() + cooldown_s)

    def trip(self, name: str) -> None:
        slot = self.slot_of.get(name)
        if slot is None:
            return
        self.trips[slot] += 1
        self.strikes[slot] += 1
        cooldown = min(self.CIRCUIT_MAX_S,
                       self.CIRCUIT_BASE_S * 2.0 ** (int(self.trips[slot]) - 1))
        now = self._clock()
        self.circuit_until[slot] = max(self.circuit_until[slot], now + cooldown)
        # Once the circuit closes the peer is asked again, but last, until it succeeds.
        self.penalty_until[slot] = max(self.penalty_until[slot], now + 2 * cooldown)
        self.errors[slot] = (1 - self.ALPHA) * self.errors[slot] + self.ALPHA
        self._rebucket(slot)

    def circuit_open(self, name: str) -> bool:
        slot = self.slot_of.get(name)
        return slot is not None and bool(self.circuit_until[slot] > self._clock())

    def _rebucket(self, slot: int) -> None:
        effective_ms = (self.latency[slot] * 1000 * (1 + 4 * self.errors[slot])
                        * (1 + self.false_pos[slot]))
        self.bucket[slot] = math.floor(2 * math.log2(1 + effective_ms))
        self._rescore(slot)

    def _rescore(self, slot: int) -> None:
        self.static_score[slot] = self.in_flight[slot] * 1e6 + self.bucket[slot]


class RouterMetrics:
    """Lookup time under Spegel's name and label (``spegel_resolve_duration_seconds{router}``)."""

    def __init__(self, registry: CollectorRegistry, router: str = "bloom") -> None:
        family = Histogram("meshmirror_resolve_duration_seconds",
                           "Time to find and rank the candidate peers for a key",
                           ["router"], buckets=_LOOKUP_BUCKETS, registry=registry)
        self.lookup = family.labels(router)


class Router(abc.ABC):
    """Candidate peers for a key, plus the feedback that ranks them."""

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 zone: str = "") -> None:
        self._health = _Health(clock, np.random.default_rng(seed), zone)
        self.metrics = RouterMetrics(registry if registry is not None else CollectorRegistry())

    @property
    def zone(self) -> str:
        """This node's zone ("" when unknown: no peer is preferred for its zone)."""
        return self._health.zone

    def same_zone(self, peer_name: str) -> bool | None:
        """Whether a known peer is in this node's zone; None when either zone is unknown."""
        slot = self._health.slot_of.get(peer_name)
        peer = None if slot is None else self._health.peer_at[slot]
        if peer is None or not peer.zone or not self._health.zone:
            return None
        return peer.zone == self._health.zone

    @abc.abstractmethod
    def _matching_slots(self, key: str) -> IntArray:
        """Slots of the peers that (probably) hold ``key``."""

    @abc.abstractmethod
    def drop_peer(self, name: str) -> None:
        """Forget a peer that died or left: no more candidates from it."""

    def candidates(self, key: str, limit: int = 3) -> list[Peer]:
        """Up to ``limit`` peers that probably hold ``key``, best first."""
        start = time.perf_counter()
        result = self._health.rank(self._matching_slots(key), limit)
        self.metrics.lookup.observe(time.perf_counter() - start)
        return result

    def report(self, peer_name: str, *, ok: bool, latency_s: float,
               false_positive: bool = False) -> None:
        """Outcome of one request: ``ok`` False for errors and bad bytes (penalised),
        ``false_positive`` for a 404 on a key the filter matched (not an error)."""
        self._health.report(peer_name, ok, latency_s, false_positive)

    def outcome(self, peer_name: str, outcome: Outcome, latency_s: float = 0.0) -> None:
        """`PeerRanking.outcome`: what one request's end means for the peer's rank."""
        if outcome is Outcome.UNFIT or (
                outcome is Outcome.TIMEOUT and self.failures_in_a_row(peer_name)):
            self.trip(peer_name)
        else:
            self.report(peer_name, ok=outcome is Outcome.OK, latency_s=latency_s,
                        false_positive=outcome is Outcome.FALSE_POSITIVE)

    def penalise(self, peer_name: str, cooldown_s: float = 30.0) -> None:
        """Push a peer down for ``cooldown_s``, below every healthy one."""
        self._health.penalise(peer_name, cooldown_s)

    def trip(self, peer_name: str) -> None:
        """Open the peer's circuit: it stalled, kept timing out or sent bytes that failed
        verification. It is no candidate for a cooling period that doubles with each
        consecutive trip, then ranks last until a success closes the circuit for good."""
        self._health.trip(peer_name)

    def failures_in_a_row(self, peer_name: str) -> int:
        """Failures (errors and trips) reported for the peer since its last success."""
        slot = self._health.slot_of.get(peer_name)
        return 0 if slot is None else int(self._health.strikes[slot])

    def circuit_open(self, peer_name: str) -> bool:
        """Whether the peer is left out of candidates right now."""
        return self._health.circuit_open(peer_name)

    def false_positive_rate(self, peer_name: str) -> float:
        """The peer's learned share of 404s for keys its filter claimed."""
        return self._health.false_positive_rate(peer_name)

    def begin(self, peer_name: str) -> None:
        self._health.begin(peer_name)

    def end(self, peer_name: str) -> None:
        self._health.end(peer_name)

    @contextmanager
    def request(self, peer_name: str) -> Iterator[None]:
        """Count a request to the peer as in flight for the duration of the block."""
        self.begin(peer_name)
        try:
            yield
        finally:
            self.end(peer_name)

    def in_flight(self, peer_name: str) -> int:
        slot = self._health.slot_of.get(peer_name)
        return 0 if slot is None else int(self._health.in_flight[slot])

    def peers(self) -> list[Peer]:
        return [p for p in self._health.peer_at if p is not None]


class InMemoryRouter(Router):
    """Exact key -> peers map; the reference the Bloom router is held to."""

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 zone: str = "") -> None:
        super().__init__(registry=registry, clock=clock, seed=seed, zone=zone)
        self._holders: dict[str, set[int]] = {}
        self._keys_of: dict[int, set[str]] = {}

    def set_keys(self, peer: Peer, keys: Iterable[str]) -> None:
        """Replace everything known about ``peer`` with exactly ``keys``."""
        slot = self._health.add(peer)
        self._forget_keys(slot)
        new = set(keys)
        self._keys_of[slot] = new
        for key in new:
            self._holders.setdefault(key, set()).add(slot)

    def drop_peer(self, name: str) -> None:
        slot = self._health.remove(name)
        if slot is not None:
            self._forget_keys(slot)

    def _forget_keys(self, slot: int) -> None:
        for key in self._keys_of.pop(slot, ()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._holders[key]

    def _matching_slots(self, key: str) -> IntArray:
        holders = self._holders.get(key)
        if not holders:
            return _EMPTY
        return np.fromiter(holders, dtype=np.int64, count=len(holders))


@dataclass(frozen=True, slots=True)
class _Active:
    """What a lookup reads of the placed filters, one value per placed slot, and the
    scratch arrays it computes in, (kmax, slots) so every operation runs along
    contiguous rows; allocated once per change of placement, so a lookup allocates
    nothing in proportion to the peers but its answer."""

    slots: IntArray
    m: npt.NDArray[np.uint64]
    mask: npt.NDArray[np.uint64]  # m - 1, for `MASK` filters
    bit_offset: npt.NDArray[np.uint64]  # where each filter starts in the buffer, in bits
    kmax: int
    beyond_k: npt.NDArray[np.uint8] | None  # 1 where a filter has fewer than kmax hashes
    reduction: int  # the first filter's; most share it
    same_reduction: npt.NDArray[np.bool_] | None  # None when all do
    pos: npt.NDArray[np.uint64]  # (kmax, slots) scratch
    other: npt.NDArray[np.uint64] | None  # the other reduction's positions, when mixed
    byte: npt.NDArray[np.uint64]
    probe: npt.NDArray[np.uint8]
    bit: npt.NDArray[np.uint8]


_U64 = (1 << 64) - 1


class _Filters:
    """Every installed filter end to end in one byte buffer, one segment per slot.

    A filter replaced by one of the same byte length is overwritten in place
    (the usual case: a new version, or a delta, of the same filter); any other
    is appended and its old segment becomes garbage, compacted away (in place)
    once garbage outweighs live bytes. Per-slot geometry lives in flat arrays
    that a lookup reads whole.

    Memory: the buffer is an anonymous mapping of `RESERVE` bytes, whose pages
    the kernel backs only once written, so the reservation costs no resident
    memory and growing never copies (a copy would hold the old and the new
    buffer at once: twice the filters' size at the peak, past a 128 MiB pod
    limit at 32 MiB of filters). Compaction hands the freed tail's pages back
    (``MADV_DONTNEED``), so dropped peers' filters stop counting too.
    """

    RESERVE = 256 * 1024 * 1024

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None  # reserved on first use
        self.buf: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)
        self.end = 0
        self.garbage = 0
        self.offset: IntArray = _EMPTY.copy()
        self.length: IntArray = _EMPTY.copy()
        self.m: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self.k: IntArray = _EMPTY.copy()
        self.reduction: IntArray = _EMPTY.copy()
        self.placed: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self._active: _Active | None = None

    @property
    def live_bytes(self) -> int:
        return self.end - self.garbage

    def _fit(self, slot: int) -> None:
        if slot < len(self.placed):
            return
        size = max(16, 2 * len(self.placed), slot + 1)
        for name in ("offset", "length", "m", "k", "reduction", "placed"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def put(self, slot: int, bits: bytes | npt.NDArray[np.uint8], m: int, k: int,
            reduction: int) -> None:
        self._fit(slot)
        size = m // 8
        if self.placed[slot] and int(self.length[slot]) == size:
            start = int(self.offset[slot])
        else:
            self.remove(slot)
            if self.end + size > len(self.buf):
                self._grow(size)
            start = self.end
            self.end += size
        self.buf[start:start + size] = np.frombuffer(bits, dtype=np.uint8) if isinstance(
            bits, bytes) else bits
        self.offset[slot], self.length[slot] = start, size
        self.m[slot], self.k[slot], self.reduction[slot] = m, k, reduction
        self.placed[slot] = True
        self._active = None

    def column(self, slot: int) -> npt.NDArray[np.uint8] | None:
        """The slot's live bits (a view), or None when it has no filter."""
        if slot >= len(self.placed) or not self.placed[slot]:
            return None
        start = int(self.offset[slot])
        return self.buf[start:start + int(self.length[slot])]

    def remove(self, slot: int) -> None:
        if slot >= len(self.placed) or not self.placed[slot]:
            return
        self.placed[slot] = False
        self.garbage += int(self.length[slot])
        self._active = None
        if self.garbage > self.live_bytes:
            self._compact()

    def _grow(self, need: int) -> None:
        size = max(2 * len(self.buf), self.end + need, self.RESERVE)
        mapped = mmap.mmap(-1, size)
        buf = np.frombuffer(mapped, dtype=np.uint8)
        buf[: self.end] = self.buf[: self.end]
        old, self._map, self.buf = self._map, mapped, buf
        if old is not None:
            old.close()

    def _compact(self) -> None:
        """Slide live segments down over the garbage, in offset order (so a move never
        overwrites a segment not yet moved), then zero the freed tail."""
        slots = np.flatnonzero(self.placed)
        slots = slots[np.argsort(self.offset[slots])]
        at = 0
        for slot in slots.tolist():
            start, size = int(self.offset[slot]), int(self.length[slot])
            if start != at:
                self.buf[at:at + size] = self.buf[start:start + size]
                self.offset[slot] = at
            at += size
        # The freed tail reads as zeros again, and its whole pages leave resident memory.
        page = mmap.PAGESIZE
        first_page = -(-at // page) * page
        self.buf[at:min(first_page, self.end)] = 0
        if self._map is not None and first_page < self.end:
            self._map.madvise(mmap.MADV_DONTNEED, first_page,
                              -(-self.end // page) * page - first_page)
        self.end, self.garbage = at, 0
        self._active = None  # offsets moved

    def active(self) -> _Active:
        """The placed slots and their geometry, gathered once per change of placement."""
        if self._active is None:
            slots = np.flatnonzero(self.placed).astype(np.int64)
            k, reduction = self.k[slots], self.reduction[slots]
            kmax = int(k.max()) if len(slots) else 0
            first = int(reduction[0]) if len(slots) else MASK
            m = self.m[slots]
            shape = (kmax, len(slots))
            same = None if bool(np.all(reduction == first)) else (reduction == first)
            self._active = _Active(
                slots, m, np.maximum(m, np.uint64(1)) - np.uint64(1),
                self.offset[slots].astype(np.uint64) * np.uint64(8), kmax,
                (np.arange(kmax)[:, None] >= k[None, :]).astype(np.uint8)
                if bool(np.any(k != kmax)) else None,
                first, same, np.empty(shape, np.uint64),
                None if same is None else np.empty(shape, np.uint64),
                np.empty(shape, np.uint64), np.empty(shape, np.uint8),
                np.empty(shape, np.uint8))
        return self._active

    def match(self, h1: int, h2: int) -> IntArray:
        """Slots whose filters have all of the key's bits set.

        A few whole-array operations on (k, slots) arrays, written into the
        active set's scratch arrays: a lookup's cost is arithmetic, not allocation
        and page faults, which is what its tail was made of."""
        act = self.active()
        if len(act.slots) == 0:
            return _EMPTY
        sums = [(h1 + i * h2) & _U64 for i in range(act.kmax)]  # wraps modulo 2^64
        pos = act.pos
        self._reduce(act, sums, act.reduction, pos)
        if act.same_reduction is not None and act.other is not None:
            self._reduce(act, sums, MASK if act.reduction != MASK else 1, act.other)
            np.copyto(pos, act.other, where=~act.same_reduction)
        np.add(pos, act.bit_offset, out=pos)  # bit positions in the whole buffer
        np.right_shift(pos, np.uint64(3), out=act.byte)
        np.take(self.buf, act.byte.view(np.int64), out=act.probe)
        np.bitwise_and(pos, np.uint64(7), out=act.bit, casting="unsafe")  # 0-7 fits
        np.right_shift(act.probe, act.bit, out=act.probe)
        if act.beyond_k is not None:
            np.bitwise_or(act.probe, act.beyond_k, out=act.probe)
        hit = np.bitwise_and.reduce(act.probe, axis=0)
        return act.slots[np.flatnonzero(hit & 1)]

    @staticmethod
    def _reduce(act: _Active, sums: list[int], reduction: int,
                out: npt.NDArray[np.uint64]) -> None:
        """`bloom.reduce_sums` for every active filter at once, into ``out``."""
        if reduction == MASK:
            np.bitwise_and(np.array(sums, dtype=np.uint64)[:, None], act.mask, out=out)
        else:
            # Lemire's ((x >> 32) * m) >> 32; the high halves are taken in Python.
            np.multiply(np.array([x >> 32 for x in sums], dtype=np.uint64)[:, None], act.m,
                        out=out)
            np.right_shift(out, np.uint64(32), out=out)


def filter_fp_rate(summary: Summary) -> float:
    """The share of random keys ``summary``'s filter matches: its fill ratio to the k.

    Taken from the bits themselves rather than from the key count the summary
    states, which a peer could understate."""
    return bits_fp_rate(np.frombuffer(summary.bits, dtype=np.uint8), summary.m, summary.k)


def bits_fp_rate(bits: npt.NDArray[np.uint8], m: int, k: int) -> float:
    if m == 0:
        return 1.0
    fill = int(np.bitwise_count(bits).sum()) / m
    return float(fill**k)


class BloomRouter(Router):
    """Candidates from peers' Bloom summaries; fed by a PeerDirectory.

    ``set_summary(peer, summary)`` installs or replaces a peer's filter,
    ``set_address(peer)`` follows a peer whose registry moved and
    ``drop_peer(name)`` removes it; the directory calls all three. A filter
    that would match more than ``USELESS_FP`` of all keys is not installed (the
    peer stays known, with no keys), so it cannot draw every request.
    """

    USELESS_FP = 0.5

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None,
                 zone: str = "") -> None:
        super().__init__(registry=registry, clock=clock, seed=seed, zone=zone)
        self._filters = _Filters()

    def filter_bytes(self) -> int:
        """Bytes of peers' filters held: the router's memory that grows with peers."""
        return self._filters.live_bytes

    def set_summary(self, peer: Peer, summary: Summary) -> None:
        slot = self._health.add(peer)
        expected = filter_fp_rate(summary)
        self._health.expected_fp[slot] = expected
        if expected > self.USELESS_FP or summary.k > MAX_K:
            self._filters.remove(slot)
            return
        self._filters.put(slot, summary.bits, summary.m, summary.k, summary.reduction)

    def apply_delta(self, peer: Peer, delta: SummaryDelta) -> bool:
        """Set a delta's positions in the peer's filter, if one of its geometry is installed."""
        slot = self._health.slot_of.get(peer.name)
        if slot is None:
            return False
        filters = self._filters
        bits = filters.column(slot)
        if bits is None or (int(filters.m[slot]), int(filters.k[slot]),
                            int(filters.reduction[slot])) != (delta.m, delta.k, delta.reduction):
            return False
        pos = delta.positions
        np.bitwise_or.at(bits, (pos >> np.uint64(3)).astype(np.int64),
                         np.left_shift(1, pos & np.uint64(7)).astype(np.uint8))
        expected = bits_fp_rate(bits, delta.m, delta.k)
        self._health.expected_fp[slot] = expected
        if expected > self.USELESS_FP:
            filters.remove(slot)
        return True

    def set_address(self, peer: Peer) -> None:
        """A known peer's registry moved or its zone changed; its filter and history stay."""
        if peer.name in self._health.slot_of:
            self._health.add(peer)

    def drop_peer(self, name: str) -> None:
        slot = self._health.remove(name)
        if slot is not None:
            self._filters.remove(slot)

    def _matching_slots(self, key: str) -> IntArray:
        h1, h2 = key_hashes(key)
        return self._filters.match(h1, h2)
