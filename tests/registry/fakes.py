"""A minimal in-memory Store and Fallback for the registry's unit tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import FallbackContent
from meshmirror.registry.ranges import RangeSpec
from meshmirror.store.base import BlobInfo, KeyEvent, NotFoundError, Store, tag_key


class FakeStore(Store):
    def __init__(self, chunk: int = 1024 * 1024) -> None:
        self.blobs: dict[Digest, tuple[bytes, str | None]] = {}
        self.tags: dict[str, Digest] = {}
        self.chunk = chunk
        self.is_ready = True
        self.fail_with: Exception | None = None
        self.reads: list[tuple[Digest, int, int | None]] = []

    def add(self, data: bytes, media_type: str | None = None) -> Digest:
        digest = Digest.of(data)
        self.blobs[digest] = (data, media_type)
        return digest

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        if self.fail_with is not None:
            raise self.fail_with
        try:
            return self.tags[tag_key(registry, repository, tag)]
        except KeyError:
            raise NotFoundError(tag_key(registry, repository, tag)) from None

    async def stat(self, digest: Digest) -> BlobInfo:
        if self.fail_with is not None:
            raise self.fail_with
        if digest not in self.blobs:
            raise NotFoundError(str(digest))
        data, media_type = self.blobs[digest]
        return BlobInfo(digest, len(data), media_type)

    async def read(self, digest: Digest, offset: int = 0,
                   length: int | None = None) -> AsyncIterator[bytes]:
        self.reads.append((digest, offset, length))
        if digest not in self.blobs:
            raise NotFoundError(str(digest))
        data = self.blobs[digest][0]
        end = len(data) if length is None else min(len(data), offset + length)
        for start in range(offset, end, self.chunk):
            yield data[start:min(end, start + self.chunk)]

    async def keys(self) -> frozenset[str]:
        return frozenset(str(d) for d in self.blobs) | frozenset(self.tags)

    async def subscribe(self) -> AsyncIterator[KeyEvent]:
        if False:  # pragma: no cover - no events from a fake
            yield KeyEvent()

    async def ready(self) -> bool:
        return self.is_ready


@dataclass
class Image:
    config: Digest
    layer: Digest
    manifest: Digest
    manifest_bytes: bytes
    layer_bytes: bytes


def add_image(store: FakeStore, registry: str, repository: str, tag: str,
              layer: bytes = b"layer-bytes" * 1000, manifest_type_known: bool = True) -> Image:
    config = store.add(b'{"architecture":"amd64","os":"linux"}', mediatypes.OCI_CONFIG)
    layer_digest = store.add(layer, mediatypes.OCI_LAYER_GZIP)
    doc = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {"mediaType": mediatypes.OCI_CONFIG, "digest": str(config), "size": 37},
        "layers": [{"mediaType": mediatypes.OCI_LAYER_GZIP, "digest": str(layer_digest),
                    "size": len(layer)}],
    }
    manifest_bytes = json.dumps(doc).encode()
    manifest = store.add(manifest_bytes,
                         mediatypes.OCI_MANIFEST if manifest_type_known else None)
    store.tags[tag_key(registry, repository, tag)] = manifest
    return Image(config, layer_digest, manifest, manifest_bytes, layer)


@dataclass
class FakeFallback:
    """Serves from its own FakeStore; records what it was asked."""

    store: FakeStore = field(default_factory=FakeStore)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    closed: int = 0
    raise_error: bool = False

    async def _body(self, data: bytes) -> AsyncIterator[bytes]:
        try:
            yield data
        finally:
            self.closed += 1

    async def open_manifest(self, registry: str, repository: str, reference: str,
                            want_body: bool) -> FallbackContent | None:
        self.calls.append(("manifest", registry, repository, reference, str(want_body)))
        if self.raise_error:
            raise RuntimeError("peer exploded")
        try:
            if ":" in reference:
                digest = Digest.parse(reference)
            else:
                digest = await self.store.resolve(registry, repository, reference)
            info = await self.store.stat(digest)
        except NotFoundError:
            return None
        data = self.store.blobs[digest][0]
        return FallbackContent(digest, info.size, info.media_type,
                               self._body(data) if want_body else None)

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool) -> FallbackContent | None:
        self.calls.append(("blob", registry, repository, str(digest), str(byte_range)))
        if self.raise_error:
            raise RuntimeError("peer exploded")
        if digest not in self.store.blobs:
            return None
        data = self.store.blobs[digest][0]
        selected = None
        if byte_range is not None:
            try:
                selected = byte_range.resolve(len(data))
            except ValueError:
                return FallbackContent(digest, len(data), None, None)
        part = data if selected is None else data[selected.offset:selected.offset + selected.length]
        return FallbackContent(digest, len(data), None, self._body(part) if want_body else None)
