"""OCI-layout store specifics: naming rules, robustness, and safe archive import."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from meshmirror.cli import main
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    BuiltImage,
    blob_path,
    build_image,
)
from meshmirror.store.base import NotFoundError
from meshmirror.store.ocilayout import (
    ArchiveError,
    OciLayoutStore,
    entry_reference,
    import_archive,
)


def _image(tmp_path: Path, name: str = "r.example/app:1", seed: int = 1) -> BuiltImage:
    return build_image(name, tmp_path / f"src-{seed}", [100, 2000], seed=seed,
                       archive=tmp_path / f"img-{seed}.tar")


def _set_annotations(layout: Path, annotations: dict[str, str]) -> None:
    index = json.loads((layout / "index.json").read_bytes())
    for entry in index["manifests"]:
        entry["annotations"] = annotations
    (layout / "index.json").write_text(json.dumps(index))


# ------------------------------------------------------------------ naming


@pytest.mark.parametrize(
    ("annotations", "base_name", "want"),
    [
        ({ANNOTATION_CONTAINERD_NAME: "r.example/a:1", ANNOTATION_REF_NAME: "x"}, None,
         "r.example/a:1"),
        ({ANNOTATION_REF_NAME: "nginx:1.25"}, None, "docker.io/library/nginx:1.25"),
        ({ANNOTATION_REF_NAME: "r.example/b/c:2"}, None, "r.example/b/c:2"),
        ({ANNOTATION_REF_NAME: "3"}, "r.example/base", "r.example/base:3"),
        ({ANNOTATION_REF_NAME: "3"}, None, None),
        ({ANNOTATION_REF_NAME: "r.example/no-tag"}, None, None),
        ({ANNOTATION_CONTAINERD_NAME: "Not A Ref"}, None, None),
        ({}, "r.example/base", None),
    ],
)
def test_entry_reference_rule(annotations: dict[str, str], base_name: str | None,
                              want: str | None) -> None:
    ref = entry_reference(annotations, base_name)
    assert (None if ref is None else str(ref)) == want


async def test_bare_ref_name_needs_base_name(tmp_path: Path) -> None:
    image = build_image("r.example/app:7", tmp_path, [10])
    _set_annotations(tmp_path, {ANNOTATION_REF_NAME: "7"})
    plain = OciLayoutStore(tmp_path)
    based = OciLayoutStore(tmp_path, base_name="localhost/demo")
    with pytest.raises(NotFoundError):
        await plain.resolve("r.example", "app", "7")
    assert await plain.keys() == image.digests()  # content still served by digest
    assert await based.resolve("localhost", "demo", "7") == image.digest
    assert "localhost/demo:7" in await based.keys()


def test_constructor_and_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        OciLayoutStore(tmp_path / "missing")
    with pytest.raises(ValueError, match="want oci:DIR"):
        OciLayoutStore.from_spec("containerd")
    with pytest.raises(ValueError):
        OciLayoutStore(tmp_path, base_name="Bad Name")
    assert OciLayoutStore.from_spec(f"oci:{tmp_path}").root == tmp_path


# ------------------------------------------------------------ robustness


async def test_empty_directory_is_an_empty_store(tmp_path: Path) -> None:
    store = OciLayoutStore(tmp_path)
    assert await store.keys() == frozenset()
    assert await store.ready()
    with pytest.raises(NotFoundError):
        await store.stat(Digest.parse("sha256:" + "1" * 64))


async def test_missing_and_partial_blobs_are_not_advertised(tmp_path: Path) -> None:
    image = build_image("r.example/app:1", tmp_path, [100, 2000])
    layers = image.platforms[0].layers
    blob_path(tmp_path, layers[0].digest).unlink()
    with blob_path(tmp_path, layers[1].digest).open("r+b") as f:
        f.truncate(layers[1].size - 1)
    store = OciLayoutStore(tmp_path)
    keys = await store.keys()
    assert str(layers[0].digest) not in keys and str(layers[1].digest) not in keys
    assert {str(image.digest), str(image.platforms[0].config.digest), image.tag_key} <= keys
    with pytest.raises(NotFoundError):
        await store.stat(layers[1].digest)


async def test_corrupt_index_json_keeps_the_previous_view(tmp_path: Path) -> None:
    image = build_image("r.example/app:1", tmp_path, [10])
    store = OciLayoutStore(tmp_path)
    assert await store.keys() == image.keys()
    (tmp_path / "index.json").write_text("{half written")
    assert await store.keys() == image.keys()
    assert await store.resolve("r.example", "app", "1") == image.digest


async def test_manifest_whose_bytes_do_not_match_its_digest_is_skipped(tmp_path: Path) -> None:
    image = build_image("r.example/app:1", tmp_path, [10])
    path = blob_path(tmp_path, image.digest)
    text = path.read_bytes()
    path.write_bytes(text.replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    store = OciLayoutStore(tmp_path)
    assert await store.keys() == frozenset()  # root unusable, so its tag is not offered


async def test_blob_deleted_under_a_reader_is_not_found(tmp_path: Path) -> None:
    image = build_image("r.example/app:1", tmp_path, [10])
    store = OciLayoutStore(tmp_path)
    layer = image.platforms[0].layers[0].digest
    await store.stat(layer)
    blob_path(tmp_path, layer).unlink()
    with pytest.raises(NotFoundError):
        _ = [c async for c in store.read(layer)]


async def test_subscribe_sees_a_layout_written_by_another_process(tmp_path: Path) -> None:
    build_image("r.example/app:1", tmp_path, [10], seed=1)
    store = OciLayoutStore(tmp_path, poll_interval=0.05)
    events = store.subscribe()
    try:
        other = await asyncio.to_thread(build_image, "r.example/other:1", tmp_path, [10], seed=2)
        event = await asyncio.wait_for(anext(events), 5)
        assert event.added == other.keys() and not event.removed
    finally:
        await store.close()


# ---------------------------------------------------------------- import


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _valid_members(image: BuiltImage) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    assert image.archive is not None
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(image.archive) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            out.append((m, f.read() if f is not None else None))
    return out


def test_import_adds_images_and_merges_index(tmp_path: Path) -> None:
    one, two = _image(tmp_path, "r.example/a:1", 1), _image(tmp_path, "r.example/b:1", 2)
    root = tmp_path / "store"
    assert one.archive is not None and two.archive is not None
    import_archive(root, one.archive)
    added = import_archive(root, two.archive)
    assert [d.digest for d in added] == [two.digest]
    import_archive(root, two.archive)  # idempotent
    names = [e["annotations"][ANNOTATION_CONTAINERD_NAME]
             for e in json.loads((root / "index.json").read_bytes())["manifests"]]
    assert names == ["r.example/a:1", "r.example/b:1"]
    for image in (one, two):
        for record in image.blobs():
            assert blob_path(root, record.digest).read_bytes() == \
                image.blob_path(record.digest).read_bytes()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("traversal", "unsafe member name"),
        ("absolute", "unsafe member name"),
        ("symlink", "not a regular file"),
        ("hardlink", "not a regular file"),
        ("fifo", "not a regular file"),
        ("device", "not a regular file"),
        ("unknown", "unexpected member"),
        ("bad_digest_name", "invalid digest"),
        ("tampered", "does not match its content"),
        ("missing_blob", "archive lacks blob"),
        ("missing_index", "index.json missing"),
        ("bad_index", "index.json"),
        ("bad_layout_version", "imageLayoutVersion"),
        ("dir_as_blob", "not a regular file"),
    ],
)
def test_import_rejects_malicious_or_broken_archives(tmp_path: Path, mutate: str,
                                                      message: str) -> None:
    image = _image(tmp_path)
    members = _valid_members(image)
    layer = image.platforms[0].layers[-1].digest
    layer_name = f"blobs/sha256/{layer.hex}"
    extra: tuple[tarfile.TarInfo, bytes | None] | None = None
    if mutate == "traversal":
        extra = (_file("blobs/../../evil"), b"x")
    elif mutate == "absolute":
        extra = (_file("/tmp/evil"), b"x")
    elif mutate in ("symlink", "hardlink"):
        info = _file(f"blobs/sha256/{'e' * 64}")
        info.type = tarfile.SYMTYPE if mutate == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        extra = (info, None)
    elif mutate in ("fifo", "device"):
        info = _file("index.json")
        info.type = tarfile.FIFOTYPE if mutate == "fifo" else tarfile.CHRTYPE
        members = [(info, None), *members]
    elif mutate == "unknown":
        extra = (_file("etc/passwd"), b"x")
    elif mutate == "bad_digest_name":
        extra = (_file("blobs/md5/abc"), b"x")
    elif mutate == "tampered":
        members = [(m, (b"X" + d[1:]) if m.name == layer_name and d else d) for m, d in members]
    elif mutate == "missing_blob":
        members = [(m, d) for m, d in members if m.name != layer_name]
    elif mutate == "missing_index":
        members = [(m, d) for m, d in members if m.name != "index.json"]
    elif mutate == "bad_index":
        members = [(m, b"[1,2" if m.name == "index.json" else d) for m, d in members]
    elif mutate == "bad_layout_version":
        members = [(m, b'{"imageLayoutVersion":"9"}' if m.name == "oci-layout" else d)
                   for m, d in members]
    elif mutate == "dir_as_blob":
        info = _file(f"blobs/sha256/{'d' * 64}")
        info.type = tarfile.DIRTYPE
        extra = (info, None)
    if extra is not None:
        members = [*members, extra]
    archive = _tar(tmp_path / "bad.tar", members)
    root = tmp_path / "store"
    with pytest.raises(ArchiveError, match=message):
        import_archive(root, archive)
    assert json.loads((root / "index.json").read_bytes())["manifests"] == []
    assert not (tmp_path / "evil").exists()
    leftovers = [p.name for p in (root / "blobs" / "sha256").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_import_refuses_gzip_archives(tmp_path: Path) -> None:
    image = _image(tmp_path)
    assert image.archive is not None
    gz = tmp_path / "img.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(image.archive, arcname="whatever")
    with pytest.raises(ArchiveError, match="not a plain tar"):
        import_archive(tmp_path / "store", gz)


def test_import_command_exit_codes_and_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path)
    root = tmp_path / "store"
    assert main(["import", str(image.archive), "--store", f"oci:{root}"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"imported {image.name} {image.digest}"
    bad = _tar(tmp_path / "bad.tar", [(_file("../x"), b"x")])
    assert main(["import", str(bad), "--store", f"oci:{root}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unsafe member name" in err
    assert main(["import", str(tmp_path / "nope.tar"), "--store", f"oci:{root}"]) == 1
    assert "No such file" in capsys.readouterr().err
    assert main(["import", str(image.archive), "--store", "containerd"]) == 2
    assert "want oci:DIR" in capsys.readouterr().err


@pytest.mark.real
async def test_serves_a_layout_skopeo_wrote(tmp_path: Path) -> None:
    image = _image(tmp_path)
    dest = tmp_path / "skopeo"
    argv = ["skopeo", "copy", "--quiet", f"oci:{image.layout}:1", f"oci:{dest}:latest"]
    await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True, timeout=60)
    store = OciLayoutStore(dest, base_name="localhost/copied")
    assert await store.resolve("localhost", "copied", "latest") == image.digest
    assert await store.keys() == image.digests() | {"localhost/copied:latest"}


def test_concurrent_imports_keep_every_entry(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = [_image(tmp_path, f"r.example/c{i}:1", seed=10 + i) for i in range(6)]
    root = tmp_path / "store"
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda im: import_archive(root, im.archive), images))
    names = {e["annotations"][ANNOTATION_CONTAINERD_NAME]
             for e in json.loads((root / "index.json").read_bytes())["manifests"]}
    assert names == {im.name for im in images}


async def test_the_key_set_holds_each_digest_only_in_its_canonical_text(tmp_path: Path) -> None:
    """The store keeps raw digests and makes key text on demand: a key is exactly
    what Digest.parse accepts and prints, nothing fromhex would also read."""
    image = build_image("r.example/app:1", tmp_path, [100, 2000])
    other = build_image("r.example/app:2", tmp_path / "other", [30])
    store = OciLayoutStore(tmp_path)
    keys = await store.keys()
    assert set(keys) == image.keys() and len(keys) == len(image.keys())
    text = str(image.digest)
    assert text in keys and image.tag_key in keys
    for variant in (text.upper(), "SHA256:" + image.digest.hex, f"{text[:9]} {text[9:]}",
                    "sha512:" + image.digest.hex, text[:-2], "sha256:", 7, image.digest):
        assert variant not in keys
    assert str(other.digest) not in keys
    assert keys - frozenset() == image.keys() and frozenset() == keys - keys
