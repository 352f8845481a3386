"""Summary deltas: the publisher's log, the endpoint's choice, the directory's use."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import DeltaLog, SummaryPublisher
from meshmirror.routing.router import BloomRouter, Peer
from meshmirror.routing.summary import (
    DELTA_MEDIA_TYPE,
    MEDIA_TYPE_V3,
    SUMMARY_PATH,
    Summary,
    SummaryDelta,
    SummaryFormatError,
    etag_for,
    max_delta_bytes,
    max_delta_positions,
)
from tests.routing.fakes import KeyStore, digest_key, until
from tests.routing.servers import PeerSource, make_summary, peer_server, published_peer


def _apply(summary: Summary, delta: SummaryDelta) -> bytes:
    bloom = summary.filter().copy()
    bloom.set_positions(delta.positions)
    return bloom.bits.tobytes()


async def _next_version(publisher: SummaryPublisher, after: int) -> Summary:
    async with asyncio.timeout(5):
        return await publisher.wait_for(lambda s: s.epoch > after)


async def test_a_delta_from_any_logged_version_rebuilds_the_current_bits() -> None:
    store = KeyStore({digest_key(i) for i in range(3000)})
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0)
    await publisher.start()
    try:
        assert publisher.current is not None
        versions = [publisher.current]
        for round_ in range(3):
            store.add(*(digest_key(f"r{round_}-{i}") for i in range(10)))
            versions.append(await _next_version(publisher, versions[-1].epoch))
        current = versions[-1]
        for held in versions[:-1]:
            data = publisher.delta_since(held.epoch)
            assert data is not None
            delta = SummaryDelta.decode(data)
            assert (delta.base_epoch, delta.epoch, delta.count) == (
                held.epoch, current.epoch, current.count)
            assert _apply(held, delta) == current.bits
            # 10-30 keys: at most 7 positions each, two bytes a position or so.
            assert len(data) < 30 * 7 * 2.5 + 100 < len(publisher.ranged_payload) / 5
        assert publisher.delta_since(current.epoch) is None  # nothing changed: a 304
        assert publisher.delta_since(versions[0].epoch - 1) is None  # never published
    finally:
        await publisher.close()


async def test_a_rebuild_forgets_every_delta() -> None:
    keys = [digest_key(i) for i in range(1000)]
    store = KeyStore(set(keys))
    publisher = SummaryPublisher(store, debounce_s=0.01, reconcile_interval_s=0)
    await publisher.start()
    try:
        assert publisher.current is not None
        first = publisher.current
        store.remove(*keys[:100])  # past the 5% removals that force a rebuild
        current = await _next_version(publisher, first.epoch)
        assert publisher.rebuilds == 2
        assert publisher.delta_since(first.epoch) is None
        assert digest_key(5) not in current
    finally:
        await publisher.close()


def test_the_log_drops_its_oldest_versions_past_its_bound() -> None:
    log = DeltaLog()
    log.restart(100)
    m = 64 * 32  # room for 64 logged positions
    current = make_summary([digest_key(1)], epoch=0)
    for epoch in range(101, 111):
        log.append(epoch, np.arange(10, dtype=np.uint32) + 10 * (epoch - 101), m)
    # 100 positions held at most 64: versions 101-104 went, so 104 is the oldest base.
    assert log.base == 104
    shaped = Summary(epoch=110, k=current.k, m=m, count=1, born_at_ms=0, bits=b"\0" * (m // 8))
    assert log.delta(100, shaped) is None
    assert log.delta(103, shaped) is None
    delta = log.delta(104, shaped)
    assert delta is not None
    assert SummaryDelta.decode(delta).positions.tolist() == list(range(40, 100))


async def test_the_endpoint_sends_a_delta_only_to_a_peer_that_asks_and_holds_a_known_epoch(
        ) -> None:
    old = make_summary([digest_key(1)], epoch=5)
    new = make_summary([digest_key(1), digest_key(2)], epoch=6)
    delta = SummaryDelta(base_epoch=5, epoch=6, k=new.k, m=new.m, reduction=new.reduction,
                         count=2, born_at_ms=0,
                         positions=np.array([1, 2], dtype=np.uint64)).encode()
    source = PeerSource(new, deltas={5: delta})
    assert old.m == new.m
    async with peer_server(source) as srv, aiohttp.ClientSession() as session:
        url = srv.http_base + SUMMARY_PATH
        both = f"{DELTA_MEDIA_TYPE}, {MEDIA_TYPE_V3}"
        for accept, held, want in ((both, 5, DELTA_MEDIA_TYPE), (MEDIA_TYPE_V3, 5, MEDIA_TYPE_V3),
                                   (both, 4, MEDIA_TYPE_V3), (both, None, MEDIA_TYPE_V3)):
            headers = {"Accept": accept}
            if held is not None:
                headers["If-None-Match"] = etag_for(held)
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200 and resp.content_type == want, (accept, held)
                assert resp.headers["ETag"] == etag_for(6)
                assert "If-None-Match" in resp.headers["Vary"]
        async with session.get(url, headers={"Accept": both,
                                             "If-None-Match": etag_for(6)}) as resp:
            assert resp.status == 304


async def test_a_new_key_reaches_a_peer_as_a_delta_of_a_few_hundred_bytes() -> None:
    store = KeyStore({digest_key(i) for i in range(20_000)})
    async with published_peer(store, timeout_s=2, debounce_s=0.01) as wired:
        router, registry, peer = wired.router, wired.registry, wired.peer
        full = registry.get_sample_value("meshmirror_peer_summary_fetched_bytes_total",
                                         {"kind": "full"})
        assert full is not None and full > 20_000  # 10 bits a key
        layers = [digest_key(f"layer-{i}") for i in range(8)]
        store.add(*layers, "docker.io/library/app:2")
        await until(lambda: all(router.candidates(k) == [peer] for k in layers))
        assert router.candidates("docker.io/library/app:2") == [peer]
        assert registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                         {"result": "delta"}) == 1
        delta_bytes = registry.get_sample_value(
            "meshmirror_peer_summary_fetched_bytes_total", {"kind": "delta"})
        assert delta_bytes is not None and 0 < delta_bytes < 400
        assert registry.get_sample_value("meshmirror_peer_summary_fetched_bytes_total",
                                         {"kind": "full"}) == full


# A peer first published _HELD (epoch 5), then _NEXT (epoch 6) with a delta from 5.
_HELD = make_summary([digest_key(1)], epoch=5)
_NEXT = make_summary([digest_key(1), digest_key(2)], epoch=6)


async def _fetched_whole_despite(delta: bytes, timeout_s: float) -> CollectorRegistry:
    """The directory, holding _HELD, is offered ``delta`` to reach _NEXT: it must end
    up holding epoch 6 all the same (fetched whole). Its metrics, for what it counted."""
    registry = CollectorRegistry()
    router = BloomRouter(registry=registry)
    directory = PeerDirectory(router, registry=registry, timeout_s=timeout_s, backoff_s=0.01)
    source = PeerSource(_HELD)
    try:
        async with peer_server(source) as srv:
            directory.update_peer("n1", srv.http_base, 5)
            await until(lambda: directory.held("n1") is not None)
            source.summary, source.deltas = _NEXT, {5: delta}
            directory.update_peer("n1", srv.http_base, 6)
            await until(lambda: (held := directory.held("n1")) is not None and held.epoch == 6)
            assert router.candidates(digest_key(2)) == [Peer("n1", srv.http_base)]
    finally:
        await directory.close()
    return registry


async def test_a_delta_that_does_not_fit_the_held_summary_is_refused_then_fetched_whole(
        ) -> None:
    # Claims to start from epoch 4, which this node never held: applying it would
    # leave bits that are neither version's.
    wrong_base = SummaryDelta(base_epoch=4, epoch=6, k=_NEXT.k, m=_NEXT.m,
                              reduction=_NEXT.reduction, count=2, born_at_ms=0,
                              positions=np.array([3], dtype=np.uint64)).encode()
    registry = await _fetched_whole_despite(wrong_base, timeout_s=2)
    assert registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                     {"result": "error"}) == 1
    assert registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                     {"result": "ok"}) == 2


def test_a_delta_with_more_positions_than_its_filter_ever_sends_is_refused() -> None:
    m = 64 * 1024
    many = SummaryDelta(base_epoch=1, epoch=2, k=7, m=m, reduction=1, count=1, born_at_ms=0,
                        positions=np.arange(max_delta_positions(m) + 1, dtype=np.uint64))
    with pytest.raises(SummaryFormatError, match="at most 2048"):
        SummaryDelta.decode(many.encode())


async def test_a_delta_larger_than_any_of_the_held_filter_is_refused_unread() -> None:
    """A peer holding a 1-key filter is sent a 1 MiB delta claiming a 2^32-bit filter:
    decoding it would cost ~50 MiB of temporaries (at the 16 MiB cap, most of a GiB);
    it is refused by its size against the held filter, and the whole filter fetched."""
    huge = SummaryDelta(base_epoch=5, epoch=6, k=7, m=1 << 32, reduction=1, count=2,
                        born_at_ms=0, positions=np.arange(1 << 20, dtype=np.uint64)).encode()
    assert len(huge) > max_delta_bytes(_HELD.m)
    registry = await _fetched_whole_despite(huge, timeout_s=5)
    assert registry.get_sample_value("meshmirror_peer_summary_fetched_bytes_total",
                                     {"kind": "delta"}) == 0
    assert registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                     {"result": "error"}) == 1
