from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from meshmirror.routing.directory import HeldSummary, PeerDirectory, check_http_base
from meshmirror.routing.router import BloomRouter, Peer
from meshmirror.routing.summary import Summary, SummaryDelta
from tests.routing.fakes import digest_key, until
from tests.routing.servers import PeerSource, make_summary, peer_server


class RecordingSink:
    def __init__(self) -> None:
        self.installed: list[tuple[Peer, int]] = []
        self.dropped: list[str] = []

    def set_summary(self, peer: Peer, summary: Summary) -> None:
        self.installed.append((peer, summary.epoch))

    def apply_delta(self, peer: Peer, delta: SummaryDelta) -> bool:
        self.installed.append((peer, delta.epoch))
        return True

    def set_address(self, peer: Peer) -> None:
        self.installed.append((peer, -1))

    def drop_peer(self, name: str) -> None:
        self.dropped.append(name)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


Directory = tuple[PeerDirectory, BloomRouter]


def held(d: PeerDirectory, name: str) -> HeldSummary:
    """The peer's installed summary, which the caller knows is there by now."""
    summary = d.held(name)
    assert summary is not None, f"no summary held for {name}"
    return summary


def held_epoch(d: PeerDirectory, name: str) -> int | None:
    summary = d.held(name)
    return None if summary is None else summary.epoch


def sample(registry: CollectorRegistry, name: str,
           labels: dict[str, str] | None = None) -> float:
    """A metric sample the code under test has recorded."""
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels or ''} was never recorded"
    return value


@pytest.fixture
async def directory(registry: CollectorRegistry) -> AsyncIterator[Directory]:
    router = BloomRouter(registry=registry, seed=1)
    d = PeerDirectory(router, registry=registry, timeout_s=0.5, backoff_s=0.05,
                      max_backoff_s=0.2)
    try:
        yield d, router
    finally:
        await d.close()


async def test_a_peer_summary_is_fetched_and_routes_its_keys(directory: Directory,
                                                              registry: CollectorRegistry) -> None:
    d, router = directory
    keys = [digest_key(i) for i in range(500)]
    async with peer_server(PeerSource(make_summary(keys, epoch=10))) as srv:
        assert d.share() == 1.0  # no peers yet
        d.update_peer("n1", srv.http_base, 10)
        assert d.share() == 0.0
        await until(lambda: d.held("n1") is not None)
        assert d.share() == 1.0
        assert registry.get_sample_value("meshmirror_peer_summaries_share") == 1.0
        assert router.candidates(keys[7]) == [Peer("n1", srv.http_base)]
        assert srv.source.requests == [None]


async def test_a_new_epoch_is_fetched_with_if_none_match(directory: Directory) -> None:
    d, router = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=10))
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 10)
        await until(lambda: d.held("n1") is not None)
        d.update_peer("n1", srv.http_base, 10)  # same epoch: nothing to do
        await asyncio.sleep(0.1)
        assert len(source.requests) == 1
        source.summary = make_summary([digest_key(1), digest_key(2)], epoch=11)
        d.update_peer("n1", srv.http_base, 11)
        await until(lambda: held(d, "n1").epoch == 11)
        assert source.requests == [None, '"10"']
        assert router.candidates(digest_key(2)) == [Peer("n1", srv.http_base)]


async def test_304_while_the_peer_has_not_published_yet_is_retried(directory: Directory,
                                                                     registry: CollectorRegistry
                                                                     ) -> None:
    d, _ = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=10))
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 10)
        await until(lambda: d.held("n1") is not None)
        d.update_peer("n1", srv.http_base, 12)  # advertised before it is served
        # Counted once the client has handled the answer, a moment after the server saw
        # the request: wait for the count itself, not for the requests.
        await until(lambda: (registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                                       {"result": "not_modified"}) or 0) >= 2)
        assert len(source.requests) >= 3
        assert d.share() == 0.0
        source.summary = make_summary([digest_key(1)], epoch=12)
        await until(lambda: held(d, "n1").epoch == 12)
        assert d.share() == 1.0


async def test_a_response_older_than_the_held_summary_is_ignored(directory: Directory) -> None:
    d, router = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=20))
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 20)
        await until(lambda: d.held("n1") is not None)
        source.summary = make_summary([digest_key(9)], epoch=5)  # e.g. a stale replica
        d.update_peer("n1", srv.http_base, 21)
        await until(lambda: len(source.requests) >= 3)
        assert held(d, "n1").epoch == 20
        assert router.candidates(digest_key(1)) == [Peer("n1", srv.http_base)]
        assert router.candidates(digest_key(9)) == []


async def test_never_more_than_one_fetch_in_flight_per_peer(directory: Directory) -> None:
    d, _ = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=1), delay_s=0.2)
    async with peer_server(source) as srv:
        for epoch in range(1, 30):
            source.summary = make_summary([digest_key(1)], epoch=epoch)
            d.update_peer("n1", srv.http_base, epoch)
            await asyncio.sleep(0.01)
        await until(lambda: held_epoch(d, "n1") == 29)
        assert source.max_in_flight == 1
        assert len(source.requests) <= 4  # a burst of epochs costs a few fetches, not 29


async def test_failures_are_retried_with_backoff(directory: Directory,
                                                 registry: CollectorRegistry) -> None:
    d, _ = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=3), fail_status=500)
    async with peer_server(source) as srv:
        started = time.monotonic()
        d.update_peer("n1", srv.http_base, 3)
        await until(lambda: len(source.requests) >= 4)
        elapsed = time.monotonic() - started
        # 0.05 + 0.1 + 0.2 (jittered to at least half) between the four attempts.
        assert elapsed >= 0.17
        assert d.held("n1") is None
        # Counted once the directory has handled each answer, just after the server saw it.
        await until(lambda: (registry.get_sample_value("meshmirror_peer_summary_fetches_total",
                                                       {"result": "error"}) or 0) >= 4)
        source.fail_status = None
        await until(lambda: d.held("n1") is not None)


async def test_a_slow_peer_times_out_and_is_retried(directory: Directory) -> None:
    d, _ = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=3), delay_s=2.0)
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 3)
        await until(lambda: len(source.requests) >= 2, within=5)
        assert d.held("n1") is None
        source.delay_s = 0
        await until(lambda: d.held("n1") is not None)


async def test_garbage_and_wrong_content_type_are_not_installed(directory: Directory) -> None:
    d, _ = directory

    class Garbage(PeerSource):
        @property
        def payload(self) -> bytes:
            return b"MMSF" + b"\x09" * 60

        @property
        def vouched_payload(self) -> bytes:
            return self.payload

        @property
        def ranged_payload(self) -> bytes:
            return self.payload

    source = Garbage(make_summary([digest_key(1)], epoch=3))
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 3)
        await until(lambda: len(source.requests) >= 2)
        assert d.held("n1") is None


async def test_an_unreachable_peer_does_not_break_the_others(directory: Directory) -> None:
    d, router = directory
    async with peer_server(PeerSource(make_summary([digest_key(1)], epoch=1))) as srv:
        async with peer_server(PeerSource()) as gone:
            dead_base = gone.http_base
        d.update_peer("dead", dead_base, 1)
        d.update_peer("n1", srv.http_base, 1)
        await until(lambda: d.held("n1") is not None)
        assert d.share() == 0.5
        assert router.candidates(digest_key(1)) == [Peer("n1", srv.http_base)]


async def test_a_dead_peer_is_dropped_with_its_fetch(registry: CollectorRegistry) -> None:
    sink = RecordingSink()
    d = PeerDirectory(sink, registry=registry, timeout_s=5)
    try:
        keys = [digest_key(1)]
        fast = PeerSource(make_summary(keys, epoch=1))
        slow = PeerSource(make_summary(keys, epoch=1), delay_s=3)
        async with peer_server(fast) as a, peer_server(slow) as b:
            d.update_peer("a", a.http_base, 1)
            d.update_peer("b", b.http_base, 1)
            await until(lambda: d.held("a") is not None and slow.in_flight == 1)
            d.remove_peer("a")
            d.remove_peer("b")  # its fetch is cancelled, nothing installed later
            assert sink.dropped == ["a", "b"]
            assert d.peers() == []
            await until(lambda: slow.in_flight == 0)
            assert [peer.name for peer, _ in sink.installed] == ["a"]
            assert d.share() == 1.0
    finally:
        await d.close()


async def test_a_moved_peer_is_routed_at_its_new_address(directory: Directory) -> None:
    d, router = directory
    source = PeerSource(make_summary([digest_key(1)], epoch=1))
    async with peer_server(source) as one, peer_server(source) as two:
        d.update_peer("n1", one.http_base, 1)
        await until(lambda: d.held("n1") is not None)
        d.update_peer("n1", two.http_base, 1)
        assert router.candidates(digest_key(1)) == [Peer("n1", two.http_base)]


async def test_propagation_is_observed_from_the_keys_arrival(directory: Directory,
                                                             registry: CollectorRegistry) -> None:
    d, _ = directory
    now_ms = time.time_ns() // 1_000_000
    source = PeerSource(make_summary([digest_key(1)], epoch=1, born_at_ms=now_ms - 60_000))
    async with peer_server(source) as srv:
        d.update_peer("n1", srv.http_base, 1)
        await until(lambda: d.held("n1") is not None)
        # The first summary of a peer measures when we met it, not propagation.
        assert registry.get_sample_value("meshmirror_summary_propagation_seconds_count") == 0
        born = time.time_ns() // 1_000_000 - 300
        source.summary = make_summary([digest_key(1), digest_key(2)], epoch=2, born_at_ms=born)
        d.update_peer("n1", srv.http_base, 2)
        await until(lambda: held(d, "n1").epoch == 2)
        assert registry.get_sample_value("meshmirror_summary_propagation_seconds_count") == 1
        observed = sample(registry, "meshmirror_summary_propagation_seconds_sum")
        assert 0.3 <= observed < 2.0
        # A version with no newer keys (a removal) is not a propagation sample.
        source.summary = make_summary([digest_key(1)], epoch=3, born_at_ms=born)
        d.update_peer("n1", srv.http_base, 3)
        await until(lambda: held(d, "n1").epoch == 3)
        assert registry.get_sample_value("meshmirror_summary_propagation_seconds_count") == 1


@pytest.mark.parametrize("base", ["127.0.0.2:5000", "ftp://h:1", "http://h:1/v2", "http://",
                                  "http://h:99999"])
def test_a_bad_peer_address_is_refused(base: str) -> None:
    with pytest.raises(ValueError, match="peer address"):
        check_http_base(base)


async def test_a_bad_epoch_is_refused(directory: Directory) -> None:
    d, _ = directory
    with pytest.raises(ValueError, match="epoch"):
        d.update_peer("n1", "http://127.0.0.2:5000", -1)


async def test_a_new_epoch_cuts_a_long_backoff_short(registry: CollectorRegistry) -> None:
    d = PeerDirectory(RecordingSink(), registry=registry, timeout_s=0.5, backoff_s=5,
                      max_backoff_s=5)
    try:
        source = PeerSource(make_summary([digest_key(1)], epoch=1), fail_status=503)
        async with peer_server(source) as srv:
            d.update_peer("n1", srv.http_base, 1)
            await until(lambda: len(source.requests) == 1)
            await asyncio.sleep(0.1)  # now waiting out a 2.5-5 s backoff
            source.fail_status = None
            source.summary = make_summary([digest_key(1)], epoch=2)
            started = time.monotonic()
            d.update_peer("n1", srv.http_base, 2)
            await until(lambda: d.held("n1") is not None, within=2)
            assert time.monotonic() - started < 1.0
            assert held(d, "n1").epoch == 2
    finally:
        await d.close()


async def test_only_the_peers_that_fit_the_budget_are_held_same_zone_first() -> None:
    """Ten peers of 2,000 keys (2.5 KB filters) and room for four: the two in this
    node's zone, then two of the others; one leaving makes room for the next."""
    registry = CollectorRegistry()
    router = BloomRouter(registry=registry, zone="zone-a")
    d = PeerDirectory(router, registry=registry, timeout_s=2, zone="zone-a", own_name="me",
                      budget_bytes=4 * 2600)
    keys = [digest_key(i) for i in range(2000)]
    try:
        async with peer_server(PeerSource(make_summary(keys, epoch=10))) as srv:
            for n in range(10):
                d.update_peer(f"n{n}", srv.http_base, 10, "zone-a" if n in (3, 7) else "zone-b",
                              2000)
            await until(lambda: sum(d.held(f"n{n}") is not None for n in range(10)) == 4)
            held = {f"n{n}" for n in range(10) if d.held(f"n{n}") is not None}
            assert {"n3", "n7"} <= held
            assert d.held_bytes <= 4 * 2600 and d.share() == 1.0
            assert registry.get_sample_value("meshmirror_peer_directory_selected") == 4
            assert {p.name for p in router.candidates(keys[1], 10)} == held
            gone = next(iter(held - {"n3", "n7"}))
            d.remove_peer(gone)
            await until(lambda: sum(d.held(f"n{n}") is not None for n in range(10)) == 4)
            assert gone not in {p.name for p in router.candidates(keys[1], 10)}
    finally:
        await d.close()


async def test_a_peer_that_understates_its_keys_is_let_go_when_its_filter_arrives() -> None:
    registry = CollectorRegistry()
    router = BloomRouter(registry=registry)
    small = make_summary([digest_key(i) for i in range(100)], epoch=10)
    big = make_summary([digest_key(i) for i in range(20_000)], epoch=10)
    budget = 4 * (small.m // 8) + big.m // 16  # room for the honest, not for the liar's truth
    d = PeerDirectory(router, registry=registry, timeout_s=2, own_name="me",
                      budget_bytes=budget)
    try:
        async with (peer_server(PeerSource(small)) as honest,
                    peer_server(PeerSource(big)) as liar):
            d.update_peer("liar", liar.http_base, 10, keys=100)  # its filter is 200x that
            for n in range(3):
                d.update_peer(f"n{n}", honest.http_base, 10, keys=100)
            await until(lambda: not d.selected("liar")
                        and all(d.held(f"n{n}") is not None for n in range(3)))
            assert d.held("liar") is None and d.held_bytes <= budget
            assert router.candidates(digest_key(15_000)) == []  # only the liar had it
            fetched = len(liar.source.requests)
            d.update_peer("late", honest.http_base, 10, keys=100)  # a reselection
            await until(lambda: d.held("late") is not None)
            assert not d.selected("liar") and len(liar.source.requests) == fetched
    finally:
        await d.close()


async def test_a_flood_of_peers_understating_their_keys_never_takes_the_router_past_the_budget(
) -> None:
    """Forty peers each advertise 100 keys and serve a 1 MiB filter: with 32 fetches in
    flight, installing first and choosing again after would put dozens of them in the
    router at once; none is held, the router never holds more than the budget, and no
    body is even read."""
    registry = CollectorRegistry()
    peak = 0

    class PeakRouter(BloomRouter):
        def set_summary(self, peer: Peer, summary: Summary) -> None:
            nonlocal peak
            super().set_summary(peer, summary)
            peak = max(peak, self.filter_bytes())

    router = PeakRouter(registry=registry)
    m = 8 * 1024 * 1024
    bits = bytearray(m // 8)
    bits[0] = 1  # nearly empty, so the router would install it
    huge = Summary(epoch=10, k=7, m=m, count=100, born_at_ms=0, bits=bytes(bits))
    budget = 256 * 1024
    d = PeerDirectory(router, registry=registry, timeout_s=10, own_name="me",
                      budget_bytes=budget)
    try:
        async with peer_server(PeerSource(huge)) as liar:
            for n in range(40):
                d.update_peer(f"n{n}", liar.http_base, 10, keys=100)
            await until(lambda: not any(d.selected(f"n{n}") for n in range(40)), within=30)
            assert peak <= budget and router.filter_bytes() == 0 and d.held_bytes == 0
            # Refused by its Content-Length against twice what its keys said, unread:
            # forty bodies of 1 MiB (up to 32 at once) never sat in this node's memory.
            assert sample(registry, "meshmirror_peer_summary_fetched_bytes_total",
                          {"kind": "full"}) == 0
    finally:
        await d.close()


async def test_a_peer_advertising_an_absurd_key_count_is_known_and_never_held() -> None:
    """A key count of 400 digits fits a member's metadata; the estimate of its filter
    once raised OverflowError out of update_peer, which ended the node's membership
    follower (no joins or deaths applied after it)."""
    registry = CollectorRegistry()
    d = PeerDirectory(BloomRouter(registry=registry), registry=registry, own_name="me")
    absurd = int("9" * 400)
    try:
        d.update_peer("liar", "http://127.0.0.1:1", 5, keys=absurd)
        d.update_peer("n1", "http://127.0.0.1:1", 5, keys=100)
        d.update_peer("n1", "http://127.0.0.1:1", 6, keys=absurd)
        await asyncio.sleep(0.05)  # the reselection
        assert {p.name for p in d.peers()} == {"liar", "n1"}
        assert not d.selected("liar") and not d.selected("n1")
        with pytest.raises(ValueError, match="key count"):
            d.update_peer("n2", "http://127.0.0.1:1", 5, keys=-1)
    finally:
        await d.close()


async def test_a_filter_far_larger_than_its_keys_said_is_held_at_its_real_size_when_it_fits(
        ) -> None:
    """A fetch reads at most twice what the budget reckons for the peer; a filter past
    that (an understated or stale key count) is chosen again at its real size, and
    with room for it, fetched whole the next time."""
    registry = CollectorRegistry()
    d = PeerDirectory(BloomRouter(registry=registry), registry=registry, timeout_s=2,
                      own_name="me")
    big = make_summary([digest_key(i) for i in range(20_000)], epoch=10)
    try:
        async with peer_server(PeerSource(big)) as srv:
            d.update_peer("n1", srv.http_base, 10, keys=100)  # its filter is 200x that
            await until(lambda: d.held("n1") is not None)
            assert held(d, "n1").m == big.m and len(srv.source.requests) == 2
            assert sample(registry, "meshmirror_peer_summary_fetches_total",
                          {"result": "error"}) == 1
    finally:
        await d.close()
