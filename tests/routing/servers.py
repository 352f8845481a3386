"""A peer's summary endpoint served for real: Starlette under Hypercorn on 127.0.x.y."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.routing.bloom import MASK, RANGE, BloomFilter
from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.router import BloomRouter, Peer
from meshmirror.routing.summary import VERSION, VERSION_VOUCHES, Summary, summary_route
from meshmirror.store.base import Store
from tests.routing.fakes import until
from tests.support.ports import free_port, loopback_host


def make_summary(keys: list[str], epoch: int, born_at_ms: int = 0,
                 reduction: int = RANGE) -> Summary:
    bloom = BloomFilter.build(keys, reduction=reduction)
    return Summary(epoch=epoch, k=bloom.k, m=bloom.m, count=len(keys), born_at_ms=born_at_ms,
                   bits=bloom.bits.tobytes(), reduction=reduction)


@dataclass
class PeerSource:
    """A settable summary source, plus faults and a log of what peers asked."""

    summary: Summary | None = None
    fail_status: int | None = None
    delay_s: float = 0.0
    requests: list[str | None] = field(default_factory=list)  # If-None-Match of each
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def current(self) -> Summary | None:
        return self.summary

    # Encoded deltas to serve, by the epoch a peer holds.
    deltas: dict[int, bytes] = field(default_factory=dict)

    @property
    def payload(self) -> bytes:
        """Version 1 of a legacy (MASK) summary; a RANGE one only has version 3."""
        if self.summary is None:
            return b""
        return self.summary.encode(VERSION if self.summary.reduction == MASK else None)

    @property
    def vouched_payload(self) -> bytes:
        if self.summary is None:
            return b""
        return self.summary.encode(VERSION_VOUCHES if self.summary.reduction == MASK else None)

    @property
    def ranged_payload(self) -> bytes:
        """Version 3; a MASK summary has none, and the fake serves its version 2
        bytes instead (the client reads a summary by its version byte)."""
        return self.vouched_payload

    def delta_since(self, epoch: int) -> bytes | None:
        return self.deltas.get(epoch)


class _Faults:
    def __init__(self, app: ASGIApp, source: PeerSource) -> None:
        self.app = app
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        src = self.source
        headers = dict(scope["headers"])
        src.requests.append(headers.get(b"if-none-match", b"").decode() or None)
        src.in_flight += 1
        src.max_in_flight = max(src.max_in_flight, src.in_flight)
        try:
            if src.delay_s:
                await asyncio.sleep(src.delay_s)
            if src.fail_status is not None:
                await send({"type": "http.response.start", "status": src.fail_status,
                            "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            await self.app(scope, receive, send)
        finally:
            src.in_flight -= 1


@dataclass
class PeerServer:
    source: PeerSource
    http_base: str


@contextlib.asynccontextmanager
async def peer_server(source: PeerSource) -> AsyncIterator[PeerServer]:
    """Serve ``source`` until the block ends; bounded start and stop."""
    host = loopback_host()
    port = free_port(host)
    app = _Faults(Starlette(routes=[summary_route(source)]), source)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    stop = asyncio.Event()
    # hypercorn types the app with its own per-event TypedDicts, which no Starlette-typed
    # (MutableMapping scope) ASGI app can match; the app is a plain ASGI 3 callable.
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield PeerServer(source, f"http://{host}:{port}")
    finally:
        stop.set()
        try:
            async with asyncio.timeout(5):
                await task
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class PublisherSource(PeerSource):
    publisher: SummaryPublisher | None = None

    @property
    def current(self) -> Summary | None:
        return None if self.publisher is None else self.publisher.current

    @property
    def payload(self) -> bytes:
        return b"" if self.publisher is None else self.publisher.payload

    @property
    def vouched_payload(self) -> bytes:
        return b"" if self.publisher is None else self.publisher.vouched_payload

    @property
    def ranged_payload(self) -> bytes:
        return b"" if self.publisher is None else self.publisher.ranged_payload

    def delta_since(self, epoch: int) -> bytes | None:
        return None if self.publisher is None else self.publisher.delta_since(epoch)


@dataclass
class PublishedPeer:
    """This node's router and directory following one peer's live publisher."""

    registry: CollectorRegistry
    router: BloomRouter
    directory: PeerDirectory
    peer: Peer
    publisher: SummaryPublisher


@contextlib.asynccontextmanager
async def published_peer(store: Store, *, timeout_s: float,
                         debounce_s: float | None = None) -> AsyncIterator[PublishedPeer]:
    """A peer serving ``store``'s summaries over loopback HTTP, wired to a directory as
    a node wires them, once the directory holds its first summary."""
    registry = CollectorRegistry()
    router = BloomRouter(registry=registry)
    directory = PeerDirectory(router, registry=registry, timeout_s=timeout_s)
    source = PublisherSource()
    try:
        async with peer_server(source) as srv:
            peer = Peer("node-a", srv.http_base)
            loop = asyncio.get_running_loop()

            # What the node wires: each version re-advertises the epoch (here
            # straight to the directory; in a cluster through gossip metadata).
            def advertise(summary: Summary) -> None:
                loop.call_soon(directory.update_peer, peer.name, peer.http_base, summary.epoch)

            pace: dict[str, Any] = {} if debounce_s is None else {"debounce_s": debounce_s}
            source.publisher = SummaryPublisher(store, registry=CollectorRegistry(),
                                                on_publish=advertise, **pace)
            await source.publisher.start()
            await until(lambda: directory.held(peer.name) is not None)
            yield PublishedPeer(registry, router, directory, peer, source.publisher)
    finally:
        if source.publisher is not None:
            await source.publisher.close()
        await directory.close()
