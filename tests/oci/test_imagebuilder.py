"""The synthesised images must be real: every digest, size and diff_id checks out."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tracemalloc
from pathlib import Path
from typing import TypedDict

import pytest

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    BuiltImage,
    ImageNameError,
    build_image,
    remove_index_entries,
    split_image_name,
)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _check_image_files(image: BuiltImage) -> None:
    for record in image.blobs():
        path = image.blob_path(record.digest)
        assert path.stat().st_size == record.size
        assert _sha(path) == str(record.digest)
    for plat in image.platforms:
        manifest = json.loads(image.blob_path(plat.manifest.digest).read_bytes())
        assert manifest["mediaType"] == plat.manifest.media_type
        assert manifest["config"]["digest"] == str(plat.config.digest)
        assert [layer["digest"] for layer in manifest["layers"]] == [
            str(layer.digest) for layer in plat.layers
        ]
        config = json.loads(image.blob_path(plat.config.digest).read_bytes())
        os_, arch = plat.platform.split("/")[:2]
        assert (config["os"], config["architecture"]) == (os_, arch)
        for layer, diff_id in zip(plat.layers, config["rootfs"]["diff_ids"], strict=True):
            raw = gzip.decompress(image.blob_path(layer.digest).read_bytes())
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                members = tar.getmembers()
            assert len(members) == 1 and members[0].isreg()


def test_single_platform_oci_image(tmp_path: Path) -> None:
    image = build_image("127.0.0.1:5050/library/demo:1", tmp_path / "lay", [0, 1000, 70_000])
    assert image.name == "127.0.0.1:5050/library/demo:1"
    assert (image.registry, image.repository, image.tag) == ("127.0.0.1:5050", "library/demo", "1")
    assert image.index is None and image.root == image.platforms[0].manifest
    assert image.root.media_type == mt.OCI_MANIFEST
    assert image.platforms[0].layers[0].media_type == mt.OCI_LAYER_GZIP
    assert len(image.blobs()) == 5
    assert image.tag_key == "127.0.0.1:5050/library/demo:1"
    assert image.keys() == image.digests() | {image.tag_key}
    _check_image_files(image)
    index = json.loads((tmp_path / "lay" / "index.json").read_bytes())
    (entry,) = index["manifests"]
    assert entry["digest"] == str(image.digest)
    assert entry["annotations"] == {
        ANNOTATION_CONTAINERD_NAME: image.name, ANNOTATION_REF_NAME: "1"
    }
    assert json.loads((tmp_path / "lay" / "oci-layout").read_bytes()) == {
        "imageLayoutVersion": "1.0.0"
    }


def test_multi_platform_docker_image(tmp_path: Path) -> None:
    image = build_image("nginx:1.25", tmp_path, [100, 200], docker=True,
                        platforms=["linux/amd64", "linux/arm64/v8"])
    assert image.name == "docker.io/library/nginx:1.25"
    assert image.index is not None and image.root == image.index
    assert image.root.media_type == mt.DOCKER_MANIFEST_LIST
    assert {p.manifest.media_type for p in image.platforms} == {mt.DOCKER_MANIFEST}
    index = json.loads(image.blob_path(image.digest).read_bytes())
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    # layers differ per platform, so the two manifests do not collapse into one
    assert len(image.blobs()) == 1 + 2 * (1 + 1 + 2)
    _check_image_files(image)


def test_deterministic_from_seed(tmp_path: Path) -> None:
    a = build_image("r.example/x:1", tmp_path / "a", [5000], seed=7)
    b = build_image("r.example/x:1", tmp_path / "b", [5000], seed=7)
    c = build_image("r.example/x:1", tmp_path / "c", [5000], seed=8)
    assert a.digests() == b.digests()
    assert a.digests().isdisjoint(c.digests())


def test_images_merge_into_one_layout_and_replace_by_name(tmp_path: Path) -> None:
    first = build_image("r.example/x:1", tmp_path, [10], seed=1)
    second = build_image("r.example/y:2", tmp_path, [10], seed=2)
    again = build_image("r.example/x:1", tmp_path, [10], seed=3)
    entries = json.loads((tmp_path / "index.json").read_bytes())["manifests"]
    by_name = {e["annotations"][ANNOTATION_CONTAINERD_NAME]: e["digest"] for e in entries}
    assert by_name == {"r.example/x:1": str(again.digest), "r.example/y:2": str(second.digest)}
    assert first.digest != again.digest
    assert remove_index_entries(tmp_path, "r.example/y:2") == 1
    entries = json.loads((tmp_path / "index.json").read_bytes())["manifests"]
    assert [e["digest"] for e in entries] == [str(again.digest)]


def test_archive_holds_only_this_image(tmp_path: Path) -> None:
    build_image("r.example/other:1", tmp_path / "lay", [10], seed=1)
    image = build_image("r.example/x:1", tmp_path / "lay", [10], seed=2,
                        archive=tmp_path / "x.tar")
    assert image.archive == tmp_path / "x.tar"
    with tarfile.open(tmp_path / "x.tar") as tar:  # plain tar: mode "r" autodetects no gzip
        names = tar.getnames()
        index_file = tar.extractfile("index.json")
        assert index_file is not None, "index.json is a regular file"
        index = json.loads(index_file.read())
        for record in image.blobs():
            member = tar.getmember(f"blobs/sha256/{record.digest.hex}")
            assert member.size == record.size
    assert names[:2] == ["oci-layout", "index.json"]
    assert len([n for n in names if n.startswith("blobs/sha256/")]) == len(image.blobs())
    assert [e["digest"] for e in index["manifests"]] == [str(image.digest)]
    assert (tmp_path / "x.tar").read_bytes()[:2] != b"\x1f\x8b"


def test_large_layer_is_streamed_not_buffered(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        image = build_image("r.example/big:1", tmp_path, [size], archive=tmp_path / "big.tar")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    layer = image.platforms[0].layers[0]
    assert layer.size > size
    assert peak < 16 * 1024 * 1024, f"peak Python allocation {peak} bytes for a {size} byte layer"
    assert _sha(image.blob_path(layer.digest)) == str(layer.digest)


@pytest.mark.parametrize("name", ["", "nginx", "nginx@sha256:" + "a" * 64, "r.example/UPPER:1",
                                  "x:bad tag",
                                  "r.example/:1", "r.example/x:"])
def test_bad_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ImageNameError):
        build_image(name, tmp_path)


def test_split_image_name_normalises_like_containerd() -> None:
    assert split_image_name("busybox:1") == ("docker.io", "library/busybox", "1")
    assert split_image_name("index.docker.io/me/app:v") == ("docker.io", "me/app", "v")
    assert split_image_name("localhost/app:v") == ("localhost", "app", "v")


class BuildOptions(TypedDict, total=False):
    """The ``build_image`` arguments the refusal cases below set."""

    layer_sizes: list[int]
    platforms: list[str]
    index: bool


BAD_ARGUMENTS: list[tuple[BuildOptions, str]] = [
    ({"platforms": ["linux"]}, "invalid platform"),
    ({"platforms": []}, "at least one platform"),
    ({"platforms": ["linux/amd64", "linux/amd64"]}, "duplicate platform"),
    ({"platforms": ["linux/amd64", "linux/arm64"], "index": False}, "need an index"),
    ({"layer_sizes": [-1]}, "layer size"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused(kwargs: BuildOptions, message: str,
                                   tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        build_image("r.example/x:1", tmp_path, **kwargs)


@pytest.mark.real
def test_skopeo_accepts_and_copies_the_layout(tmp_path: Path) -> None:
    image = build_image("127.0.0.1:5050/library/demo:1", tmp_path / "lay", [1000, 20_000],
                        platforms=["linux/amd64", "linux/arm64"], seed=4)
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'lay'}:1"],
                         check=True, capture_output=True, timeout=60).stdout
    assert Digest.of(raw) == image.digest
    subprocess.run(["skopeo", "copy", "--all", "--quiet", f"oci:{tmp_path / 'lay'}:1",
                    f"oci:{tmp_path / 'copy'}:1"], check=True, capture_output=True, timeout=60)
    copied = {p.name for p in (tmp_path / "copy" / "blobs" / "sha256").iterdir()}
    assert copied == {d.hex for d in (r.digest for r in image.blobs())}


@pytest.mark.real
def test_ctr_imports_and_unpacks_the_archive(tmp_path: Path) -> None:
    from tests.support.containerd import Containerd

    image = build_image("docker.io/library/built:1", tmp_path / "lay", [1000, 30_000],
                        platforms=["linux/amd64", "linux/arm64"], archive=tmp_path / "img.tar")
    with Containerd() as ctrd:
        ctrd.ctr("images", "import", "--all-platforms", str(image.archive))
        listing = ctrd.ctr("images", "ls").stdout
        assert image.name in listing and str(image.digest) in listing
        content = ctrd.ctr("content", "ls", "-q").stdout.split()
        # ctr also stores the archive's own index.json briefly, until GC collects it
        assert image.digests() <= set(content)
        # unpacking checks every layer's diff_id against the config
        ctrd.ctr("images", "import", "--platform", "linux/amd64", str(image.archive))
        check = ctrd.ctr("images", "check").stdout
        assert "complete" in check
        snapshots = ctrd.ctr("snapshots", "ls").stdout.strip().splitlines()[1:]
        assert len(snapshots) == 2, snapshots  # one per layer: the diff_ids matched
