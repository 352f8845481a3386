"""The Store conformance suite: every Store implementation runs these same tests.

How to run it against a store (the fixture contract)
-----------------------------------------------------
Subclass :class:`StoreConformance` in a test module whose class name starts
with ``Test`` and override the ``harness`` fixture. It must yield a
:class:`StoreHarness` whose ``store`` already holds exactly one image, built with
:func:`build_known_image` (so it has an index over two platforms, a layer larger
than ``MAX_CHUNK``, and every blob on disk under ``image.layout``), with
*all* platforms' blobs present (containerd: ``ctr images import --all-platforms``),
and no other content. ``add_image(built)`` must put a further image in the store
while it runs (from ``built.archive`` or ``built.layout``) and ``remove_image(built)``
take it out again; both may return before the store has noticed, the suite
waits (at most ``EVENT_TIMEOUT`` seconds) for ``subscribe()`` and ``keys()`` to
catch up. The fixture closes the store on teardown. Example::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        async def harness(self, tmp_path: Path) -> AsyncIterator[StoreHarness]:
            image = build_known_image(tmp_path / "known")
            store = MyStore(...)  # loaded with image
            try:
                yield StoreHarness(store, image, add, remove, tmp_path / "extra")
            finally:
                await store.close()

What the suite pins down, beyond the Store docstrings: a range outside the blob
raises ValueError (never a short read); chunks are at most ``MAX_CHUNK``; blobs
only the removed image reached are gone from ``stat`` afterwards (set
``removal_deletes_content = False`` in the subclass for stores whose garbage
collection is not immediate); the tag target's ``stat`` always reports its media
type.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.store.base import KeyEvent, NotFoundError, Store

EVENT_TIMEOUT = 5.0
MAX_CHUNK = 4 * 1024 * 1024
MIB = 1024 * 1024
KNOWN_IMAGE_NAME = "127.0.0.1:5050/conformance/known:v1"
KNOWN_LAYER_SIZES = (700, 5 * MIB + 12_345)
KNOWN_PLATFORMS = ("linux/amd64", "linux/arm64")
KNOWN_SEED = 1
ABSENT = Digest.parse("sha256:" + "0" * 64)


def build_known_image(directory: Path) -> BuiltImage:
    """The image every harness pre-loads (layout in ``directory``, archive beside it)."""
    return build_image(KNOWN_IMAGE_NAME, directory, KNOWN_LAYER_SIZES, seed=KNOWN_SEED,
                       platforms=KNOWN_PLATFORMS, archive=directory.with_suffix(".tar"))


@dataclass
class StoreHarness:
    store: Store
    image: BuiltImage
    add_image: Callable[[BuiltImage], Awaitable[None]]
    remove_image: Callable[[BuiltImage], Awaitable[None]]
    build_dir: Path  # where the suite writes further images; need not exist yet
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def build(self, name: str, seed: int, layer_sizes: tuple[int, ...] = (300, 5000)
              ) -> BuiltImage:
        """A further image with its own layout and archive under ``build_dir``."""
        n = next(self._counter)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        return build_image(name, self.build_dir / f"image{n}", layer_sizes, seed=seed,
                           platforms=KNOWN_PLATFORMS,
                           archive=self.build_dir / f"image{n}.tar")


async def _read(store: Store, digest: Digest, offset: int = 0, length: int | None = None
                ) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, offset, length)])


async def _events_until(events: AsyncIterator[KeyEvent],
                        done: Callable[[set[str], set[str]], bool]) -> tuple[set[str], set[str]]:
    """Accumulate added/removed keys until ``done`` holds; fail after EVENT_TIMEOUT."""
    added: set[str] = set()
    removed: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVENT_TIMEOUT
    while not done(added, removed):
        left = deadline - loop.time()
        if left <= 0:
            pytest.fail(f"no matching events within {EVENT_TIMEOUT}s: "
                        f"added={sorted(added)} removed={sorted(removed)}")
        try:
            event = await asyncio.wait_for(anext(events), left)
        except TimeoutError:
            continue
        except StopAsyncIteration:
            pytest.fail("subscription ended early")
        added |= event.added
        removed |= event.removed
    return added, removed


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EVENT_TIMEOUT
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {EVENT_TIMEOUT}s: {what}")
        await asyncio.sleep(0.05)


class StoreConformance:
    """Inherit, override ``harness``; see the module docstring for the contract."""

    removal_deletes_content = True

    @pytest.fixture
    async def harness(self) -> AsyncIterator[StoreHarness]:
        raise NotImplementedError("a StoreConformance subclass must provide a harness fixture")
        yield  # pragma: no cover

    # ------------------------------------------------------------- lookups

    async def test_ready(self, harness: StoreHarness) -> None:
        assert await harness.store.ready() is True

    async def test_resolve_tag(self, harness: StoreHarness) -> None:
        image = harness.image
        assert await harness.store.resolve(image.registry, image.repository, image.tag) \
            == image.digest

    @pytest.mark.parametrize("change", ["registry", "repository", "tag"])
    async def test_resolve_unknown_tag(self, harness: StoreHarness, change: str) -> None:
        parts = {"registry": harness.image.registry, "repository": harness.image.repository,
                 "tag": harness.image.tag}
        parts[change] = "other-" + parts[change].replace(":", "-")
        with pytest.raises(NotFoundError):
            await harness.store.resolve(**parts)

    async def test_stat_every_blob(self, harness: StoreHarness) -> None:
        for record in harness.image.blobs():
            info = await harness.store.stat(record.digest)
            assert info.digest == record.digest
            assert info.size == record.size
            assert info.media_type in (None, record.media_type)
        root = await harness.store.stat(harness.image.digest)
        assert root.media_type == mt.OCI_INDEX

    async def test_stat_absent(self, harness: StoreHarness) -> None:
        with pytest.raises(NotFoundError):
            await harness.store.stat(ABSENT)

    async def test_keys_are_every_digest_and_the_tag(self, harness: StoreHarness) -> None:
        assert await harness.store.keys() == harness.image.keys()

    async def test_digests_next_to_held_ones_are_not_held(self, harness: StoreHarness) -> None:
        """Stores may keep digests sorted and search them: the first and last held, and
        digests one byte off either end of each, must be told apart."""
        keys = await harness.store.keys()
        held = sorted(bytes.fromhex(r.digest.hex) for r in harness.image.blobs())
        near = {bytes(32), b"\xff" * 32}
        for raw in held:
            near |= {raw[:-1] + bytes([raw[-1] ^ 1]), bytes([raw[0] ^ 0x80]) + raw[1:],
                     raw[:-1] + b"\0", raw[:-1] + b"\xff"}
        near -= set(held)
        for raw in [held[0], held[-1]]:
            assert (await harness.store.stat(Digest("sha256", raw.hex()))).size > 0
        for raw in sorted(near):
            digest = Digest("sha256", raw.hex())
            assert str(digest) not in keys
            with pytest.raises(NotFoundError):
                await harness.store.stat(digest)
        assert f"sha256:{held[0].hex().upper()}" not in keys
        assert f"sha512:{held[0].hex() * 2}" not in keys
        expected = harness.image.keys()
        assert all(key in keys for key in expected)

    # --------------------------------------------------------------- reads

    async def test_read_whole_blobs(self, harness: StoreHarness) -> None:
        for record in harness.image.blobs():
            data = await _read(harness.store, record.digest)
            assert len(data) == record.size
            assert "sha256:" + hashlib.sha256(data).hexdigest() == str(record.digest)

    async def test_read_all_small_blob(self, harness: StoreHarness) -> None:
        data = await harness.store.read_all(harness.image.digest)
        assert data == harness.image.blob_path(harness.image.digest).read_bytes()

    async def test_read_ranges(self, harness: StoreHarness) -> None:
        big = max(harness.image.blobs(), key=lambda r: r.size)
        assert big.size > MAX_CHUNK
        content = harness.image.blob_path(big.digest).read_bytes()
        size = len(content)
        cases = [(0, 1), (1, size - 1), (size - 1, 1), (size - 1, None), (MIB - 7, 2 * MIB + 9),
                 (MIB, MIB), (12_345, None), (0, None), (0, size), (4 * MIB - 1, MIB + 2)]
        for offset, length in cases:
            got = await _read(harness.store, big.digest, offset, length)
            want = content[offset:] if length is None else content[offset : offset + length]
            assert got == want, f"range {offset}+{length}"

    async def test_open_file_is_the_same_bytes_as_read(self, harness: StoreHarness) -> None:
        """A store that offers a file (for sendfile) offers exactly what `read` streams:
        the span and the chunks both; None is an answer too (no file here)."""
        big = max(harness.image.blobs(), key=lambda r: r.size)
        content = harness.image.blob_path(big.digest).read_bytes()
        for offset, length in [(0, None), (MIB - 7, 2 * MIB + 9), (len(content) - 1, 1)]:
            body = await harness.store.open_file(big.digest, offset, length)
            if body is None:
                return
            want = content[offset:] if length is None else content[offset:offset + length]
            span = body.file_span()
            assert span is not None and span.count == len(want)
            assert os.pread(span.fd, span.count, span.offset) == want
            assert b"".join([chunk async for chunk in body]) == want
            assert body.file_span() is None, "read to the end, the file is closed"
        with pytest.raises(NotFoundError):
            await harness.store.open_file(ABSENT)

    async def test_read_in_bounded_chunks(self, harness: StoreHarness) -> None:
        big = max(harness.image.blobs(), key=lambda r: r.size)
        sizes = [len(c) async for c in harness.store.read(big.digest)]
        assert sum(sizes) == big.size
        assert max(sizes) <= MAX_CHUNK
        assert len(sizes) >= 2, "a multi-MiB blob must stream in pieces"

    async def test_read_empty_ranges(self, harness: StoreHarness) -> None:
        record = harness.image.root
        assert await _read(harness.store, record.digest, record.size) == b""
        assert await _read(harness.store, record.digest, record.size, 0) == b""
        assert await _read(harness.store, record.digest, 3, 0) == b""

    @pytest.mark.parametrize(("offset", "length"),
                             [(-1, None), (0, -1), ("size+1", None), (0, "size+1"), (1, "size")])
    async def test_read_outside_blob_is_value_error(self, harness: StoreHarness,
                                                     offset: int | str,
                                                     length: int | str | None) -> None:
        size = harness.image.root.size

        def value(v: int | str | None) -> int | None:
            return {"size": size, "size+1": size + 1}[v] if isinstance(v, str) else v

        start = value(offset)
        assert start is not None
        with pytest.raises(ValueError):
            await _read(harness.store, harness.image.digest, start, value(length))

    async def test_read_absent(self, harness: StoreHarness) -> None:
        with pytest.raises(NotFoundError):
            await _read(harness.store, ABSENT)

    # -------------------------------------------------------------- events

    async def test_subscribe_reports_added_image(self, harness: StoreHarness) -> None:
        events = harness.store.subscribe()
        extra = harness.build("127.0.0.1:5050/conformance/added:1", seed=101)
        await harness.add_image(extra)
        added, removed = await _events_until(events, lambda a, r: extra.keys() <= a)
        assert added == extra.keys() - harness.image.keys()
        assert not removed & harness.image.keys()
        assert await harness.store.keys() == harness.image.keys() | extra.keys()
        assert await harness.store.resolve(extra.registry, extra.repository, extra.tag) \
            == extra.digest
        layer = extra.platforms[0].layers[-1]
        assert await _read(harness.store, layer.digest) == \
            extra.blob_path(layer.digest).read_bytes()

    async def test_subscribe_reports_removed_image(self, harness: StoreHarness) -> None:
        extra = harness.build("127.0.0.1:5050/conformance/removed:1", seed=202)
        events = harness.store.subscribe()
        await harness.add_image(extra)
        await _events_until(events, lambda a, r: extra.keys() <= a)
        await harness.remove_image(extra)
        _, removed = await _events_until(events, lambda a, r: extra.keys() <= r)
        assert not removed & harness.image.keys()
        await _eventually(lambda: _keys_equal(harness.store, harness.image.keys()),
                          "keys() back to the known image's")
        with pytest.raises(NotFoundError):
            await harness.store.resolve(extra.registry, extra.repository, extra.tag)
        if self.removal_deletes_content:
            with pytest.raises(NotFoundError):
                await harness.store.stat(extra.platforms[0].layers[0].digest)

    async def test_shared_blobs_survive_removal(self, harness: StoreHarness) -> None:
        """A second tag on the same content: removing it withdraws the tag key only."""
        twin = harness.build("127.0.0.1:5050/conformance/twin:2", seed=KNOWN_SEED,
                             layer_sizes=KNOWN_LAYER_SIZES)
        assert twin.digests() == harness.image.digests()
        events = harness.store.subscribe()
        await harness.add_image(twin)
        added, _ = await _events_until(events, lambda a, r: twin.tag_key in a)
        assert added == {twin.tag_key}
        await harness.remove_image(twin)
        _, removed = await _events_until(events, lambda a, r: twin.tag_key in r)
        assert removed == {twin.tag_key}
        assert await harness.store.keys() == harness.image.keys()
        for record in harness.image.blobs():
            assert (await harness.store.stat(record.digest)).size == record.size

    async def test_every_subscriber_sees_changes(self, harness: StoreHarness) -> None:
        first, second = harness.store.subscribe(), harness.store.subscribe()
        extra = harness.build("127.0.0.1:5050/conformance/fanout:1", seed=303)
        await harness.add_image(extra)
        for events in (first, second):
            await _events_until(events, lambda a, r: extra.keys() <= a)

    async def test_close_ends_subscriptions(self, harness: StoreHarness) -> None:
        events = harness.store.subscribe()
        await harness.store.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(events), EVENT_TIMEOUT)


async def _keys_equal(store: Store, want: frozenset[str]) -> bool:
    return await store.keys() == want
