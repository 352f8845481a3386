"""Lifeguard's local health: a node that is itself slow trusts its own verdicts less.

A node that misses acks, gets refuted or has to refute suspicions about itself
is more likely the unhealthy party (CPU starved, GC pause, saturated NIC). Its
score rises, and every probe interval and timeout it uses is multiplied by
``score + 1``, so it waits longer before suspecting others. Good probes bring
the score back down.
"""

from __future__ import annotations


class Awareness:
    """A score in ``[0, max_multiplier - 1]``; 0 is healthy."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError(f"awareness max multiplier must be >= 1, got {max_multiplier}")
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        return self._score

    def apply_delta(self, delta: int) -> None:
        self._score = min(max(self._score + delta, 0), self._max - 1)

    def scale(self, timeout: float) -> float:
        """``timeout`` stretched by local ill-health."""
        return timeout * (self._score + 1)
