"""A Store held in a dict, for unit tests of everything that sits on a Store.

It follows the same contract as the real stores (it passes the conformance
suite), so a test written against it means the same against containerd: a tag
removed takes with it the blobs no other image or loose ``add_blob`` still needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage
from meshmirror.oci.reference import tag_key
from meshmirror.store.base import (
    BlobInfo,
    KeyEvent,
    KeyEventHub,
    NotFoundError,
    Store,
    check_range,
)

_CHUNK = 1024 * 1024
_TagId = tuple[str, str, str]


class MemoryStore(Store):
    def __init__(self, chunk_size: int = _CHUNK) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._chunk = chunk_size
        self._blobs: dict[Digest, tuple[bytes, str | None]] = {}
        self._tags: dict[_TagId, Digest] = {}
        # Blobs each tagged image brought in; loose blobs came from add_blob.
        self._image_blobs: dict[_TagId, frozenset[Digest]] = {}
        self._loose: set[Digest] = set()
        self._ready = True
        self._hub = KeyEventHub()

    # -------------------------------------------------------------- mutation

    def add_blob(self, data: bytes, media_type: str | None = None) -> Digest:
        """Hold ``data`` under its sha256; kept until ``remove_blob``."""
        digest = Digest.of(data)
        self._blobs[digest] = (data, media_type)
        self._loose.add(digest)
        self._publish()
        return digest

    def remove_blob(self, digest: Digest) -> None:
        self._loose.discard(digest)
        if not any(digest in blobs for blobs in self._image_blobs.values()):
            self._blobs.pop(digest, None)
        self._publish()

    def tag(self, registry: str, repository: str, tag: str, digest: Digest) -> None:
        if digest not in self._blobs:
            raise NotFoundError(f"cannot tag {digest}: not in the store")
        self._tags[(registry, repository, tag)] = digest
        self._publish()

    def add_image(self, image: BuiltImage) -> None:
        """Load every blob of a built image from its layout and tag it (small images only)."""
        tag_id = (image.registry, image.repository, image.tag)
        for record in image.blobs():
            data = image.blob_path(record.digest).read_bytes()
            if Digest.of(data, record.digest.algorithm) != record.digest:
                raise ValueError(f"{image.blob_path(record.digest)} does not match its digest")
            self._blobs[record.digest] = (data, record.media_type)
        self._image_blobs[tag_id] = frozenset(r.digest for r in image.blobs())
        self._tags[tag_id] = image.digest
        self._publish()

    def remove_image(self, registry: str, repository: str, tag: str) -> None:
        """Untag, then drop the blobs that no other image and no loose add still hold."""
        tag_id = (registry, repository, tag)
        if self._tags.pop(tag_id, None) is None:
            raise NotFoundError(f"no image tagged {tag_key(*tag_id)}")
        mine = self._image_blobs.pop(tag_id, frozenset())
        still_used = set(self._loose).union(*self._image_blobs.values())
        for digest in mine - still_used:
            self._blobs.pop(digest, None)
        self._publish()

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def _publish(self) -> None:
        self._hub.publish(self._keys())

    def _keys(self) -> frozenset[str]:
        return frozenset(str(d) for d in self._blobs) | frozenset(
            tag_key(*t) for t in self._tags)

    # ----------------------------------------------------------------- Store

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        try:
            return self._tags[(registry, repository, tag)]
        except KeyError:
            raise NotFoundError(f"unknown tag {tag_key(registry, repository, tag)}") from None

    async def stat(self, digest: Digest) -> BlobInfo:
        try:
            data, media_type = self._blobs[digest]
        except KeyError:
            raise NotFoundError(f"blob {digest} not found") from None
        return BlobInfo(digest, len(data), media_type)

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncIterator[bytes]:
        try:
            data, _ = self._blobs[digest]
        except KeyError:
            raise NotFoundError(f"blob {digest} not found") from None
        end = check_range(len(data), offset, length)
        view = memoryview(data)
        for pos in range(offset, end, self._chunk):
            yield bytes(view[pos : min(pos + self._chunk, end)])

    async def keys(self) -> frozenset[str]:
        return self._keys()

    def subscribe(self) -> AsyncIterator[KeyEvent]:
        return self._hub.subscribe()

    async def ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._hub.close()
