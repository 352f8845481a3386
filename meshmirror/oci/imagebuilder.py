"""Synthesise real OCI images offline, for tests, benchmarks and the demo.

Tests, benchmarks and the demo run without the internet, yet containerd, skopeo
and the Distribution registry all need genuine images: gzip'd tar layers whose
``diff_ids`` match, a config, a manifest and optionally a multi-platform index.
This module writes them with the standard library (plus the AES-CTR stream from
``cryptography`` as a fast deterministic byte source) into an OCI image-layout
directory, and can also pack that layout as the plain tar archive that
``ctr images import`` and ``meshmirror import`` accept.

Layers are produced chunk by chunk and hashed as they are written, so a 512 MiB
layer never sits in memory. Layer bytes depend only on ``(seed, platform,
layer index)``, not on the image name: two images built with the same seed share
their layers (and, with the same sizes, their whole manifest), which is how tests
model "a blob still referenced by another image".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest
from meshmirror.oci.reference import InvalidReferenceError, Reference, tag_key

ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_CHUNK = 1024 * 1024
_TAR_BLOCK = 512


class ImageNameError(ValueError):
    """An image name the builder cannot split into registry, repository and tag."""


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """One blob written into a layout, as a descriptor would describe it."""

    digest: Digest
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                               "size": self.size}
        out.update(extra)
        return out


@dataclass(frozen=True, slots=True)
class PlatformImage:
    platform: str  # "linux/amd64", "linux/arm64/v8"
    manifest: BlobRecord
    config: BlobRecord
    layers: tuple[BlobRecord, ...]


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """What a test needs to know about an image it just synthesised."""

    name: str  # normalised full name, "127.0.0.1:5050/library/demo:1"
    registry: str
    repository: str
    tag: str
    root: BlobRecord  # what the tag points at: the index when there is one, else the manifest
    index: BlobRecord | None
    platforms: tuple[PlatformImage, ...]
    layout: Path
    archive: Path | None

    @property
    def digest(self) -> Digest:
        return self.root.digest

    @property
    def tag_key(self) -> str:
        return tag_key(self.registry, self.repository, self.tag)

    def blobs(self) -> tuple[BlobRecord, ...]:
        """Every blob of the image once, root first, then per platform manifest, config, layers."""
        seen: dict[Digest, BlobRecord] = {self.root.digest: self.root}
        for plat in self.platforms:
            for record in (plat.manifest, plat.config, *plat.layers):
                seen.setdefault(record.digest, record)
        return tuple(seen.values())

    def digests(self) -> frozenset[str]:
        return frozenset(str(b.digest) for b in self.blobs())

    def keys(self) -> frozenset[str]:
        """The keys a store holding exactly this image advertises."""
        return self.digests() | {self.tag_key}

    def blob_path(self, digest: Digest) -> Path:
        return blob_path(self.layout, digest)


def split_image_name(name: str) -> tuple[str, str, str]:
    """Split ``[registry/]repository:tag`` as containerd names images.

    Normalisation is Docker's (``nginx:1`` -> ``docker.io/library/nginx:1``), via
    :class:`meshmirror.oci.reference.Reference`, so a built image carries the same
    name containerd would record after ``ctr images import``.
    """
    try:
        ref = Reference.parse(name)
    except InvalidReferenceError as err:
        raise ImageNameError(str(err)) from err
    if ref.tag is None or ref.digest is not None:
        raise ImageNameError(f"invalid image name {name!r}: want [registry/]repository:tag")
    return ref.registry, ref.repository, ref.tag


# ----------------------------------------------------------------- layout I/O


def blob_path(layout: Path, digest: Digest) -> Path:
    """Where a blob lives in an image layout; built only from a validated digest."""
    return layout / "blobs" / digest.algorithm / digest.hex


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _create_if_absent(path: Path, data: bytes) -> None:
    """Write a whole file only if none exists; never clobbers a concurrent writer's file."""
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)  # atomic, and fails if someone got there first
    except FileExistsError:
        pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def ensure_layout(layout: Path) -> None:
    """Create the skeleton of an image layout (idempotent, safe against concurrent callers)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    _create_if_absent(layout / "oci-layout",
                      canonical_json({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}))
    _create_if_absent(layout / "index.json", _layout_index([]))


def _layout_index(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries},
                      indent=2, sort_keys=True).encode() + b"\n"


def merge_index_entries(layout: Path, new_entries: Iterable[dict[str, Any]]) -> None:
    """Add descriptors to ``index.json``, replacing entries that carry the same image name.

    The name compared is ``io.containerd.image.name`` when present, else
    ``org.opencontainers.image.ref.name``; entries with neither are kept as they are.
    """
    path = layout / "index.json"
    try:
        current = json.loads(path.read_bytes())
        entries: list[dict[str, Any]] = list(current.get("manifests") or [])
    except FileNotFoundError:
        entries = []
    new = list(new_entries)
    names = {entry_name(e) for e in new} - {None}
    kept = [e for e in entries if entry_name(e) is None or entry_name(e) not in names]
    atomic_write(path, _layout_index(kept + new))


def remove_index_entries(layout: Path, name: str) -> int:
    """Drop every ``index.json`` entry naming ``name``; returns how many went."""
    path = layout / "index.json"
    entries: list[dict[str, Any]] = list(json.loads(path.read_bytes()).get("manifests") or [])
    kept = [e for e in entries if entry_name(e) != name]
    atomic_write(path, _layout_index(kept))
    return len(entries) - len(kept)


def entry_name(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict):
        return None
    name = annotations.get(ANNOTATION_CONTAINERD_NAME) or annotations.get(ANNOTATION_REF_NAME)
    return name if isinstance(name, str) else None


# ------------------------------------------------------------------ building


class _HashingWriter:
    """Counts and hashes everything written to the wrapped file."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.size += len(data)
            self.raw.write(data)


def _byte_stream(key_material: str, size: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes in 1 MiB chunks (AES-CTR runs at GB/s)."""
    key = hashlib.sha256(key_material.encode()).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    zeros = bytes(_CHUNK)
    left = size
    while left > 0:
        n = min(left, _CHUNK)
        yield enc.update(zeros if n == _CHUNK else bytes(n))
        left -= n


def _store_temp(layout: Path) -> tuple[BinaryIO, Path]:
    fd, tmp = tempfile.mkstemp(dir=layout / "blobs" / "sha256", prefix=".tmp-")
    return os.fdopen(fd, "wb"), Path(tmp)


def _commit_blob(layout: Path, tmp: Path, digest: Digest) -> None:
    final = blob_path(layout, digest)
    if final.exists():
        tmp.unlink()
    else:
        os.replace(tmp, final)


def write_blob(layout: Path, data: bytes, media_type: str) -> BlobRecord:
    digest = Digest.of(data)
    final = blob_path(layout, digest)
    if not final.exists():
        atomic_write(final, data)
    return BlobRecord(digest, len(data), media_type)


def _write_layer(layout: Path, size: int, key_material: str, file_name: str,
                 media_type: str, compresslevel: int) -> tuple[BlobRecord, Digest]:
    """A tar.gz layer holding one regular file of ``size`` bytes; returns it and its diff_id."""
    info = tarfile.TarInfo(file_name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    padding = (-size) % _TAR_BLOCK
    trailer = bytes(padding + 2 * _TAR_BLOCK)

    diff = hashlib.sha256()
    # wbits=31 writes a gzip member whose header carries mtime 0: same input, same bytes.
    gz = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)
    raw, tmp = _store_temp(layout)
    try:
        with raw:
            out = _HashingWriter(raw)

            def feed(piece: bytes) -> None:
                diff.update(piece)
                out.write(gz.compress(piece))

            feed(header)
            for chunk in _byte_stream(key_material, size):
                feed(chunk)
            feed(trailer)
            out.write(gz.flush())
        digest = Digest("sha256", out.sha.hexdigest())
        _commit_blob(layout, tmp, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BlobRecord(digest, out.size, media_type), Digest("sha256", diff.hexdigest())


def _parse_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"invalid platform {platform!r}: want os/arch[/variant]")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def _build_platform(layout: Path, platform: str, layer_sizes: Sequence[int], seed: int,
                    docker: bool, compresslevel: int) -> PlatformImage:
    plat = _parse_platform(platform)
    layer_type = mt.DOCKER_LAYER_GZIP if docker else mt.OCI_LAYER_GZIP
    layers: list[BlobRecord] = []
    diff_ids: list[str] = []
    slug = platform.replace("/", "-")
    for i, size in enumerate(layer_sizes):
        if size < 0:
            raise ValueError(f"layer size must be >= 0, got {size}")
        record, diff_id = _write_layer(
            layout, size, f"meshmirror-imagebuilder:{seed}:{platform}:{i}",
            f"layer-{i}-{slug}-{seed}.bin", layer_type, compresslevel)
        layers.append(record)
        diff_ids.append(str(diff_id))
    config_doc: dict[str, Any] = {
        **plat,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Labels": {"io.meshmirror.seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"meshmirror layer {i}"}
                    for i in range(len(layers))],
    }
    config = write_blob(layout, canonical_json(config_doc),
                        mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG)
    manifest_type = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = write_blob(layout, canonical_json(manifest_doc), manifest_type)
    return PlatformImage(platform, manifest, config, tuple(layers))


def build_image(
    name: str,
    layout: Path | str,
    layer_sizes: Sequence[int] = (1024,),
    *,
    seed: int = 0,
    platforms: Sequence[str] = ("linux/amd64",),
    index: bool | None = None,
    docker: bool = False,
    archive: Path | str | None = None,
    compresslevel: int = 0,
) -> BuiltImage:
    """Write an image into the layout directory ``layout`` (created or merged into).

    ``index`` defaults to True when more than one platform is asked for. With
    ``docker`` the manifest, config, layer and list media types are Docker v2
    schema2 instead of OCI. ``compresslevel`` 0 (stored deflate blocks) keeps a
    512 MiB layer at disk speed; random bytes do not compress anyway. When
    ``archive`` is given, also write a plain tar archive holding this image only.
    """
    registry, repository, tag = split_image_name(name)
    full_name = f"{registry}/{repository}:{tag}"
    if not platforms:
        raise ValueError("at least one platform is needed")
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"duplicate platform in {list(platforms)}")
    use_index = len(platforms) > 1 if index is None else index
    if not use_index and len(platforms) > 1:
        raise ValueError("several platforms need an index")
    layout = Path(layout)
    ensure_layout(layout)

    built = tuple(_build_platform(layout, p, layer_sizes, seed, docker, compresslevel)
                  for p in platforms)
    index_record: BlobRecord | None = None
    if use_index:
        index_type = mt.DOCKER_MANIFEST_LIST if docker else mt.OCI_INDEX
        index_doc = {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [p.manifest.descriptor(platform=_parse_platform(p.platform))
                          for p in built],
        }
        index_record = write_blob(layout, canonical_json(index_doc), index_type)
    root = index_record or built[0].manifest
    entry = root.descriptor(annotations={ANNOTATION_CONTAINERD_NAME: full_name,
                                         ANNOTATION_REF_NAME: tag})
    merge_index_entries(layout, [entry])
    image = BuiltImage(full_name, registry, repository, tag, root, index_record, built,
                       layout, None)
    if archive is not None:
        archive = Path(archive)
        write_archive(image, archive)
        image = BuiltImage(full_name, registry, repository, tag, root, index_record, built,
                           layout, archive)
    return image


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o644
    return info


def write_archive(image: BuiltImage, archive: Path) -> None:
    """Pack one image as a plain (uncompressed) tar of an image layout.

    Only this image's blobs and index entry go in, even when its layout directory
    holds other images too. Blob files are copied through tarfile in 1 MiB
    pieces, so archive size does not bound memory.
    """
    entry = image.root.descriptor(annotations={ANNOTATION_CONTAINERD_NAME: image.name,
                                               ANNOTATION_REF_NAME: image.tag})
    small = {
        "oci-layout": canonical_json({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}),
        "index.json": _layout_index([entry]),
    }
    tmp = archive.with_name(f".{archive.name}.tmp")
    try:
        with tarfile.TarFile(tmp, "w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
            for fname, data in small.items():
                tar.addfile(_tar_info(fname, len(data)), io.BytesIO(data))
            tar.addfile(_tar_info("blobs", directory=True))
            tar.addfile(_tar_info("blobs/sha256", directory=True))
            for record in sorted(image.blobs(), key=lambda r: r.digest.hex):
                with open(blob_path(image.layout, record.digest), "rb") as f:
                    tar.addfile(_tar_info(f"blobs/sha256/{record.digest.hex}", record.size), f)
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

