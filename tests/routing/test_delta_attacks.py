"""Attacks on the summary deltas from #18's review: what a client naming many old
epochs can make a node hold, and a peer whose epochs go back (restarted with its clock
behind), served over real HTTP."""

from __future__ import annotations

import numpy as np

from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import DeltaLog
from meshmirror.routing.router import BloomRouter
from meshmirror.routing.summary import Summary, SummaryDelta, max_delta_bytes, max_delta_positions
from tests.routing.fakes import digest_key, until
from tests.routing.servers import PeerSource, make_summary, peer_server


def test_deltas_asked_from_every_logged_epoch_keep_only_a_few_encoded() -> None:
    # 255 small versions then one large one, in a filter of 100,000 keys: the delta from
    # each logged epoch holds the large version, and each was kept once encoded (7.7 MB).
    m = 960_000
    log = DeltaLog()
    log.restart(1000)
    for i in range(255):
        log.append(1001 + i, np.array([7 * i + 3], np.uint32), m)
    rng = np.random.default_rng(1)
    log.append(2000, np.unique(rng.integers(0, m, max_delta_positions(m) - 300)
                               ).astype(np.uint32), m)
    current = Summary(epoch=2000, k=7, m=m, count=100_000, born_at_ms=0, bits=bytes(m // 8))
    epochs = [1000, *range(1001, 1256)]
    first = {epoch: log.delta(epoch, current) for epoch in epochs}
    assert all(first.values())
    assert log.encoded_bytes <= DeltaLog.MAX_ENCODED * max_delta_bytes(m)
    # What was let go is encoded again when asked, to the same bytes.
    for epoch in (1000, 1128, 1255):
        again = log.delta(epoch, current)
        assert again is not None and again == first[epoch]
        assert SummaryDelta.decode(again).base_epoch == epoch


async def test_a_peer_restarted_with_its_clock_behind_is_fetched_whole_again() -> None:
    # Its epochs are wall-clock ms: restarted with the clock stepped back, it advertises
    # an epoch before the one held, for a summary that no longer holds the old keys.
    router = BloomRouter(seed=1)
    directory = PeerDirectory(router, timeout_s=1.0, backoff_s=0.05, max_backoff_s=0.2)
    before, after = [digest_key(i) for i in range(50)], [digest_key(i) for i in range(50, 99)]
    source = PeerSource(make_summary(before, epoch=5_000))
    try:
        async with peer_server(source) as srv:
            directory.update_peer("n1", srv.http_base, 5_000)
            await until(lambda: router.candidates(before[0]) != [])
            source.summary = make_summary(after, epoch=1_000)
            directory.update_peer("n1", srv.http_base, 1_000)
            await until(lambda: router.candidates(after[0]) != [])
            held = directory.held("n1")
            assert held is not None and held.epoch == 1_000
            assert directory.held_bytes == held.m // 8 and directory.share() == 1.0
            source.summary = make_summary(after + before[:1], epoch=1_001)  # and on from there
            directory.update_peer("n1", srv.http_base, 1_001)
            await until(lambda: router.candidates(before[0]) != [])
    finally:
        await directory.close()
