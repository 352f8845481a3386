"""PeerClient against real HTTP peers on loopback: a request is in flight at its peer
exactly until it is released, on every path, cancellation included."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.mirror.client import PeerClient
from meshmirror.mirror.errors import PeerFailure
from meshmirror.mirror.fetch import StreamBody
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import FallbackContent
from meshmirror.routing.router import InMemoryRouter
from tests.mirror.peers import Behaviour, FakePeer

BLOB = os.urandom(100_000)
BLOB_D = str(Digest.of(BLOB))
PATH = f"/v2/r/blobs/{BLOB_D}"


@pytest.fixture
async def peers() -> AsyncIterator[list[FakePeer]]:
    started: list[FakePeer] = []
    yield started
    for peer in started:
        await peer.stop()


async def start_peer(peers: list[FakePeer], name: str, header_delay: float = 0.0) -> FakePeer:
    peer = await FakePeer(name, Behaviour(blobs={BLOB_D: BLOB}, header_delay=header_delay)).start()
    peers.append(peer)
    return peer


def router_for(*peers: FakePeer) -> InMemoryRouter:
    router = InMemoryRouter(seed=1)
    for peer in peers:
        router.set_keys(peer.peer, [BLOB_D])
    return router


async def test_cancelling_an_open_mid_flight_releases_the_peer(
    session: aiohttp.ClientSession, peers: list[FakePeer]
) -> None:
    peer = await start_peer(peers, "slow", header_delay=5.0)
    router = router_for(peer)
    options = MirrorConfig(first_byte_timeout=10.0)
    client = PeerClient(router, session, options, MirrorMetrics(CollectorRegistry()))
    opening = asyncio.ensure_future(client.open(peer.peer, PATH, "docker.io"))
    for _ in range(200):  # up to 2 s for the request to reach the peer
        if peer.behaviour.requests:
            break
        await asyncio.sleep(0.01)
    assert peer.behaviour.requests, "the request reached the peer"
    assert router.in_flight("slow") == 1
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(opening, 1.0)
    assert router.in_flight("slow") == 0
    client.close()


async def test_a_response_is_in_flight_until_released_once(
    session: aiohttp.ClientSession, peers: list[FakePeer]
) -> None:
    peer = await start_peer(peers, "a")
    router = router_for(peer)
    client = PeerClient(router, session, MirrorConfig(), MirrorMetrics(CollectorRegistry()))
    opened = await client.open(peer.peer, PATH, "docker.io")
    assert router.in_flight("a") == 1
    opened.release()
    opened.release()
    assert router.in_flight("a") == 0
    with pytest.raises(PeerFailure, match="not_found"):
        await client.open(peer.peer, f"/v2/r/blobs/{Digest.of(b'other')}", "docker.io")
    assert router.in_flight("a") == 0, "a refused request is not in flight"
    client.close()


async def test_the_loser_of_a_hedge_is_not_left_busy(
    session: aiohttp.ClientSession, peers: list[FakePeer]
) -> None:
    slow = await start_peer(peers, "slow", header_delay=2.0)
    fast = await start_peer(peers, "fast")
    router = router_for(slow, fast)
    router.report("fast", ok=True, latency_s=5.0)  # ask the slow one first
    options = MirrorConfig(first_byte_timeout=3.0, connect_timeout=0.1)
    mirror = PeerMirror(router, session, options=options)
    content = await mirror.open_blob("docker.io", "r", Digest.parse(BLOB_D), None, True)
    assert isinstance(content, FallbackContent) and content.body is not None
    assert b"".join([chunk async for chunk in content.body]) == BLOB
    assert slow.behaviour.requests and fast.behaviour.requests, "the race was hedged"
    assert (router.in_flight("slow"), router.in_flight("fast")) == (0, 0)
    mirror.close()


async def test_a_streamed_body_closed_unread_releases_its_peer(
    session: aiohttp.ClientSession, peers: list[FakePeer]
) -> None:
    """The client left before the first byte: the body is closed without being iterated."""
    peer = await start_peer(peers, "a")
    router = router_for(peer)
    mirror = PeerMirror(router, session, options=MirrorConfig(
        verify_before_send_limit=1000, spool_limit=0))  # streamed
    content = await mirror.open_blob("docker.io", "r", Digest.parse(BLOB_D), None, True)
    assert isinstance(content, FallbackContent) and isinstance(content.body, StreamBody)
    assert router.in_flight("a") == 1
    await content.body.aclose()
    assert router.in_flight("a") == 0
    mirror.close()
