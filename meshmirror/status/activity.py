"""What the mirror did lately, kept in memory for the status page.

`MirrorActivity` observes every request the mirror finishes (``MirrorMetrics.observers``):
it keeps the last few in a ring and running totals, and files a sample of the totals
into a second ring at most every ``interval`` seconds. The totals only move when a
request finishes, so sampling at those moments (and whenever the page asks) draws the
same curves a timer would, with no background task whose lifetime the node must own.

`RecentMisses` observes every request the registry did not serve
(``RegistryMetrics.miss_observers``), with its reason, in a ring of its own: the
misses that matter (a private repository, an outage) are easy to lose among hits.
Both rings are bounded, and totals by reason are keyed by the closed `MissReason`
set, so nothing here grows with what clients send.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshmirror.mirror.metrics import MirrorRequest
from meshmirror.registry.fallback import MissReason
from meshmirror.registry.metrics import MissedRequest

RECENT_REQUESTS = 50
RECENT_MISSES = 50
HISTORY_SECONDS = 15 * 60
SAMPLE_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Sample:
    """Running totals at one moment."""

    unix_seconds: float
    hits: int
    misses: int
    peer_bytes: int


class MirrorActivity:
    """Ring buffers of recent requests and of sampled totals; thread-confined to the loop."""

    def __init__(self, *, interval: float = SAMPLE_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self._clock = clock
        self.recent: deque[MirrorRequest] = deque(maxlen=RECENT_REQUESTS)
        self.history: deque[Sample] = deque(maxlen=int(HISTORY_SECONDS / interval) + 1)
        self.hits = 0
        self.misses = 0
        self.peer_bytes = 0
        self.last_success_unix_seconds: float | None = None

    def observe(self, request: MirrorRequest) -> None:
        """A `MirrorObserver`: one finished mirror request."""
        self.recent.append(request)
        if request.result == "hit":
            self.hits += 1
            self.peer_bytes += request.size_bytes or 0
            self.last_success_unix_seconds = request.finished_unix_seconds
        elif request.result in ("miss", "error"):
            self.misses += 1
        self.sample()

    def sample(self) -> None:
        """File the totals now, unless the last sample is younger than the interval.

        The newest sample is replaced rather than kept stale, so the plots end at the
        current totals.
        """
        now = self._clock()
        current = Sample(now, self.hits, self.misses, self.peer_bytes)
        if len(self.history) >= 2 and now - self.history[-2].unix_seconds < self.interval:
            self.history[-1] = current
        else:
            self.history.append(current)
        while self.history and now - self.history[0].unix_seconds > HISTORY_SECONDS:
            self.history.popleft()

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


class RecentMisses:
    """The last `RECENT_MISSES` requests not served and totals by reason since start."""

    def __init__(self) -> None:
        self.recent: deque[MissedRequest] = deque(maxlen=RECENT_MISSES)
        self.by_reason: dict[MissReason, int] = dict.fromkeys(MissReason, 0)

    def observe(self, request: MissedRequest) -> None:
        """A `MissObserver`."""
        self.recent.append(request)
        self.by_reason[request.reason] += 1
