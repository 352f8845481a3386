"""Live updates from containerd's event stream, and surviving containerd going away.

The stores here re-sync only once an hour, so every change a test sees before
that arrived through an event (or a reconnect), not through polling.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshmirror.containerd.client import ContainerdUnavailableError
from meshmirror.containerd.store import ContainerdStore, ImageIndex, ImageRecord
from meshmirror.store.base import KeyEvent, NotFoundError
from tests.containerd.conftest import READY_WITHIN, ImageFactory, import_image, wait_keys
from tests.support.containerd import NAMESPACE, Containerd

pytestmark = pytest.mark.real


@pytest.fixture
def containerd_version(matrix_version: str) -> str:
    """This module runs on every containerd version (see conftest)."""
    return matrix_version

EVENT_WITHIN = 5.0


def _store(socket: Path | str, content: Path | None = None, **kwargs: float) -> ContainerdStore:
    options: dict[str, float] = {"resync_interval": 3600.0, "backoff_max": 0.5} | kwargs
    return ContainerdStore(socket, NAMESPACE, content, **options)


class Changes:
    """Accumulates KeyEvents from one subscription so tests can wait for a net effect."""

    def __init__(self, events: AsyncIterator[KeyEvent]) -> None:
        self.added: set[str] = set()
        self.removed: set[str] = set()
        self.events: list[KeyEvent] = []
        self._events = events

    async def wait(self, added: frozenset[str] = frozenset(),
                   removed: frozenset[str] = frozenset(), within: float = EVENT_WITHIN) -> None:
        async def until() -> None:
            while not (added <= self.added and removed <= self.removed):
                event = await anext(self._events)
                self.events.append(event)
                self.added.update(event.added)  # a Set, not always a frozenset
                self.removed.update(event.removed)

        try:
            await asyncio.wait_for(until(), within)
        except TimeoutError:
            raise AssertionError(
                f"after {within}s still waiting for added {sorted(added - self.added)}, "
                f"removed {sorted(removed - self.removed)}") from None

    def reset(self) -> None:
        self.added.clear()
        self.removed.clear()


async def _wait_ready_state(store: ContainerdStore, want: bool, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while await store.ready() != want:
        assert asyncio.get_running_loop().time() < deadline, f"ready() never became {want}"
        await asyncio.sleep(0.02)


async def test_import_and_rmi_update_keys(containerd: Containerd,
                                          make_image: ImageFactory) -> None:
    # Same seed: the second image shares the first one's layer and adds another.
    first = make_image("docker.io/library/first:1", (1500,), seed=7)
    second = make_image("docker.io/library/second:1", (1500, 2500), seed=7)
    shared = str(first.platforms[0].layers[0].digest)
    assert shared == str(second.platforms[0].layers[0].digest)
    async with _store(containerd.socket, containerd.content_path) as store:
        assert await store.wait_ready(READY_WITHIN)
        changes = Changes(store.subscribe())

        import_image(containerd, first)
        await changes.wait(added=first.keys())
        import_image(containerd, second)
        await changes.wait(added=second.keys() - first.keys())
        assert await store.keys() == first.keys() | second.keys()

        changes.reset()
        containerd.ctr("images", "rm", first.name)
        await changes.wait(removed=first.keys() - second.keys())
        assert shared not in changes.removed
        assert await store.keys() == second.keys()
        with pytest.raises(NotFoundError):
            await store.resolve(first.registry, first.repository, first.tag)

        changes.reset()
        containerd.ctr("images", "rm", "--sync", second.name)
        await changes.wait(removed=second.keys())
        assert await store.keys() == frozenset()


async def test_reimport_under_same_name_is_an_update(containerd: Containerd,
                                                     make_image: ImageFactory) -> None:
    """ctr import of an existing name updates the record (/images/update), new target."""
    old = make_image("docker.io/library/moving:latest", (1000,), seed=21)
    new = make_image("docker.io/library/moving:latest", (1000,), seed=22)
    import_image(containerd, old)
    async with _store(containerd.socket, containerd.content_path) as store:
        assert await store.wait_ready(READY_WITHIN)
        changes = Changes(store.subscribe())
        import_image(containerd, new)
        await changes.wait(added=new.digests(), removed=old.digests())
        assert await store.keys() == new.keys()
        assert await store.resolve("docker.io", "library/moving", "latest") == new.digest


async def test_retag_and_content_delete(containerd: Containerd,
                                        make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/tagme:1", (1000, 1000), seed=3)
    import_image(containerd, image)
    async with _store(containerd.socket, containerd.content_path) as store:
        assert await store.wait_ready(READY_WITHIN)
        assert await store.keys() == image.keys()
        changes = Changes(store.subscribe())

        containerd.ctr("images", "tag", image.name, "docker.io/library/tagme:2")
        await changes.wait(added=frozenset({"docker.io/library/tagme:2"}))
        assert await store.resolve("docker.io", "library/tagme", "2") == image.digest

        # Deleting a blob from the content store withdraws it at once.
        layer = str(image.platforms[0].layers[1].digest)
        containerd.ctr("content", "rm", layer)
        await changes.wait(removed=frozenset({layer}))
        assert layer not in await store.keys()
        assert str(image.platforms[0].layers[0].digest) in await store.keys()


async def test_containerd_restart_is_survived(containerd: Containerd,
                                              make_image: ImageFactory) -> None:
    before = make_image("docker.io/library/before:1", seed=11)
    after = make_image("docker.io/library/after:1", seed=12)
    import_image(containerd, before)
    async with _store(containerd.socket, containerd.content_path) as store:
        assert await store.wait_ready(READY_WITHIN)
        changes = Changes(store.subscribe())
        containerd.stop()
        await _wait_ready_state(store, False)
        # The store keeps running and answers misses fast while containerd is away.
        with pytest.raises(ContainerdUnavailableError):
            await store.stat(before.digest)
        with pytest.raises(NotFoundError):
            await store.resolve(before.registry, before.repository, before.tag)
        await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
        assert not await store.ready()

        containerd.start()
        await _wait_ready_state(store, True)
        assert await store.keys() == before.keys()
        assert (await store.stat(before.digest)).size == before.root.size
        # The fresh subscription delivers events again.
        import_image(containerd, after)
        await changes.wait(added=after.keys())


async def test_resync_after_reconnect_reports_difference(make_image: ImageFactory,
                                                         tmp_path: Path,
                                                         containerd_version: str) -> None:
    """The socket path switches to another containerd while the store is disconnected."""
    old = make_image("docker.io/library/old:1", (1000,), seed=1)
    new = make_image("docker.io/library/new:1", (1000,), seed=2)
    link = tmp_path / "ctrd.sock"
    with Containerd(version=containerd_version) as first, \
            Containerd(version=containerd_version) as second:
        import_image(first, old)
        import_image(second, new)
        os.symlink(first.socket, link)
        async with _store(link) as store:
            assert await store.wait_ready(READY_WITHIN)
            assert await store.keys() == old.keys()
            changes = Changes(store.subscribe())
            link.unlink()
            os.symlink(second.socket, link)
            first.stop()
            await changes.wait(added=new.keys(), removed=old.keys(), within=10.0)
            assert await store.keys() == new.keys()
            assert await store.ready()


async def test_unreachable_socket_then_containerd_appears(make_image: ImageFactory,
                                                          containerd_version: str) -> None:
    image = make_image("docker.io/library/late:1")
    late = Containerd(version=containerd_version)
    try:
        late.start()
        import_image(late, image)
        late.stop()
        async with _store(late.socket, late.content_path) as store:
            assert not await store.wait_ready(1.0)
            assert await store.keys() == frozenset()
            with pytest.raises(NotFoundError):
                await store.resolve(image.registry, image.repository, image.tag)
            late.start()
            await _wait_ready_state(store, True)
            await wait_keys(store, image.keys(), exact=True)
    finally:
        late.close()


async def test_close_ends_subscriptions(containerd: Containerd) -> None:
    store = _store(containerd.socket)
    await store.start()
    assert await store.wait_ready(READY_WITHIN)
    events = store.subscribe()
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(events), 2.0)
    assert not await store.ready()


async def test_ctr_pull_from_a_registry(containerd: Containerd, tmp_path: Path) -> None:
    """A real pull of a two-platform index: only what ctr fetched (amd64) is advertised."""
    import subprocess

    from meshmirror.oci.imagebuilder import build_image
    from tests.support.distribution import DistributionRegistry

    with DistributionRegistry() as upstream:
        image = build_image(f"{upstream.address}/team/pulled:3", tmp_path / "served",
                            (20_000, 30_000), seed=31,
                            platforms=("linux/amd64", "linux/arm64"))
        # Blocking is fine here: no store is running on this loop yet.
        push = subprocess.run(  # noqa: ASYNC221
            ["skopeo", "--insecure-policy", "copy", "--all", "--dest-tls-verify=false",
             "--preserve-digests", f"oci:{tmp_path / 'served'}:3",
             f"docker://{upstream.address}/team/pulled:3"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert push.returncode == 0, push.stderr
        amd64 = next(p for p in image.platforms if p.platform == "linux/amd64")
        want = frozenset({image.tag_key, str(image.digest)} | {
            str(b.digest) for b in (amd64.manifest, amd64.config, *amd64.layers)})
        if containerd.version.startswith("2"):
            # containerd 2 also fetches every platform's manifest and config (not its
            # layers) to match the platform; they are held, so they are shared too.
            want |= {str(b.digest) for p in image.platforms for b in (p.manifest, p.config)}
        async with _store(containerd.socket, containerd.content_path) as store:
            assert await store.wait_ready(READY_WITHIN)
            changes = Changes(store.subscribe())
            containerd.ctr("images", "pull", "--plain-http", image.name, timeout=120)
            await changes.wait(added=want)
            await wait_keys(store, want, exact=True)
            assert await store.resolve(upstream.address, "team/pulled", "3") == image.digest

            containerd.ctr("images", "rm", image.name)
            await changes.wait(removed=want)
            assert await store.keys() == frozenset()


async def test_a_resync_that_changes_many_images_lets_the_loop_serve_between_them(
        make_image: ImageFactory, tmp_path: Path, containerd_version: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image a re-sync changes moves the union's arrays; hundreds held the loop
    for seconds in one go. Here the socket moves to a containerd with other images: a
    task that runs whenever the loop gets control must run between any two changes."""
    olds = [make_image(f"docker.io/library/old{n}:1", (100,), seed=100 + n) for n in range(6)]
    new = make_image("docker.io/library/new:1", (100,), seed=99)
    ticks = 0
    seen: list[int] = []
    put = ImageIndex.put

    def counted(index: ImageIndex, name: str, record: ImageRecord | None) -> None:
        seen.append(ticks)
        put(index, name, record)

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    link = tmp_path / "ctrd.sock"
    with Containerd(version=containerd_version) as first, \
            Containerd(version=containerd_version) as second:
        for old in olds:
            import_image(first, old)
        import_image(second, new)
        os.symlink(first.socket, link)
        async with _store(link) as store:
            assert await store.wait_ready(READY_WITHIN)
            monkeypatch.setattr(ImageIndex, "put", counted)
            ticker = asyncio.create_task(tick())
            try:
                link.unlink()
                os.symlink(second.socket, link)
                first.stop()
                await wait_keys(store, new.keys(), within=10.0, exact=True)
            finally:
                ticker.cancel()
    assert len(seen) == len(olds) + 1
    assert len(set(seen)) == len(seen), seen
