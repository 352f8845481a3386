"""A client that disconnects while the mirror is still fetching stops the fetch.

The mirror holds a large blob until its digest checks out; a pull cancelled
meanwhile must not keep the peer transfer, the body threads and the spool busy.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorConfig
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.oci.digest import Digest
from meshmirror.registry.app import create_app
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec
from meshmirror.registry.server import ServerConfig, bind_listener, serve
from meshmirror.routing.router import InMemoryRouter
from meshmirror.store.memory import MemoryStore
from tests.mirror.peers import Behaviour, FakePeer
from tests.registry.asgi import call
from tests.support.ports import loopback_host

BLOB = os.urandom(3 * 1024 * 1024 + 5)
BLOB_D = Digest.of(BLOB)
PATH = f"/v2/library/x/blobs/{BLOB_D}"


async def get(app: ASGIApp, leave_after: float | None) -> tuple[int, bytes]:
    """GET ``PATH`` through ``app``; the client disconnects after ``leave_after`` seconds."""
    sent = await call(app, "GET", PATH, query=b"ns=docker.io", leave_after=leave_after)
    return sent.status, sent.body


class SlowFallback:
    """A fallback that answers after ``delay`` seconds and notes whether it was cancelled."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cancelled = False

    async def open_manifest(self, registry: str, repository: str, reference: str,
                            want_body: bool) -> FallbackContent | Miss:
        return Miss(MissReason.NO_PEER)

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool) -> FallbackContent | Miss:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise

        async def body() -> AsyncIterator[bytes]:
            yield BLOB

        return FallbackContent(digest, len(BLOB), None, body())


async def test_client_leaving_cancels_the_fallback() -> None:
    fallback = SlowFallback(delay=30.0)
    app = create_app(MemoryStore(), fallback=fallback)
    started = time.monotonic()
    status, _ = await asyncio.wait_for(get(app, leave_after=0.1), 5.0)
    assert fallback.cancelled
    assert time.monotonic() - started < 2.0
    assert status == 404  # nobody reads it; the access log records the outcome


async def test_client_that_stays_gets_the_blob() -> None:
    app = create_app(MemoryStore(), fallback=SlowFallback(delay=0.1))
    status, body = await asyncio.wait_for(get(app, leave_after=None), 5.0)
    assert (status, body) == (200, BLOB)


@pytest.fixture
async def stalled_peer() -> AsyncIterator[FakePeer]:
    peer = await FakePeer("stalled", Behaviour(blobs={str(BLOB_D): BLOB},
                                               stall_after=1024 * 1024 + 3)).start()
    yield peer
    await peer.stop()


async def test_client_leaving_mid_spool_frees_the_peer_threads_and_spool(
        stalled_peer: FakePeer) -> None:
    registry = CollectorRegistry()
    router = InMemoryRouter(registry=registry, seed=1)
    router.set_keys(stalled_peer.peer, [str(BLOB_D)])
    options = MirrorConfig(verify_before_send_limit=1 << 20, chunk_size=64 * 1024,
                            stall_timeout=30.0)  # only the client leaving may end the fetch
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        mirror = PeerMirror(router, session, options=options, metrics=MirrorMetrics(registry))
        app = create_app(MemoryStore(), fallback=mirror)
        started = time.monotonic()
        status, body = await asyncio.wait_for(get(app, leave_after=0.5), 10.0)
        assert (status, body[:1]) == (404, b"{"), "no byte of the unverified blob was sent"
        assert time.monotonic() - started < 3.0
        assert registry.get_sample_value("meshmirror_mirror_spool_bytes") == 0
        for _ in range(200):  # up to 2 s
            if mirror.client.pumps_running == 0:
                break
            await asyncio.sleep(0.01)
        assert mirror.client.pumps_running == 0, "body threads must return"
        assert router.in_flight(stalled_peer.name) == 0, "the peer is no longer busy"
        await asyncio.wait_for(stalled_peer.behaviour.client_gone.wait(), 2.0)
        mirror.close()


async def test_hypercorn_tells_the_app_when_a_real_client_leaves() -> None:
    """The same through a real server and socket: the disconnect must reach the app."""
    fallback = SlowFallback(delay=30.0)
    host = loopback_host()
    listener = bind_listener(host, 0)
    port = listener.getsockname()[1]
    shutdown = asyncio.Event()
    server = asyncio.create_task(serve(create_app(MemoryStore(), fallback=fallback), listener,
                                       shutdown, ServerConfig(graceful_timeout=1.0)))
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        writer.write(f"GET {PATH}?ns=docker.io HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.3)  # the fallback is now waiting
        writer.close()
        for _ in range(300):  # up to 3 s
            if fallback.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fallback.cancelled, "the fallback went on after the client left"
    finally:
        shutdown.set()
        await asyncio.wait_for(server, 10.0)
