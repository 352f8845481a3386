"""One node-wide bound on the bytes of peer chunks held in memory.

Each request's own memory is small (a few chunks), but a burst multiplies it:
two hundred concurrent pulls of large blobs once held half a gigabyte of
chunks being read, hashed and written to clients. A `MemoryBudget` is taken
before a chunk is read (from a peer, or from a spool file on its way to a
client) and given back once that chunk has been passed on, so a burst waits
for room instead of growing the process.

It is taken from body threads (blocking, see `take_blocking`) and from the
event loop (`take`), and given back from either, so it is guarded by a lock and
wakes waiting coroutines through their loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable


class MemoryBudget:
    """At most ``limit`` bytes taken at once; a request for more than ``limit`` is
    clamped to it, so one large chunk can always proceed alone."""

    # How often a blocked thread looks at its stop condition.
    _POLL_S = 0.05

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the memory limit must be positive")
        self.limit = limit
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever taken at once: what a burst test compares with ``limit``."""
        with self._cond:
            return self._peak

    def clamp(self, size: int) -> int:
        """What taking ``size`` bytes actually takes (and must be given back)."""
        return max(0, min(size, self.limit))

    def _try(self, size: int) -> bool:
        if self._used + size > self.limit and self._used > 0:
            return False
        self._used += size
        self._peak = max(self._peak, self._used)
        return True

    def try_take(self, size: int) -> bool:
        """Take ``clamp(size)`` bytes if there is room now; False (nothing taken) if not."""
        with self._cond:
            return self._try(self.clamp(size))

    def take_blocking(self, size: int, stopped: Callable[[], bool]) -> bool:
        """Take ``clamp(size)`` bytes on a thread, waiting for room; False (nothing
        taken) once ``stopped()`` says the caller no longer needs them."""
        size = self.clamp(size)
        with self._cond:
            while not self._try(size):
                if stopped():
                    return False
                self._cond.wait(self._POLL_S)
            return True

    async def take(self, size: int) -> None:
        """Take ``clamp(size)`` bytes on the event loop, waiting for room."""
        size = self.clamp(size)
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._try(size):
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            try:
                await waiter
            finally:
                with self._cond:
                    if (loop, waiter) in self._waiters:
                        self._waiters.remove((loop, waiter))

    def give(self, size: int) -> None:
        """Give back what a take of ``size`` took; safe from any thread."""
        size = self.clamp(size)
        with self._cond:
            self._used = max(0, self._used - size)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
