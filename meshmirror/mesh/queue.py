"""memberlist's transmit-limited broadcast queue.

Every membership change is gossiped a bounded number of times,
``retransmit_mult * ceil(log10(N + 1))``, which is enough for epidemic spread
to reach every node with high probability while keeping bandwidth flat. The
least-sent messages go first (new news spreads fastest), larger ones before
smaller at the same count (to fill packets), newer before older. A message
about a node replaces any older queued message about the same node, so stale
"suspect" never chases a newer "alive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one broadcast is sent in a cluster of ``n`` nodes."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


@dataclass(slots=True)
class _Item:
    transmits: int
    msg: bytes
    id: int
    name: str | None


class TransmitLimitedQueue:
    """Broadcasts waiting to be piggybacked on gossip and probe packets."""

    __slots__ = ("_by_name", "_id", "_items", "retransmit_mult")

    def __init__(self, retransmit_mult: int) -> None:
        self.retransmit_mult = retransmit_mult
        self._items: dict[int, _Item] = {}
        self._by_name: dict[str, int] = {}
        self._id = 0

    def __len__(self) -> int:
        return len(self._items)

    def contains(self, name: str) -> bool:
        """Whether a message of that name is still waiting to be sent (more times)."""
        return name in self._by_name

    def queue(self, msg: bytes, name: str | None = None) -> None:
        """Queue ``msg``; with a ``name``, it replaces the queued message of that name."""
        if name is not None:
            old = self._by_name.pop(name, None)
            if old is not None:
                del self._items[old]
        self._id += 1
        self._items[self._id] = _Item(0, msg, self._id, name)
        if name is not None:
            self._by_name[name] = self._id

    def get_broadcasts(self, overhead: int, limit: int, num_nodes: int) -> list[bytes]:
        """Take as many messages as fit in ``limit`` bytes, each costing ``overhead`` more.

        Picking greedily over (fewest transmits, largest, newest) is what
        memberlist's per-transmit-level btree walk amounts to, since the space
        left only shrinks as messages are taken.
        """
        if not self._items:
            return []
        transmit_limit = retransmit_limit(self.retransmit_mult, num_nodes)
        ordered = sorted(self._items.values(), key=lambda it: (it.transmits, -len(it.msg), -it.id))
        used = 0
        out: list[bytes] = []
        for item in ordered:
            free = limit - used - overhead
            if free <= 0:
                break
            if len(item.msg) > free:
                continue
            used += overhead + len(item.msg)
            out.append(item.msg)
            item.transmits += 1
            if item.transmits >= transmit_limit:
                self._remove(item)
        if not self._items:
            self._id = 0
        return out

    def _remove(self, item: _Item) -> None:
        del self._items[item.id]
        if item.name is not None and self._by_name.get(item.name) == item.id:
            del self._by_name[item.name]

    def reset(self) -> None:
        self._items.clear()
        self._by_name.clear()
        self._id = 0

    def prune(self, max_retain: int) -> None:
        """Drop the most-sent messages until at most ``max_retain`` remain."""
        while len(self._items) > max_retain:
            worst = max(self._items.values(), key=lambda it: (it.transmits, -len(it.msg), -it.id))
            self._remove(worst)
