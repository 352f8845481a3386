"""Publisher -> HTTP endpoint -> directory -> router, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.router import BloomRouter, Peer
from meshmirror.routing.summary import Summary
from tests.routing.fakes import KeyStore, digest_key, until
from tests.routing.servers import PeerSource, peer_server


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


async def test_a_new_key_on_one_node_is_routable_on_another_within_a_second() -> None:
    registry = CollectorRegistry()
    router = BloomRouter(registry=registry)
    directory = PeerDirectory(router, registry=registry, timeout_s=1)
    store = KeyStore({digest_key(i) for i in range(2000)})
    source = PublisherSource()
    try:
        async with peer_server(source) as srv:
            peer = Peer("node-a", srv.http_base)
            loop = asyncio.get_running_loop()

            # What the node wires: each version re-advertises the epoch (here
            # straight to the directory; in a cluster through gossip metadata).
            def advertise(summary: Summary) -> None:
                loop.call_soon(directory.update_peer, peer.name, peer.http_base, summary.epoch)

            source.publisher = SummaryPublisher(store, registry=CollectorRegistry(),
                                                on_publish=advertise)
            await source.publisher.start()
            await until(lambda: directory.held(peer.name) is not None)
            assert router.candidates(digest_key(5)) == [peer]
            assert router.candidates(digest_key("layer")) == []

            started = time.monotonic()
            store.add(digest_key("layer"), "docker.io/library/app:1")
            await until(lambda: router.candidates(digest_key("layer")) == [peer])
            assert time.monotonic() - started < 1.0
            assert router.candidates("docker.io/library/app:1") == [peer]
            assert registry.get_sample_value(
                "meshmirror_summary_propagation_seconds_count") == 1
            propagation = registry.get_sample_value(
                "meshmirror_summary_propagation_seconds_sum")
            assert propagation is not None
            assert 0.1 <= propagation < 1.0  # at least the debounce, within the deadline
            assert registry.get_sample_value("meshmirror_peer_summaries_share") == 1.0
    finally:
        if source.publisher is not None:
            await source.publisher.close()
        await directory.close()
