"""An OCI layout whose index.json cannot be used, from #18's review: one clear warning
per version of the file, not one (and a re-parse) per lookup."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import build_image
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
