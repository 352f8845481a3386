"""Manifest parsing: shapes, media types, and hostile input ending in ManifestError only."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest
from meshmirror.oci.imagebuilder import build_image
from meshmirror.oci.manifest import (
    MAX_MANIFEST_SIZE,
    ManifestError,
    Platform,
    parse_descriptor,
    parse_manifest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _desc(digest: str = D1, media_type: str = mt.OCI_LAYER_GZIP, size: int = 3,
          **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _manifest(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                           "config": _desc(D1, mt.OCI_CONFIG), "layers": [_desc(D2)]}
    doc.update(overrides)
    return doc


def _bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_media_type_helpers() -> None:
    assert mt.is_manifest(mt.OCI_MANIFEST) and mt.is_manifest(mt.DOCKER_MANIFEST)
    assert mt.is_index(mt.OCI_INDEX) and mt.is_index(mt.DOCKER_MANIFEST_LIST)
    assert mt.is_manifest(mt.OCI_MANIFEST.upper() + "; charset=utf-8")
    assert not mt.is_manifest(mt.OCI_INDEX) and not mt.is_index(mt.OCI_MANIFEST)
    assert not mt.is_manifest(None) and not mt.is_index(None)
    assert not mt.is_manifest_like(mt.OCI_LAYER_GZIP)
    assert mt.CONTAINERD_ACCEPT.split(", ") == [
        mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST, mt.OCI_MANIFEST, mt.OCI_INDEX, "*/*"]


def test_manifest_children_are_config_then_layers() -> None:
    m = parse_manifest(_bytes(_manifest()))
    assert m.media_type == mt.OCI_MANIFEST and not m.is_index
    assert [str(d.digest) for d in m.children()] == [D1, D2]
    assert m.config is not None and m.config.media_type == mt.OCI_CONFIG


def test_index_children_and_platforms() -> None:
    doc = {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": [
        _desc(D1, mt.DOCKER_MANIFEST, platform={"os": "linux", "architecture": "arm64",
                                                "variant": "v8"},
              annotations={"a": "b"})]}
    m = parse_manifest(_bytes(doc))
    assert m.is_index
    (child,) = m.children()
    assert child.platform == Platform("linux", "arm64", "v8")
    assert str(child.platform) == "linux/arm64/v8"
    assert child.annotations == {"a": "b"}


def test_shape_detection_without_media_type() -> None:
    no_type = _manifest()
    del no_type["mediaType"]
    assert parse_manifest(_bytes(no_type)).media_type == mt.OCI_MANIFEST
    assert parse_manifest(_bytes({"schemaVersion": 2, "manifests": []})).media_type == mt.OCI_INDEX
    # a claimed type fills in for a missing field
    assert parse_manifest(_bytes(no_type), mt.DOCKER_MANIFEST).media_type == mt.DOCKER_MANIFEST


def test_built_images_parse(tmp_path: Path) -> None:
    image = build_image("r.example/x:1", tmp_path, [10, 20], platforms=["linux/amd64",
                                                                         "linux/arm64"])
    index = parse_manifest(image.blob_path(image.digest).read_bytes(), image.root.media_type)
    assert [c.digest for c in index.children()] == [p.manifest.digest for p in image.platforms]
    for plat in image.platforms:
        m = parse_manifest(image.blob_path(plat.manifest.digest).read_bytes())
        assert [c.digest for c in m.children()] == [plat.config.digest,
                                                   *(layer.digest for layer in plat.layers)]


@pytest.mark.parametrize(
    ("data", "media_type", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply|not valid JSON|JSON object"),
        (b" " * (MAX_MANIFEST_SIZE + 1), None, "byte limit"),
        (_bytes(_manifest(schemaVersion=1)), None, "schema1"),
        (_bytes(_manifest(schemaVersion=True)), None, "schemaVersion"),
        (_bytes(_manifest(schemaVersion="2")), None, "schemaVersion"),
        (_bytes(_manifest(mediaType="text/plain")), None, "unsupported manifest media type"),
        (_bytes(_manifest(mediaType=7)), None, "mediaType must be a string"),
        (_bytes({"schemaVersion": 2}), None, "cannot tell"),
        (_bytes(_manifest()), mt.OCI_INDEX, "served as"),
        (_bytes(_manifest()), mt.OCI_LAYER_GZIP, "not a manifest media type"),
        (_bytes(_manifest(layers={})), None, "layers must be a list"),
        (_bytes(_manifest(config=None)), None, "config: must be an object"),
        (_bytes(_manifest(layers=[_desc(digest="md5:00")])), None, r"layers\[0\]: invalid digest"),
        (_bytes(_manifest(layers=[{**_desc(), "digest": 5}])), None, "digest must be a string"),
        (_bytes(_manifest(layers=[_desc(size=-1)])), None, "size"),
        (_bytes(_manifest(layers=[_desc(size=True)])), None, "size"),
        (_bytes(_manifest(layers=[_desc(media_type="")])), None, "mediaType"),
        (_bytes(_manifest(layers=[_desc(annotations={"a": 1})])), None, "annotations"),
        (_bytes(_manifest(annotations=[])), None, "annotations"),
        (_bytes(_manifest(layers=[_desc(platform={"os": "linux"})])), None, "platform"),
        (_bytes(_manifest(layers=[_desc(platform="linux")])), None, "platform"),
        (_bytes({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": {}}), None,
         "manifests must be a list"),
    ],
)
def test_bad_manifests_get_a_clear_error(data: bytes, media_type: str | None,
                                          message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(data, media_type)


def test_descriptor_round_trip() -> None:
    d = parse_descriptor(_desc(D2, size=0))
    assert (d.digest, d.size, d.annotations, d.platform) == (Digest.parse(D2), 0, {}, None)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests",
                         "annotations", "digest", "size", "platform", "os", "architecture"])
_values = st.one_of(_json, st.sampled_from([2, 1, mt.OCI_MANIFEST, mt.OCI_INDEX, D1, D2,
                                            mt.DOCKER_MANIFEST_LIST]))
_near_manifest = st.recursive(
    st.dictionaries(_keys, _values, max_size=6),
    lambda inner: st.dictionaries(_keys, st.one_of(_values, inner, st.lists(inner, max_size=3)),
                                  max_size=6),
    max_leaves=15,
)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


@given(_near_manifest, st.none() | st.sampled_from([mt.OCI_MANIFEST, mt.OCI_INDEX, "x/y"]))
def test_manifest_shaped_json_only_raises_manifest_error(doc: dict[str, Any],
                                                         claimed: str | None) -> None:
    try:
        m = parse_manifest(_bytes(doc), claimed)
    except ManifestError:
        return
    assert all(isinstance(c.digest, Digest) for c in m.children())
