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
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
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


@dataclass(frozen=True, slots=True)
class _Ref:
    """A descriptor met while walking an image: what to fetch and how to parse it."""

    digest: str
    media_type: str


@dataclass(frozen=True, slots=True)
class _ImageRecord:
    target: str
    # Reachable and present digests with the media type their parent declared.
    blobs: dict[str, str]
    tag: str | None

    def keys(self) -> set[str]:
        out = set(self.blobs)
        # A tag is only worth advertising when what it points at is here.
        if self.tag is not None and self.target in self.blobs:
            out.add(self.tag)
        return out


@dataclass(slots=True)
class _Index:
    """Images of the namespace and the key set they add up to (reference counted)."""

    images: dict[str, _ImageRecord] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    media_types: dict[str, str] = field(default_factory=dict)
    # Sizes of held blobs already asked of containerd: content is immutable by
    # digest, so a blob still in the key set keeps its size. Saves the Info RPC
    # on every stat, which a peer pays for before its first byte.
    sizes: dict[str, int] = field(default_factory=dict)
    _frozen: frozenset[str] | None = None

    def keys(self) -> frozenset[str]:
        if self._frozen is None:
            self._frozen = frozenset(self.counts)
        return self._frozen

    def put(self, name: str, record: _ImageRecord | None) -> None:
        """Replace (or, with None, drop) one image's contribution to the key set."""
        old = self.images.pop(name, None)
        old_keys = old.keys() if old is not None else set()
        new_keys = record.keys() if record is not None else set()
        if record is not None:
            self.images[name] = record
            for digest, media_type in record.blobs.items():
                if media_type:
                    self.media_types[digest] = media_type
        if old_keys == new_keys:
            return
        self._frozen = None
        for key in new_keys - old_keys:
            self.counts[key] += 1
        for key in old_keys - new_keys:
            self.counts[key] -= 1
            if self.counts[key] <= 0:
                del self.counts[key]
                self.media_types.pop(key, None)
                self.sizes.pop(key, None)

    def forget_digest(self, digest: str) -> None:
        """containerd deleted a blob: no image holds it any more."""
        holders = [(n, r) for n, r in self.images.items() if digest in r.blobs]
        for name, record in holders:
            blobs = {d: m for d, m in record.blobs.items() if d != digest}
            self.put(name, _ImageRecord(record.target, blobs, record.tag))


def _children(ref: _Ref, data: bytes) -> list[_Ref]:
    """Descriptors an index or manifest points at; content we cannot parse has none."""
    try:
        manifest = parse_manifest(data, ref.media_type)
    except ManifestError as err:
        log.warning("containerd content %s (%s) not walked: %s", ref.digest, ref.media_type, err)
        return []
    return [_Ref(str(d.digest), d.media_type) for d in manifest.children()]


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
        self._index = _Index()
        self._manifest_cache: dict[str, list[_Ref]] = {}
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
        key = str(digest)
        index = self._index
        size = index.sizes.get(key) if key in index.counts else None
        if size is None:
            info = await self._require_client().content_info(key)
            size = int(info.size)
            if key in index.counts:
                index.sizes[key] = size
        return BlobInfo(digest, size, index.media_types.get(key))

    async def keys(self) -> frozenset[str]:
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

    async def _children_of(self, client: ContainerdClient, ref: _Ref) -> list[_Ref]:
        cached = self._manifest_cache.get(ref.digest)
        if cached is not None:
            return cached
        try:
            data = await self._read_small(client, ref.digest)
        except ContainerdUnavailableError:
            raise
        except NotFoundError:  # deleted since it was listed
            return []
        except ValueError as err:
            log.warning("skipping %s: %s", ref.digest, err)
            return []
        children = _children(ref, data)
        self._manifest_cache[ref.digest] = children
        return children

    async def _walk(self, client: ContainerdClient, name: str, target: _Ref,
                    present: Callable[[str], Awaitable[bool]]) -> _ImageRecord:
        blobs: dict[str, str] = {}
        seen: set[str] = set()
        stack = [target]
        while stack:
            ref = stack.pop()
            if ref.digest in seen:
                continue
            seen.add(ref.digest)
            if not await present(ref.digest):
                continue
            blobs[ref.digest] = ref.media_type
            if is_manifest_like(ref.media_type):
                stack.extend(await self._children_of(client, ref))
        return _ImageRecord(target.digest, blobs, image_tag_key(name))

    async def _full_sync(self, client: ContainerdClient) -> None:
        """Rebuild the index from listings and publish the difference as one event."""
        images = await client.list_images()
        listing = {info.digest for info in await client.list_content()}

        async def present(digest: str) -> bool:
            return digest in listing

        fresh = _Index()
        for image in images:
            target = _Ref(image.target.digest, image.target.media_type)
            fresh.put(image.name, await self._walk(client, image.name, target, present))
        self._index = fresh
        for digest in [d for d in self._manifest_cache if d not in fresh.counts]:
            del self._manifest_cache[digest]
        self._publish()

    async def _refresh_image(self, client: ContainerdClient, name: str) -> None:
        try:
            image = await client.get_image(name)
        except ContainerdUnavailableError:
            raise
        except NotFoundError:
            self._index.put(name, None)
            self._publish()
            return

        async def present(digest: str) -> bool:
            try:
                await client.content_info(digest)
            except ContainerdUnavailableError:
                raise
            except NotFoundError:
                return False
            return True

        target = _Ref(image.target.digest, image.target.media_type)
        record = await self._walk(client, name, target, present)
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
            self._manifest_cache.pop(gone.digest, None)
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
                         len(self._index.counts))
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


def _read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes, not a manifest")
    return data
