"""MemoryStore's own API and the KeyEventHub behaviour every store relies on."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import build_image
from meshmirror.store.base import KeyEvent, KeyEventHub, NotFoundError, check_range
from meshmirror.store.memory import MemoryStore


async def test_loose_blobs_tags_and_readiness() -> None:
    store = MemoryStore(chunk_size=3)
    digest = store.add_blob(b"hello world", "text/plain")
    assert (await store.stat(digest)).media_type == "text/plain"
    assert [c async for c in store.read(digest, 1, 7)] == [b"ell", b"o w", b"o"]
    store.tag("r.example", "a", "1", digest)
    assert await store.resolve("r.example", "a", "1") == digest
    assert await store.keys() == {str(digest), "r.example/a:1"}
    with pytest.raises(NotFoundError):
        store.tag("r.example", "a", "2", Digest.of(b"absent"))
    store.set_ready(False)
    assert await store.ready() is False
    store.remove_blob(digest)
    with pytest.raises(NotFoundError):
        await store.stat(digest)
    with pytest.raises(ValueError):
        MemoryStore(chunk_size=0)


async def test_remove_image_keeps_blobs_other_images_or_loose_adds_hold(tmp_path: Path) -> None:
    a = build_image("r.example/a:1", tmp_path / "a", [10], seed=1)
    b = build_image("r.example/b:1", tmp_path / "b", [10], seed=1)  # same content
    store = MemoryStore()
    store.add_image(a)
    store.add_image(b)
    store.remove_image("r.example", "a", "1")
    assert await store.keys() == b.keys()
    loose = a.platforms[0].layers[0]
    store.add_blob(a.blob_path(loose.digest).read_bytes())
    store.remove_image("r.example", "b", "1")
    assert await store.keys() == {str(loose.digest)}
    with pytest.raises(NotFoundError):
        store.remove_image("r.example", "b", "1")


async def test_add_image_refuses_corrupt_blobs(tmp_path: Path) -> None:
    image = build_image("r.example/a:1", tmp_path, [10])
    image.blob_path(image.platforms[0].config.digest).write_bytes(b"{}")
    with pytest.raises(ValueError, match="does not match"):
        MemoryStore().add_image(image)


async def test_hub_coalesces_for_slow_subscribers() -> None:
    hub = KeyEventHub(frozenset({"a"}))
    sub = hub.subscribe()
    hub.publish(frozenset({"a", "b"}))
    hub.publish(frozenset({"b", "c"}))
    hub.publish(frozenset({"b", "c"}))  # no change, no wake-up
    assert await asyncio.wait_for(anext(sub), 1) == KeyEvent(frozenset({"b", "c"}),
                                                             frozenset({"a"}))
    # a change and its undo cancel out: nothing to report, the subscriber keeps waiting
    hub.publish(frozenset({"b"}))
    hub.publish(frozenset({"b", "c"}))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(sub), 0.1)
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), 1)


async def test_hub_wakes_a_waiting_subscriber_and_forgets_abandoned_ones() -> None:
    hub = KeyEventHub()
    sub = hub.subscribe()
    waiter = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)
    hub.publish(frozenset({"x"}))
    assert await asyncio.wait_for(waiter, 1) == KeyEvent(added=frozenset({"x"}))
    await sub.aclose()
    abandoned = hub.subscribe()
    del abandoned
    gc.collect()
    assert len(hub._subscriptions) == 0


@pytest.mark.parametrize(("size", "offset", "length", "end"),
                         [(10, 0, None, 10), (10, 10, None, 10), (10, 3, 0, 3), (10, 2, 8, 10),
                          (0, 0, None, 0)])
def test_check_range_accepts(size: int, offset: int, length: int | None, end: int) -> None:
    assert check_range(size, offset, length) == end


@pytest.mark.parametrize(("size", "offset", "length"),
                         [(10, -1, None), (10, 0, -1), (10, 11, None), (10, 2, 9), (0, 1, 0)])
def test_check_range_refuses(size: int, offset: int, length: int | None) -> None:
    with pytest.raises(ValueError):
        check_range(size, offset, length)
