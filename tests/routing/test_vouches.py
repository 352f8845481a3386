"""Vouches on the wire and in memory: exact round trips, hard bounds, old peers unharmed."""

from __future__ import annotations

import struct

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.routing.bloom import MASK
from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.router import BloomRouter
from meshmirror.routing.summary import (
    MEDIA_TYPE,
    MEDIA_TYPE_V2,
    VERSION_VOUCHES,
    Summary,
    SummaryFormatError,
    fetch_summary,
)
from meshmirror.routing.vouches import (
    ENTRY_SIZE,
    MAX_VOUCH_AGE,
    MAX_VOUCHES,
    NO_VOUCHES,
    VouchBook,
    Vouches,
    VouchFormatError,
    vouch_key,
)
from tests.routing.fakes import KeyStore, digest_key, until
from tests.routing.servers import PeerSource, make_summary, peer_server

NOW = 1_800_000_000.0


def test_vouches_round_trip_exactly() -> None:
    vouches = Vouches.of([(vouch_key("docker.io", "library/nginx"), NOW - 60),
                          (vouch_key("ghcr.io", "acme/tool"), NOW - 5)])
    back = Vouches.decode(vouches.encode())
    assert len(back) == 2
    assert back.checked_at(vouch_key("docker.io", "library/nginx")) == NOW - 60
    assert back.checked_at(vouch_key("ghcr.io", "acme/tool")) == NOW - 5
    assert back.checked_at(vouch_key("docker.io", "library/redis")) is None
    # 12 bytes a vouch, plus the count: no names travel.
    assert len(vouches.encode()) == 4 + 2 * ENTRY_SIZE == 28


def test_a_member_vouches_for_at_most_the_newest_max_vouches_once_each() -> None:
    entries = [(i, NOW - i) for i in range(MAX_VOUCHES + 100)] + [(0, NOW - 1000)]
    vouches = Vouches.of(entries)
    assert len(vouches) == MAX_VOUCHES
    assert vouches.checked_at(0) == NOW  # the newer of its two dates
    assert vouches.checked_at(MAX_VOUCHES + 50) is None  # among the oldest, left out


@pytest.mark.parametrize(("data", "message"), [
    (b"", "has no count"),
    (struct.pack(">I", MAX_VOUCHES + 1) + b"\0" * ENTRY_SIZE * (MAX_VOUCHES + 1),
     f"at most {MAX_VOUCHES}"),
    (struct.pack(">I", 2) + b"\0" * ENTRY_SIZE, "must be"),
    (struct.pack(">I", 1) + b"\0" * (ENTRY_SIZE + 1), "must be"),
    (struct.pack(">IQIQI", 2, 5, 1, 3, 1), "sorted and unique"),
    (struct.pack(">IQIQI", 2, 5, 1, 5, 1), "sorted and unique"),
])
def test_malformed_vouches_are_rejected_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(VouchFormatError, match=message):
        Vouches.decode(data)


def test_the_book_ignores_old_vouches_and_forgets_a_member_that_left() -> None:
    book = VouchBook()
    nginx = vouch_key("docker.io", "library/nginx")
    book.set_vouches("a", Vouches.of([(nginx, NOW - MAX_VOUCH_AGE - 1)]))
    assert book.newest("docker.io", "library/nginx", NOW) is None  # too old
    book.set_vouches("b", Vouches.of([(nginx, NOW - 30)]))
    assert book.newest("docker.io", "library/nginx", NOW) == NOW - 30
    # A date in the future is no younger than now.
    book.set_vouches("c", Vouches.of([(nginx, NOW + 10_000)]))
    assert book.newest("docker.io", "library/nginx", NOW) == NOW
    book.drop("c")
    book.set_vouches("b", NO_VOUCHES)
    assert book.newest("docker.io", "library/nginx", NOW) is None
    assert len(book) == 1


def test_a_version_2_summary_carries_its_vouches_and_version_1_does_not() -> None:
    vouches = Vouches.of([(vouch_key("docker.io", "library/nginx"), NOW)])
    base = make_summary([digest_key(1)], epoch=7, reduction=MASK)
    summary = Summary(base.epoch, base.k, base.m, base.count, base.born_at_ms, base.bits,
                      vouches, MASK)
    v2 = Summary.decode(summary.encode(VERSION_VOUCHES))
    assert v2.bits == summary.bits and digest_key(1) in v2
    assert v2.vouches.checked_at(vouch_key("docker.io", "library/nginx")) == NOW
    v1 = summary.encode()
    assert v1 == base.encode()
    assert len(Summary.decode(v1).vouches) == 0
    unsorted = Vouches(np.array([2, 1], dtype=np.uint64), np.array([0, 0], dtype=np.uint32))
    bad = Summary(base.epoch, base.k, base.m, base.count, base.born_at_ms, base.bits, unsorted,
                  MASK)
    with pytest.raises(SummaryFormatError, match="sorted and unique"):
        Summary.decode(bad.encode(VERSION_VOUCHES))
    with pytest.raises(SummaryFormatError, match="has no count"):
        Summary.decode(v1[:4] + bytes([VERSION_VOUCHES]) + v1[5:])


async def test_a_peer_gets_version_2_only_when_it_asks_for_it() -> None:
    vouched = make_summary([digest_key(1)], epoch=3, reduction=MASK)
    vouched = Summary(vouched.epoch, vouched.k, vouched.m, vouched.count, vouched.born_at_ms,
                      vouched.bits, Vouches.of([(vouch_key("r.test", "a/b"), NOW)]), MASK)
    async with peer_server(PeerSource(vouched)) as srv, aiohttp.ClientSession() as session:
        # This node's client asks for version 2 and gets the vouches.
        fetched = await fetch_summary(session, srv.http_base, None, 1 << 20)
        assert fetched is not None and fetched.vouches.checked_at(
            vouch_key("r.test", "a/b")) == NOW
        # A node that reads only version 1 (before this change) gets version 1.
        async with session.get(srv.http_base + "/_mesh/v1/summary",
                               headers={"Accept": MEDIA_TYPE}) as resp:
            assert resp.content_type == MEDIA_TYPE
            assert await resp.read() == vouched.encode()
        async with session.get(srv.http_base + "/_mesh/v1/summary",
                               headers={"Accept": f"{MEDIA_TYPE_V2}, {MEDIA_TYPE}"}) as resp:
            assert resp.content_type == MEDIA_TYPE_V2
            assert "Accept" in resp.headers.get("Vary", "")


async def test_the_directory_installs_a_members_vouches_and_drops_them_when_it_leaves() -> None:
    registry = CollectorRegistry()
    directory = PeerDirectory(BloomRouter(registry=registry), registry=registry, timeout_s=2)
    base = make_summary([digest_key(1)], epoch=5)
    vouched = Summary(base.epoch, base.k, base.m, base.count, base.born_at_ms, base.bits,
                      Vouches.of([(vouch_key("r.test", "team/app"), NOW - 10)]))
    try:
        async with peer_server(PeerSource(vouched)) as srv:
            directory.update_peer("n1", srv.http_base, 5)
            await until(lambda: directory.held("n1") is not None)
            assert directory.vouches.newest("r.test", "team/app", NOW) == NOW - 10
            directory.remove_peer("n1")
            assert directory.vouches.newest("r.test", "team/app", NOW) is None
    finally:
        await directory.close()


async def test_the_publisher_republishes_when_its_vouches_change() -> None:
    current = [Vouches.of([])]
    registry = CollectorRegistry()
    publisher = SummaryPublisher(KeyStore({digest_key(1)}), debounce_s=0.01, registry=registry,
                                 reconcile_interval_s=0, vouches=lambda: current[0])
    await publisher.start()
    try:
        first = publisher.current
        assert first is not None and len(first.vouches) == 0
        current[0] = Vouches.of([(vouch_key("r.test", "team/app"), NOW)])
        publisher.vouches_changed()
        await until(lambda: publisher.current is not None and publisher.current.epoch
                    > first.epoch)
        assert publisher.current is not None and len(publisher.current.vouches) == 1
        assert Summary.decode(publisher.vouched_payload).vouches.checked_at(
            vouch_key("r.test", "team/app")) == NOW
        assert len(Summary.decode(publisher.payload).vouches) == 0  # version 1: no vouches
        assert len(Summary.decode(publisher.ranged_payload).vouches) == 1
        assert registry.get_sample_value("meshmirror_summary_vouches") == 1
    finally:
        await publisher.close()
