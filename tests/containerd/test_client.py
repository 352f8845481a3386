"""The gRPC client against a real containerd 1.6: namespaces, errors, ranged reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmirror.containerd.client import ContainerdClient, ContainerdUnavailableError
from meshmirror.store.base import NotFoundError
from tests.containerd.conftest import ImageFactory, import_image
from tests.support.containerd import Containerd

pytestmark = pytest.mark.real


async def test_namespace_metadata_scopes_every_call(containerd: Containerd,
                                                    make_image: ImageFactory) -> None:
    mine = make_image("docker.io/library/mine:1", seed=1)
    theirs = make_image("docker.io/library/theirs:1", seed=2)
    import_image(containerd, mine)
    containerd.ctr("images", "import", str(theirs.archive), namespace="other")
    k8s = ContainerdClient(str(containerd.socket))
    other = ContainerdClient(str(containerd.socket), "other")
    try:
        assert [i.name for i in await k8s.list_images()] == [mine.name]
        assert [i.name for i in await other.list_images()] == [theirs.name]
        assert (await k8s.get_image(mine.name)).target.digest == str(mine.digest)
        with pytest.raises(NotFoundError):
            await k8s.get_image(theirs.name)
        listed = {info.digest for info in await k8s.list_content()}
        # ctr import also stores the archive's own index.json until GC collects it.
        assert mine.digests() <= listed
        assert not theirs.digests() & listed
        with pytest.raises(NotFoundError):
            await k8s.content_info(str(theirs.digest))
        info = await other.content_info(str(theirs.digest))
        assert info.size == theirs.root.size
    finally:
        await k8s.close()
        await other.close()


async def test_read_content_with_offset_and_size(containerd: Containerd,
                                                 make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/readme:1", (3 * 1024 * 1024 + 17,))
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    data = image.blob_path(layer.digest).read_bytes()
    client = ContainerdClient(str(containerd.socket))
    try:
        async def read(offset: int, size: int) -> bytes:
            return b"".join([c async for c in client.read_content(str(layer.digest), offset,
                                                                   size)])

        assert await read(0, 0) == data  # size 0: to the end, as containerd defines it
        assert await read(1024 * 1024 + 5, 10) == data[1024 * 1024 + 5:1024 * 1024 + 15]
        assert await read(len(data) - 3, 0) == data[-3:]
        chunks = [c async for c in client.read_content(str(layer.digest))]
        assert max(len(c) for c in chunks) <= 1024 * 1024
        with pytest.raises(NotFoundError):
            [c async for c in client.read_content("sha256:" + "0" * 64)]
        with pytest.raises(ValueError, match="negative"):
            await read(-1, 0)
    finally:
        await client.close()


async def test_unreachable_socket_is_unavailable(tmp_path: Path) -> None:
    client = ContainerdClient(str(tmp_path / "nothing.sock"), timeout=2.0)
    try:
        with pytest.raises(ContainerdUnavailableError, match="unavailable"):
            await client.list_images()
        with pytest.raises(ContainerdUnavailableError):
            [c async for c in client.read_content("sha256:" + "0" * 64)]
    finally:
        await client.close()


def test_empty_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        ContainerdClient("/run/containerd/containerd.sock", "")
