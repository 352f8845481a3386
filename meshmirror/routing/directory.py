"""The peer directory: the latest Bloom summary of every alive peer.

Membership tells the directory who is alive, where their registry listens and
which summary epoch they advertise (node metadata); the directory fetches a
peer's ``/_mesh/v1/summary`` whenever that epoch moves past the one it holds,
and hands each installed summary to a sink (the BloomRouter). Filters never
ride in gossip: metadata is capped at 512 bytes and a filter is kilobytes.

Fetching rules, per peer:
  * at most one fetch in flight: one task per peer loops until the summary it
    holds is at least the advertised epoch, re-reading the advertised epoch on
    every turn, so a burst of epoch changes costs one fetch, not one each;
  * ``If-None-Match`` with the held epoch, a bounded timeout, and exponential
    backoff with jitter between failed attempts (capped, retried while the
    peer is alive and stale, since a stale filter costs false hits); a newly
    advertised epoch cuts the wait short and restarts the backoff;
  * a response older than what is held is ignored (a slow response racing a
    newer one, or a load balancer answering from elsewhere);
  * a dead or left peer is dropped at once, with its in-flight fetch.

`meshmirror.peering` feeds it from membership events, which reach the node's
event loop through a queue (the mesh itself runs on its own thread): it calls
``update_peer`` when a peer joins or changes its metadata and ``remove_peer``
when it dies or leaves. Every method runs on that one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshmirror.routing.router import Peer
from meshmirror.routing.summary import (
    FetchError,
    Summary,
    SummaryFormatError,
    fetch_summary,
    wall_clock_ms,
)
from meshmirror.routing.vouches import VouchBook

log = logging.getLogger(__name__)

_PROPAGATION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)


class SummarySink(Protocol):
    """Where installed summaries go; BloomRouter implements it."""

    def set_summary(self, peer: Peer, summary: Summary) -> None: ...

    def set_address(self, peer: Peer) -> None: ...

    def drop_peer(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class HeldSummary:
    """What the directory keeps of an installed summary: the bits live only in
    the sink (at 1,000 peers they are tens of MiB; one copy is enough)."""

    epoch: int
    count: int
    born_at_ms: int
    m: int
    k: int


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
        for result in ("ok", "not_modified", "error"):
            self.fetches.labels(result)


@dataclass(slots=True)
class _PeerState:
    peer: Peer
    advertised: int | None
    held: HeldSummary | None = None
    task: asyncio.Task[None] | None = None
    # Set when the advertised epoch moves: cuts a backoff wait short, so a peer
    # that failed a while ago is fetched as soon as it has something new.
    poke: asyncio.Event = field(default_factory=asyncio.Event)

    def is_current(self) -> bool:
        if self.held is None:
            return False
        return self.advertised is None or self.held.epoch >= self.advertised


class PeerDirectory:
    """Alive peers and their latest summaries; every method runs on one event loop."""

    def __init__(self, sink: SummarySink, *, registry: CollectorRegistry | None = None,
                 timeout_s: float = 2.0, backoff_s: float = 0.1, max_backoff_s: float = 10.0,
                 max_summary_bytes: int = 64 * 1024 * 1024,
                 wall_ms: Callable[[], int] | None = None,
                 vouches: VouchBook | None = None) -> None:
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
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._update_share()

    def update_peer(self, name: str, http_base: str, epoch: int | None) -> None:
        """A peer is alive at ``http_base`` advertising ``epoch`` (None: not yet known)."""
        if self._closed:
            return
        base = check_http_base(http_base)
        if epoch is not None and epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        state = self._peers.get(name)
        if state is None:
            state = self._peers[name] = _PeerState(Peer(name, base), epoch)
        else:
            if state.peer.http_base != base:
                state.peer = Peer(name, base)
                self._sink.set_address(state.peer)
            if epoch is not None and (state.advertised is None or epoch > state.advertised):
                state.advertised = epoch
                state.poke.set()
        if not state.is_current() and (state.task is None or state.task.done()):
            state.task = asyncio.get_running_loop().create_task(
                self._sync(state), name=f"summary-fetch-{name}")
        self._update_share()

    def remove_peer(self, name: str) -> None:
        """A peer died or left: forget its summary and stop fetching it."""
        state = self._peers.pop(name, None)
        if state is None:
            return
        if state.task is not None:
            state.task.cancel()
        self._sink.drop_peer(name)
        self.vouches.drop(name)
        self._update_share()

    def held(self, name: str) -> HeldSummary | None:
        """What is known of the peer's installed summary; None before the first."""
        state = self._peers.get(name)
        return None if state is None else state.held

    def peers(self) -> list[Peer]:
        return [state.peer for state in self._peers.values()]

    def share(self) -> float:
        """Share of alive peers whose advertised summary is held (1.0 with no peers)."""
        if not self._peers:
            return 1.0
        return sum(state.is_current() for state in self._peers.values()) / len(self._peers)

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

    async def _sync(self, state: _PeerState) -> None:
        failures = 0
        while self._peers.get(state.peer.name) is state and not state.is_current():
            try:
                fetched = await self._fetch(state)
            except (aiohttp.ClientError, TimeoutError, SummaryFormatError, FetchError) as err:
                self.metrics.fetches.labels("error").inc()
                log.info("summary fetch from %s failed: %s", state.peer.name, err)
                fetched = None
            else:
                self.metrics.fetches.labels("not_modified" if fetched is None else "ok").inc()
            if fetched is not None and self._peers.get(state.peer.name) is state:
                self._install(state, fetched)
            if state.is_current():
                return
            # Failed, not modified yet, or the peer answered an older epoch than
            # it advertises (published between the two): wait, then try again.
            failures += 1
            delay = min(self._max_backoff_s, self._backoff_s * 2 ** (failures - 1))
            state.poke.clear()
            try:
                async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                    await state.poke.wait()
                failures = 0  # a new epoch: start the backoff over
            except TimeoutError:
                pass

    async def _fetch(self, state: _PeerState) -> Summary | None:
        """The peer's summary, or None when it answers 304 for the one held."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        held = state.held.epoch if state.held is not None else None
        return await fetch_summary(self._session, state.peer.http_base, held, self._max_bytes)

    def _install(self, state: _PeerState, summary: Summary) -> None:
        previous = state.held
        if previous is not None and summary.epoch <= previous.epoch:
            return
        state.held = HeldSummary(summary.epoch, summary.count, summary.born_at_ms, summary.m,
                                 summary.k)
        self._sink.set_summary(state.peer, summary)
        self.vouches.set_vouches(state.peer.name, summary.vouches)
        # Observe only versions carrying keys newer than the last one held: the
        # first summary of a peer measures when we met it, not propagation.
        if previous is not None and summary.born_at_ms > previous.born_at_ms:
            delay_s = max(0, self._wall_ms() - summary.born_at_ms) / 1000
            self.metrics.propagation.observe(delay_s)
        self._update_share()
