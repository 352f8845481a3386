"""One rogue mesh member must not hurt a pull.

Real processes on loopback: an honest `meshmirror run` holding an image, the
node under test (`puller`, empty, joined to it), and for each case a rogue: a
real mesh member whose HTTP server (`rogue.Rogue`) serves a lying summary and
then hangs, drips, answers 404 after 45 ms or answers 404 at once. Its summary
either claims every key (all bits set: the router must ignore it) or claims
exactly the blob (a believable filter: the mirror must survive asking it).

For each case, 20 sequential GETs of the blob through the puller must all be
served with the right digest, each within ``BOUND_S`` and nine in ten within
``P90_S``, and the honest holder must never be blamed (the puller logs every
peer failure with the peer's name).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshmirror.mirror.options import MirrorConfig
from tests.reliability.rogue import KINDS, Rogue, all_ones_summary, claiming_summary
from tests.support.http import timed_sha256
from tests.support.node import RunningNode, held_epoch, holder_and_puller
from tests.support.processes import wait_until

pytestmark = [pytest.mark.real]

BLOB_SIZE = 2 * 1024 * 1024
GETS = 20
STALL_S = MirrorConfig().stall_timeout
# A hanging or dripping rogue asked first costs at most two stall windows, then
# the blob is read again whole from the honest peer.
BOUND_S = 2 * STALL_S + 1.0
P90_S = 1.0
# Figures by case, printed at the end of the module (pytest -s) for docs/reliability.md.
FIGURES: dict[str, str] = {}


@dataclass
class Cluster:
    holder: RunningNode
    puller: RunningNode
    url: str
    digest: str
    workdir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("rogues")
    try:
        # No blob cache: each of the 20 GETs must ask peers again, which a cached
        # blob would not (tests/reliability/test_single_flight.py covers the cache).
        with holder_and_puller(workdir, "docker.io/library/app:1", [BLOB_SIZE],
                               "--mirror-spool-dir", str(workdir),
                               "--upstream-cache-limit", "0",
                               seed=5, puller="puller") as (holder, puller, image):
            layer = image.platforms[0].layers[0]
            url = f"http://{puller.address}/v2/library/app/blobs/{layer.digest}?ns=docker.io"
            wait_until(lambda: timed_sha256(url)[0] == str(layer.digest), 30,
                       "the puller to find the blob through the holder's summary")
            yield Cluster(holder, puller, url, str(layer.digest), workdir)
    finally:
        if FIGURES:
            print("\nrogue member figures (20 sequential GETs each):")
            for case, line in FIGURES.items():
                print(f"  {case}: {line}")


def blamed(node: RunningNode, peer: str) -> list[str]:
    return [line for line in node.log.read_text().splitlines()
            if f"peer {peer} failed" in line]


@pytest.mark.parametrize("claims", ["everything", "the_blob"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_rogue_member_never_hurts_a_pull(cluster: Cluster, kind: str, claims: str) -> None:
    name = f"rogue-{kind}-{claims}"
    summary = (all_ones_summary(epoch=7) if claims == "everything"
               else claiming_summary([cluster.digest], epoch=7))
    blamed_before = len(blamed(cluster.puller, "holder"))
    with Rogue(kind, summary, BLOB_SIZE, join=cluster.puller.mesh,
               log=cluster.workdir / f"{name}.log", name=name) as rogue:
        wait_until(lambda: held_epoch(cluster.puller, name) == 7, 30,
                   f"the puller to hold {name}'s summary")
        results = [timed_sha256(cluster.url) for _ in range(GETS)]
        durations = sorted(took for _, took in results)
        p90 = durations[int(0.9 * GETS) - 1]
        FIGURES[name] = (f"p50 {durations[GETS // 2 - 1] * 1000:.0f} ms, "
                         f"p90 {p90 * 1000:.0f} ms, max {durations[-1] * 1000:.0f} ms, "
                         f"rogue asked {rogue.state.blob_requests}x")
        assert [digest for digest, _ in results] == [cluster.digest] * GETS
        assert durations[-1] <= BOUND_S, FIGURES[name]
        assert p90 <= P90_S, FIGURES[name]
        if claims == "everything":
            assert rogue.state.blob_requests == 0, "a filter that claims every key is ignored"
        else:
            assert rogue.state.blob_requests >= 1, "the case must exercise the rogue"
        # Whatever the rogue held open is closed within the stall bound.
        wait_until(lambda: rogue.state.open_connections == 0, BOUND_S,
                   "the rogue's connections to be closed")
    assert blamed(cluster.puller, "holder")[blamed_before:] == []
