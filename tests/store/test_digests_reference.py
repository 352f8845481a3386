"""DigestTable and DigestKeys against a plain dict and set: the same answers for any
digests, including the edge cases a sorted table has (its first and last element,
digests one byte apart or a prefix of another, trailing NULs, an empty table); and
the bound on the media types a store names."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshmirror.oci import mediatypes as mt
from meshmirror.store.digests import (
    DigestKeys,
    DigestTable,
    DigestTableBuilder,
    MediaTypes,
    digest_text,
    raw_digest,
)

# Few distinct byte values, so digests collide, share prefixes and end in NULs often.
_BYTE = st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])
_RAW = st.one_of(st.binary(min_size=32, max_size=32),
                 st.lists(_BYTE, min_size=32, max_size=32).map(bytes),
                 st.lists(_BYTE, min_size=64, max_size=64).map(bytes))
_PAIRS = st.lists(st.tuples(_RAW, st.integers(0, (1 << 64) - 1)), max_size=30)


def _build(pairs: list[tuple[bytes, int]]) -> tuple[DigestTable, dict[bytes, int]]:
    builder = DigestTableBuilder()
    reference: dict[bytes, int] = {}
    for raw, value in pairs:
        builder.add(raw, value)
        reference.setdefault(raw, value)  # the first number given is kept
    return builder.build(), reference


@settings(max_examples=150, deadline=None)
@given(_PAIRS, _PAIRS, st.lists(_RAW, max_size=10), st.integers(0, (1 << 64) - 1))
def test_table_answers_like_a_dict(pairs: list[tuple[bytes, int]],
                                   others: list[tuple[bytes, int]], probes: list[bytes],
                                   bits: int) -> None:
    table, reference = _build(pairs)
    other, other_ref = _build(others)
    assert len(table) == len(reference)
    assert sorted(table) == sorted(reference)
    for raw in [*reference, *other_ref, *probes, b"", bytes(31), bytes(33)]:
        assert table.get(raw) == reference.get(raw)
        assert (raw in table) == (raw in reference)
    assert set(table.difference(other)) == reference.keys() - other_ref.keys()
    assert table.same_digests(other) == (reference.keys() == other_ref.keys())
    # Numbers learned later (set_bits) are ORed into the digests held, and only those.
    for raw in [*list(reference)[:3], *probes[:2]]:
        table.set_bits(raw, bits)
        if raw in reference:
            reference[raw] |= bits
    for raw in [*reference, *probes]:
        assert table.get(raw) == reference.get(raw)


@settings(max_examples=100, deadline=None)
@given(_PAIRS, _PAIRS, st.frozensets(st.sampled_from(["r/a:1", "r/b:2", "r/c:3"])),
       st.frozensets(st.sampled_from(["r/a:1", "r/b:2", "r/c:3"])))
def test_key_views_behave_like_sets(pairs: list[tuple[bytes, int]],
                                    others: list[tuple[bytes, int]],
                                    tags: frozenset[str], other_tags: frozenset[str]) -> None:
    table, reference = _build(pairs)
    other, other_ref = _build(others)
    keys, their_keys = DigestKeys(table, tags), DigestKeys(other, other_tags)
    mine = frozenset(map(digest_text, reference)) | tags
    theirs = frozenset(map(digest_text, other_ref)) | other_tags
    assert len(keys) == len(mine) and set(keys) == mine
    assert set(keys - their_keys) == mine - theirs
    assert set(keys - theirs) == mine - theirs
    assert set(theirs - keys) == theirs - mine
    assert (keys == their_keys) == (mine == theirs) == (keys == theirs)
    assert set(keys & theirs) == mine & theirs and set(keys | theirs) == mine | theirs
    for key in [*mine, *theirs, "sha256:" + "A" * 64, "sha256:" + "0" * 63, "x", ""]:
        assert (key in keys) == (key in mine)
        raw = raw_digest(key)
        assert raw is None or digest_text(raw) == key


def test_media_types_a_store_names_are_bounded_and_manifests_stay_known() -> None:
    # Media types come from manifests anyone can push and the table is never emptied:
    # distinct or huge ones read as unknown past a bound, and the manifest types a
    # store must recognise to walk images are named from the start.
    media = MediaTypes()
    named = [media.name(media.number(f"application/x-hostile-{n}")) for n in range(5000)]
    assert named[0] == "application/x-hostile-0"
    assert sum(name is not None for name in named) <= 1024
    assert media.name(media.number("application/" + "x" * 4096)) is None
    for known in sorted(mt.MANIFEST_TYPES | mt.INDEX_TYPES):
        assert media.name(media.number(known)) == known
