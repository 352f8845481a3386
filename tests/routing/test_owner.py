"""The designated fetcher and fan-out tree: same answer everywhere, stable under change."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import pytest

from meshmirror.routing.owner import (
    MIN_STRIPE,
    FanoutTree,
    owner_of,
    rendezvous_order,
    stripe_count,
    stripe_range,
    tree_depth,
)

MEMBERS = [f"node-{i}" for i in range(50)]
DIGESTS = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(2000)]


def test_every_view_order_gives_the_same_owner_and_order() -> None:
    digest = DIGESTS[0]
    assert rendezvous_order(digest, MEMBERS) == rendezvous_order(digest, reversed(MEMBERS))
    assert owner_of(digest, MEMBERS) == rendezvous_order(digest, MEMBERS)[0]
    assert owner_of(digest, []) is None


def test_owners_spread_evenly() -> None:
    counts = Counter(owner_of(d, MEMBERS) for d in DIGESTS)
    assert len(counts) == len(MEMBERS)
    mean = len(DIGESTS) / len(MEMBERS)
    assert max(counts.values()) < 2.5 * mean


def test_removing_a_member_moves_only_its_share() -> None:
    gone = MEMBERS[7]
    rest = [m for m in MEMBERS if m != gone]
    for digest in DIGESTS:
        before, after = owner_of(digest, MEMBERS), owner_of(digest, rest)
        if before != gone:
            assert after == before
        else:
            # The next in the old order takes over: what every reader fails over to.
            assert after == rendezvous_order(digest, MEMBERS)[1]
    # And the relative order of everybody else does not change.
    assert rendezvous_order(DIGESTS[3], rest) == [
        m for m in rendezvous_order(DIGESTS[3], MEMBERS) if m != gone]


def test_adding_a_member_takes_only_its_share() -> None:
    moved = sum(owner_of(d, MEMBERS) != owner_of(d, [*MEMBERS, "new"]) for d in DIGESTS)
    assert all(owner_of(d, [*MEMBERS, "new"]) in (owner_of(d, MEMBERS), "new")
               for d in DIGESTS)
    assert moved < 3 * len(DIGESTS) / len(MEMBERS)


def test_views_one_member_apart_name_at_most_two_owners() -> None:
    """A brief disagreement: at most one extra upstream fetch per digest."""
    views = [MEMBERS, MEMBERS[:-1], [*MEMBERS, "late"]]
    for digest in DIGESTS[:200]:
        for a in views:
            for b in views:
                if abs(len(a) - len(b)) <= 1:
                    assert len({owner_of(digest, a), owner_of(digest, b)}) <= 2


@pytest.mark.parametrize(("members", "fanout"), [(1, 8), (2, 8), (9, 8), (100, 8),
                                                 (1000, 8), (5000, 8), (37, 3)])
def test_tree_shape(members: int, fanout: int) -> None:
    names = [f"n{i}" for i in range(members)]
    tree = FanoutTree(DIGESTS[1], names, fanout)
    placements = [tree.placement(m) for m in names]
    owners = [p for p in placements if p.is_owner]
    assert [p.member for p in owners] == [owner_of(DIGESTS[1], names)]
    readers = Counter(p.parent for p in placements if p.parent is not None)
    assert max(readers.values(), default=0) <= fanout
    assert max(p.depth for p in placements) == tree_depth(members, fanout)
    # Every member's parent lists it as a child; every path ends at the owner.
    for p in placements:
        if p.parent is not None:
            assert p.member in tree.placement(p.parent).children
            assert p.ancestors[-1] == tree.owner


def test_depth_is_log_f() -> None:
    assert tree_depth(1) == 0
    assert tree_depth(9) == 1
    assert tree_depth(1000) == 4  # 1 + 8 + 64 + 512 = 585 < 1,000 <= 4,681
    assert tree_depth(5000) == 5


def test_sources_fail_over_up_the_tree_then_the_order() -> None:
    tree = FanoutTree(DIGESTS[2], MEMBERS, 3)
    leaf = tree.order[-1]
    sources = tree.sources(leaf)
    placement = tree.placement(leaf)
    assert sources[: len(placement.ancestors)] == list(placement.ancestors)
    assert sources[len(placement.ancestors) - 1] == tree.owner
    assert leaf not in sources and len(sources) == len(MEMBERS) - 1
    assert tree.sources(tree.order[0]) == []


def test_fanout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FanoutTree(DIGESTS[0], MEMBERS, 0)


@pytest.mark.parametrize("members", [3, 9, 20, 100, 1000, 5000])
def test_stripes_spread_the_upload(members: int) -> None:
    """Over all 8 stripes a member serves F stripe readers, a stripe root 2F: it uploads
    the blob about once however large the cluster."""
    names = [f"n{i}" for i in range(members)]
    served: Counter[str] = Counter()
    for stripe in range(8):
        tree = FanoutTree(DIGESTS[4], names, 8, stripe)
        served.update({m: len(tree.placement(m).children) for m in names})
    if members >= 100:
        assert len([m for m in names if served[m] > 8]) <= 2 * 8
        assert max(served.values()) <= 16
    else:
        assert max(served.values()) <= 32


def test_stripe_roots_are_as_stable_as_owners() -> None:
    """A member joining takes only the stripe roots it wins: disagreement costs little."""
    names = [f"n{i}" for i in range(100)]
    moved = 0
    for digest in DIGESTS[:100]:
        for stripe in range(1, 8):
            before = FanoutTree(digest, names, 8, stripe).owner
            after = FanoutTree(digest, [*names, "late"], 8, stripe).owner
            moved += before != after
            assert after in (before, "late")
    assert moved < 3 * 700 / 100


def test_stripe_ranges_cover_the_blob() -> None:
    assert stripe_count(10 * MIN_STRIPE) == 8
    assert stripe_count(3 * MIN_STRIPE) == 3
    assert stripe_count(100) == 1
    size = 8 * MIN_STRIPE + 5
    ranges = [stripe_range(size, 8, i) for i in range(8)]
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    with pytest.raises(ValueError):
        stripe_range(size, 8, 8)
