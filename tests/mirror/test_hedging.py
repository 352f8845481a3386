"""The generic hedging race, with scripted attempts instead of peers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from meshmirror.mirror.hedging import hedged


class Attempt(Exception):
    """A scripted attempt's failure."""


def scripted(
    script: dict[str, tuple[float, bool]], started: list[str]
) -> Callable[[str], Awaitable[str]]:
    """Attempts that take ``delay`` seconds and then succeed (or raise `Attempt`)."""

    async def start(name: str) -> str:
        started.append(name)
        delay, ok = script[name]
        await asyncio.sleep(delay)
        if not ok:
            raise Attempt(name)
        return name

    return start


async def test_a_silent_first_candidate_is_hedged_and_discarded() -> None:
    started: list[str] = []
    discarded: list[str] = []
    race = hedged(
        ["slow", "fast"],
        scripted({"slow": (0.3, True), "fast": (0.0, True)}, started),
        delay=0.05,
        failure=Attempt,
        on_failure=lambda name, err: None,
        discard=discarded.append,
    )
    began = time.monotonic()
    assert await anext(race) == "fast"
    assert time.monotonic() - began < 0.25, "the hedge did not wait for the slow one"
    await race.aclose()
    assert started == ["slow", "fast"]
    assert discarded == [], "the loser was cancelled before it produced anything"


async def test_a_failure_starts_the_next_at_once_and_is_reported() -> None:
    started: list[str] = []
    failed: list[str] = []
    race = hedged(
        ["bad", "good", "spare"],
        scripted({"bad": (0.0, False), "good": (0.0, True), "spare": (0.0, True)}, started),
        delay=10.0,
        failure=Attempt,
        on_failure=lambda name, err: failed.append(name),
        discard=lambda result: None,
    )
    assert await asyncio.wait_for(anext(race), 1.0) == "good"
    assert failed == ["bad"]
    assert started == ["bad", "good"], "the spare is started only if the winner disappoints"
    assert await asyncio.wait_for(anext(race), 1.0) == "spare"
    with pytest.raises(StopAsyncIteration):
        await anext(race)


async def test_a_loser_that_finishes_anyway_is_discarded() -> None:
    """A result the race no longer wants must still be given back."""
    started: list[str] = []
    discarded: list[str] = []
    race = hedged(
        ["slow", "fast"],
        scripted({"slow": (0.05, True), "fast": (0.0, True)}, started),
        delay=0.01,
        failure=Attempt,
        on_failure=lambda name, err: None,
        discard=discarded.append,
    )
    assert await anext(race) == "fast"
    await asyncio.sleep(0.2)  # the slow one finishes while the caller holds the winner
    await race.aclose()
    assert discarded == ["slow"]


async def test_cancelling_the_caller_cancels_every_attempt() -> None:
    cancelled: list[str] = []

    async def start(name: str) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return name

    async def first() -> str:
        race = hedged(["a", "b"], start, delay=0.01, failure=Attempt,
                      on_failure=lambda name, err: None, discard=lambda result: None)
        try:
            return await anext(race)
        finally:
            await race.aclose()

    task = asyncio.ensure_future(first())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert sorted(cancelled) == ["a", "b"]
