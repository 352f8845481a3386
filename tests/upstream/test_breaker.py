"""The circuit breaker's states, driven by a fake clock."""

from __future__ import annotations

import pytest

from meshmirror.upstream.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(threshold, cooldown, clock), clock


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker, _ = make()
    for n in range(2):
        assert breaker.allow()
        breaker.record_failure(f"refused {n}")
        assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure("refused 2")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    health = breaker.health()
    assert health.consecutive_failures == 3
    assert health.last_error == "refused 2"
    assert health.retry_at == 1010.0


def test_a_success_resets_the_count() -> None:
    breaker, _ = make()
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()
    breaker.record_failure("c")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.health().consecutive_failures == 1


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    breaker, clock = make(threshold=1)
    breaker.record_failure("down")
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # one probe at a time
    breaker.record_success()
    assert breaker.health().state is BreakerState.CLOSED
    assert breaker.allow()


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    breaker, clock = make(threshold=3)
    for _ in range(3):
        breaker.record_failure("down")
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure("still down")
    assert breaker.state is BreakerState.OPEN
    assert breaker.health().retry_at == clock.now + 10
    assert not breaker.allow()


def test_abandoned_probe_frees_the_slot() -> None:
    breaker, clock = make(threshold=1)
    breaker.record_failure("down")
    clock.now += 10
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, -1.0)
