"""The Store interface every content source implements.

A Store answers four questions the registry and the mesh ask: which tag points
where, how big a blob is, what its bytes are (at any range), and which keys the
node holds. Keys are plain strings so they can go straight into a Bloom filter:
digests (``sha256:...``) and tags (``registry/repository:tag``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from meshmirror.oci.digest import Digest


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
    """Keys that appeared in or disappeared from the store since the last event."""

    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()


def tag_key(registry: str, repository: str, tag: str) -> str:
    """The key under which a tag is advertised, e.g. ``docker.io/library/nginx:1.25``."""
    return f"{registry}/{repository}:{tag}"


class Store(abc.ABC):
    """Read-only view of the image content a node holds."""

    @abc.abstractmethod
    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        """The digest a tag points at; NotFoundError when the tag is unknown."""

    @abc.abstractmethod
    async def stat(self, digest: Digest) -> BlobInfo:
        """Size and media type of a blob; NotFoundError when absent."""

    @abc.abstractmethod
    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream ``length`` bytes (all remaining when None) from ``offset``.

        NotFoundError is raised on the first iteration when the blob is absent, so
        callers must stat first if they need to answer before streaming.
        """

    @abc.abstractmethod
    async def keys(self) -> frozenset[str]:
        """Every digest and tag key this store currently holds."""

    @abc.abstractmethod
    def subscribe(self) -> AsyncIterator[KeyEvent]:
        """Changes to ``keys()`` as they happen, until the store is closed."""

    async def ready(self) -> bool:
        """Whether the store can answer now (a containerd store may be reconnecting)."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections and end every subscription."""

    async def read_all(self, digest: Digest, limit: int = 4 * 1024 * 1024) -> bytes:
        """Read a small blob (a manifest, an index) whole; refuses anything over ``limit``."""
        info = await self.stat(digest)
        if info.size > limit:
            raise ValueError(f"{digest} is {info.size} bytes, over the {limit} byte limit")
        chunks = [chunk async for chunk in self.read(digest)]
        return b"".join(chunks)
