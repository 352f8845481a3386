"""DigestUnion and the diff of two tables: exact against sets, whatever path the search
takes (a short list, one much shorter than the table, two of about equal length) and
however many digests share their first 8 bytes."""

from __future__ import annotations

import hashlib
import random

import pytest

from meshmirror.store.digests import DigestTable, DigestTableBuilder, DigestUnion


def _table(raws: list[bytes], value: int = 0) -> DigestTable:
    builder = DigestTableBuilder()
    for raw in raws:
        builder.add(raw, value)
    return builder.build()


def _digests(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    raws = [hashlib.sha256(b"%d-%d" % (seed, n)).digest() for n in range(count)]
    for n in range(count // 10):  # runs sharing one prefix, as a crafted image could
        prefix = raws[rng.randrange(len(raws))][:8]
        raws.append(prefix + hashlib.sha256(b"c%d-%d" % (seed, n)).digest()[:24])
    return [*raws, bytes(32), b"\xff" * 32, hashlib.sha512(b"%d" % seed).digest()]


@pytest.mark.parametrize(("old_count", "new_count"), [(3000, 3000), (3000, 40), (3000, 200),
                                                      (200, 3000), (0, 500), (500, 0)])
def test_changes_and_union_replacement_match_sets(old_count: int, new_count: int) -> None:
    rng = random.Random(old_count * 7 + new_count)
    pool = _digests(4000, old_count + new_count)
    old_raws = set(rng.sample(pool, min(old_count, len(pool))))
    new_raws = set(rng.sample(pool, min(new_count, len(pool))))
    old, new = _table(sorted(old_raws)), _table(sorted(new_raws), 1)
    added, removed = new.changes(old)
    assert set(added) == new_raws - old_raws and set(removed) == old_raws - new_raws

    other = set(rng.sample(pool, 1500))  # another member, sharing some of both
    union = DigestUnion([old, _table(sorted(other), 2)])
    before = union.table
    union.replace(old, new)
    assert set(union.table) == new_raws | other
    assert set(before) == old_raws | other  # the table handed out before is unchanged
    for raw in pool:  # a digest held throughout keeps its number: the first seen wins
        held = new_raws | other
        expected = (None if raw not in held else 0 if raw in old_raws
                     else 2 if raw in other else 1)
        assert union.table.get(raw) == expected
    widths = {len(raw) for raw in union.table}
    for width in widths:  # sorted, as every lookup's binary search needs
        listed = [raw for raw in union.table if len(raw) == width]
        assert listed == sorted(listed)
    union.replace(new, None)
    union.replace(_table(sorted(other)), None)
    assert len(union.table) == 0


def test_a_diff_walks_the_steps_a_union_took_while_their_tables_are_held() -> None:
    raws = _digests(300, 9)
    a, b, c = _table(raws[:100]), _table(raws[50:150]), _table(raws[120:200])
    union = DigestUnion([a])
    first = union.table
    union.replace(a, b)
    middle = union.table
    union.replace(b, c)
    assert middle._step is not None and union.table._steps_since(first) is not None
    added, removed = union.table.changes(first)
    assert set(added) == set(raws[120:200]) - set(raws[:100])
    assert set(removed) == set(raws[:100]) - set(raws[120:200])
    after_c = union.table
    union.replace(c, b)
    after_b = union.table
    union.replace(b, c)  # there and back: the last two steps cancel out
    latest = union.table
    steps = latest._steps_since(middle)
    assert steps is not None and len(steps) == 3 and after_b is not after_c
    assert [set(side) for side in latest.changes(after_c)] == [set(), set()]
    assert [set(side) for side in latest.changes(middle)] == [
        set(raws[120:200]) - set(raws[50:150]), set(raws[50:150]) - set(raws[120:200])]
    del middle, after_c, after_b  # the tables between need not be held, only the steps
    assert latest._steps_since(first) is not None
    for turn in range(10):  # but only the last 16 steps are: further back the diff searches
        union.replace(c, b)
        union.replace(b, c)
        if turn == 4:
            recent = union.table
    assert union.table._steps_since(first) is None
    assert union.table._steps_since(latest) is None
    assert union.table._steps_since(recent) is not None
    added, removed = union.table.changes(first)
    assert set(added) == set(raws[120:200]) - set(raws[:100])
    assert set(removed) == set(raws[:100]) - set(raws[120:200])


def test_widths_not_a_multiple_of_8_bytes_compare_as_strings() -> None:
    # No digest algorithm gives them, but a table holds whatever it is given.
    raws = [hashlib.sha1(b"%d" % n).digest() for n in range(300)]
    old, new = _table(raws[:200]), _table(raws[100:])
    added, removed = new.changes(old)
    assert set(added) == set(raws[200:]) and set(removed) == set(raws[:100])
