"""The Store interface every content source implements.

A Store answers four questions the registry and the summary publisher ask: which tag points
where, how big a blob is, what its bytes are (at any range), and which keys the
node holds. Keys are plain strings so they can go straight into a Bloom filter:
digests (``sha256:...``) and tags (``registry/repository:tag``).
"""

from __future__ import annotations

import abc
import asyncio
import weakref
from collections.abc import AsyncIterator, Set
from dataclasses import dataclass

from meshmirror.fileio import FileChunks
from meshmirror.oci.digest import Digest
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE
from meshmirror.store.digests import DigestKeys


class NotFoundError(LookupError):
    """The store does not hold the tag or digest asked for."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: Digest
    size: int
    # Known for content reached through a descriptor (manifests, indexes); None
    # when the store cannot tell, in which case a manifest's own mediaType field
    # is authoritative.
    media_type: str | None = None


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """Keys that appeared in or disappeared from the store since the last event. Sets
    never mutated, as `Store.keys` returns them: a store's whole key set arriving at
    once (containerd's first sync) comes as the store's own view, not 100,000 strings."""

    added: Set[str] = frozenset()
    removed: Set[str] = frozenset()


def check_range(size: int, offset: int, length: int | None) -> int:
    """Validate a read of ``size``-byte content and return its end offset.

    Stores raise ValueError rather than silently shortening a read, because the
    registry has already promised a Content-Length by the time it streams.
    """
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"negative offset or length ({offset}, {length})")
    end = size if length is None else offset + length
    if offset > size or end > size:
        raise ValueError(f"range {offset}+{length} is outside the {size} byte blob")
    return end


class KeyEventHub:
    """Fans a store's key set out to subscribers as KeyEvents.

    Each subscription remembers the key set it last reported and, when woken,
    reports the difference to the newest set. A slow or idle subscriber therefore
    costs one frozenset reference, never a growing queue, and bursts of changes
    coalesce into one event. Use from the store's event loop only; subscriptions
    abandoned without ``aclose()`` are dropped with their last reference.
    """

    def __init__(self, keys: Set[str] = frozenset()) -> None:
        self._keys = keys
        self._closed = False
        self._subscriptions: weakref.WeakSet[KeySubscription] = weakref.WeakSet()

    @property
    def keys(self) -> Set[str]:
        return self._keys

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, keys: Set[str]) -> None:
        """Record the store's whole current key set; subscribers see the change."""
        if keys == self._keys:
            return
        self._keys = keys
        for sub in list(self._subscriptions):
            sub._wake.set()

    def subscribe(self) -> KeySubscription:
        """A subscription whose baseline is the key set published so far."""
        sub = KeySubscription(self, self._keys)
        self._subscriptions.add(sub)
        return sub

    def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            sub._wake.set()


class KeySubscription:
    """Async iterator of KeyEvents from a KeyEventHub; ends when the hub closes."""

    def __init__(self, hub: KeyEventHub, baseline: Set[str]) -> None:
        self._hub = hub
        self._last = baseline
        self._wake = asyncio.Event()

    def __aiter__(self) -> KeySubscription:
        return self

    async def __anext__(self) -> KeyEvent:
        while True:
            if self._hub.closed:
                raise StopAsyncIteration
            self._wake.clear()
            current = self._hub.keys
            if current != self._last:
                if isinstance(current, DigestKeys):  # both ways from one search
                    added, removed = current.changes(self._last)
                else:
                    added, removed = current - self._last, self._last - current
                event = KeyEvent(added=added, removed=removed)
                self._last = current
                return event
            await self._wake.wait()

    async def aclose(self) -> None:
        self._hub._subscriptions.discard(self)


class Store(abc.ABC):
    """Read-only view of the image content a node holds."""

    @abc.abstractmethod
    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        """The digest a tag points at; NotFoundError when the tag is unknown."""

    @abc.abstractmethod
    async def stat(self, digest: Digest) -> BlobInfo:
        """Size and media type of a blob; NotFoundError when absent."""

    @abc.abstractmethod
    def read(self, digest: Digest, offset: int = 0, length: int | None = None
             ) -> AsyncIterator[bytes]:
        """Stream ``length`` bytes (all remaining when None) from ``offset``.

        NotFoundError is raised on the first iteration when the blob is absent, so
        callers must stat first if they need to answer before streaming. A range
        outside the blob raises ValueError (see ``check_range``), never a short read.
        """

    async def open_file(self, digest: Digest, offset: int = 0, length: int | None = None
                        ) -> FileChunks | None:
        """The bytes `read` would stream, as an open file's range: a server sends them with
        ``sendfile`` instead of copying each chunk through Python. None when this store's
        bytes are not in a file it can open here (memory, containerd over gRPC); raises
        like `stat`, and ValueError for a range outside the blob. The caller closes it.
        """
        return None

    @abc.abstractmethod
    async def keys(self) -> Set[str]:
        """Every digest and tag key this store currently holds; never mutated once
        returned (a store changes by returning a new set). A set rather than a
        frozenset, so a store can answer with a view over what it holds anyway
        instead of a second table of 100,000 strings."""

    @abc.abstractmethod
    def subscribe(self) -> AsyncIterator[KeyEvent]:
        """Changes to ``keys()`` as they happen, until the store is closed."""

    async def ready(self) -> bool:
        """Whether the store can answer now (a containerd store may be reconnecting)."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections and end every subscription."""

    async def read_all(self, digest: Digest, limit: int = MAX_MANIFEST_SIZE) -> bytes:
        """Read a small blob (a manifest, an index) whole; refuses anything over ``limit``."""
        info = await self.stat(digest)
        if info.size > limit:
            raise ValueError(f"{digest} is {info.size} bytes, over the {limit} byte limit")
        chunks = [chunk async for chunk in self.read(digest)]
        return b"".join(chunks)
