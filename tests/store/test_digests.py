"""DigestTable: the sorted-array blob map the OCI layout store keeps its blobs in."""

from __future__ import annotations

import hashlib

from meshmirror.store.digests import DigestTable, DigestTableBuilder


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
