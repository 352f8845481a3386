"""A Store over an OCI image-layout directory (``--store oci:DIR``).

For standalone use, the demo and tests: what a node holds is what
``DIR/index.json`` reaches. Every descriptor walked from ``index.json`` (indexes
to manifests, manifests to config and layers) whose blob is on disk with the
size the descriptor states is held and advertised; a blob that is present but
unreachable is not, so dropping an image from ``index.json`` withdraws its
digests, except those another image still reaches.

Tag names. ``io.containerd.image.name`` is a full reference and wins.
Otherwise ``org.opencontainers.image.ref.name`` is used: if it contains ``/`` or
``:`` it is read as a full reference (Docker-normalised, ``nginx:1`` meaning
``docker.io/library/nginx:1``); if it is a bare tag such as ``1`` (what
``skopeo copy ... oci:DIR:1`` writes) it is joined to ``base_name`` when one was
given (``base_name:1``) and otherwise left untagged, its content still served by
digest. This is containerd's own rule for ``ctr images import --base-name``: a
bare tag says nothing about which repository it belongs to, and guessing would
let one layout answer for images it does not hold.

Changes while running are seen by polling ``index.json``'s (inode, size, mtime)
every ``poll_interval`` seconds (0.5 by default). One ``stat`` per interval costs
nothing measurable, works on every filesystem including bind mounts and
overlayfs where inotify is unreliable, and needs no extra dependency; writers
that replace ``index.json`` atomically (``meshmirror import``, skopeo) are picked
up within one interval, and lookups (resolve, stat, keys) re-check on every call.

Blob files are only ever named from a parsed :class:`Digest`, so no request can
make the store open a path outside ``DIR/blobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from meshmirror.fileio import FileChunks
from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.imagebuilder import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    blob_path,
    ensure_layout,
    merge_index_entries,
)
from meshmirror.oci.manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    ManifestError,
    parse_manifest,
)
from meshmirror.oci.reference import InvalidReferenceError, Reference, tag_key
from meshmirror.store.base import (
    BlobInfo,
    KeyEvent,
    KeyEventHub,
    NotFoundError,
    Store,
    check_range,
)
from meshmirror.store.digests import (
    ALGORITHMS,
    MEDIA_BITS,
    DigestKeys,
    DigestTable,
    DigestTableBuilder,
    MediaTypes,
    PackedDigests,
    digest_text,
)

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# Reads hop to a thread per chunk; at 1 MiB the hop costs about half the
# throughput of a plain read, at 4 MiB it costs nothing measurable
# (benchmarks/bench_store_read.py). One chunk per stream is in memory at a time.
_READ_CHUNK = 4 * 1024 * 1024
# index.json lists every image of the store; larger than a manifest may be.
_MAX_INDEX_JSON = 64 * 1024 * 1024
_MAX_LAYOUT_MARKER = 4096
_LOCK_FILE = ".meshmirror-index.lock"
_TagId = tuple[str, str, str]
_Signature = tuple[int, int, int]
# Differs from every real signature and from None ("no index.json"), so the first
# look always loads.
_NEVER_LOADED: _Signature = (-1, -1, -1)


class ArchiveError(ValueError):
    """An archive that cannot be imported safely; the message is one line."""


def entry_reference(annotations: Mapping[str, str], base_name: str | None) -> Reference | None:
    """The tag an ``index.json`` entry stands for, per the module's naming rule."""
    full = annotations.get(ANNOTATION_CONTAINERD_NAME)
    ref_name = annotations.get(ANNOTATION_REF_NAME)
    text: str | None = None
    if full:
        text = full
    elif ref_name and ("/" in ref_name or ":" in ref_name):
        text = ref_name
    elif ref_name and base_name:
        text = f"{base_name}:{ref_name}"
    if text is None:
        return None
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError:
        return None
    return ref if ref.tag is not None else None


# A blob reached through a descriptor: its digest's raw bytes (the algorithm is
# implied by their length), and its size and media type packed in one unsigned
# 64-bit number (``size << 16 | n``, n the media type's number in the store's
# table). A layout of 100,000 blobs held them as Descriptor, Digest and BlobInfo
# objects, an empty annotations dict and a media type string each: 76 MiB, over
# half of a node's 128 MiB; as (digest text, size, media type) tuples 27 MiB; as a
# dict from raw digest to int 16 MiB; in a DigestTable 4 MiB. The key text is made
# when asked (a rebuild of the summary, a subscription's diff), a BlobInfo when
# stat asks.
_Blob = tuple[bytes, int]
# A descriptor's size past what 48 bits hold (256 TiB) is packed as this, which no
# file on disk has, so the blob is never held, as it never would have been.
_SIZE_UNHELD = (1 << (64 - MEDIA_BITS)) - 1


def _raw(digest: Digest) -> bytes:
    return bytes.fromhex(digest.hex)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What index.json reached when it last changed; replaced whole, never mutated."""

    signature: _Signature | None
    tags: Mapping[_TagId, Digest] = field(default_factory=dict)
    blobs: DigestTable = field(default_factory=DigestTable)  # packed infos by raw digest
    keys: Set[str] = frozenset()


class OciLayoutStore(Store):
    def __init__(self, root: Path | str, *, base_name: str | None = None,
                 poll_interval: float = 0.5, chunk_size: int = _READ_CHUNK) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a directory")
        if poll_interval <= 0 or chunk_size <= 0:
            raise ValueError("poll_interval and chunk_size must be positive")
        if base_name is not None:
            Reference.parse(base_name)  # InvalidReferenceError is a ValueError
        self.base_name = base_name
        self.poll_interval = poll_interval
        self.chunk_size = chunk_size
        self._snapshot = _Snapshot(signature=_NEVER_LOADED)
        # The index.json last found unusable: not read again (nor warned about again on
        # every lookup and poll, each re-parsing up to 64 MiB) until it changes.
        self._refused: _Signature | None = _NEVER_LOADED
        # Manifests are content-addressed, so their children never change: kept for the
        # manifests the last load reached.
        self._children: dict[bytes, PackedDigests] = {}
        self._media = MediaTypes()
        self._hub = KeyEventHub()
        self._poller: asyncio.Task[None] | None = None
        self._load_lock = asyncio.Lock()

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> OciLayoutStore:
        """Build from a ``--store`` value of the form ``oci:DIR``."""
        if not spec.startswith("oci:") or not spec[4:]:
            raise ValueError(f"--store {spec!r}: want oci:DIR")
        return cls(Path(spec[4:]), **kwargs)

    # ------------------------------------------------------------ snapshot

    def _signature(self) -> _Signature | None:
        try:
            st = os.stat(self.root / "index.json")
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _path(self, raw: bytes) -> str:
        # A str path, not `blob_path`: pathlib interns every part it parses, and a
        # walk of 100,000 blobs left a 1.8 MiB interned-string table behind.
        return os.path.join(self.root, "blobs", ALGORITHMS[len(raw)], raw.hex())

    def _blob_size(self, raw: bytes) -> int | None:
        try:
            st = os.stat(self._path(raw))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size

    def _blob(self, desc: Descriptor) -> _Blob:
        return (_raw(desc.digest), min(desc.size, _SIZE_UNHELD) << MEDIA_BITS
                | self._media.number(desc.media_type))

    def _media_type(self, info: int) -> str | None:
        return self._media.name(info)

    def _manifest_children(self, raw: bytes, info: int,
                           kept: dict[bytes, PackedDigests]) -> Iterator[_Blob]:
        cached = self._children.get(raw)
        if cached is None:
            size = info >> MEDIA_BITS
            if size > MAX_MANIFEST_SIZE:
                raise ManifestError(f"{size} bytes is over the manifest size limit")
            with open(self._path(raw), "rb") as f:
                data = f.read()
            if hashlib.new(ALGORITHMS[len(raw)], data).digest() != raw:
                raise ManifestError(f"{digest_text(raw)} does not match its content")
            media_type = self._media_type(info) or ""
            cached = PackedDigests(self._blob(child)
                                   for child in parse_manifest(data, media_type).children())
        kept[raw] = cached
        return iter(cached)

    def _load(self, signature: _Signature | None) -> _Snapshot | None:
        """Walk index.json; None when it cannot be read right now (keep the old view)."""
        if signature is None:
            return _Snapshot(signature=None)
        try:
            with open(self.root / "index.json", "rb") as f:
                data = f.read(_MAX_INDEX_JSON + 1)
            index = parse_manifest(data, mt.OCI_INDEX, max_size=_MAX_INDEX_JSON)
        except (OSError, ManifestError) as err:
            log.warning("oci store %s: cannot use index.json: %s", self.root, err)
            return None
        tags: dict[_TagId, Digest] = {}
        # Flat buffers, not a set of every digest seen: a blob two images share is
        # stat'ed twice and kept once by the builder; manifests are walked once.
        builder = DigestTableBuilder()
        walked: set[bytes] = set()
        # The children of the manifests this walk reaches: those of manifests no longer
        # reached go with the old snapshot, or a layout whose images come and go grew
        # this cache by every manifest it ever held.
        children: dict[bytes, PackedDigests] = {}
        pending = [self._blob(entry) for entry in index.manifests]
        for entry in index.manifests:
            ref = entry_reference(entry.annotations, self.base_name)
            if ref is not None and ref.tag is not None:
                tags[(ref.registry, ref.repository, ref.tag)] = entry.digest
        while pending:
            raw, info = pending.pop()
            manifest = mt.is_manifest_like(self._media_type(info) or "")
            if manifest and raw in walked:
                continue
            size = self._blob_size(raw)
            if size is None or size != info >> MEDIA_BITS:
                continue  # absent or partial: neither served nor advertised
            if manifest:
                walked.add(raw)
                try:
                    pending.extend(self._manifest_children(raw, info, children))
                except (OSError, ManifestError) as err:
                    log.warning("oci store %s: skipping %s: %s", self.root, digest_text(raw), err)
                    continue
            builder.add(raw, info)
        blobs = builder.build()
        self._children = children
        tags = {t: d for t, d in tags.items() if _raw(d) in blobs}
        keys = DigestKeys(blobs, frozenset(tag_key(*t) for t in tags))
        return _Snapshot(signature, tags, blobs, keys)

    def _refresh_sync(self) -> _Snapshot:
        signature = self._signature()
        if self._stale(signature):
            loaded = self._load(signature)
            if loaded is None:
                self._refused = signature
            else:
                self._apply(loaded)
        return self._snapshot

    def _stale(self, signature: _Signature | None) -> bool:
        """Whether index.json changed since it was last loaded or found unusable."""
        return signature != self._snapshot.signature and signature != self._refused

    def _apply(self, snapshot: _Snapshot) -> None:
        self._snapshot = snapshot
        self._hub.publish(snapshot.keys)

    async def _current(self) -> _Snapshot:
        """The snapshot, reloaded in a thread when index.json changed since the last look."""
        if not self._stale(self._signature()):
            return self._snapshot
        async with self._load_lock:
            signature = self._signature()
            if self._stale(signature):
                loaded = await asyncio.to_thread(self._load, signature)
                if loaded is None:
                    self._refused = signature
                else:
                    self._apply(loaded)
        return self._snapshot

    async def _poll(self) -> None:
        while not self._hub.closed:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._current()
            except Exception:  # a poller that dies silently would freeze the key set
                log.exception("oci store %s: poll failed", self.root)

    # ----------------------------------------------------------------- Store

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        snap = await self._current()
        try:
            return snap.tags[(registry, repository, tag)]
        except KeyError:
            raise NotFoundError(f"unknown tag {tag_key(registry, repository, tag)}") from None

    async def stat(self, digest: Digest) -> BlobInfo:
        snap = await self._current()
        info = snap.blobs.get(_raw(digest))
        if info is None:
            raise NotFoundError(f"blob {digest} not found")
        return BlobInfo(digest, info >> MEDIA_BITS, self._media_type(info))

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncIterator[bytes]:
        body = await self.open_file(digest, offset, length)
        if body is None:
            return
        async with contextlib.aclosing(body):
            async for chunk in body:
                yield chunk

    async def open_file(self, digest: Digest, offset: int = 0, length: int | None = None
                        ) -> FileChunks | None:
        info = await self.stat(digest)
        end = check_range(info.size, offset, length)
        if offset == end:
            return None
        try:
            fd = await asyncio.to_thread(os.open, blob_path(self.root, digest),
                                         os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None
        return FileChunks(fd, offset, end, self.chunk_size)

    async def keys(self) -> Set[str]:
        return (await self._current()).keys

    def subscribe(self) -> AsyncIterator[KeyEvent]:
        """Must be called from the event loop; starts the index.json poller on first use."""
        self._refresh_sync()
        subscription = self._hub.subscribe()
        if self._poller is None and not self._hub.closed:
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        return subscription

    async def ready(self) -> bool:
        return self.root.is_dir()

    async def close(self) -> None:
        self._hub.close()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    # ---------------------------------------------------------------- import

    def import_archive(self, archive: Path | str) -> list[Descriptor]:
        """Add every image of a plain-tar OCI archive; returns the index entries added.

        Blocking; call it in a thread from async code. See :func:`import_archive`.
        """
        return import_archive(self.root, Path(archive))


# ---------------------------------------------------------------- importing


def _member_target(name: str) -> tuple[str, Digest | None]:
    """Classify an archive member name; ArchiveError for anything that could escape."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise ArchiveError(f"unsafe member name {name[:100]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"unsafe member name {name[:100]!r}")
    if parts in (["oci-layout"], ["index.json"]):
        return parts[0], None
    if parts in (["manifest.json"], ["repositories"]):
        return "ignored", None  # docker-save compatibility files some exporters add
    if not parts or parts == ["blobs"] or (len(parts) == 2 and parts[0] == "blobs"):
        return "dir", None
    if len(parts) == 3 and parts[0] == "blobs":
        try:
            return "blob", Digest.parse(f"{parts[1]}:{parts[2]}")
        except DigestError as err:
            raise ArchiveError(f"member {name[:100]!r}: {err}") from err
    raise ArchiveError(f"unexpected member {name[:100]!r} in an OCI archive")


def _copy_verified(src: IO[bytes], root: Path, digest: Digest, size: int) -> None:
    """Write one blob beside its final path, renaming it in only if the digest matches."""
    final = blob_path(root, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    hasher = digest.hasher()
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".import-")
    try:
        with os.fdopen(fd, "wb") as out:
            copied = 0
            while chunk := src.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                copied += len(chunk)
        if copied != size or hasher.hexdigest() != digest.hex:
            raise ArchiveError(f"blob {digest} does not match its content")
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_small(src: IO[bytes] | None, name: str, limit: int) -> bytes:
    if src is None:
        raise ArchiveError(f"cannot read {name}")
    data = src.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{name} is over {limit} bytes")
    return data


def _check_reachable(root: Path, entries: list[Descriptor]) -> None:
    """Every blob the new entries reach must now be in the store, with the right size."""
    pending = list(entries)
    seen: set[Digest] = set()
    while pending:
        desc = pending.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        path = blob_path(root, desc.digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ArchiveError(f"archive lacks blob {desc.digest}") from None
        if size != desc.size:
            raise ArchiveError(f"blob {desc.digest} is {size} bytes, descriptor says {desc.size}")
        if mt.is_manifest_like(desc.media_type):
            if size > MAX_MANIFEST_SIZE:
                raise ArchiveError(f"manifest {desc.digest} is over {MAX_MANIFEST_SIZE} bytes")
            try:
                pending.extend(parse_manifest(path.read_bytes(), desc.media_type).children())
            except ManifestError as err:
                raise ArchiveError(f"manifest {desc.digest}: {err}") from err


@contextlib.contextmanager
def _index_lock(root: Path) -> Iterator[None]:
    """Serialise index.json read-modify-write between concurrent importers."""
    with open(root / _LOCK_FILE, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def import_archive(root: Path, archive: Path) -> list[Descriptor]:
    """Safely add a plain tar of an OCI layout to the layout at ``root``.

    Accepted members: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>`` as
    regular files, their directories, and docker-save's ``manifest.json`` and
    ``repositories`` (ignored). Anything else (absolute or ``..`` paths, links,
    devices, unknown names, digests that do not match the bytes) rejects the
    whole archive before ``index.json`` changes. Blobs are copied in 1 MiB
    pieces and verified while copying; index entries are merged under a lock
    and written atomically, replacing entries with the same image name.
    """
    ensure_layout(root)
    index_data: bytes | None = None
    layout_data: bytes | None = None
    try:
        # "r:" reads plain tar only: a gzip'd archive fails here with a clear message.
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                kind, digest = _member_target(member.name)
                if member.isdir() and kind == "dir":
                    continue
                if not member.isreg():
                    raise ArchiveError(f"member {member.name[:100]!r} is not a regular file")
                if kind == "ignored":
                    continue
                if kind == "dir":
                    raise ArchiveError(f"member {member.name[:100]!r} should be a directory")
                src = tar.extractfile(member)
                if kind == "index.json":
                    if index_data is not None:
                        raise ArchiveError("archive holds index.json twice")
                    index_data = _read_small(src, "index.json", _MAX_INDEX_JSON)
                elif kind == "oci-layout":
                    layout_data = _read_small(src, "oci-layout", _MAX_LAYOUT_MARKER)
                else:
                    assert digest is not None and src is not None
                    _copy_verified(src, root, digest, member.size)
    except tarfile.TarError as err:
        raise ArchiveError(f"{archive} is not a plain tar archive: {err}") from err
    if layout_data is None or index_data is None:
        raise ArchiveError(f"{archive} is not an OCI archive: oci-layout or index.json missing")
    try:
        version = json.loads(layout_data).get("imageLayoutVersion")
    except (ValueError, AttributeError) as err:
        raise ArchiveError("oci-layout is not a JSON object") from err
    if version != mt.OCI_LAYOUT_VERSION:
        raise ArchiveError(f"unsupported imageLayoutVersion {str(version)[:40]!r}")
    try:
        index = parse_manifest(index_data, mt.OCI_INDEX, max_size=_MAX_INDEX_JSON)
        raw_entries = json.loads(index_data)["manifests"]
    except ManifestError as err:
        raise ArchiveError(f"index.json: {err}") from err
    _check_reachable(root, list(index.manifests))
    with _index_lock(root):
        merge_index_entries(root, raw_entries)
    return list(index.manifests)


def import_command(archive: Path, spec: str) -> int:
    """``meshmirror import ARCHIVE.tar --store oci:DIR``."""
    if not spec.startswith("oci:") or not spec[4:]:
        print(f"meshmirror import: --store {spec!r}: want oci:DIR", file=sys.stderr)
        return 2
    root = Path(spec[4:])
    try:
        added = import_archive(root, archive)
    except (ValueError, OSError) as err:  # ArchiveError, or a corrupt index.json in DIR
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"meshmirror import: {archive}: {message}", file=sys.stderr)
        return 1
    for entry in added:
        name = entry.annotations.get(ANNOTATION_CONTAINERD_NAME) or entry.annotations.get(
            ANNOTATION_REF_NAME, "(untagged)")
        print(f"imported {name} {entry.digest}")
    return 0
