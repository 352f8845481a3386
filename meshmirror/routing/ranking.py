"""What the mirror may ask of routing: candidates, in-flight brackets and outcomes.

`Router` carries the whole health model (penalties, circuits, false-positive
learning, in-flight ranking) and more methods than its callers need. The mirror
sees only this protocol, so it cannot reach into that model (how many failures in
a row trip a circuit is decided behind it), and a different ranking needs to offer
only these six methods. Spegel's mirror likewise sees a four-method router.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshmirror.routing.router import Peer


class Outcome(enum.Enum):
    """How one request to a peer ended, as far as ranking is concerned."""

    OK = enum.auto()  # good bytes: its time counts towards the peer's rank
    FALSE_POSITIVE = enum.auto()  # a 404 for a key its filter matched: not an error
    ERROR = enum.auto()  # refused, broke off, bad status: pushed down for a while
    # Timed out: our own busy moment as likely as the peer's, so an error the first
    # time and a circuit trip when it follows another failure with no success between.
    TIMEOUT = enum.auto()
    UNFIT = enum.auto()  # stalled, too slow or sent bad bytes: its circuit opens


class PeerRanking(Protocol):
    """The routing the mirror uses. Call from the registry's event loop only."""

    def candidates(self, key: str, limit: int = 3) -> list[Peer]:
        """Up to ``limit`` peers that probably hold ``key``, best first."""
        ...

    def peers(self) -> list[Peer]:
        """Every peer known now, in no particular order."""
        ...

    def begin(self, peer_name: str) -> None:
        """A request to the peer starts (or queues): it counts as in flight."""
        ...

    def end(self, peer_name: str) -> None:
        """A request begun with `begin` is over, however it ended."""
        ...

    def outcome(self, peer_name: str, outcome: Outcome, latency_s: float = 0.0) -> None:
        """How a request ended, and how long the peer took to answer or to fail."""
        ...

    def same_zone(self, peer_name: str) -> bool | None:
        """Whether a peer is in this node's zone (bytes are counted by zone); None when
        either zone is unknown."""
        ...
