"""A peer whose filter claims nearly half of all keys (just under what the router
refuses outright) and answers 404 for them, in this node's zone: from #18's review."""

from __future__ import annotations

import numpy as np

from meshmirror.routing.ranking import Outcome
from meshmirror.routing.router import BloomRouter, Peer
from meshmirror.routing.summary import Summary
from tests.routing.fakes import digest_key
from tests.routing.servers import make_summary


def _half_full(k: int, seed: int) -> Summary:
    """A filter matching 49% of all keys with ``k`` hashes: installed, as under half."""
    m = 8192 * 8
    rng = np.random.default_rng(seed)
    pos = rng.choice(m, int(0.49 ** (1 / k) * m), replace=False)
    bits = np.zeros(m // 8, np.uint8)
    np.bitwise_or.at(bits, pos >> 3, (1 << (pos & 7)).astype(np.uint8))
    return Summary(epoch=1, k=k, m=m, count=10, born_at_ms=0, bits=bits.tobytes())


def test_peers_whose_half_full_filters_answer_404_fall_below_an_honest_holder() -> None:
    now = [0.0]
    router = BloomRouter(clock=lambda: now[0], seed=1, zone="a")
    keys = [digest_key(i) for i in range(2000)]
    router.set_summary(Peer("honest", "http://127.0.0.2:1", "a"), make_summary(keys, epoch=1))
    for k in (1, 2, 3):
        router.set_summary(Peer(f"liar{k}", "http://127.0.0.3:1", "a"), _half_full(k, k))
    liar_first = 0
    for key in keys[:400]:
        now[0] += 0.05
        candidates = router.candidates(key, limit=4)
        assert "honest" in [peer.name for peer in candidates]
        liar_first += candidates[0].name != "honest"
        for peer in candidates:  # the mirror asks them in order until one has it
            if peer.name == "honest":
                router.outcome(peer.name, Outcome.OK, 0.005)
                break
            router.outcome(peer.name, Outcome.FALSE_POSITIVE, 0.001)  # a fast 404
    # A few pulls teach the router; then the honest holder is asked first. (Without the
    # cap on the demotion bound the liars came first for nine pulls in ten.)
    assert liar_first <= 20
    assert router.candidates(keys[0], limit=4)[0].name == "honest"
    # Demoted, not dropped: still asked for what only they claim.
    claimed = [digest_key(10**6 + i) for i in range(20)]
    assert any(router.candidates(key, limit=4) for key in claimed)
