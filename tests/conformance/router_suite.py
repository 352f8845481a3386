"""The Router conformance suite: every Router implementation runs these same tests.

How to run it against a router (the fixture contract)
-----------------------------------------------------
Subclass :class:`RouterConformance` in a test module whose class name starts
with ``Test`` and override the ``harness`` fixture. It must return a
:class:`RouterHarness` whose ``router`` was built with ``clock=harness.clock``
(a :class:`FakeClock`, so cooling periods pass without sleeping) and a private
``CollectorRegistry`` (``harness.registry``); ``give(peer, keys)`` makes the
router hold exactly ``keys`` for ``peer`` (replacing what it held before) and
``drop(name)`` tells it the peer died. Example::

    class TestMyRouter(RouterConformance):
        @pytest.fixture
        def harness(self) -> RouterHarness:
            clock, registry = FakeClock(), CollectorRegistry()
            router = MyRouter(clock=clock, registry=registry)
            return RouterHarness(router, clock, registry, router.load, router.drop_peer)

What the suite pins down beyond the Router docstrings: a peer that holds a key
is always among the candidates when ``limit`` allows (no false negatives; a
probabilistic router may add false positives, so the tests use key sets small
enough that one is vanishingly unlikely); a penalised peer ranks below every
healthy one until its cooling period ends; in-flight accounting never goes
below zero; feedback about unknown peers is ignored; ties are broken at random;
a tripped peer is no candidate at all until its circuit closes, then ranks last
until a success; a peer whose 404s far outnumber what its filter makes likely
ranks after the others, and what was learned fades with time.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from meshmirror.routing.ranking import Outcome, PeerRanking
from meshmirror.routing.router import Peer, Router


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RouterHarness:
    router: Router
    clock: FakeClock
    registry: CollectorRegistry
    give: Callable[[Peer, set[str]], None]
    drop: Callable[[str], None]


def key(label: object) -> str:
    return "sha256:" + hashlib.sha256(str(label).encode()).hexdigest()


def peer(n: int) -> Peer:
    return Peer(f"node-{n}", f"http://127.0.0.{n + 2}:5000")


class RouterConformance:
    @pytest.fixture
    def harness(self) -> RouterHarness:
        raise NotImplementedError("subclasses provide the router under test")

    def _many(self, h: RouterHarness, count: int, shared: str) -> list[Peer]:
        peers = [peer(n) for n in range(count)]
        for p in peers:
            h.give(p, {shared, key(f"own-{p.name}")})
        return peers

    def test_no_peer_no_candidates(self, harness: RouterHarness) -> None:
        assert harness.router.candidates(key("x"), 3) == []

    def test_only_holders_are_candidates(self, harness: RouterHarness) -> None:
        h = harness
        h.give(peer(1), {key("a"), key("b"), "docker.io/library/nginx:1.25"})
        h.give(peer(2), {key("b")})
        h.give(peer(3), {key("c")})
        assert h.router.candidates(key("a"), 3) == [peer(1)]
        assert set(h.router.candidates(key("b"), 3)) == {peer(1), peer(2)}
        assert h.router.candidates("docker.io/library/nginx:1.25", 3) == [peer(1)]
        assert h.router.candidates(key("missing"), 3) == []
        assert h.router.candidates("docker.io/library/nginx:1.26", 3) == []

    def test_limit_is_respected(self, harness: RouterHarness) -> None:
        self._many(harness, 10, key("shared"))
        assert len(harness.router.candidates(key("shared"), 3)) == 3
        assert len(harness.router.candidates(key("shared"), 50)) == 10
        assert harness.router.candidates(key("shared"), 0) == []

    def test_every_holder_is_found_among_many_peers(self, harness: RouterHarness) -> None:
        peers = self._many(harness, 200, key("shared"))
        for p in peers:
            assert p in harness.router.candidates(key(f"own-{p.name}"), 200)

    def test_a_dropped_peer_is_never_a_candidate(self, harness: RouterHarness) -> None:
        h = harness
        h.give(peer(1), {key("a")})
        h.give(peer(2), {key("a")})
        h.drop(peer(1).name)
        assert h.router.candidates(key("a"), 3) == [peer(2)]
        h.drop(peer(2).name)
        h.drop("never-seen")
        assert h.router.candidates(key("a"), 3) == []
        assert h.router.peers() == []

    def test_new_keys_replace_old_ones(self, harness: RouterHarness) -> None:
        h = harness
        h.give(peer(1), {key("old")})
        h.give(peer(1), {key("new")})
        assert h.router.candidates(key("new"), 3) == [peer(1)]
        assert h.router.candidates(key("old"), 3) == []
        assert h.router.peers() == [peer(1)]

    def test_fewest_in_flight_ranks_first(self, harness: RouterHarness) -> None:
        h = harness
        peers = self._many(h, 3, key("s"))
        h.router.begin(peers[0].name)
        h.router.begin(peers[0].name)
        h.router.begin(peers[1].name)
        for _ in range(20):
            assert h.router.candidates(key("s"), 3) == [peers[2], peers[1], peers[0]]
        assert h.router.in_flight(peers[0].name) == 2
        h.router.end(peers[0].name)
        h.router.end(peers[0].name)
        h.router.end(peers[0].name)  # one too many: stays at zero
        assert h.router.in_flight(peers[0].name) == 0
        assert h.router.candidates(key("s"), 3)[-1] == peers[1]

    def test_request_context_counts_in_flight_even_on_error(self, harness: RouterHarness
                                                            ) -> None:
        h = harness
        (p,) = self._many(h, 1, key("s"))
        with h.router.request(p.name):
            assert h.router.in_flight(p.name) == 1
        assert h.router.in_flight(p.name) == 0
        with pytest.raises(RuntimeError), h.router.request(p.name):
            raise RuntimeError("stream broke")
        assert h.router.in_flight(p.name) == 0

    def test_faster_peers_rank_first(self, harness: RouterHarness) -> None:
        h = harness
        peers = self._many(h, 3, key("s"))
        for _ in range(5):
            h.router.report(peers[0].name, ok=True, latency_s=0.400)
            h.router.report(peers[1].name, ok=True, latency_s=0.005)
            h.router.report(peers[2].name, ok=True, latency_s=0.050)
        assert h.router.candidates(key("s"), 3) == [peers[1], peers[2], peers[0]]

    def test_in_flight_outranks_latency(self, harness: RouterHarness) -> None:
        h = harness
        fast, slow = self._many(h, 2, key("s"))
        h.router.report(fast.name, ok=True, latency_s=0.001)
        h.router.report(slow.name, ok=True, latency_s=0.5)
        h.router.begin(fast.name)
        assert h.router.candidates(key("s"), 2) == [slow, fast]

    def test_an_erroring_peer_is_pushed_down_for_a_cooling_period(self, harness: RouterHarness
                                                                   ) -> None:
        h = harness
        bad, busy = self._many(h, 2, key("s"))
        h.router.begin(busy.name)  # even a busy healthy peer beats a penalised one
        h.router.report(bad.name, ok=False, latency_s=0.02)
        assert h.router.candidates(key("s"), 2) == [busy, bad]
        h.clock.advance(1.5)  # first strike cools in about a second
        assert h.router.candidates(key("s"), 2) == [bad, busy]  # idle beats busy again
        # Repeated failures cool for longer.
        h.router.report(bad.name, ok=False, latency_s=0.02)
        h.router.report(bad.name, ok=False, latency_s=0.02)
        h.clock.advance(1.5)
        assert h.router.candidates(key("s"), 2) == [busy, bad]
        # A success ends the penalty at once.
        h.router.report(bad.name, ok=True, latency_s=0.001)
        h.router.report(busy.name, ok=True, latency_s=0.2)
        assert h.router.candidates(key("s"), 2) == [bad, busy]

    def test_penalise_pushes_a_liar_down_until_it_cools(self, harness: RouterHarness) -> None:
        h = harness
        liar, other = self._many(h, 2, key("s"))
        h.router.report(liar.name, ok=True, latency_s=0.001)
        h.router.report(other.name, ok=True, latency_s=0.3)
        h.router.penalise(liar.name, 30)
        assert h.router.candidates(key("s"), 2) == [other, liar]
        h.clock.advance(31)
        assert h.router.candidates(key("s"), 2) == [liar, other]

    def test_a_false_positive_is_not_a_penalty(self, harness: RouterHarness) -> None:
        h = harness
        a, b = self._many(h, 2, key("s"))
        h.router.begin(b.name)
        h.router.report(a.name, ok=False, latency_s=0.001, false_positive=True)
        assert h.router.candidates(key("s"), 2) == [a, b]

    def test_ties_are_broken_at_random(self, harness: RouterHarness) -> None:
        peers = self._many(harness, 5, key("s"))
        firsts = collections.Counter(harness.router.candidates(key("s"), 1)[0]
                                     for _ in range(500))
        assert set(firsts) == set(peers)
        assert min(firsts.values()) > 40  # about 100 each

    def test_feedback_about_unknown_peers_is_ignored(self, harness: RouterHarness) -> None:
        r = harness.router
        r.begin("ghost")
        r.end("ghost")
        r.report("ghost", ok=False, latency_s=1.0)
        r.penalise("ghost")
        assert r.in_flight("ghost") == 0
        assert r.candidates(key("s"), 3) == []

    def test_nonsense_latency_is_refused(self, harness: RouterHarness) -> None:
        (p,) = self._many(harness, 1, key("s"))
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="latency"):
                harness.router.report(p.name, ok=True, latency_s=bad)

    def test_lookups_are_timed(self, harness: RouterHarness) -> None:
        self._many(harness, 3, key("s"))
        for _ in range(5):
            harness.router.candidates(key("s"), 3)
        assert harness.registry.get_sample_value(
            "meshmirror_resolve_duration_seconds_count", {"router": "bloom"}) == 5

    def test_a_tripped_peer_is_no_candidate_until_its_circuit_closes(
            self, harness: RouterHarness) -> None:
        h = harness
        bad, good = self._many(h, 2, key("s"))
        h.router.trip(bad.name)
        assert h.router.circuit_open(bad.name)
        for _ in range(20):
            assert h.router.candidates(key("s"), 3) == [good]
        assert h.router.candidates(key(f"own-{bad.name}"), 3) == []  # even as the only holder
        h.clock.advance(5.5)  # the first trip cools in about five seconds
        assert not h.router.circuit_open(bad.name)
        h.router.begin(good.name)  # half-open: asked again, but after a busy healthy peer
        assert h.router.candidates(key("s"), 3) == [good, bad]
        h.router.end(good.name)
        # Consecutive trips stay open for longer.
        h.router.trip(bad.name)
        h.clock.advance(5.5)
        assert h.router.candidates(key("s"), 3) == [good]
        h.clock.advance(5)
        assert set(h.router.candidates(key("s"), 3)) == {good, bad}

    def test_a_success_closes_a_circuit_for_good(self, harness: RouterHarness) -> None:
        h = harness
        peer_a, peer_b = self._many(h, 2, key("s"))
        h.router.trip(peer_a.name)
        h.clock.advance(5.5)
        h.router.report(peer_a.name, ok=True, latency_s=0.001)
        h.router.report(peer_b.name, ok=True, latency_s=0.2)
        assert h.router.candidates(key("s"), 2) == [peer_a, peer_b]
        h.router.trip(peer_a.name)  # counting starts again from the shortest period
        h.clock.advance(5.5)
        assert not h.router.circuit_open(peer_a.name)

    def test_a_peer_that_404s_far_above_its_filters_rate_is_demoted(
            self, harness: RouterHarness) -> None:
        h = harness
        liar, honest = self._many(h, 2, key("s"))
        # The liar answers fastest, but with 404s: after a couple it goes last.
        h.router.report(honest.name, ok=True, latency_s=0.050)
        h.router.report(liar.name, ok=False, latency_s=0.001, false_positive=True)
        h.router.report(liar.name, ok=False, latency_s=0.001, false_positive=True)
        assert h.router.false_positive_rate(liar.name) > 0.2
        h.router.begin(honest.name)  # demotion outranks load
        for _ in range(20):
            assert h.router.candidates(key("s"), 2) == [honest, liar]
        # One 404 among many good answers is the filter's ordinary error: no demotion.
        for _ in range(10):
            h.router.report(honest.name, ok=True, latency_s=0.050)
        h.router.report(honest.name, ok=False, latency_s=0.001, false_positive=True)
        h.router.end(honest.name)
        assert h.router.candidates(key("s"), 2)[0] == honest
        # What is learned fades: minutes later the liar is asked again on its merits.
        h.clock.advance(600)
        h.router.begin(honest.name)
        assert h.router.candidates(key("s"), 2) == [liar, honest]

    def test_outcomes_decide_rank_and_circuit_behind_the_interface(
            self, harness: RouterHarness) -> None:
        h = harness
        ranking: PeerRanking = h.router  # what the mirror sees
        a, b, c = self._many(h, 3, key("s"))
        ranking.outcome(a.name, Outcome.FALSE_POSITIVE, 0.001)
        assert not h.router.circuit_open(a.name) and h.router.failures_in_a_row(a.name) == 0
        ranking.outcome(b.name, Outcome.TIMEOUT, 0.5)  # once: an error, not a trip
        assert not h.router.circuit_open(b.name)
        assert ranking.candidates(key("s"), 3)[-1] == b  # pushed below the healthy ones
        ranking.outcome(b.name, Outcome.TIMEOUT, 0.5)  # again with no success between
        assert h.router.circuit_open(b.name)
        ranking.outcome(c.name, Outcome.UNFIT, 0.1)
        assert h.router.circuit_open(c.name)
        assert ranking.candidates(key("s"), 3) == [a]
        h.clock.advance(5.5)
        ranking.outcome(c.name, Outcome.OK, 0.001)
        assert not h.router.circuit_open(c.name)
        ranking.outcome(c.name, Outcome.ERROR, 0.001)
        assert not h.router.circuit_open(c.name) and h.router.failures_in_a_row(c.name) == 1
