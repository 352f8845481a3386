"""The containerd store's index, changed one image at a time, against a plain model.

The index keeps the union of its images' blobs with a count per digest and changes it
in place of rebuilding it, so every path that moves a count (an image replaced, dropped,
a blob deleted, shared blobs, the first and last digest of the table, digests sharing
their first 8 bytes, both digest widths) is checked against sets after every step, and
so are the key views handed out before: a subscriber's baseline must not move.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from meshmirror.containerd.store import ImageIndex, ImageRecord
from meshmirror.store.digests import (
    DigestKeys,
    DigestTable,
    PackedDigests,
    digest_text,
)

_SIZE_SHIFT = 16


def _pool() -> list[bytes]:
    """Digests that sort at both ends, share prefixes, and come in both widths."""
    raws = [hashlib.sha256(str(n).encode()).digest() for n in range(240)]
    raws += [bytes(32), b"\xff" * 32, b"\x01" + bytes(31)]  # first, last, trailing NULs
    shared = b"\x42" * 8  # a crafted run of digests with one 8-byte prefix
    raws += [shared + hashlib.sha256(b"p%d" % n).digest()[:24] for n in range(12)]
    raws += [hashlib.sha512(str(n).encode()).digest() for n in range(40)]
    raws += [bytes(64), b"\xff" * 64]
    return raws


POOL = _pool()
NAMES = [f"r.example/app{n}:v" for n in range(8)] + ["sha256:untagged"]


class _Model:
    """What the index must answer, from dicts and sets."""

    def __init__(self) -> None:
        self.images: dict[str, tuple[bytes, dict[bytes, int]]] = {}
        self.media: dict[bytes, int] = {}  # the union's: first seen while held
        self.sizes: dict[bytes, int] = {}

    def union(self) -> set[bytes]:
        return set().union(*(blobs.keys() for _, blobs in self.images.values()))

    def put(self, name: str, image: tuple[bytes, dict[bytes, int]] | None) -> None:
        if image is None:
            self.images.pop(name, None)
        else:
            self.images[name] = image
        held = self.union()
        for raw in [r for r in self.media if r not in held]:
            del self.media[raw]
            self.sizes.pop(raw, None)
        for _, blobs in self.images.values():
            for raw, media in blobs.items():
                self.media.setdefault(raw, media)

    def keys(self) -> set[str]:
        tags = {name for name, (target, blobs) in self.images.items()
                if ":" in name.split("/")[-1] and "/" in name and target in blobs}
        return {digest_text(raw) for raw in self.union()} | tags


def _record(name: str, blobs: dict[bytes, int], target: bytes) -> ImageRecord:
    """Blobs in two parts, as a walk names a target and a manifest's children."""
    pairs = list(blobs.items())
    tag = name if not name.startswith("sha256:") else None
    return ImageRecord(digest_text(target),
                       (PackedDigests(pairs[:1]), PackedDigests(pairs[1:])), tag)


def _check(index: ImageIndex, model: _Model) -> None:
    table = index.blobs()
    assert set(table) == model.union()
    for raw in POOL:
        packed = table.get(raw)
        if raw not in model.media:
            assert packed is None and index.size(raw) is None
            continue
        assert packed is not None and packed & 0xFFFF == model.media[raw]
        assert index.size(raw) == model.sizes.get(raw)
    assert set(index.keys()) == model.keys()


@pytest.mark.parametrize("seed", range(6))
def test_index_matches_a_model_through_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    index, model = ImageIndex(), _Model()
    index.blobs()  # from here on the union changes one image at a time
    views: list[tuple[DigestKeys, set[str]]] = []
    for _ in range(160):
        step = rng.random()
        name = rng.choice(NAMES)
        if step < 0.55:  # an image (re)walked: a fresh record, often sharing blobs
            count = rng.choice([0, 1, 5, 40, 120, 200])
            chosen = rng.sample(POOL, min(count, len(POOL)))
            if rng.random() < 0.3:
                chosen += [POOL[240], POOL[241]]  # the table's first and last
            blobs = {raw: rng.randrange(4) for raw in chosen}
            target = rng.choice(chosen) if chosen and rng.random() < 0.8 else POOL[0]
            index.put(name, _record(name, blobs, target))
            model.put(name, (target, blobs))
        elif step < 0.7:  # an image deleted (or one never held)
            index.put(name, None)
            model.put(name, None)
        elif step < 0.8:  # containerd deleted a blob
            raw = rng.choice(POOL)
            index.forget_digest(digest_text(raw))
            for image, (target, blobs) in list(model.images.items()):
                if raw in blobs:
                    model.put(image, (target, {r: m for r, m in blobs.items() if r != raw}))
        elif step < 0.9:  # a stat learned a size (content is immutable: always the same)
            raw = rng.choice(POOL)
            size = int.from_bytes(raw[-5:])
            index.learn_size(raw, size)
            if raw in model.media:
                model.sizes.setdefault(raw, size)
        else:  # the same record again: nothing moves
            if name in index.images:
                index.put(name, index.images[name])
        _check(index, model)
        before = views[-1][0] if views else None
        view = index.keys()
        views.append((view, model.keys()))
        if before is not None:  # what a subscription reports, and its baseline kept
            added, removed = view.changes(before)
            assert set(added) == views[-1][1] - views[-2][1]
            assert set(removed) == views[-2][1] - views[-1][1]
    for view, keys in views:  # every view handed out still holds what it held
        assert set(view) == keys and len(view) == len(keys)
    for _ in range(40):  # a subscriber several events behind: the steps between, or a search
        first, second = sorted(rng.sample(range(len(views)), 2))
        (old, old_keys), (new, new_keys) = views[first], views[second]
        added, removed = new.changes(old)
        assert (set(added), set(removed)) == (new_keys - old_keys, old_keys - new_keys)
        added, removed = old.changes(new)  # and backwards, which no step leads to
        assert (set(added), set(removed)) == (old_keys - new_keys, new_keys - old_keys)


def test_a_resync_changes_the_union_in_place_and_keeps_what_it_learned() -> None:
    index = ImageIndex()
    shared, only_a, only_b = POOL[0], POOL[1], POOL[2]
    index.put("r.example/a:1", _record("r.example/a:1", {shared: 1, only_a: 2}, shared))
    index.put("r.example/b:1", _record("r.example/b:1", {shared: 3, only_b: 1}, only_b))
    index.learn_size(shared, 10)
    index.learn_size(only_a, 20)
    table = index.blobs()
    # A re-sync walks every image again: records equal to those held move nothing.
    index.put("r.example/a:1", _record("r.example/a:1", {shared: 1, only_a: 2}, shared))
    index.put("r.example/b:1", _record("r.example/b:1", {shared: 3, only_b: 1}, only_b))
    assert index.blobs() is table
    # An image gone and another changed: the digests still held keep their sizes.
    index.put("r.example/a:1", None)
    assert index.size(shared) == 10 and index.size(only_a) is None
    assert set(index.keys()) == {digest_text(shared), digest_text(only_b), "r.example/b:1"}
    index.put("r.example/c:1", _record("r.example/c:1", {only_a: 0, shared: 0}, only_a))
    assert index.size(shared) == 10 and index.size(only_a) is None
    assert index.blobs().get(shared) == (11 << _SIZE_SHIFT) | 1
    index.put("r.example/b:1", None)
    index.put("r.example/c:1", None)
    assert len(index.blobs()) == 0 and set(index.keys()) == set()
    assert isinstance(index.blobs(), DigestTable)


def test_a_record_names_its_blobs_less_those_absent() -> None:
    shared, layer, gone = POOL[0], POOL[1], POOL[2]
    record = ImageRecord(digest_text(shared), (PackedDigests([(shared, 1)]),
                                               PackedDigests([(layer, 2), (gone, 2)])),
                         "r.example/a:1")
    assert record.holds(gone) and record.tag_key() == "r.example/a:1"
    less = record.without(gone)
    assert set(less.blobs()) == {shared, layer} and not less.holds(gone)
    assert less.without(shared).tag_key() is None  # what the tag points at is gone
    # A digest found inside another's bytes, not at a digest's start, is not held.
    assert not record.holds(layer[1:] + gone[:1])


def test_a_blob_an_image_names_twice_leaves_with_the_image() -> None:
    """The union is first built from every record at once: a layer one manifest lists
    twice (identical empty layers), or two of an index's manifests share, counts once
    for its image, or deleting the image left it advertised for good (a re-sync changes
    the union in place and never rebuilds it)."""
    index, model = ImageIndex(), _Model()
    target, manifest, config, layer, other = POOL[:5]
    twice = ImageRecord(digest_text(target), (
        PackedDigests([(target, 1)]), PackedDigests([(manifest, 1), (other, 1)]),
        PackedDigests([(config, 2), (layer, 3), (layer, 3)]),  # one layer listed twice
        PackedDigests([(config, 2), (layer, 3)])), "r.example/a:1")  # shared by another
    index.put("r.example/a:1", twice)
    model.put("r.example/a:1", (target, {target: 1, manifest: 1, other: 1, config: 2,
                                         layer: 3}))
    index.put("r.example/b:1", _record("r.example/b:1", {other: 1, layer: 3}, other))
    model.put("r.example/b:1", (other, {other: 1, layer: 3}))
    _check(index, model)  # the first build, from every record
    index.put("r.example/b:1", None)
    model.put("r.example/b:1", None)
    _check(index, model)
    index.put("r.example/a:1", None)
    model.put("r.example/a:1", None)
    _check(index, model)
    assert len(index.blobs()) == 0
