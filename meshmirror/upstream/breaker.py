"""A per-registry circuit breaker, so an upstream outage costs no added latency.

Without it, every tag resolution during an outage would wait out the connect
or answer timeout before the mirror could fall back to peers. After
``failure_threshold`` consecutive failures the breaker opens and calls are
refused at once for ``cooldown`` seconds; then one probe is let through
(half-open): its success closes the breaker, its failure opens it again.

The breaker is sans-IO: time comes from an injected clock, so tests drive it
without sleeping. :func:`behind_breaker` is the one place a call to the upstream
is made under it, so every caller keeps the same contract (one outcome reported
per allowed call, a cancelled one abandoned) and counts the same failures.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from meshmirror.upstream.results import FailureKind, Unreachable

# Outcomes that say the upstream is down or overloaded, as opposed to answering.
BREAKER_FAILURES = frozenset({FailureKind.CONNECTION, FailureKind.TIMEOUT, FailureKind.TLS,
                              FailureKind.SERVER_ERROR, FailureKind.RATE_LIMITED})

_Answer = TypeVar("_Answer")


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


async def behind_breaker(breaker: CircuitBreaker, registry: str, bound: float, where: str,
                         ask: Callable[[], Awaitable[_Answer | Unreachable]]
                         ) -> _Answer | Unreachable:
    """``ask()`` within ``bound`` seconds if the breaker allows, its outcome reported to it.

    Refused at once while the breaker holds ``registry`` unreachable; past the bound it
    is an ``Unreachable`` naming ``where``. Only :data:`BREAKER_FAILURES` count
    against the registry: any other answer, a 404 or a refusal to an anonymous
    client included, shows it is up. A cancelled call frees the half-open probe slot.
    """
    if not breaker.allow():
        return Unreachable(FailureKind.CIRCUIT_OPEN,
                           f"{registry} held unreachable after: {breaker.health().last_error}")
    try:
        async with asyncio.timeout(bound):
            result = await ask()
    except TimeoutError:
        result = Unreachable(FailureKind.TIMEOUT, f"{where}: no answer within {bound:g}s")
    except BaseException:
        breaker.abandon()
        raise
    if isinstance(result, Unreachable) and result.kind in BREAKER_FAILURES:
        breaker.record_failure(f"{result.kind.value}: {result.reason}")
    else:
        breaker.record_success()
    return result
