"""One bad peer must not hurt a pull: stalls, drips, lies after a resume, 404s, bursts.

Real HTTP peers on loopback (`peers.FakePeer`) with scripted faults, against a
`PeerMirror` in this process. The same faults against whole nodes joined to a
mesh are in tests/reliability/.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import FallbackContent, Miss
from meshmirror.routing.router import InMemoryRouter
from tests.mirror.peers import Behaviour, FakePeer

BLOB = os.urandom(3 * 1024 * 1024 + 5)
DIGEST = Digest.of(BLOB)
SMALL = os.urandom(200_000)
SMALL_DIGEST = Digest.of(SMALL)


@pytest.fixture
async def started() -> AsyncIterator[list[FakePeer]]:
    peers: list[FakePeer] = []
    yield peers
    for peer in peers:
        await peer.stop()


async def peer(started: list[FakePeer], name: str, **faults: object) -> FakePeer:
    behaviour = Behaviour(blobs={str(DIGEST): BLOB, str(SMALL_DIGEST): SMALL})
    for field, value in faults.items():
        setattr(behaviour, field, value)
    fake = await FakePeer(name, behaviour).start()
    started.append(fake)
    return fake


def mirror_of(session: aiohttp.ClientSession, first: FakePeer, *rest: FakePeer,
              **options: float | int) -> tuple[PeerMirror, InMemoryRouter, CollectorRegistry]:
    """A mirror whose router ranks ``first`` first (it answered fastest before)."""
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    for fake in (first, *rest):
        router.set_keys(fake.peer, [str(DIGEST), str(SMALL_DIGEST)])
    router.report(first.name, ok=True, latency_s=0.0001)
    for fake in rest:
        router.report(fake.name, ok=True, latency_s=0.2)
    settings: dict[str, float | int] = {"verify_before_send_limit": 1 << 20,
                                        "chunk_size": 256 * 1024, "stall_timeout": 0.3}
    settings.update(options)
    opts = MirrorConfig(**settings)  # type: ignore[arg-type]
    return PeerMirror(router, session, options=opts, metrics=MirrorMetrics(registry)), \
        router, registry


async def fetch(mirror: PeerMirror, digest: Digest = DIGEST) -> bytes | None:
    content = await mirror.open_blob("docker.io", "library/x", digest, None, True)
    if isinstance(content, Miss):
        return None
    assert content.body is not None
    return b"".join([chunk async for chunk in content.body])


def failures(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("meshmirror_mirror_peer_failures_total",
                                     {"reason": reason}) or 0.0


async def test_lying_prefix_then_stall_blames_the_liar_not_the_peer_resumed_from(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    liar = await peer(started, "liar", lie=True, stall_after=100_000)
    honest = await peer(started, "honest")
    mirror, router, registry = mirror_of(session, liar, honest)
    began = time.monotonic()
    assert await fetch(mirror) == BLOB
    assert time.monotonic() - began < 2.0
    # The honest peer was asked with Range, the mismatch re-read it from byte 0 alone.
    assert [r[1] for r in honest.behaviour.requests] == ["bytes=100000-", None]
    assert router.circuit_open(liar.name)
    assert not router.circuit_open(honest.name)
    assert failures(registry, "digest_mismatch") == 1  # the liar's, after the verified re-read
    # The next pull goes straight to the honest peer.
    assert await fetch(mirror) == BLOB
    assert len(liar.behaviour.requests) == 1


async def test_a_dripping_peer_is_left_within_two_stall_windows(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    drip = await peer(started, "drip", drip_interval=0.05)
    honest = await peer(started, "honest")
    mirror, router, registry = mirror_of(session, drip, honest)
    for digest, body in ((SMALL_DIGEST, SMALL), (DIGEST, BLOB)):  # memory and spool paths
        router.report(drip.name, ok=True, latency_s=0.0001)  # close the circuit, rank it first
        began = time.monotonic()
        assert await fetch(mirror, digest) == body
        assert time.monotonic() - began < 2 * 0.3 + 0.5
    assert failures(registry, "slow") == 2
    assert not router.circuit_open(honest.name)
    await asyncio.wait_for(drip.behaviour.client_gone.wait(), 3)


async def test_a_hanging_peer_alone_is_a_miss_within_the_stall_bound(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    hang = await peer(started, "hang", stall_after=10)
    mirror, router, _ = mirror_of(session, hang)
    began = time.monotonic()
    assert await fetch(mirror) is None
    assert time.monotonic() - began < 0.3 + 0.5
    assert router.circuit_open(hang.name)


async def test_a_moving_queue_is_waited_for_and_a_stuck_one_is_not(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    # One request at a time, 0.2 s each: the queue moves, so all four are served
    # though the last waits 0.6 s, past the 0.35 s deadline.
    busy = await peer(started, "busy", header_delay=0.2)
    mirror, router, registry = mirror_of(session, busy, peer_connections=1, deadline=0.35)
    bodies = await asyncio.gather(*(fetch(mirror, SMALL_DIGEST) for _ in range(4)))
    assert bodies == [SMALL] * 4
    # A streamed body whose client does not read holds the only connection: the
    # next request gives up after the deadline with the queue stuck, blaming nobody.
    mirror, router, registry = mirror_of(session, busy, peer_connections=1, deadline=0.35,
                                         spool_limit=0)
    held = await mirror.open_blob("docker.io", "library/x", DIGEST, None, True)
    assert isinstance(held, FallbackContent) and held.body is not None
    began = time.monotonic()
    assert await fetch(mirror, SMALL_DIGEST) is None
    assert 0.35 <= time.monotonic() - began < 0.35 + 0.2
    assert failures(registry, "queue_stalled") == 1
    assert not router.circuit_open(busy.name)
    await held.body.aclose()  # type: ignore[attr-defined]
    assert router.in_flight(busy.name) == 0


async def test_a_404_is_ranked_with_the_time_it_took(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    liar = await peer(started, "liar", not_found=True, header_delay=0.045)
    honest = await peer(started, "honest")
    # No cache: each fetch must go to the peers for the ranking to show.
    mirror, router, _ = mirror_of(session, liar, honest, connect_timeout=0.2,
                                  upstream_cache_limit=0)
    for _ in range(10):
        assert await fetch(mirror, SMALL_DIGEST) == SMALL
    assert len(liar.behaviour.requests) <= 2, "demoted after a couple of false positives"
    # The rest went straight to the honest peer, without the liar's 45 ms first (the
    # times themselves are not asserted: this machine is shared and noisy).
    assert len(honest.behaviour.requests) >= 10
    assert router.false_positive_rate(liar.name) > 0.2


async def test_head_is_answered_only_for_a_verified_blob(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    liar = await peer(started, "liar", lie=True)
    mirror, _, _ = mirror_of(session, liar)
    assert isinstance(await mirror.open_blob("docker.io", "library/x", DIGEST, None, False), Miss)
    honest = await peer(started, "honest")
    mirror, _, _ = mirror_of(session, honest)
    head = await mirror.open_blob("docker.io", "library/x", DIGEST, None, False)
    assert isinstance(head, FallbackContent) and head.size == len(BLOB) and head.body is None


async def test_a_burst_waits_in_the_peer_queue_instead_of_timing_out(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    # Each answer takes 0.15 s and only two run at once: 12 requests queue for
    # up to 0.9 s, far past the first-byte bound, which must not count the queue.
    busy = await peer(started, "busy", header_delay=0.15)
    mirror, router, registry = mirror_of(session, busy, peer_connections=2,
                                         first_byte_timeout=0.3, connect_timeout=0.2)
    bodies = await asyncio.gather(*(fetch(mirror, SMALL_DIGEST) for _ in range(12)))
    assert bodies == [SMALL] * 12
    assert failures(registry, "timeout") == 0
    assert router.in_flight(busy.name) == 0


async def test_the_memory_budget_bounds_chunks_across_concurrent_fetches(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    honest = await peer(started, "honest")
    mirror, _, _ = mirror_of(session, honest, memory_limit=1024 * 1024,
                             chunk_size=256 * 1024)
    bodies = await asyncio.gather(*(fetch(mirror) for _ in range(8)))
    assert bodies == [BLOB] * 8
    budget = mirror.client.budget
    assert budget.peak <= budget.limit
    assert budget.used == 0


async def test_a_peer_hedged_to_and_left_for_a_liar_is_asked_again_after_the_lie(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    """The liar answers after the hedge delay, so the honest peer is asked too; the liar's
    headers come first and its response is taken, the honest one is dropped unread. Its
    peer did nothing wrong: once the liar's bytes fail to verify, it is the next source
    (it was left out as if it had failed, and the pull was a 404 with good bytes a
    request away)."""
    # Hedged after 50 ms; the honest peer's headers come 150 ms after the liar's, well
    # inside the 300 ms stall bound that applies to them.
    liar = await peer(started, "liar", corrupt=True, header_delay=0.08)
    honest = await peer(started, "honest", header_delay=0.2)
    mirror, router, registry = mirror_of(session, liar, honest)
    assert await fetch(mirror) == BLOB
    assert [r[1] for r in honest.behaviour.requests] == [None, None]
    assert router.circuit_open(liar.name)
    assert not router.circuit_open(honest.name)
    assert failures(registry, "digest_mismatch") == 1


@pytest.mark.parametrize("lie_size", [-1000, 1000], ids=["smaller", "larger"])
async def test_a_liar_about_the_size_is_blamed_and_the_blob_read_from_the_next_peer(
        session: aiohttp.ClientSession, started: list[FakePeer], lie_size: int) -> None:
    """A peer announcing another size than the blob's (a compressed body, a lie) and
    sending that many wrong bytes: the flight's cache entry was made for its size, and
    the honest peer's whole blob did not fit it (a 404) or left the entry, and every
    reader's Content-Length, at the liar's size."""
    liar = await peer(started, "liar", lie=True, lie_size=lie_size)
    honest = await peer(started, "honest")
    mirror, router, registry = mirror_of(session, liar, honest)
    assert await fetch(mirror) == BLOB
    content = await mirror.open_blob("docker.io", "library/x", DIGEST, None, False)
    assert isinstance(content, FallbackContent) and content.size == len(BLOB)
    assert len(liar.behaviour.requests) == 1
    assert router.circuit_open(liar.name)
    assert not router.circuit_open(honest.name)
    assert failures(registry, "digest_mismatch") == 1


@pytest.mark.parametrize("lie_size", [-100_000, 500_000], ids=["smaller", "larger"])
async def test_a_liar_about_the_size_leaves_the_memory_budget_as_it_was(
        session: aiohttp.ClientSession, started: list[FakePeer], lie_size: int) -> None:
    """A small blob the cache does not take is held in memory until verified, its size
    taken from the budget as the first peer announced it. A liar's size and the verified
    one differ: the budget got back the verified size, leaking the difference for good
    (a larger lie: in-memory requests and body threads end up waiting for memory that
    never comes back) or giving back memory others hold (a smaller one)."""
    liar = await peer(started, "liar", lie=True, lie_size=lie_size)
    honest = await peer(started, "honest")
    mirror, _, _ = mirror_of(session, liar, honest, upstream_cache_limit=0)
    budget = mirror.client.budget
    held_elsewhere = 300_000
    await budget.take(held_elsewhere)
    assert await fetch(mirror, SMALL_DIGEST) == SMALL
    assert liar.behaviour.requests, "the case must exercise the liar"
    assert budget.used == held_elsewhere


async def test_a_liar_about_the_size_cannot_make_the_node_stream_it_unverified_bytes(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    """A blob the cache cannot hold is streamed, its bytes sent before they verify; the
    first peer's Content-Length alone chose that path. A liar announcing more than the
    cache holds (64 GiB, on a real node) was streamed to the client as garbage, for as
    long as its size allowed at the minimum rate, and the honest peer resumed to was
    blamed for a 416. Now another candidate must agree on the size first: here it does
    not, and the answer is a 404 (containerd goes upstream), blaming nobody."""
    liar = await peer(started, "liar", lie=True, lie_size=1000)
    honest = await peer(started, "honest")
    mirror, router, registry = mirror_of(session, liar, honest, upstream_cache_limit=0)
    assert await fetch(mirror) is None
    assert not router.circuit_open(honest.name)
    assert failures(registry, "bad_status") == 0
    # An honest stream, confirmed by the other peer's last byte, is served as before.
    liar.behaviour.lie = False
    assert await fetch(mirror) == BLOB
    assert [r[1] for r in honest.behaviour.requests][-1] == f"bytes={len(BLOB) - 1}-{len(BLOB) - 1}"


async def test_a_liar_that_breaks_past_the_blobs_end_gets_nobody_else_blamed(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    """A liar announcing more than the blob and breaking after its real end: resumed to
    past its end, the honest peer answers 416. That is a disagreement about the size,
    which the bytes settle (as a different total in its Content-Range would be): the
    blob is read again from byte 0 there, not a failure charged to the honest peer."""
    liar = await peer(started, "liar", lie=True, lie_size=500_000,
                      break_after=len(BLOB) + 100_000)
    honest = await peer(started, "honest")
    mirror, router, registry = mirror_of(session, liar, honest)
    assert await fetch(mirror) == BLOB
    assert [r[1] for r in honest.behaviour.requests] == [f"bytes={len(BLOB) + 100_000}-", None]
    assert failures(registry, "bad_status") == 0
    assert not router.circuit_open(honest.name)


async def test_a_liar_about_the_size_holds_none_of_the_cache_once_found_out(
        session: aiohttp.ClientSession, started: list[FakePeer]) -> None:
    """A peer announcing a larger size than the blob's, which the cache can take, had
    the flight's entry reserve that size; once its bytes failed the digest, the entry
    kept the reservation (and the bytes on disk) while the next peer was looked for,
    which may take until the fetch's deadline. Here the honest peer takes a second to
    answer: meanwhile the cache holds nothing."""
    lie_size = 2 * 1024 * 1024
    liar = await peer(started, "liar", lie=True, lie_size=lie_size)
    honest = await peer(started, "honest", header_delay=1.0)
    mirror, _, registry = mirror_of(session, liar, honest, stall_timeout=3.0,
                                    first_byte_timeout=3.0)
    cache = mirror.flights.cache
    fetching = asyncio.create_task(fetch(mirror))
    try:
        async with asyncio.timeout(10):
            while failures(registry, "digest_mismatch") == 0:  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.005)
        assert not fetching.done(), "the honest peer's delay must still be running"
        assert (cache.total, cache.held) == (0, 0)
        assert all(path.stat().st_size == 0 for path in cache_files(mirror))
        assert await fetching == BLOB
    finally:
        fetching.cancel()
    assert cache.total == len(BLOB)


def cache_files(mirror: PeerMirror) -> list[Path]:
    root = mirror.flights.cache._root
    return [] if root is None else [p for p in root.iterdir() if p.name != ".lock"]
