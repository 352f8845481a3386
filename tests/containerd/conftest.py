"""Fixtures for the containerd store tests: a private real containerd and a store on it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import pytest

from meshmirror.containerd.store import ContainerdStore
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.store.base import Store
from tests.support.containerd import NAMESPACE, SYSTEM_VERSION, Containerd, versions_or_skip

READY_WITHIN = 10.0


@pytest.fixture
def containerd_version() -> str:
    """The system's containerd; a module on the version matrix overrides this with
    ``matrix_version`` (see ``versions_or_skip``)."""
    return SYSTEM_VERSION


@pytest.fixture(params=versions_or_skip())
def matrix_version(request: pytest.FixtureRequest) -> str:
    """Every containerd version: for the modules whose behaviour depends on containerd
    itself (its events, its content store, its hosts.toml resolver)."""
    version: str = request.param
    return version


@pytest.fixture
def containerd(containerd_version: str) -> Iterator[Containerd]:
    with Containerd(version=containerd_version) as instance:
        yield instance


class ImageOptions(TypedDict, total=False):
    """Keyword options of ``build_image`` that ``make_image`` passes on."""

    seed: int
    platforms: Sequence[str]
    index: bool | None
    docker: bool
    compresslevel: int


class ImageFactory(Protocol):
    def __call__(self, name: str, layer_sizes: Sequence[int] = ...,
                 **options: Unpack[ImageOptions]) -> BuiltImage: ...


@pytest.fixture
def make_image(tmp_path: Path) -> ImageFactory:
    """Build an image archive offline; each call gets its own layout and archive."""
    counter = itertools.count()

    def make(name: str, layer_sizes: Sequence[int] = (1024,),
             **options: Unpack[ImageOptions]) -> BuiltImage:
        n = next(counter)
        return build_image(name, tmp_path / f"layout{n}", layer_sizes,
                           archive=tmp_path / f"image{n}.tar", **options)

    return make


def import_image(ctrd: Containerd, image: BuiltImage, *extra: str) -> None:
    assert image.archive is not None
    ctrd.ctr("images", "import", *extra, str(image.archive))


@pytest.fixture
async def store(containerd: Containerd) -> AsyncIterator[ContainerdStore]:
    s = ContainerdStore(containerd.socket, NAMESPACE, containerd.content_path)
    await s.start()
    try:
        assert await s.wait_ready(READY_WITHIN), "store did not sync with containerd"
        yield s
    finally:
        await s.close()


async def wait_keys(store: Store, want: frozenset[str], within: float = 5.0,
                    exact: bool = False) -> None:
    """Bounded wait until ``want`` is a subset of (``exact``: equal to) the store's keys."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        keys = await store.keys()
        if keys == want or (not exact and want <= keys):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"after {within}s missing {sorted(want - keys)}, "
                                 f"extra {sorted(keys - want) if exact else []}")
        await asyncio.sleep(0.02)
