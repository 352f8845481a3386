"""Bounds on what clients of the registry port can make this node ask upstream.

Every client of the registry port (any pod, with the chart's hostPort) can name
a repository, and a repository never seen costs an upstream question. Unbounded,
one client's flood of invented names becomes the same flood of HEADs at the
upstream (which then rate-limits the whole node) and of verdicts in the caches.
So new questions are paced per client address: a token bucket each, refilled at
``rate`` per second up to ``burst``. containerd on the node is one client too, so
the burst is sized for a node starting many pods at once.

Sans-IO: time comes from an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class ClientRateLimiter:
    """A token bucket per client address; the least recently seen forgotten past a bound.

    A forgotten client starts again with a full bucket, so the bound on clients
    must exceed the number of addresses that can reach the port at once (pods on
    a node's network, in practice a few hundred).
    """

    def __init__(self, rate: float, burst: int, *, max_clients: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be > 0, burst and max_clients >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._max = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str | None) -> bool:
        """Whether ``client`` may ask a new question now (and take one token if so).

        None (the node itself, or a caller that knows no client) is never limited.
        """
        if client is None:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
