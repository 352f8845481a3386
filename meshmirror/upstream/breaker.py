"""A per-registry circuit breaker, so an upstream outage costs no added latency.

Without it, every tag resolution during an outage would wait out the connect
or answer timeout before the mirror could fall back to peers. After
``failure_threshold`` consecutive failures the breaker opens and calls are
refused at once for ``cooldown`` seconds; then one probe is let through
(half-open): its success closes the breaker, its failure opens it again.

Sans-IO: time comes from an injected clock, so tests drive it without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"  # requests flow
    OPEN = "open"  # requests refused until the cool-down ends
    HALF_OPEN = "half_open"  # one probe in flight decides


@dataclass(frozen=True, slots=True)
class BreakerHealth:
    """A snapshot for metrics and the status page."""

    state: BreakerState
    consecutive_failures: int
    last_error: str | None
    # Clock time at which an open breaker lets a probe through; None unless OPEN.
    retry_at: float | None


class CircuitBreaker:
    """Counts consecutive failures of one upstream and decides whether to ask it."""

    def __init__(self, failure_threshold: int = 3, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown < 0:
            raise ValueError("cooldown must not be negative")
        self._threshold = failure_threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False
        self._last_error: str | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probe_in_flight or self._clock() >= self._opened_at + self._cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether a call may go to the upstream now; a True in half-open is the probe.

        The caller must then report exactly one of :meth:`record_success`,
        :meth:`record_failure` or :meth:`abandon` for it.
        """
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """The upstream answered (any non-5xx status counts): close the breaker."""
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False

    def record_failure(self, reason: str) -> None:
        """Refused, timed out or 5xx: count it; open at the threshold or after a failed probe."""
        self._failures += 1
        self._last_error = reason
        if self._probe_in_flight or self._failures >= self._threshold:
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def abandon(self) -> None:
        """The call ended without an answer either way (cancelled): free the probe slot."""
        self._probe_in_flight = False

    def health(self) -> BreakerHealth:
        state = self.state
        retry_at = (self._opened_at + self._cooldown
                    if state is BreakerState.OPEN and self._opened_at is not None else None)
        return BreakerHealth(state, self._failures, self._last_error, retry_at)
