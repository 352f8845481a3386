"""The Store over a node's containerd: its images, their blobs, and live changes.

The key set is derived, never stored: every digest reachable from an image of
the namespace (index -> manifests -> config and layers) that containerd actually
holds, plus ``registry/repo:tag`` for each tagged image. It is built with two
listing calls (images, content) and a read of each manifest not seen before,
rather than one RPC per blob, so 1,000 images and 20,000 blobs stay cheap.

Changes arrive through containerd's event stream. containerd's garbage
collector deletes content without publishing an event, so withdrawal does not
wait for it: a digest leaves the key set as soon as no image reaches it any
more. A periodic full re-sync (cheap, manifests are cached by digest) repairs
anything events cannot tell us. When containerd restarts or its socket goes
away the store keeps running, reports ``ready() == False``, reconnects with
bounded backoff and re-syncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Set
from dataclasses import dataclass, field
from pathlib import Path

from meshmirror.containerd.client import (
    DEFAULT_NAMESPACE,
    ContainerdClient,
    ContainerdError,
    ContainerdUnavailableError,
    EventStream,
)
from meshmirror.containerd.proto import content_events_pb2, events_pb2, image_events_pb2
from meshmirror.fileio import FileChunks
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.manifest import MAX_MANIFEST_SIZE, ManifestError, parse_manifest
from meshmirror.oci.mediatypes import is_manifest_like
from meshmirror.oci.reference import tag_key
from meshmirror.store.base import (
    BlobInfo,
    KeyEvent,
    KeyEventHub,
    NotFoundError,
    Store,
    check_range,
)
from meshmirror.store.digests import (
    MEDIA_BITS,
    DigestKeys,
    DigestSet,
    DigestTable,
    DigestTableBuilder,
    DigestUnion,
    MediaTypes,
    PackedDigests,
    digest_text,
    raw_digest,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024

_IMAGE_TOPICS = frozenset({"/images/create", "/images/update", "/images/delete"})
_CONTENT_DELETE = "/content/delete"


def image_tag_key(name: str) -> str | None:
    """The tag key of a containerd image name, or None for digest-only and bare names.

    containerd names pulled images by their full reference, so
    ``docker.io/library/nginx:1.25`` already is ``registry/repo:tag``. Names
    pinned by digest (``...@sha256:...``) carry no tag to advertise, and names
    without a registry component (CRI's ``sha256:...`` id records) are not
    references at all.
    """
    if "@" in name:
        return None
    slash = name.find("/")
    colon = name.rfind(":")
    if slash <= 0 or colon <= name.rfind("/") or colon == len(name) - 1:
        return None
    return name


# What the index holds of a blob is its raw digest in a DigestTable with one number:
# the media type its parent declared (store/digests.MediaTypes) in the low bits and,
# once a stat asked containerd, its size + 1 above them (0: not asked yet). Content
# is immutable by digest, so a blob still held keeps its size, which saves the Info
# RPC on every stat (a peer pays for it before its first byte). 100,000 keys held as
# digest strings in each image's dict, a reference Counter, a media type dict, a size
# dict and a frozenset of the keys took 31.5 MiB with the manifest cache's _Ref lists
# (tracemalloc); as tables and packed children 12.9; with the images naming the
# manifest cache's children instead of a table each, 9.1 for the whole store after a
# sync (13.3 before, measured the same way).
_SIZE_SHIFT = MEDIA_BITS
_NONE = PackedDigests(())


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """What one image reaches, named rather than copied: its parts are the target (with
    the media type it was listed with) and the children of each manifest walked, the
    very objects the manifest cache holds, so 1,000 images of 100 blobs cost a few
    small objects each instead of a 4 KiB table; ``absent`` are the digests reached
    but not in containerd (other platforms' manifests, content the GC took), few.
    Content is immutable by digest, so the blobs a record names never change."""

    target: str
    parts: tuple[PackedDigests, ...]
    tag: str | None
    absent: PackedDigests = field(default_factory=lambda: _NONE)

    def add_to(self, builder: DigestTableBuilder) -> None:
        """Each held blob once, whatever number of this image's manifests name it (or
        how often one does: identical empty layers): a union counts an image once per
        blob, as `ImageIndex.put` counts it out, or the blob outlives the image."""
        builder.extend(self.blobs())

    def blobs(self) -> DigestTable:
        """Each held blob with its declared media type (a digest met twice: either)."""
        builder = DigestTableBuilder()
        skip = frozenset(raw for raw, _ in self.absent)
        for part in self.parts:
            builder.extend_packed(part, skip)
        return builder.build()

    def holds(self, raw: bytes) -> bool:
        return raw not in self.absent and any(raw in part for part in self.parts)

    def without(self, raw: bytes) -> ImageRecord:
        """This record with ``raw`` no longer held (containerd deleted it)."""
        return ImageRecord(self.target, self.parts, self.tag,
                           PackedDigests([*self.absent, (raw, 0)]))

    def tag_key(self) -> str | None:
        """The tag, when what it points at is here: only then is it worth advertising."""
        raw = raw_digest(self.target)
        return self.tag if self.tag is not None and raw is not None and self.holds(raw) else None


@dataclass(slots=True)
class ImageIndex:
    """Images of the namespace and the key set they add up to: the union of the images'
    blobs, built from all of them when first asked and from then on changed one image
    at a time (a re-sync too: an image whose record is unchanged moves nothing), so an
    image event costs what that image holds, not a sort of every key on the node, and
    a re-sync builds no second union beside the first."""

    images: dict[str, ImageRecord] = field(default_factory=dict, init=False)
    _union: DigestUnion | None = None
    # Each image's tag key, when it has one to advertise: asking 1,000 records on every
    # event was a binary search each, 5 ms.
    _tags: dict[str, str] = field(default_factory=dict, init=False)
    _keys: DigestKeys | None = None

    def blobs(self) -> DigestTable:
        if self._union is None:
            builder = DigestTableBuilder()
            for record in self.images.values():
                record.add_to(builder)
            self._union = DigestUnion(builder)
        return self._union.table

    def keys(self) -> DigestKeys:
        if self._keys is None:
            self._keys = DigestKeys(self.blobs(), frozenset(self._tags.values()))
        return self._keys

    def put(self, name: str, record: ImageRecord | None) -> None:
        """Replace (or, with None, drop) one image's contribution to the key set."""
        if record is None:
            old = self.images.pop(name, None)
            if old is None:
                return
        else:
            old = self.images.get(name)
            if old == record:  # the same blobs again: nothing moves
                return
            self.images[name] = record
        tag = None if record is None else record.tag_key()
        if tag is None:
            self._tags.pop(name, None)
        else:
            self._tags[name] = tag
        if self._union is not None:
            self._union.replace(None if old is None else old.blobs(),
                                None if record is None else record.blobs())
        self._keys = None

    def size(self, raw: bytes) -> int | None:
        """A held blob's size when a stat already asked; None when not, or not held."""
        packed = self.blobs().get(raw)
        return None if packed is None or packed >> _SIZE_SHIFT == 0 else (
            (packed >> _SIZE_SHIFT) - 1)

    def learn_size(self, raw: bytes, size: int) -> None:
        if size + 1 < 1 << (64 - _SIZE_SHIFT):
            self.blobs().set_bits(raw, (size + 1) << _SIZE_SHIFT)

    def forget_digest(self, digest: str) -> None:
        """containerd deleted a blob: no image holds it any more."""
        raw = raw_digest(digest)
        if raw is None or raw not in self.blobs():
            return
        for name, record in [(n, r) for n, r in self.images.items() if r.holds(raw)]:
            self.put(name, record.without(raw))


def _children(digest: str, media_type: str, data: bytes, media: MediaTypes
              ) -> PackedDigests | None:
    """Descriptors an index or manifest points at; None for content that cannot be
    parsed as ``media_type``."""
    try:
        manifest = parse_manifest(data, media_type)
    except ManifestError as err:
        log.warning("containerd content %s (%s) not walked: %s", digest, media_type, err)
        return None
    return PackedDigests((bytes.fromhex(d.digest.hex), media.number(d.media_type))
                         for d in manifest.children())


class ContainerdStore(Store):
    """Images and blobs of one containerd namespace, kept current from its events.

    Use as ``async with ContainerdStore(...) as store`` or call ``start()`` and
    ``close()``; ``wait_ready()`` waits for the first full sync.
    """

    def __init__(
        self,
        socket_path: str | Path,
        namespace: str = DEFAULT_NAMESPACE,
        content_path: str | Path | None = None,
        *,
        resync_interval: float = 60.0,
        settle_delay: float = 0.5,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        rpc_timeout: float = 10.0,
    ) -> None:
        if not namespace:
            raise ValueError("containerd namespace must not be empty")
        if (resync_interval <= 0 or settle_delay < 0 or backoff_initial <= 0
                or backoff_max < backoff_initial):
            raise ValueError("resync_interval and backoffs must be positive, settle_delay "
                             "not negative, backoff_max >= backoff_initial")
        self.socket_path = str(socket_path)
        self.namespace = namespace
        self.content_path = Path(content_path) if content_path is not None else None
        self._resync_interval = resync_interval
        self._settle_delay = settle_delay
        # image name -> loop time at which to walk it again (after containerd's GC)
        self._recheck: dict[str, float] = {}
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rpc_timeout = rpc_timeout
        self._index = ImageIndex()
        self._manifest_cache: dict[bytes, PackedDigests] = {}
        # Manifests that did not parse as the type a parent named them with. Not in the
        # cache by digest alone: an image naming another's manifest with a wrong type
        # (containerd takes a Docker type for an OCI manifest) hid that image's blobs.
        self._unwalkable: set[tuple[bytes, str]] = set()
        self._media = MediaTypes()
        self._client: ContainerdClient | None = None
        self._connected = False
        self._synced = asyncio.Event()
        self._hub = KeyEventHub()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="containerd-store")

    async def wait_ready(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a completed sync; returns ready()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), seconds)
        return await self.ready()

    async def ready(self) -> bool:
        return self._connected and not self._closed

    async def close(self) -> None:
        self._closed = True
        self._connected = False
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._hub.close()

    async def __aenter__(self) -> ContainerdStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- Store -------------------------------------------------------------

    def _require_client(self) -> ContainerdClient:
        if self._client is None or self._closed:
            raise ContainerdUnavailableError(f"not connected to containerd at {self.socket_path}")
        return self._client

    async def resolve(self, registry: str, repository: str, tag: str) -> Digest:
        name = tag_key(registry, repository, tag)
        if image_tag_key(name) is None:
            raise NotFoundError(f"{name!r} is not a registry/repository:tag reference")
        client = self._require_client()
        try:
            image = await client.get_image(name)
        except ContainerdError as err:  # e.g. INVALID_ARGUMENT for a malformed name
            raise NotFoundError(f"{name}: {err}") from err
        try:
            target = Digest.parse(image.target.digest)
        except DigestError as err:
            raise NotFoundError(f"{name} points at an unusable digest: {err}") from err
        # A tag whose manifest is gone would send containerd to a fetch that fails.
        await client.content_info(str(target))
        return target

    async def stat(self, digest: Digest) -> BlobInfo:
        raw = bytes.fromhex(digest.hex)
        index = self._index
        size = index.size(raw)
        if size is None:
            info = await self._require_client().content_info(str(digest))
            size = int(info.size)
            self._index.learn_size(raw, size)  # when held: the index may be new by now
        packed = self._index.blobs().get(raw)
        media_type = None if packed is None else self._media.name(packed)
        return BlobInfo(digest, size, media_type or None)

    async def keys(self) -> Set[str]:
        return self._index.keys()

    def subscribe(self) -> AsyncIterator[KeyEvent]:
        # Baseline is the key set at this call, so nothing changed after it is missed.
        return self._hub.subscribe()

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0):
            check_range(0, offset, length)  # raises the ValueError before any RPC
        # Info first: it gives the size and scopes the read to our namespace
        # (the content directory holds every namespace's blobs).
        info = await self.stat(digest)
        end = check_range(info.size, offset, length)
        if end <= offset:
            return
        fd = await self._open_direct(digest)
        if fd is not None:
            async with contextlib.aclosing(FileChunks(fd, offset, end, CHUNK_SIZE)) as body:
                async for chunk in body:
                    yield chunk
            return
        async for chunk in self._read_grpc(digest, offset, end - offset):
            yield chunk

    async def open_file(self, digest: Digest, offset: int = 0, length: int | None = None
                        ) -> FileChunks | None:
        """The blob's file in containerd's content directory, when it is readable here."""
        info = await self.stat(digest)
        end = check_range(info.size, offset, length)
        if end <= offset:
            return None
        fd = await self._open_direct(digest)
        return None if fd is None else FileChunks(fd, offset, end, CHUNK_SIZE)

    async def _open_direct(self, digest: Digest) -> int | None:
        """A descriptor on the blob's file, or None when the directory is not readable here."""
        if self.content_path is None:
            return None
        path = self.content_path / "blobs" / digest.algorithm / digest.hex
        try:
            return await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    async def _read_grpc(self, digest: Digest, offset: int, count: int) -> AsyncIterator[bytes]:
        remaining = count
        # aclosing: stopping early must cancel the RPC now, not when GC finds it.
        async with contextlib.aclosing(
                self._require_client().read_content(str(digest), offset, count)) as stream:
            async for data in stream:
                if len(data) > remaining:
                    data = data[:remaining]
                remaining -= len(data)
                yield data
                if remaining == 0:
                    return
        if remaining:
            raise ContainerdError(f"containerd Read of {digest} ended {remaining} bytes early")

    # -- index -------------------------------------------------------------

    def _publish(self) -> None:
        self._hub.publish(self._index.keys())

    async def _read_small(self, client: ContainerdClient, digest: str) -> bytes:
        if self.content_path is not None:
            parsed = Digest.parse(digest)
            path = self.content_path / "blobs" / parsed.algorithm / parsed.hex
            try:
                data = await asyncio.to_thread(_read_limited, path, MAX_MANIFEST_SIZE)
            except OSError:
                pass
            else:
                return data
        chunks: list[bytes] = []
        total = 0
        async with contextlib.aclosing(client.read_content(digest)) as stream:
            async for chunk in stream:
                total += len(chunk)
                if total > MAX_MANIFEST_SIZE:
                    raise ValueError(f"{digest} is over {MAX_MANIFEST_SIZE} bytes, "
                                     "not a manifest")
                chunks.append(chunk)
        return b"".join(chunks)

    async def _children_of(self, client: ContainerdClient, raw: bytes, media_type: str
                           ) -> PackedDigests | None:
        """A manifest's children, read once per digest; None when it cannot be read."""
        cached = self._manifest_cache.get(raw)
        if cached is None:
            if (raw, media_type) in self._unwalkable:
                return None
            digest = digest_text(raw)
            try:
                data = await self._read_small(client, digest)
            except ContainerdUnavailableError:
                raise
            except NotFoundError:  # deleted since it was listed
                return None
            except ValueError as err:
                log.warning("skipping %s: %s", digest, err)
                return None
            cached = _children(digest, media_type, data, self._media)
            if cached is None:
                self._unwalkable.add((raw, media_type))
                return None
            self._manifest_cache[raw] = cached
        return cached

    async def _walk(self, client: ContainerdClient, name: str, target: str, target_type: str,
                    present: Callable[[bytes], Awaitable[bool]]) -> ImageRecord:
        tag = image_tag_key(name)
        raw = raw_digest(target)
        if raw is None or not await present(raw):
            # containerd names content only by digests a registry serves
            return ImageRecord(target, (), tag)
        media = self._media
        parts = [PackedDigests([(raw, media.number(target_type))])]
        absent: list[tuple[bytes, int]] = []
        seen = {raw}
        stack = [(raw, target_type)]
        while stack:
            raw, media_type = stack.pop()
            if not is_manifest_like(media_type):
                continue
            children = await self._children_of(client, raw, media_type)
            if children is None:
                continue
            parts.append(children)
            for child, number in children:
                if child in seen:
                    continue
                seen.add(child)
                if not await present(child):
                    absent.append((child, 0))
                    continue
                stack.append((child, media.name(number) or ""))
        return ImageRecord(target, tuple(parts), tag, PackedDigests(absent) if absent else _NONE)

    async def _full_sync(self, client: ContainerdClient) -> None:
        """Rebuild the index from listings and publish the difference as one event."""
        images = await client.list_images()
        listing = DigestSet()
        async for digest in client.content_digests():
            raw = raw_digest(digest)
            if raw is not None:
                listing.add(raw)

        async def present(raw: bytes) -> bool:
            return raw in listing

        # Changed in place, image by image: what stayed the same (nearly everything, at
        # a periodic re-sync) keeps its place in the union and the sizes learned.
        # Each image that changed moves the union's arrays (about a millisecond at 100,000
        # keys), and a walk of cached manifests never waits: hundreds changed at once
        # (events missed while disconnected, content collected) held the event loop for
        # seconds, long enough for peers to think the node dead. It serves in between.
        index = self._index
        for image in images:
            index.put(image.name, await self._walk(client, image.name, image.target.digest,
                                                   image.target.media_type, present))
            await asyncio.sleep(0)
        listed = {image.name for image in images}
        for name in [n for n in index.images if n not in listed]:
            index.put(name, None)
            await asyncio.sleep(0)
        listing = DigestSet()  # let the listing go before the union is built (first sync)
        held = index.blobs()
        for raw in [r for r in self._manifest_cache if r not in held]:
            del self._manifest_cache[raw]
        self._unwalkable = {(raw, kind) for raw, kind in self._unwalkable if raw in held}
        self._publish()
        _trim_heap()

    async def _refresh_image(self, client: ContainerdClient, name: str) -> None:
        try:
            image = await client.get_image(name)
        except ContainerdUnavailableError:
            raise
        except NotFoundError:
            self._index.put(name, None)
            self._publish()
            return

        async def present(raw: bytes) -> bool:
            try:
                await client.content_info(digest_text(raw))
            except ContainerdUnavailableError:
                raise
            except NotFoundError:
                return False
            return True

        record = await self._walk(client, name, image.target.digest, image.target.media_type,
                                  present)
        self._index.put(name, record)
        self._publish()

    async def _apply(self, client: ContainerdClient, envelope: events_pb2.Envelope) -> None:
        if envelope.namespace != self.namespace:
            return
        topic = envelope.topic
        if topic in _IMAGE_TOPICS:
            if topic == "/images/delete":
                deleted = image_events_pb2.ImageDelete.FromString(envelope.event.value)
                self._index.put(deleted.name, None)
                self._publish()
            else:
                kind = (image_events_pb2.ImageCreate if topic == "/images/create"
                        else image_events_pb2.ImageUpdate)
                changed = kind.FromString(envelope.event.value)
                await self._refresh_image(client, changed.name)
                # containerd's garbage collector removes what the import or pull
                # did not keep (other platforms' blobs) shortly after, silently.
                self._recheck[changed.name] = (asyncio.get_running_loop().time()
                                               + self._settle_delay)
        elif topic == _CONTENT_DELETE:
            gone = content_events_pb2.ContentDelete.FromString(envelope.event.value)
            raw = raw_digest(gone.digest) or b""
            self._manifest_cache.pop(raw, None)
            self._unwalkable = {(r, kind) for r, kind in self._unwalkable if r != raw}
            self._index.forget_digest(gone.digest)
            self._publish()

    # -- connection loop ---------------------------------------------------

    async def _follow(self, client: ContainerdClient,
                      queue: asyncio.Queue[events_pb2.Envelope | BaseException]) -> None:
        """Apply events as they come; re-check settled images and re-sync when due."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self._resync_interval
        while True:
            now = loop.time()
            for name in [n for n, due in self._recheck.items() if due <= now]:
                del self._recheck[name]
                await self._refresh_image(client, name)
            if now >= next_resync:
                await self._full_sync(client)
                next_resync = loop.time() + self._resync_interval
                continue
            wake = min([next_resync, *self._recheck.values()])
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, wake - now))
            except TimeoutError:
                continue
            if isinstance(item, BaseException):
                raise item
            await self._apply(client, item)

    def _event_filters(self) -> list[str]:
        ns = json.dumps(self.namespace)
        return [f'namespace=={ns},topic~="^/images/"',
                f'namespace=={ns},topic=="{_CONTENT_DELETE}"']

    async def _pump(self, stream: EventStream,
                    queue: asyncio.Queue[events_pb2.Envelope | BaseException]) -> None:
        try:
            async for envelope in stream:
                queue.put_nowait(envelope)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # handed to the worker, which reconnects
            queue.put_nowait(err)

    async def _run(self) -> None:
        delay = self._backoff_initial
        while not self._closed:
            client = ContainerdClient(self.socket_path, self.namespace, timeout=self._rpc_timeout)
            self._client = client
            stream: EventStream | None = None
            pump: asyncio.Task[None] | None = None
            try:
                # Subscribe before listing so a change made during the sync is
                # still delivered afterwards (applying it twice is harmless).
                stream = client.subscribe(self._event_filters())
                queue: asyncio.Queue[events_pb2.Envelope | BaseException] = asyncio.Queue()
                pump = asyncio.create_task(self._pump(stream, queue))
                await self._full_sync(client)
                self._connected = True
                self._synced.set()
                delay = self._backoff_initial
                log.info("containerd %s: synced %d keys", self.socket_path,
                         len(self._index.keys()))
                await self._follow(client, queue)
            except asyncio.CancelledError:
                raise
            except (ContainerdUnavailableError, ContainerdError) as err:
                log.warning("containerd %s: %s; reconnecting in %.1fs", self.socket_path, err,
                            delay)
            except Exception:
                log.exception("containerd %s: unexpected error; reconnecting in %.1fs",
                              self.socket_path, delay)
            finally:
                self._connected = False
                self._recheck.clear()
                self._synced.clear()
                if pump is not None:
                    pump.cancel()
                if stream is not None:
                    stream.cancel()
                self._client = None
                await client.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system after a full sync. A sync makes
    and drops megabytes in pieces under glibc's mmap threshold (the listing, the
    union's build, the listing's messages); what they leave free inside the heap stayed
    resident, 5 MiB more RSS after each re-sync at 101,000 keys. malloc_trim takes
    about a millisecond once a minute; a C library without it (musl) has nothing to do."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def _read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes, not a manifest")
    return data
