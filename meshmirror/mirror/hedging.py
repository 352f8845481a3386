"""Hedged requests: race candidates, starting the next one when the current ones are slow.

A request to the best candidate may be slow for reasons that have nothing to do
with the candidate's rank (a busy moment, a lost packet). Waiting for it costs
the whole delay; asking every candidate at once multiplies the load. Hedging
sits between the two: the next candidate is started only once the ones already
started have stayed silent for ``delay``, or have failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

C = TypeVar("C")
T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


async def hedged(
    candidates: Sequence[C],
    start: Callable[[C], Awaitable[T]],
    *,
    delay: float,
    failure: type[E],
    on_failure: Callable[[C, E], None],
    discard: Callable[[T], None],
) -> AsyncGenerator[T, None]:
    """Yield the results of ``start(candidate)``, first finished first, best candidate first.

    ``candidates`` are started in order: the first at once, each next one when
    the started ones have all failed or none finished within ``delay``. A
    ``failure`` raised by one is passed to ``on_failure`` and the race goes on;
    any other exception ends it. A caller that comes back for more (the winner
    turned out bad) gets the next result. However the generator ends, closed
    early or cancelled, the attempts still running are cancelled and any result
    they produce anyway is passed to ``discard``, so nothing a loser opened stays
    open.
    """
    remaining = list(candidates)
    pending: dict[asyncio.Future[T], C] = {}

    def launch() -> None:
        candidate = remaining.pop(0)
        pending[asyncio.ensure_future(start(candidate))] = candidate

    try:
        if remaining:
            launch()
        while pending:
            done, _ = await asyncio.wait(
                pending, timeout=delay, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                if remaining:
                    launch()
                continue
            for task in done:
                candidate = pending.pop(task)
                try:
                    result = task.result()
                except failure as err:
                    on_failure(candidate, err)
                    if remaining:
                        launch()
                    continue
                yield result
                if not pending and remaining:
                    launch()
    finally:
        losers = list(pending)
        for task in losers:
            # A callback rather than awaiting each one: it runs even if this
            # cleanup is itself cancelled, and it retrieves every exception.
            task.add_done_callback(_discarding(discard))
            task.cancel()
        if losers:
            await asyncio.wait(losers)


def _discarding(discard: Callable[[T], None]) -> Callable[[asyncio.Future[T]], None]:
    def settle(task: asyncio.Future[T]) -> None:
        if not task.cancelled() and task.exception() is None:
            discard(task.result())

    return settle
