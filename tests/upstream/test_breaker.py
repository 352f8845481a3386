"""The circuit breaker's states, driven by a fake clock, and the calls made behind it."""

from __future__ import annotations

import asyncio

import pytest

from meshmirror.upstream.breaker import BreakerState, CircuitBreaker, behind_breaker
from meshmirror.upstream.results import FailureKind, Unreachable


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


async def test_behind_breaker_counts_only_outages_and_bounds_the_call() -> None:
    breaker, _ = make(threshold=2)

    async def refused() -> Unreachable:
        return Unreachable(FailureKind.PROTOCOL, "garbage")

    async def stuck() -> Unreachable:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    # An answer that breaks the protocol shows the registry is up: not counted.
    await behind_breaker(breaker, "r.test", 1.0, "https://r.test", refused)
    assert breaker.health().consecutive_failures == 0
    for _ in range(2):
        result = await behind_breaker(breaker, "r.test", 0.01, "https://r.test", stuck)
        assert isinstance(result, Unreachable) and result.kind is FailureKind.TIMEOUT
        assert "https://r.test: no answer within" in result.reason
    assert breaker.state is BreakerState.OPEN
    held = await behind_breaker(breaker, "r.test", 1.0, "https://r.test", refused)
    assert isinstance(held, Unreachable) and held.kind is FailureKind.CIRCUIT_OPEN
    assert "r.test held unreachable after: timeout" in held.reason


async def test_behind_breaker_frees_the_probe_of_a_cancelled_call() -> None:
    breaker, clock = make(threshold=1)
    breaker.allow()
    breaker.record_failure("refused")
    clock.now += 10.0
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.sleep(10)
        return "late"

    probe = asyncio.create_task(behind_breaker(breaker, "r.test", 5.0, "u", hang))
    await asyncio.wait_for(started.wait(), 1.0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.allow()  # the slot is free for the next probe
