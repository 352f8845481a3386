from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from meshmirror.routing.bloom import MASK, RANGE, BloomFilter
from meshmirror.routing.router import BloomRouter, InMemoryRouter, Peer, filter_fp_rate
from meshmirror.routing.summary import Summary
from tests.conformance.router_suite import FakeClock, RouterConformance, RouterHarness, key, peer


def summary_of(keys: set[str], capacity: int | None = None, fp_rate: float = 0.01) -> Summary:
    bloom = BloomFilter.build(keys, fp_rate=fp_rate, capacity=capacity)
    return Summary(epoch=1, k=bloom.k, m=bloom.m, count=len(keys), born_at_ms=0,
                   bits=bloom.bits.tobytes())


class TestInMemoryRouter(RouterConformance):
    @pytest.fixture
    def harness(self) -> RouterHarness:
        clock, registry = FakeClock(), CollectorRegistry()
        router = InMemoryRouter(clock=clock, registry=registry)
        return RouterHarness(router, clock, registry, router.set_keys, router.drop_peer)


class TestBloomRouter(RouterConformance):
    @pytest.fixture
    def harness(self) -> RouterHarness:
        clock, registry = FakeClock(), CollectorRegistry()
        router = BloomRouter(clock=clock, registry=registry)

        def give(p: Peer, keys: set[str]) -> None:
            router.set_summary(p, summary_of(keys))

        return RouterHarness(router, clock, registry, give, router.drop_peer)


def test_bloom_router_matches_across_filter_geometries() -> None:
    router = BloomRouter(seed=3)
    shared = key("shared")
    sizes = [10, 5000, 20000]
    for n, size in enumerate(sizes):
        router.set_summary(peer(n), summary_of({shared, key(f"only-{n}")}, capacity=size))
    router.set_summary(peer(9), summary_of({shared}, fp_rate=0.001))  # another k
    assert router.filter_bytes() == sum(
        summary_of(set(), capacity=size).m // 8 for size in sizes) + summary_of(
        set(), fp_rate=0.001).m // 8
    assert set(router.candidates(shared, 10)) == {peer(0), peer(1), peer(2), peer(9)}
    for n in range(3):
        assert router.candidates(key(f"only-{n}"), 10) == [peer(n)]
    # A peer whose filter changes size moves; its old bits match nothing.
    router.set_summary(peer(0), summary_of({key("moved")}, capacity=20000))
    assert router.candidates(key("moved"), 10) == [peer(0)]
    assert peer(0) not in router.candidates(shared, 10)


def test_bloom_router_compacts_the_space_of_dropped_peers() -> None:
    router = BloomRouter(seed=3)
    one = summary_of({key(0)}).m // 8
    for n in range(20):
        router.set_summary(peer(n), summary_of({key(n)}))
    for n in range(10):
        router.drop_peer(peer(n).name)
    assert router.filter_bytes() == 10 * one
    router.drop_peer(peer(10).name)  # garbage now outweighs live filters: compacted
    assert router._filters.end == router.filter_bytes() == 9 * one
    for n in range(20, 30):
        router.set_summary(peer(n), summary_of({key(n)}))
    assert router.filter_bytes() == router._filters.end == 19 * one
    for n in range(11):
        assert router.candidates(key(n), 5) == []
    for n in range(11, 30):
        assert router.candidates(key(n), 5) == [peer(n)]


def test_bloom_router_agrees_with_single_filter_membership() -> None:
    """The stacked-matrix lookup gives exactly what each filter alone says,
    false positives included."""
    rng = np.random.default_rng(7)
    router = BloomRouter(seed=1)
    summaries = {}
    for n in range(60):
        keys = {key(f"{n}-{i}") for i in range(int(rng.integers(50, 400)))}
        summaries[peer(n)] = summary_of(keys, capacity=300)  # some over capacity: more FPs
        router.set_summary(peer(n), summaries[peer(n)])
    probes = [key(f"probe-{i}") for i in range(300)] + [key(f"{n}-3") for n in range(60)]
    for probe in probes:
        expected = {p for p, s in summaries.items() if probe in s}
        assert set(router.candidates(probe, 100)) == expected


def test_bloom_router_ignores_a_filter_that_matches_everything() -> None:
    router = BloomRouter(seed=3)
    honest = summary_of({key("real")})
    everything = Summary(epoch=1, k=honest.k, m=honest.m, count=1, born_at_ms=0,
                         bits=b"\xff" * (honest.m // 8))
    router.set_summary(peer(1), everything)
    router.set_summary(peer(2), honest)
    assert router.candidates(key("real"), 3) == [peer(2)]
    assert router.candidates(key("anything"), 3) == []
    assert peer(1) in router.peers()  # known, with no keys
    # A useful filter later puts it back.
    router.set_summary(peer(1), summary_of({key("real")}))
    assert set(router.candidates(key("real"), 3)) == {peer(1), peer(2)}
    # An over-full but still telling filter stays (its expected rate is just higher).
    crowded = summary_of({key(n) for n in range(3000)}, capacity=1000)
    assert 0.01 < filter_fp_rate(crowded) < BloomRouter.USELESS_FP
    router.set_summary(peer(3), crowded)
    assert peer(3) in router.candidates(key(5), 3)


def test_bloom_router_matches_old_peers_power_of_two_filters_beside_new_ones() -> None:
    """A rolling upgrade: peers still serving version 1 (masked positions) and peers
    serving version 3 (range-reduced) answer the same lookup."""
    router = BloomRouter(seed=3)
    shared = key("shared")
    old = BloomFilter.build([shared, key("old-only")], reduction=MASK)
    router.set_summary(peer(1), Summary(epoch=1, k=old.k, m=old.m, count=2, born_at_ms=0,
                                        bits=old.bits.tobytes(), reduction=MASK))
    router.set_summary(peer(2), summary_of({shared, key("new-only")}))
    assert set(router.candidates(shared, 5)) == {peer(1), peer(2)}
    assert router.candidates(key("old-only"), 5) == [peer(1)]
    assert router.candidates(key("new-only"), 5) == [peer(2)]


def test_bloom_router_answers_exactly_what_each_filter_answers() -> None:
    """The router's one pass over all filters at once agrees, key by key, with asking
    each peer's filter on its own, across sizes, hash counts and both reductions
    (false positives included: both read the same bits)."""
    rng = np.random.default_rng(7)
    router = BloomRouter(seed=7, clock=FakeClock())
    filters: dict[Peer, BloomFilter] = {}
    for n in range(40):
        members = [key(f"{n}-{i}") for i in range(int(rng.integers(1, 400)))]
        bloom = BloomFilter.build(members, fp_rate=[0.01, 0.05, 0.001][n % 3],
                                  reduction=MASK if n % 4 == 0 else RANGE)
        filters[peer(n)] = bloom
        router.set_summary(peer(n), Summary(epoch=1, k=bloom.k, m=bloom.m,
                                            count=len(members), born_at_ms=0,
                                            bits=bloom.bits.tobytes(),
                                            reduction=bloom.reduction))
    router.drop_peer(peer(5).name)  # a hole among the placed filters
    del filters[peer(5)]
    probes = [key(f"{n}-{i}") for n in range(40) for i in range(0, 400, 37)]
    probes += [key(f"absent-{i}") for i in range(300)]
    for probe in probes:
        assert set(router.candidates(probe, 100)) == {
            p for p, bloom in filters.items() if probe in bloom}
