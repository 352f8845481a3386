"""ContainerdStore against a real containerd 1.6: keys, resolve, stat, reads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from meshmirror.containerd.store import ContainerdStore, image_tag_key
from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import BuiltImage, canonical_json, write_archive, write_blob
from meshmirror.store.base import NotFoundError
from tests.containerd.conftest import READY_WITHIN, ImageFactory, import_image, wait_keys
from tests.support.containerd import NAMESPACE, Containerd

pytestmark = pytest.mark.real


@pytest.fixture
def containerd_version(matrix_version: str) -> str:
    """This module runs on every containerd version (see conftest)."""
    return matrix_version


async def _read(store: ContainerdStore, digest: Digest, offset: int = 0,
                length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest, offset, length)])


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("docker.io/library/nginx:1.25", "docker.io/library/nginx:1.25"),
        ("127.0.0.1:5050/team/app:v1", "127.0.0.1:5050/team/app:v1"),
        ("docker.io/library/nginx@sha256:" + "a" * 64, None),
        ("docker.io/library/nginx:1.25@sha256:" + "a" * 64, None),
        ("127.0.0.1:5050/team/app", None),
        ("sha256:" + "b" * 64, None),
        ("nginx:1", None),
        ("docker.io/library/nginx:", None),
    ],
)
def test_image_tag_key(name: str, key: str | None) -> None:
    assert image_tag_key(name) == key


async def test_keys_cover_image_and_tag(containerd: Containerd, store: ContainerdStore,
                                        make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/alpha:1", (2048, 4096))
    import_image(containerd, image)
    assert await store.wait_ready(READY_WITHIN)
    await wait_keys(store, image.keys())
    assert await store.keys() == image.keys()


async def test_only_present_platform_is_advertised(containerd: Containerd,
                                                   store: ContainerdStore,
                                                   make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/multi:1", (1000,),
                       platforms=("linux/amd64", "linux/arm64"))
    # Without --all-platforms ctr imports only the host's platform (amd64 here).
    import_image(containerd, image)
    amd64 = next(p for p in image.platforms if p.platform == "linux/amd64")
    arm64 = next(p for p in image.platforms if p.platform == "linux/arm64")
    want = {str(image.digest), image.tag_key} | {
        str(b.digest) for b in (amd64.manifest, amd64.config, *amd64.layers)}
    if containerd.version.startswith("2"):
        # containerd 2 keeps every platform's manifest (not its config or layers).
        want.add(str(arm64.manifest.digest))
    # ctr writes every blob of the archive; containerd's GC then drops arm64's
    # silently, which the store notices on its settle re-check.
    await wait_keys(store, frozenset(want), exact=True)
    keys = await store.keys()
    assert str(arm64.config.digest) not in keys
    assert str(arm64.layers[0].digest) not in keys


async def test_all_platforms_when_imported(containerd: Containerd, store: ContainerdStore,
                                           make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/multi:2", (1000,), docker=True,
                       platforms=("linux/amd64", "linux/arm64"))
    import_image(containerd, image, "--all-platforms")
    await wait_keys(store, image.keys())
    assert await store.keys() == image.keys()
    assert (await store.stat(image.digest)).media_type == mt.DOCKER_MANIFEST_LIST


async def test_digest_only_name_has_no_tag_key(containerd: Containerd,
                                               make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/pinned:1")
    import_image(containerd, image)
    pinned = f"docker.io/library/pinned@{image.digest}"
    containerd.ctr("images", "tag", image.name, pinned)
    containerd.ctr("images", "rm", image.name)
    async with ContainerdStore(containerd.socket, NAMESPACE, containerd.content_path) as store:
        assert await store.wait_ready(READY_WITHIN)
        assert await store.keys() == image.digests()
        with pytest.raises(NotFoundError):
            await store.resolve(image.registry, image.repository, image.tag)


async def test_resolve_and_stat(containerd: Containerd, store: ContainerdStore,
                                make_image: ImageFactory) -> None:
    image = make_image("127.0.0.1:5050/team/app:v1", (3000,))
    import_image(containerd, image)
    assert await store.resolve("127.0.0.1:5050", "team/app", "v1") == image.digest
    with pytest.raises(NotFoundError):
        await store.resolve("127.0.0.1:5050", "team/app", "v2")
    with pytest.raises(NotFoundError):
        await store.resolve("127.0.0.1:5050", "team/app", "bad tag!")
    await wait_keys(store, image.keys())
    for blob in image.blobs():
        info = await store.stat(blob.digest)
        assert (info.digest, info.size, info.media_type) == (blob.digest, blob.size,
                                                             blob.media_type)
    with pytest.raises(NotFoundError):
        await store.stat(Digest.of(b"never stored"))


async def test_read_ranges_direct_and_grpc_agree(containerd: Containerd,
                                                 make_image: ImageFactory) -> None:
    # 2.5 MiB layer: more than two 1 MiB chunks, so chunk boundaries are crossed.
    image = make_image("docker.io/library/big:1", (5 * 512 * 1024,))
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    expected = image.blob_path(layer.digest).read_bytes()
    missing_dir = containerd.dir / "no-such-content-dir"
    direct = ContainerdStore(containerd.socket, NAMESPACE, containerd.content_path)
    viagrpc = ContainerdStore(containerd.socket, NAMESPACE, missing_dir)
    async with direct, viagrpc:
        assert await direct.wait_ready(READY_WITHIN)
        assert await viagrpc.wait_ready(READY_WITHIN)
        for offset, length in [(0, None), (1, None), (1024 * 1024 - 3, 1024 * 1024 + 7),
                               (layer.size - 5, None), (layer.size - 5, 5), (10, 0),
                               (layer.size, None)]:
            want = expected[offset:] if length is None else expected[offset:offset + length]
            got_direct = await _read(direct, layer.digest, offset, length)
            got_grpc = await _read(viagrpc, layer.digest, offset, length)
            assert got_direct == want, (offset, length)
            assert got_grpc == want, (offset, length)
        whole = await _read(viagrpc, layer.digest)
        assert hashlib.sha256(whole).hexdigest() == layer.digest.hex


async def test_read_uses_grpc_when_file_unreadable(containerd: Containerd,
                                                   make_image: ImageFactory,
                                                   tmp_path: Path) -> None:
    """A content path pointing at a copy we corrupt proves which path served the bytes."""
    image = make_image("docker.io/library/which:1", (4096,))
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    fake = tmp_path / "fake-content"
    (fake / "blobs" / "sha256").mkdir(parents=True)
    (fake / "blobs" / "sha256" / layer.digest.hex).write_bytes(b"X" * layer.size)
    async with ContainerdStore(containerd.socket, NAMESPACE, fake) as s:
        assert await s.wait_ready(READY_WITHIN)
        # Direct path is taken when the file is readable...
        assert await _read(s, layer.digest) == b"X" * layer.size
        # ...and gRPC Read when it is not.
        (fake / "blobs" / "sha256" / layer.digest.hex).unlink()
        assert await _read(s, layer.digest) == image.blob_path(layer.digest).read_bytes()


async def test_read_rejects_bad_ranges_and_absent(store: ContainerdStore, containerd: Containerd,
                                                  make_image: ImageFactory) -> None:
    image = make_image("docker.io/library/r:1")
    import_image(containerd, image)
    layer = image.platforms[0].layers[0]
    with pytest.raises(ValueError, match="negative"):
        await _read(store, layer.digest, -1)
    with pytest.raises(ValueError, match="negative"):
        await _read(store, layer.digest, 0, -5)
    with pytest.raises(ValueError, match="outside"):
        await _read(store, layer.digest, layer.size + 1)
    with pytest.raises(ValueError, match="outside"):
        await _read(store, layer.digest, layer.size - 5, 6)
    with pytest.raises(NotFoundError):
        await _read(store, Digest.of(b"absent"))


async def test_other_namespace_is_invisible(containerd: Containerd, store: ContainerdStore,
                                            make_image: ImageFactory) -> None:
    """Blob files are shared across namespaces on disk; reads must still be namespaced."""
    image = make_image("docker.io/library/private:1")
    containerd.ctr("images", "import", str(image.archive), namespace="other")
    layer = image.platforms[0].layers[0]
    assert (containerd.content_path / "blobs" / "sha256" / layer.digest.hex).exists()
    with pytest.raises(NotFoundError):
        await store.stat(layer.digest)
    with pytest.raises(NotFoundError):
        await _read(store, layer.digest)
    with pytest.raises(NotFoundError):
        await store.resolve(image.registry, image.repository, image.tag)
    assert await store.keys() == frozenset()


def _layer_twice(image: BuiltImage, archive: Path) -> BuiltImage:
    """``image`` with its one layer listed twice, as builders that write identical empty
    layers make them."""
    plat = image.platforms[0]
    config_doc = json.loads(image.blob_path(plat.config.digest).read_bytes())
    config_doc["rootfs"]["diff_ids"] *= 2
    config_doc["history"] *= 2
    config = write_blob(image.layout, canonical_json(config_doc), plat.config.media_type)
    manifest = write_blob(image.layout, canonical_json({
        "schemaVersion": 2, "mediaType": plat.manifest.media_type,
        "config": config.descriptor(), "layers": [plat.layers[0].descriptor()] * 2,
    }), plat.manifest.media_type)
    twice = dataclasses.replace(image, root=manifest, platforms=(
        dataclasses.replace(plat, manifest=manifest, config=config),))
    write_archive(twice, archive)
    return dataclasses.replace(twice, archive=archive)


async def test_a_layer_listed_twice_leaves_with_its_image(containerd: Containerd,
                                                         make_image: ImageFactory,
                                                         tmp_path: Path) -> None:
    """Synced at start (the union's first build), then deleted: nothing stays advertised."""
    image = _layer_twice(make_image("docker.io/library/twice:1", (1000,), seed=41),
                         tmp_path / "twice.tar")
    import_image(containerd, image)
    async with ContainerdStore(containerd.socket, NAMESPACE, containerd.content_path,
                               resync_interval=3600.0) as store:
        assert await store.wait_ready(READY_WITHIN)
        assert await store.keys() == image.keys()
        containerd.ctr("images", "rm", image.name)
        await wait_keys(store, frozenset(), exact=True)


async def test_an_image_naming_a_manifest_with_a_wrong_type_hides_no_other_image(
        containerd: Containerd, make_image: ImageFactory, tmp_path: Path) -> None:
    """An index that names another image's OCI manifest with the Docker type (containerd
    imports it) cannot be walked there; walked first (its name sorts first), it left
    that manifest cached with no children, and the other image's config and layers
    unadvertised for as long as it was held."""
    victim = make_image("docker.io/library/victim:1", (1000, 2000), seed=51)
    manifest = victim.platforms[0].manifest
    index = write_blob(victim.layout, canonical_json({
        "schemaVersion": 2, "mediaType": mt.OCI_INDEX,
        "manifests": [dataclasses.replace(manifest, media_type=mt.DOCKER_MANIFEST).descriptor(
            platform={"os": "linux", "architecture": "amd64"})],
    }), mt.OCI_INDEX)
    other = dataclasses.replace(victim, name="docker.io/library/a-other:1",
                                repository="library/a-other", root=index, index=index)
    write_archive(other, tmp_path / "other.tar")
    import_image(containerd, victim)
    containerd.ctr("images", "import", "--no-unpack", str(tmp_path / "other.tar"))
    async with ContainerdStore(containerd.socket, NAMESPACE, containerd.content_path,
                               resync_interval=3600.0) as store:
        assert await store.wait_ready(READY_WITHIN)
        assert await store.keys() == victim.keys() | {str(index.digest), other.tag_key}
