"""MemoryStore with failure injection, and a Fallback, for the registry's unit tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import FallbackContent, Miss, MissReason
from meshmirror.registry.ranges import RangeSpec
from meshmirror.store.base import BlobInfo, NotFoundError
from meshmirror.store.memory import MemoryStore


class FakeStore(MemoryStore):
    """MemoryStore that can be made to fail and records every read."""

    def __init__(self, chunk: int = 1024 * 1024) -> None:
        super().__init__(chunk_size=chunk)
        self.fail_with: Exception | None = None
        self.reads: list[tuple[Digest, int, int | None]] = []
        self.held: set[Digest] = set()

    def add(self, data: bytes, media_type: str | None = None) -> Digest:
        digest = self.add_blob(data, media_type)
        self.held.add(digest)
        return digest

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        if self.fail_with is not None:
            raise self.fail_with
        return await super().resolve(registry, repository, tag)

    async def stat(self, digest: Digest) -> BlobInfo:
        if self.fail_with is not None:
            raise self.fail_with
        return await super().stat(digest)

    def read(self, digest: Digest, offset: int = 0,
             length: int | None = None) -> AsyncIterator[bytes]:
        self.reads.append((digest, offset, length))
        return super().read(digest, offset, length)


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
    store.tag(registry, repository, tag, manifest)
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
                            want_body: bool) -> FallbackContent | Miss:
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
            return Miss(MissReason.NO_PEER)
        data = await self.store.read_all(digest)
        return FallbackContent(digest, info.size, info.media_type,
                               self._body(data) if want_body else None)

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool) -> FallbackContent | Miss:
        self.calls.append(("blob", registry, repository, str(digest), str(byte_range)))
        if self.raise_error:
            raise RuntimeError("peer exploded")
        if digest not in self.store.held:
            return Miss(MissReason.NO_PEER)
        data = await self.store.read_all(digest)
        selected = None
        if byte_range is not None:
            try:
                selected = byte_range.resolve(len(data))
            except ValueError:
                return FallbackContent(digest, len(data), None, None)
        part = data if selected is None else data[selected.offset:selected.offset + selected.length]
        return FallbackContent(digest, len(data), None, self._body(part) if want_body else None)
