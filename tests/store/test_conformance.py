"""The shared Store conformance suite, run against the in-memory and OCI-layout stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, remove_index_entries
from meshmirror.store.memory import MemoryStore
from meshmirror.store.ocilayout import OciLayoutStore, import_archive
from tests.conformance.store_suite import StoreConformance, StoreHarness, build_known_image


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[StoreHarness]:
        image = build_known_image(tmp_path / "known")
        store = MemoryStore()
        store.add_image(image)

        async def add(built: BuiltImage) -> None:
            store.add_image(built)

        async def remove(built: BuiltImage) -> None:
            store.remove_image(built.registry, built.repository, built.tag)

        try:
            yield StoreHarness(store, image, add, remove, tmp_path / "extra")
        finally:
            await store.close()


class TestOciLayoutStore(StoreConformance):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[StoreHarness]:
        image = build_known_image(tmp_path / "known")
        root = tmp_path / "store"
        assert image.archive is not None
        import_archive(root, image.archive)
        store = OciLayoutStore(root, poll_interval=0.05)

        async def add(built: BuiltImage) -> None:
            assert built.archive is not None
            await asyncio.to_thread(store.import_archive, built.archive)

        async def remove(built: BuiltImage) -> None:
            await asyncio.to_thread(remove_index_entries, root, built.name)

        try:
            yield StoreHarness(store, image, add, remove, tmp_path / "extra")
        finally:
            await store.close()
