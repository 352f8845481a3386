"""Zone-aware peer choice: the router's ranking, and four real nodes in two zones."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
from meshmirror.routing.router import BloomRouter, Peer
from tests.routing.fakes import digest_key
from tests.routing.servers import make_summary
from tests.support.http import timed_sha256
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

HERE_A, HERE_B, THERE, NOWHERE = (Peer("a1", "http://127.0.0.1:1", "zone-a"),
                                  Peer("a2", "http://127.0.0.1:2", "zone-a"),
                                  Peer("b1", "http://127.0.0.1:3", "zone-b"),
                                  Peer("old", "http://127.0.0.1:4"))


def _router(zone: str, holders: dict[Peer, list[str]]) -> BloomRouter:
    router = BloomRouter(seed=1, zone=zone)
    for peer, keys in holders.items():
        router.set_summary(peer, make_summary(keys, epoch=1))
    return router


def test_same_zone_holders_come_first_even_when_busy() -> None:
    key = digest_key("layer")
    router = _router("zone-a", {p: [key] for p in (HERE_A, HERE_B, THERE, NOWHERE)})
    for _ in range(50):
        assert set(router.candidates(key, 2)) == {HERE_A, HERE_B}
    for _ in range(20):  # twenty requests in flight at each same-zone holder
        router.begin(HERE_A.name)
        router.begin(HERE_B.name)
    assert set(router.candidates(key, 2)) == {HERE_A, HERE_B}
    assert set(router.candidates(key, 4)[2:]) == {THERE, NOWHERE}
    assert router.same_zone(HERE_A.name) is True
    assert router.same_zone(THERE.name) is False
    assert router.same_zone(NOWHERE.name) is None


def test_other_zones_are_asked_when_no_same_zone_holder_can_be() -> None:
    key, only_there = digest_key("layer"), digest_key("rare")
    router = _router("zone-a", {HERE_A: [key], THERE: [key, only_there]})
    assert router.candidates(only_there, 3) == [THERE]
    router.trip(HERE_A.name)  # its circuit opens: the other zone's holder it is
    assert router.candidates(key, 3) == [THERE]


def test_a_router_that_knows_no_zone_prefers_none() -> None:
    key = digest_key("layer")
    router = _router("", {HERE_A: [key], THERE: [key]})
    firsts = {router.candidates(key, 1)[0] for _ in range(200)}
    assert firsts == {HERE_A, THERE}
    assert router.same_zone(HERE_A.name) is None


# -- four real nodes in two zones ------------------------------------------------------

def zone_bytes(node: RunningNode) -> dict[str, float]:
    metrics = scrape(node.metrics)
    return {zone: metric(metrics, "meshmirror_mirror_peer_zone_bytes_total", zone=zone)
            for zone in ("same", "cross", "unknown")}


def all_summaries_held(node: RunningNode, peers: set[str]) -> bool:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as r:
        members = json.load(r)["mesh"]["members"]
    current = {m["name"] for m in members if m["summary_current"] and m["state"] == "alive"}
    return peers <= current


@pytest.fixture
def two_zones(tmp_path: Path) -> Iterator[list[RunningNode]]:
    """puller (zone a, empty), near (a, holds "both"), far1 and far2 (b, hold "both";
    far2 also holds "far")."""
    layouts = {name: tmp_path / name for name in ("puller", "near", "far1", "far2")}
    layouts["puller"].mkdir()
    for name in ("near", "far1", "far2"):
        build_image("docker.io/library/both:1", layouts[name], [64 * 1024], seed=1)
    build_image("docker.io/library/far:1", layouts["far2"], [64 * 1024], seed=2)
    nodes: list[RunningNode] = []
    try:
        for name, zone in (("near", "zone-a"), ("far1", "zone-b"), ("far2", "zone-b"),
                           ("puller", "zone-a")):
            extra: tuple[str, ...] = ("--node-name", name, "--zone", zone)
            if nodes:
                extra += ("--join", nodes[0].mesh)
            if name == "puller":  # keeps nothing it fetched: every GET is routed again
                extra += ("--upstream-cache-limit", "0")
            nodes.append(start_node(f"oci:{layouts[name]}", tmp_path / f"{name}.log", extra))
        yield nodes
    finally:
        for node in nodes:
            stop(node.proc)


@pytest.mark.real
def test_a_blob_in_both_zones_comes_from_the_same_zone_and_one_only_across_from_across(
        two_zones: list[RunningNode], tmp_path: Path) -> None:
    puller = two_zones[-1]
    wait_until(lambda: all_summaries_held(puller, {"near", "far1", "far2"}), 30,
               "the puller to hold every peer's summary")
    both = build_image("docker.io/library/both:1", tmp_path / "again", [64 * 1024], seed=1)
    far = build_image("docker.io/library/far:1", tmp_path / "again", [64 * 1024], seed=2)
    both_layer, far_layer = both.platforms[0].layers[0], far.platforms[0].layers[0]
    url = f"http://{puller.address}/v2/library/%s/blobs/%s?ns=docker.io"

    start = zone_bytes(puller)
    for _ in range(6):
        assert timed_sha256(url % ("both", both_layer.digest))[0] == str(both_layer.digest)
    after_both = zone_bytes(puller)
    # Every fetch from a peer came from the one in zone a. (A GET that arrives while
    # the previous fetch of the same blob is still finishing joins it: fewer than six.)
    same = after_both["same"] - start["same"]
    assert same % both_layer.size == 0 and 1 <= same // both_layer.size <= 6
    assert after_both["cross"] == start["cross"]

    assert timed_sha256(url % ("far", far_layer.digest))[0] == str(far_layer.digest)
    after_far = zone_bytes(puller)
    assert after_far["cross"] - after_both["cross"] == far_layer.size
    assert after_far["same"] == after_both["same"]
    assert after_far["unknown"] == start["unknown"] == 0
