"""Who fetches a cold blob from the upstream, and whom every other node reads it from.

When a rollout starts, no peer holds the new image, so every node's mirror would
miss and every node would pull the whole image from the upstream. Instead, each
digest gets one *owner* in the cluster, the only node that fetches it from the
upstream, and a *fan-out tree* through which every other node reads it while
it downloads. Both are pure functions of ``(digest, members)``: every node
computes the same answer from the membership it sees, with no tracker, no
election and no message.

The owner: rendezvous (highest-random-weight) hashing
------------------------------------------------------
Each member gets the weight ``sha256(digest NUL member)``; members are ranked by
weight, highest first, and the first is the owner. Chosen over a consistent-hash
ring because it needs no virtual nodes to spread load evenly (every member is
equally likely to win any digest) and gives a full *order* for free: when the
owner dies, the next in the order takes over, the same for every node. Removing
one member moves only the digests it owned (its 1/N share); the relative order
of everybody else is unchanged, so a reader that fails over lands on the member
that every node now agrees on. Cost: O(N) hashes per cold digest, microseconds
for a thousand members and paid once per blob, not per request.

The tree: the rendezvous order, laid out as a heap
---------------------------------------------------
Position 0 of the order is the owner (the root); the member at position i > 0
reads from the member at position ``(i - 1) // F``. So the owner serves at most
F readers, each of them serves at most F, and the depth is about log_F(N):
4 for 1,000 members with F = 8, 5 for 5,000. Every member serves at most F
readers whatever N is, so no NIC carries more than F copies, and the whole
image crosses each level once.

Disagreement costs little. Two nodes whose views differ by one member compute
at most two different owners, so at most one extra upstream fetch, and a parent
another node computed differently is still a node that reads the blob through
the tree itself (a request to it makes it join), so a pull never fails for it;
at worst a member serves a few readers more than F for the moment views differ.
A member whose position shifts by one keeps its owner and only changes parent.

Stripes: every member uploads about what it downloads
-----------------------------------------------------
In one tree a member at an inner position uploads F copies and a leaf none, so
a large blob moves at 1/F of a NIC through the inner members. A blob of at
least F * `MIN_STRIPE` bytes is therefore cut into up to F stripes (byte
ranges, read with ``Range``). Stripe s takes the digest's order rotated by
about s * N/F positions, with its root chosen by rendezvous of ``digest#s``
(so stripe roots are as stable as owners). The inner positions of the rotated
trees do not overlap but for a member or two at their edges, so a member is
inner in one stripe (a stripe root or an edge member in two): it serves F
stripe readers, uploading F copies of 1/F of the blob, about the blob once,
while it downloads the F stripes in parallel from F different parents
(SplitStream's idea, without its overlay). Each stripe's root fetches only
that range from the upstream, so the upstream still serves each byte once, and
the upstream fetch is spread over F members.

Only members that advertise a registry (an HTTP base) take part: the caller
passes their names, including its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_FANOUT = 8
# Below F stripes of this size a blob is one stripe: per-request costs would dominate.
MIN_STRIPE = 16 * 1024 * 1024


def weight(digest: str, member: str) -> int:
    """The rendezvous weight of ``member`` for ``digest`` (64 bits of a sha256)."""
    h = hashlib.sha256(digest.encode() + b"\0" + member.encode()).digest()
    return int.from_bytes(h[:8], "big")


def rendezvous_order(digest: str, members: Iterable[str]) -> list[str]:
    """Members ranked for ``digest``, owner first; ties (never seen in practice) by name."""
    return sorted(set(members), key=lambda m: (-weight(digest, m), m))


def owner_of(digest: str, members: Iterable[str]) -> str | None:
    """The member that fetches ``digest`` from the upstream; None with no member."""
    best: tuple[int, str] | None = None
    for member in set(members):
        key = (-weight(digest, member), member)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


@dataclass(frozen=True, slots=True)
class Placement:
    """One member's place in a digest's fan-out tree.

    ``parent`` is None for the owner (the root, which reads from the upstream);
    ``ancestors`` runs from the parent up to the owner: where to resume when the
    parent fails, nearest first. ``children`` are the readers this member serves.
    """

    member: str
    position: int
    depth: int
    parent: str | None
    ancestors: tuple[str, ...]
    children: tuple[str, ...]

    @property
    def is_owner(self) -> bool:
        return self.parent is None


def parent_position(position: int, fanout: int) -> int | None:
    return None if position == 0 else (position - 1) // fanout


def depth_of(position: int, fanout: int) -> int:
    depth = 0
    while position > 0:
        position = (position - 1) // fanout
        depth += 1
    return depth


def tree_depth(members: int, fanout: int = DEFAULT_FANOUT) -> int:
    """The depth of a tree of ``members`` members (0 for one member)."""
    return 0 if members <= 1 else depth_of(members - 1, fanout)


def stripe_count(size: int, fanout: int = DEFAULT_FANOUT, min_stripe: int = MIN_STRIPE) -> int:
    """How many stripes a blob of ``size`` bytes is cut into (1 to ``fanout``)."""
    return max(1, min(fanout, size // max(1, min_stripe)))


def stripe_range(size: int, stripes: int, index: int) -> tuple[int, int]:
    """Bytes [start, end) of stripe ``index`` of ``stripes``: equal cuts, the rest in the last."""
    if not 0 <= index < stripes:
        raise ValueError(f"stripe {index} of {stripes}")
    step = size // stripes
    return index * step, size if index == stripes - 1 else (index + 1) * step


class FanoutTree:
    """A digest's (or one stripe's) fan-out tree over one membership view.

    See the module's note. Built once per cold digest per membership view;
    lookups are O(depth). ``stripe`` rotates the order so the inner members of
    stripes 0..F-1 are disjoint.
    """

    def __init__(self, digest: str, members: Iterable[str],
                 fanout: int = DEFAULT_FANOUT, stripe: int = 0) -> None:
        if fanout < 1:
            raise ValueError("fan-out must be at least 1")
        if stripe < 0:
            raise ValueError("stripe must not be negative")
        self.digest = digest
        self.fanout = fanout
        order = rendezvous_order(digest, members)
        if order and stripe:
            # The root by rendezvous of the stripe's own key, so a member joining or
            # leaving moves only its share of stripe roots (upstream fetches); the
            # rest rotated, so inner members differ from stripe to stripe.
            root = owner_of(f"{digest}#{stripe}", order)
            inner = -(-(len(order) - 1) // fanout)  # positions that have readers
            shift = (1 + stripe * max(1, inner - 1)) % len(order)
            rotated = order[shift:] + order[:shift]
            order = [m for m in rotated if m == root] + [m for m in rotated if m != root]
        self.order: Sequence[str] = order
        self._position = {member: i for i, member in enumerate(self.order)}

    def __len__(self) -> int:
        return len(self.order)

    @property
    def owner(self) -> str | None:
        return self.order[0] if self.order else None

    def placement(self, member: str) -> Placement:
        """``member``'s place; KeyError for a member not in this view."""
        position = self._position[member]
        ancestors: list[str] = []
        up = parent_position(position, self.fanout)
        while up is not None:
            ancestors.append(self.order[up])
            up = parent_position(up, self.fanout)
        first = position * self.fanout + 1
        children = tuple(self.order[first:min(first + self.fanout, len(self.order))])
        return Placement(member, position, len(ancestors),
                         ancestors[0] if ancestors else None, tuple(ancestors), children)

    def sources(self, member: str) -> list[str]:
        """Whom ``member`` reads from, in failover order: its ancestors nearest first,
        then the rest of the rendezvous order (the owner's successors), never itself.
        An empty list means ``member`` is the owner and reads from the upstream."""
        placement = self.placement(member)
        if placement.is_owner:
            return []
        seen = set(placement.ancestors) | {member}
        rest = [m for m in self.order if m not in seen]
        return list(placement.ancestors) + rest
