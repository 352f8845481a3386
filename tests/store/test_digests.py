"""DigestTable: the sorted-array blob map the OCI layout store keeps its blobs in."""

from __future__ import annotations

import hashlib

from meshmirror.store.digests import (
    MEDIA_UNKNOWN,
    DigestKeys,
    DigestTable,
    DigestTableBuilder,
    MediaTypes,
    PackedDigests,
    digest_text,
    raw_digest,
)


def _table(pairs: list[tuple[bytes, int]]) -> DigestTable:
    builder = DigestTableBuilder()
    for raw, value in pairs:
        builder.add(raw, value)
    return builder.build()


def test_lookups_survive_nul_bytes_and_mixed_widths() -> None:
    # numpy hands fixed-width byte strings back without their trailing NULs; a digest
    # ending (or made) in them must still be found, told apart and given back whole.
    zeros = bytes(32)
    ends_in_nul = b"\x01" + bytes(31)
    sha512 = hashlib.sha512(b"x").digest()
    others = [hashlib.sha256(str(n).encode()).digest() for n in range(50)]
    pairs = [(zeros, 1), (ends_in_nul, 2), (sha512, 3)] + [(d, 10 + n)
                                                         for n, d in enumerate(others)]
    table = _table(pairs)
    assert len(table) == 53
    for raw, value in pairs:
        assert table.get(raw) == value and raw in table
    assert sorted(table) == sorted(raw for raw, _ in pairs)
    assert table.get(b"\x01" + bytes(30) + b"\x02") is None
    assert table.get(hashlib.sha256(b"absent").digest()) is None
    assert table.get(bytes(20)) is None  # a width it holds none of
    assert "not bytes" not in table


def test_first_value_wins_and_differences_compare_digests_only() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    old = _table([(a, 1), (b, 2), (a, 99)])
    assert len(old) == 2 and old.get(a) == 1
    new = _table([(b, 7), (c, 3)])
    assert set(new.difference(old)) == {c} and set(old.difference(new)) == {a}
    assert old.same_digests(_table([(b, 5), (a, 6)]))
    assert not old.same_digests(new)
    empty = DigestTable()
    assert len(empty) == 0 and list(empty) == [] and empty.get(a) is None
    assert set(new.difference(empty)) == {b, c} and list(empty.difference(new)) == []
    assert not empty.same_digests(new) and empty.same_digests(_table([]))


def test_numbers_learned_later_are_ored_in_place() -> None:
    # What the containerd store does with a blob's size: set on the held table, never
    # into the media-type bits, and only for a digest it holds.
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    first = _table([(a, 1), (b, 2)])
    first.set_bits(a, 5 << 16)
    first.set_bits(c, 7 << 16)  # not held: nothing to set
    assert first.get(a) == 5 << 16 | 1 and first.get(b) == 2 and first.get(c) is None


def test_key_views_media_types_and_packed_children() -> None:
    raws = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    keys = DigestKeys(_table([(r, 0) for r in raws]), frozenset({"r.example/app:1"}))
    texts = {digest_text(r) for r in raws}
    assert set(keys) == texts | {"r.example/app:1"} and len(keys) == 4
    assert all(t in keys for t in texts) and "r.example/app:1" in keys
    assert digest_text(raws[0]).upper() not in keys and "sha256:zz" not in keys
    assert raw_digest(digest_text(raws[0])) == raws[0] and raw_digest("md5:00") is None
    fewer = DigestKeys(_table([(r, 9) for r in raws[:2]]), frozenset())
    assert keys - fewer == {digest_text(raws[2]), "r.example/app:1"}
    assert keys == texts | {"r.example/app:1"} and keys != fewer
    media = MediaTypes()
    number = media.number("application/vnd.oci.image.layer.v1.tar")
    assert media.number("application/vnd.oci.image.layer.v1.tar") == number
    assert media.name(7 << 16 | number) == "application/vnd.oci.image.layer.v1.tar"
    assert media.name(MEDIA_UNKNOWN) is None
    pairs = [(raws[0], 1), (hashlib.sha512(b"x").digest(), 2), (bytes(32), 3)]
    assert list(PackedDigests(pairs)) == pairs and list(PackedDigests(())) == []
