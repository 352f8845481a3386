"""The peer directory: the latest Bloom summary of every alive peer.

Membership tells the directory who is alive, where their registry listens and
which summary epoch they advertise (node metadata); the directory fetches a
peer's ``/_mesh/v1/summary`` whenever that epoch moves past the one it holds,
and hands each installed summary to a sink (the BloomRouter). Filters never
ride in gossip: metadata is capped at 512 bytes and a filter is kilobytes.

Fetching rules: at most 32 fetches in flight across all peers (a node joining
thousands would otherwise hold a body per peer at once); and per peer:
  * at most one fetch in flight: one task per peer loops until the summary it
    holds is at least the advertised epoch, re-reading the advertised epoch on
    every turn, so a burst of epoch changes costs one fetch, not one each;
  * ``If-None-Match`` with the held epoch, a bounded timeout, and exponential
    backoff with jitter between failed attempts (capped, retried while the
    peer is alive and stale, since a stale filter costs false hits); a newly
    advertised epoch cuts the wait short and restarts the backoff;
  * a response older than what is held is ignored (a slow response racing a
    newer one, or a load balancer answering from elsewhere);
  * a dead or left peer is dropped at once, with its in-flight fetch;
  * an advertised epoch lower than before (the peer restarted with its clock
    behind) is a new summary: fetched whole, whatever epoch is held;
  * a peer already held is asked for a delta (see `summary`); a delta that does
    not fit what is held (another base epoch or geometry, or a filter the sink
    could not install) counts as an error and the next fetch asks for the whole
    filter, so a broken or hostile delta costs one extra fetch, never wrong bits.

Bounded memory. A node does not hold every peer's summary: at 5,000 peers of
21,500 keys that would be 130 MiB of filters. It holds the summaries of the
peers that fit in ``budget_bytes`` (20 MiB: about 780 such peers; a real node
measured 11 MiB for the rest of what 5,000 members cost, gossip state and this
directory included, so all it spends on peers stays within 32 MiB:
bench_summary_scale),
chosen same zone first, then in an order of its own (a hash of its name and the
peer's, so every node samples a different subset and each peer is held by about
the same number of nodes). A peer's filter size is estimated from the key count
it advertises (10 bits a key) before it is fetched and taken from the filter
once held; a peer that understates its keys is caught when its filter arrives:
a fetch reads at most twice what is reckoned for the peer (so fetches in flight
hold at most twice the budget; a larger body is refused on its Content-Length
and the peer chosen again at that size), a filter larger than reckoned that the
budget has no room for is not held (checked before the router takes it, so a
flood of such peers cannot pile up filters between two reselections), and what
is held never exceeds the budget. Content held by a few percent of nodes is
still found (a 1% holder share misses with probability 0.99^780, about 4e-4);
content held by a handful of nodes of thousands may not be, and is then fetched
upstream.
Peers outside the subset stay known (membership), their summaries unfetched.

`meshmirror.peering` feeds it from membership events, which reach the node's
event loop through a queue (the mesh itself runs on its own thread): it calls
``update_peer`` when a peer joins or changes its metadata and ``remove_peer``
when it dies or leaves. Every method runs on that one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshmirror.routing.router import Peer
from meshmirror.routing.summary import (
    SUMMARY_OVERHEAD,
    FetchError,
    Summary,
    SummaryDelta,
    SummaryFormatError,
    SummaryTooLarge,
    fetch_summary,
    wall_clock_ms,
)
from meshmirror.routing.vouches import VouchBook

log = logging.getLogger(__name__)

# Fetches in flight at once. A node joining 5,000 peers would otherwise open about
# 1,200 at once, each holding a body being read: tens of MiB at the start alone.
MAX_CONCURRENT_FETCHES = 32
# What the held summaries may take in all (see "Bounded memory" above).
SUMMARY_BUDGET_BYTES = 20 * 1024 * 1024
# Filter bits a key, as publishers size them (`bloom.bits_for`); for estimates only.
# An int: a key count is a peer's word of any size (hundreds of digits fit its
# metadata), and a float product of one raised OverflowError out of update_peer.
_BITS_PER_KEY = 10
# A peer that advertises no key count yet is assumed this large until fetched.
_UNKNOWN_FILTER_BYTES = 32 * 1024
_PROPAGATION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)


class SummarySink(Protocol):
    """Where installed summaries go; BloomRouter implements it."""

    def set_summary(self, peer: Peer, summary: Summary) -> None: ...

    def apply_delta(self, peer: Peer, delta: SummaryDelta) -> bool:
        """Set the delta's positions in the peer's installed filter; False when no
        filter of the delta's geometry is installed for it."""
        ...

    def set_address(self, peer: Peer) -> None: ...

    def drop_peer(self, name: str) -> None: ...


def _close(a: int | None, b: int | None) -> bool:
    """Key counts near enough (within a quarter) that the held subset need not change."""
    if a is None or b is None:
        return a == b
    return abs(a - b) <= max(a, b) // 4


@dataclass(frozen=True, slots=True)
class HeldSummary:
    """What the directory keeps of an installed summary: the bits live only in
    the sink (at 1,000 peers they are tens of MiB; one copy is enough)."""

    epoch: int
    count: int
    born_at_ms: int
    m: int
    k: int
    reduction: int = 0


def check_http_base(http_base: str) -> str:
    """``http_base`` without a trailing slash; ValueError unless http(s)://host:port."""
    parts = urlsplit(http_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"peer address {http_base!r} is not http(s)://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"peer address {http_base!r} must have no path, query or fragment")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as err:
        raise ValueError(f"peer address {http_base!r} has an invalid port") from err
    return http_base.rstrip("/")


class DirectoryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.share = Gauge("meshmirror_peer_summaries_share",
                           "Share of alive peers whose current summary this node holds",
                           registry=registry)
        self.propagation = Histogram(
            "meshmirror_summary_propagation_seconds",
            "Seconds from a key's arrival on a peer to this node holding a summary with it",
            buckets=_PROPAGATION_BUCKETS, registry=registry)
        self.fetches = Counter("meshmirror_peer_summary_fetches",
                               "Summary fetches from peers by result", ["result"],
                               registry=registry)
        self.peers = Gauge("meshmirror_peer_directory_peers",
                           "Alive peers known to the directory", registry=registry)
        self.selected = Gauge("meshmirror_peer_directory_selected",
                              "Peers whose summaries this node holds (fits the memory budget)",
                              registry=registry)
        self.held_bytes = Gauge("meshmirror_peer_summary_held_bytes",
                                "Bytes of peers' filters this node holds", registry=registry)
        for result in ("ok", "delta", "not_modified", "error"):
            self.fetches.labels(result)
        self.fetched_bytes = Counter(
            "meshmirror_peer_summary_fetched_bytes",
            "Bytes of summaries and deltas received from peers, by kind (full, delta)",
            ["kind"], registry=registry)
        for kind in ("full", "delta"):
            self.fetched_bytes.labels(kind)


@dataclass(slots=True)
class _PeerState:
    peer: Peer
    advertised: int | None
    held: HeldSummary | None = None
    task: asyncio.Task[None] | None = None
    # Set when the advertised epoch moves: cuts a backoff wait short, so a peer
    # that failed a while ago is fetched as soon as it has something new.
    # (Made by the fetch task when it first waits: thousands of members, few waiting.)
    poke: asyncio.Event | None = None
    # After a delta that did not fit: ask for the whole filter next time.
    full_next: bool = False
    keys: int | None = None  # as advertised
    selected: bool = False
    order: bytes = b""  # where this node ranks the peer among those of its zone class
    # The size of the last filter held: a peer let go for understating its keys is
    # not chosen again on the same understatement.
    seen_bytes: int = 0

    def filter_bytes(self) -> int:
        """The held filter's size, or an estimate from the advertised key count."""
        if self.held is not None:
            return self.held.m // 8
        estimate = (_UNKNOWN_FILTER_BYTES if self.keys is None
                    else max(128, self.keys * _BITS_PER_KEY // 8))
        return max(estimate, self.seen_bytes)

    def is_current(self) -> bool:
        if self.held is None:
            return False
        return self.advertised is None or self.held.epoch >= self.advertised


class PeerDirectory:
    """Alive peers and their latest summaries; every method runs on one event loop."""

    def __init__(self, sink: SummarySink, *, registry: CollectorRegistry | None = None,
                 timeout_s: float = 2.0, backoff_s: float = 0.1, max_backoff_s: float = 10.0,
                 max_summary_bytes: int = 16 * 1024 * 1024,
                 wall_ms: Callable[[], int] | None = None,
                 vouches: VouchBook | None = None, zone: str = "", own_name: str = "",
                 budget_bytes: int = SUMMARY_BUDGET_BYTES,
                 max_fetches: int = MAX_CONCURRENT_FETCHES) -> None:
        if timeout_s <= 0 or backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError("timeout_s > 0 and 0 < backoff_s <= max_backoff_s required")
        self._sink = sink
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_bytes = max_summary_bytes
        self._wall_ms = wall_ms or wall_clock_ms
        # Each installed summary's vouches go here, and leave with their member.
        self.vouches = vouches if vouches is not None else VouchBook()
        self.metrics = DirectoryMetrics(registry if registry is not None else CollectorRegistry())
        self._peers: dict[str, _PeerState] = {}
        self._zone = zone
        self._own_name = own_name
        self._budget = budget_bytes
        self._held_bytes = 0
        # The selected peers' filter sizes as last reckoned (estimates until held).
        self._committed = 0
        self._selection_due = False
        self._fetch_slots = asyncio.Semaphore(max_fetches)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._update_share()

    def update_peer(self, name: str, http_base: str, epoch: int | None, zone: str = "",
                    keys: int | None = None) -> None:
        """A peer is alive at ``http_base`` in ``zone`` advertising ``epoch`` (None: not
        yet known) and a summary of ``keys`` keys (None: not said)."""
        if self._closed:
            return
        base = check_http_base(http_base)
        if epoch is not None and epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if keys is not None and keys < 0:
            raise ValueError(f"key count must be >= 0, got {keys}")
        state = self._peers.get(name)
        if state is None:
            state = self._peers[name] = _PeerState(Peer(name, base, zone), epoch, keys=keys)
            state.order = hashlib.blake2b(f"{self._own_name}\0{name}".encode(),
                                          digest_size=8).digest()
            if self._committed + state.filter_bytes() <= self._budget:
                # Room for it whatever the ranking: held at once, no reshuffle needed.
                state.selected = True
                self._committed += state.filter_bytes()
            else:
                self._select_soon()
        else:
            if (state.peer.http_base, state.peer.zone) != (base, zone):
                if state.peer.zone != zone:
                    self._select_soon()
                state.peer = Peer(name, base, zone)
                if state.selected:
                    self._sink.set_address(state.peer)
            if epoch is not None and (state.advertised is None or epoch > state.advertised):
                state.advertised = epoch
                if state.poke is not None:
                    state.poke.set()
            elif epoch is not None and state.advertised is not None and epoch < state.advertised:
                self._epochs_went_back(state, epoch)
            if keys != state.keys:
                # Only a change that moves the estimate much can change the selection.
                if state.held is None and not _close(keys, state.keys):
                    self._select_soon()
                state.keys = keys
        if state.selected:
            self._start_sync(state)
        self._update_share()

    def _epochs_went_back(self, state: _PeerState, epoch: int) -> None:
        """The peer restarted with its clock behind the epochs it published before
        (gossip never carries an older version of a member's metadata): what is held
        is of a summary it no longer has, and no later epoch of it would replace that
        until its clock caught up. Fetched whole again; the held bits route until then."""
        log.info("peer %s now advertises epoch %d, before the %d it advertised: "
                 "fetching its summary whole", state.peer.name, epoch, state.advertised)
        state.advertised = epoch
        if state.held is not None:
            size = state.held.m // 8
            state.held = None
            self._held_bytes -= size
            if state.selected:
                self._committed += state.filter_bytes() - size
        if state.poke is not None:
            state.poke.set()

    def _start_sync(self, state: _PeerState) -> None:
        if not state.is_current() and (state.task is None or state.task.done()):
            state.task = asyncio.get_running_loop().create_task(
                self._sync(state), name=f"summary-fetch-{state.peer.name}")

    def _select_soon(self) -> None:
        """Choose the held subset once this burst of membership events is applied."""
        if not self._selection_due:
            self._selection_due = True
            asyncio.get_running_loop().call_soon(self._select)

    def _select(self) -> None:
        """Hold the best-ranked peers whose filters fit the budget; let the rest go."""
        self._selection_due = False
        if self._closed:
            return
        ranked = sorted(self._peers.values(),
                        key=lambda s: (bool(self._zone) and s.peer.zone != self._zone, s.order))
        total = 0
        for state in ranked:
            size = state.filter_bytes()
            keep = total + size <= self._budget
            if keep:
                total += size
            if keep and not state.selected:
                state.selected = True
                self._start_sync(state)
            elif not keep and state.selected:
                self._let_go(state)
        self._committed = total
        self._update_share()

    def _let_go(self, state: _PeerState) -> None:
        state.selected = False
        # A fetch task letting its own peer go ends by itself (its loop checks
        # ``selected``); it stays recorded so a reselection does not start a second.
        if state.task is not None and state.task is not asyncio.current_task():
            state.task.cancel()
            state.task = None
        if state.held is not None:
            self._held_bytes -= state.held.m // 8
        state.held = None
        state.full_next = False
        self._sink.drop_peer(state.peer.name)
        self.vouches.drop(state.peer.name)

    def remove_peer(self, name: str) -> None:
        """A peer died or left: forget its summary and stop fetching it."""
        state = self._peers.pop(name, None)
        if state is None:
            return
        if state.task is not None:
            state.task.cancel()
        if state.held is not None:
            self._held_bytes -= state.held.m // 8
        if state.selected:
            self._committed -= state.filter_bytes()
        self._sink.drop_peer(name)
        self.vouches.drop(name)
        self._select_soon()  # room for another
        self._update_share()

    def held(self, name: str) -> HeldSummary | None:
        """What is known of the peer's installed summary; None before the first."""
        state = self._peers.get(name)
        return None if state is None else state.held

    def peers(self) -> list[Peer]:
        return [state.peer for state in self._peers.values()]

    def share(self) -> float:
        """Share of the peers chosen to be held whose advertised summary is held (1.0 with
        none)."""
        chosen = [state for state in self._peers.values() if state.selected]
        if not chosen:
            return 1.0
        return sum(state.is_current() for state in chosen) / len(chosen)

    def selected(self, name: str) -> bool:
        """Whether this node holds (or is fetching) the peer's summary."""
        state = self._peers.get(name)
        return state is not None and state.selected

    @property
    def held_bytes(self) -> int:
        """Bytes of the peers' filters held, which the budget bounds."""
        return self._held_bytes

    async def close(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._peers.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _update_share(self) -> None:
        self.metrics.share.set(self.share())
        self.metrics.peers.set(len(self._peers))
        self.metrics.selected.set(sum(state.selected for state in self._peers.values()))
        self.metrics.held_bytes.set(self._held_bytes)

    async def _sync(self, state: _PeerState) -> None:
        failures = 0
        while (self._peers.get(state.peer.name) is state and state.selected
               and not state.is_current()):
            try:
                fetched = await self._fetch(state)
            except SummaryTooLarge as err:
                # Far larger than reckoned: chosen again (or not) at its real size.
                self.metrics.fetches.labels("error").inc()
                log.info("summary from %s is larger than its keys said: %s", state.peer.name,
                         err)
                state.seen_bytes = max(state.seen_bytes, err.size)
                self._let_go(state)
                self._select_soon()
                self._update_share()
                return
            except (aiohttp.ClientError, TimeoutError, SummaryFormatError, FetchError) as err:
                self.metrics.fetches.labels("error").inc()
                log.info("summary fetch from %s failed: %s", state.peer.name, err)
                # Perhaps a bad delta: the whole filter next time, which a peer
                # that cannot send deltas properly still serves.
                state.full_next = True
            else:
                result = "not_modified" if fetched is None else "ok"
                if isinstance(fetched, SummaryDelta):
                    result = "delta" if self._install_delta(state, fetched) else "error"
                elif fetched is not None:
                    state.full_next = False
                    self._install(state, fetched)
                self.metrics.fetches.labels(result).inc()
            if state.is_current():
                return
            # Failed, not modified yet, or the peer answered an older epoch than
            # it advertises (published between the two): wait, then try again.
            failures += 1
            delay = min(self._max_backoff_s, self._backoff_s * 2 ** (failures - 1))
            if state.poke is None:
                state.poke = asyncio.Event()
            state.poke.clear()
            try:
                async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                    await state.poke.wait()
                failures = 0  # a new epoch: start the backoff over
            except TimeoutError:
                pass

    async def _fetch(self, state: _PeerState) -> Summary | SummaryDelta | None:
        """The peer's summary or a delta from the one held, or None when it answers
        304 for the one held."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        held = state.held
        # Read at most twice what the budget reckons for this peer: fetches in
        # flight then hold at most twice the budget between them, where the 16 MiB
        # cap alone let 32 peers understating their keys hold 512 MiB of bodies.
        limit = min(self._max_bytes, SUMMARY_OVERHEAD + 2 * state.filter_bytes())
        async with self._fetch_slots:
            return await fetch_summary(self._session, state.peer.http_base,
                                       None if held is None else held.epoch, limit,
                                       delta=not state.full_next,
                                       held_m=None if held is None else held.m,
                                       on_body=self._count_bytes)

    def _count_bytes(self, delta: bool, size: int) -> None:
        self.metrics.fetched_bytes.labels("delta" if delta else "full").inc(size)

    def _install_delta(self, state: _PeerState, delta: SummaryDelta) -> bool:
        """Apply a delta to the held summary; False (and the whole filter next) when it
        does not fit it."""
        if self._peers.get(state.peer.name) is not state or not state.selected:
            return True
        held = state.held
        if held is not None and delta.epoch <= held.epoch:
            return True
        if held is None or delta.base_epoch != held.epoch or (
                (delta.m, delta.k, delta.reduction) != (held.m, held.k, held.reduction)) or (
                not self._sink.apply_delta(state.peer, delta)):
            # Not a delta from what is held: nothing is changed, the whole filter comes next.
            log.info("summary delta from %s does not fit the summary held; fetching it whole",
                     state.peer.name)
            state.full_next = True
            return False
        self._held(state, delta.epoch, delta.count, delta.born_at_ms, delta.m, delta.k,
                   delta.reduction)
        self.vouches.set_vouches(state.peer.name, delta.vouches)
        return True

    def _install(self, state: _PeerState, summary: Summary) -> None:
        if self._peers.get(state.peer.name) is not state or not state.selected:
            return
        if state.held is not None and summary.epoch <= state.held.epoch:
            return
        size = summary.m // 8
        previous = state.held.m // 8 if state.held is not None else 0
        if size > state.filter_bytes() and self._held_bytes - previous + size > self._budget:
            # Larger than reckoned and past the budget: checked before the sink takes
            # it, or a burst of such peers (up to the fetches in flight, each up to the
            # size cap) would all be installed before the reselection let them go.
            log.info("summary from %s is %d bytes, more than its keys said and than the "
                     "budget has room for; not held", state.peer.name, size)
            state.seen_bytes = size
            self._let_go(state)
            self._select_soon()
            self._update_share()
            return
        self._sink.set_summary(state.peer, summary)
        self._held(state, summary.epoch, summary.count, summary.born_at_ms, summary.m,
                   summary.k, summary.reduction)
        self.vouches.set_vouches(state.peer.name, summary.vouches)

    def _held(self, state: _PeerState, epoch: int, count: int, born_at_ms: int, m: int, k: int,
              reduction: int) -> None:
        previous = state.held
        reckoned = state.filter_bytes()
        state.held = HeldSummary(epoch, count, born_at_ms, m, k, reduction)
        state.seen_bytes = m // 8
        self._committed += m // 8 - reckoned
        self._held_bytes += m // 8 - (previous.m // 8 if previous is not None else 0)
        if self._held_bytes > self._budget or self._committed > self._budget:
            # Larger than its advertised keys said: choose again with the real size.
            self._select_soon()
        # Observe only versions carrying keys newer than the last one held: the
        # first summary of a peer measures when we met it, not propagation.
        if previous is not None and born_at_ms > previous.born_at_ms:
            delay_s = max(0, self._wall_ms() - born_at_ms) / 1000
            self.metrics.propagation.observe(delay_s)
        self._update_share()
