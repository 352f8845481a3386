"""The shared Store conformance suite against ContainerdStore on a real containerd 1.6."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshmirror.containerd.store import ContainerdStore
from meshmirror.oci.imagebuilder import BuiltImage
from tests.conformance.store_suite import StoreConformance, StoreHarness, build_known_image
from tests.containerd.conftest import READY_WITHIN
from tests.support.containerd import NAMESPACE, Containerd

pytestmark = pytest.mark.real


async def _harness(tmp_path: Path, direct_reads: bool) -> AsyncIterator[StoreHarness]:
    image = build_known_image(tmp_path / "known")
    with Containerd() as containerd:

        async def add(built: BuiltImage) -> None:
            assert built.archive is not None
            containerd.ctr("images", "import", "--all-platforms", str(built.archive))

        async def remove(built: BuiltImage) -> None:
            # --sync waits for containerd's GC, so blobs only this image held are gone.
            containerd.ctr("images", "rm", "--sync", built.name)

        await add(image)
        content = containerd.content_path if direct_reads else tmp_path / "no-content-dir"
        store = ContainerdStore(containerd.socket, NAMESPACE, content)
        await store.start()
        try:
            assert await store.wait_ready(READY_WITHIN)
            yield StoreHarness(store, image, add, remove, tmp_path / "extra")
        finally:
            await store.close()


class TestContainerdStore(StoreConformance):
    """Blob bytes read straight from containerd's content directory."""

    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[StoreHarness]:
        async for h in _harness(tmp_path, direct_reads=True):
            yield h


class TestContainerdStoreOverGrpcRead(StoreConformance):
    """The content directory is unreadable, so every byte comes over gRPC Read."""

    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[StoreHarness]:
        async for h in _harness(tmp_path, direct_reads=False):
            yield h
