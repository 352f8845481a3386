"""Requests to one peer: a bounded number at once, the rest waiting their turn.

A burst of pulls through one node used to open every request to the one peer
that held the blob at once; the peer, busy sending the first ones, answered
the later ones after the connect and first-byte bounds, and they became 404s.
A `PeerQueue` lets at most ``limit`` requests reach the peer at once and keeps
the others waiting, first come first served, before any timer of theirs starts.

The limit adapts, as TCP's window does: it grows by one per ``limit`` answers
in time, up to ``most``, and halves when a request times out while others to
the same peer are running (the peer is busy with our own load, so we send it
less instead of blaming it).

The wait is not timed, since it measures our own load, but it must move: a
request that sees no request to the peer finish for ``stalled_after`` seconds
gives up (`PeerFailure` "queue_stalled", which charges the peer nothing).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from meshmirror.mirror.errors import FailureReason, PeerFailure


class PeerQueue:
    """The admission queue of one peer; use from the event loop only."""

    def __init__(self, name: str, most: int, stalled_after: float,
                 clock: Callable[[], float]) -> None:
        self.name = name
        self.most = max(1, most)
        self.limit = float(self.most)
        self.running = 0
        self._stalled_after = stalled_after
        self._clock = clock
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._freed_at = clock()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiting if not waiter.done())

    async def enter(self) -> None:
        """Wait for a turn; the caller must `leave` once its request is over."""
        if self.running < int(self.limit) and not self._waiting:
            self.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self._stalled_after)
                if done:
                    return
                if self._clock() - self._freed_at >= self._stalled_after:
                    raise PeerFailure(FailureReason.QUEUE_STALLED,
                                      f"no request to {self.name} finished "
                                      f"for {self._stalled_after:g} s")
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the turn came as we gave up: pass it on
            else:
                waiter.cancel()
            raise

    def leave(self) -> None:
        """A request is over: let the next one in."""
        self.running = max(0, self.running - 1)
        self._freed_at = self._clock()
        self._admit()

    def answered(self) -> None:
        """A request was answered in time: allow a little more at once."""
        self.limit = min(float(self.most), self.limit + 1.0 / self.limit)
        self._admit()

    def overloaded(self) -> None:
        """A request timed out while others ran: the peer is busy, send it less."""
        self.limit = max(1.0, self.limit / 2)

    def _admit(self) -> None:
        while self._waiting and self.running < int(self.limit):
            waiter = self._waiting.popleft()
            if waiter.done():
                continue
            self.running += 1
            waiter.set_result(None)
