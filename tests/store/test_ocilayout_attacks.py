"""OCI layout stores from #18's review: an index.json that cannot be used draws one
clear warning per version of the file, not one (and a re-parse) per lookup; and what
the store keeps of manifests follows what index.json reaches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.imagebuilder import BuiltImage, build_image, remove_index_entries
from meshmirror.store.base import NotFoundError
from meshmirror.store.ocilayout import OciLayoutStore


@pytest.mark.parametrize("first_load", [True, False])
async def test_an_unusable_index_json_is_warned_about_once_until_it_changes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, first_load: bool) -> None:
    image = build_image("r.example/app:1", tmp_path, [10, 20])
    good = (tmp_path / "index.json").read_bytes()
    index = json.loads(good)
    index["manifests"].append({**index["manifests"][0], "digest": "sha384:" + "a" * 96})
    store = OciLayoutStore(tmp_path)
    if not first_load:
        assert await store.keys() == image.keys()
    (tmp_path / "index.json").write_text(json.dumps(index))
    want = set() if first_load else image.keys()
    with caplog.at_level(logging.WARNING, logger="meshmirror.store.ocilayout"):
        for _ in range(20):
            assert await store.keys() == want
            if first_load:
                with pytest.raises(NotFoundError):
                    await store.stat(image.digest)
            else:
                assert (await store.stat(image.digest)).size > 0
    warnings = [r for r in caplog.records if "cannot use index.json" in r.getMessage()]
    assert len(warnings) == 1
    assert "sha384" in warnings[0].getMessage()
    (tmp_path / "index.json").write_bytes(good + b"\n")  # fixed: read again at once
    assert await store.keys() == image.keys()


async def test_manifests_no_longer_reached_leave_the_manifest_cache(tmp_path: Path) -> None:
    # Images coming and going: the store kept every manifest it ever walked (the cache of
    # their children is how a reload skips re-reading them), so a long-lived node over a
    # layout that churns grew by every manifest it ever held.
    store = OciLayoutStore(tmp_path)

    def manifests(image: BuiltImage) -> set[bytes]:
        return {bytes.fromhex(r.digest.hex) for r in image.blobs()
                if mt.is_manifest_like(r.media_type)}

    held: set[bytes] = set()
    for n in range(5):
        image = build_image(f"r.example/app:{n}", tmp_path, [10], seed=n,
                            platforms=("linux/amd64", "linux/arm64"))
        if n:
            remove_index_entries(tmp_path, f"r.example/app:{n - 1}")
        assert await store.keys() == image.keys()
        held = manifests(image)
        assert set(store._children) == held  # the cache is what leaked
    assert len(held) == 3  # an index and a manifest per platform
