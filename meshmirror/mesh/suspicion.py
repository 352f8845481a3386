"""Lifeguard's suspicion timer: long when one node suspects, shorter as others agree.

A single suspicion might just be the suspecter's own problem, so it starts at
``max_timeout``. Each independent peer that also suspects the node (a distinct
``from`` on a suspect message) is evidence, and the timeout falls
logarithmically toward ``min_timeout`` once ``k`` peers have confirmed. The
timer is a plain deadline: the core compares it with ``now`` in ``tick``.
"""

from __future__ import annotations

import math


def remaining_suspicion_time(n: int, k: int, elapsed: float, min_timeout: float,
                             max_timeout: float) -> float:
    """Seconds left after ``n`` of ``k`` confirmations, ``elapsed`` seconds in.

    Rounded down to whole milliseconds as memberlist does, so both fire at the
    same moment for the same inputs.
    """
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    timeout = max(timeout, min_timeout)
    return timeout - elapsed


class Suspicion:
    """The suspicion of one node, started by ``from_node`` at ``start``."""

    __slots__ = ("_confirmations", "deadline", "k", "max_timeout", "min_timeout", "n", "start")

    def __init__(self, from_node: str, k: int, min_timeout: float, max_timeout: float,
                 start: float) -> None:
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = start
        self.n = 0
        self._confirmations = {from_node}
        # With nobody to confirm (tiny clusters) waiting for confirmations is pointless.
        self.deadline = start + (max_timeout if k >= 1 else min_timeout)

    def confirm(self, from_node: str, now: float) -> bool:
        """Count an independent confirmation; True if it was new (worth re-gossiping)."""
        if self.n >= self.k or from_node in self._confirmations:
            return False
        self._confirmations.add(from_node)
        self.n += 1
        remaining = remaining_suspicion_time(self.n, self.k, now - self.start,
                                             self.min_timeout, self.max_timeout)
        self.deadline = now + max(remaining, 0.0)
        return True
