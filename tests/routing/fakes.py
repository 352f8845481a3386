"""A Store that only knows keys, for driving the publisher by hand."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable

from meshmirror.oci.digest import Digest
from meshmirror.store.base import BlobInfo, KeyEvent, NotFoundError, Store


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll state that a real server and a background task change; bounded."""
    async with asyncio.timeout(within):
        while not cond():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(0.005)


def digest_key(label: str | int) -> str:
    return "sha256:" + hashlib.sha256(str(label).encode()).hexdigest()


class KeyStore(Store):
    """Holds a key set; ``add``/``remove`` emit KeyEvents to every subscriber.

    ``lose_events`` drops changes silently, as a store whose subscription
    hiccupped would, so tests can check the publisher's resync paths.
    """

    def __init__(self, keys: set[str] | None = None) -> None:
        self._keys: set[str] = set(keys or ())
        self._queues: list[asyncio.Queue[KeyEvent | None]] = []
        self.lose_events = False
        self.keys_calls = 0

    def add(self, *keys: str) -> None:
        new = frozenset(keys) - self._keys
        self._keys |= new
        self._emit(KeyEvent(added=new))

    def remove(self, *keys: str) -> None:
        gone = frozenset(keys) & self._keys
        self._keys -= gone
        self._emit(KeyEvent(removed=gone))

    def _emit(self, event: KeyEvent) -> None:
        if self.lose_events:
            return
        for queue in self._queues:
            queue.put_nowait(event)

    async def keys(self) -> frozenset[str]:
        self.keys_calls += 1
        await asyncio.sleep(0)
        return frozenset(self._keys)

    def subscribe(self) -> AsyncIterator[KeyEvent]:
        queue: asyncio.Queue[KeyEvent | None] = asyncio.Queue()
        self._queues.append(queue)

        async def events() -> AsyncIterator[KeyEvent]:
            while (event := await queue.get()) is not None:
                yield event

        return events()

    async def close(self) -> None:
        for queue in self._queues:
            queue.put_nowait(None)

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        raise NotFoundError(tag)

    async def stat(self, digest: Digest) -> BlobInfo:
        raise NotFoundError(str(digest))

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncIterator[bytes]:
        raise NotFoundError(str(digest))
        yield b""  # pragma: no cover - makes this an async generator
