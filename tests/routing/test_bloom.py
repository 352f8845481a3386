from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.routing.bloom import (
    MASK,
    RANGE,
    BloomFilter,
    bits_for,
    key_hashes,
    optimal_k,
    positions,
)
from meshmirror.routing.summary import Summary
from tests.routing.fakes import digest_key


@pytest.mark.parametrize(("reduction", "m"), [(MASK, 1 << 20), (RANGE, 996_864)])
def test_false_positive_rate_on_100k_keys_is_within_tolerance(reduction: int, m: int) -> None:
    members = [digest_key(i) for i in range(100_000)]
    bloom = BloomFilter.build(members, fp_rate=0.01, reduction=reduction)
    assert all(key in bloom for key in members[:: 97])
    # 100k digests and 100k tag keys never added.
    others = [digest_key(f"other-{i}") for i in range(50_000)]
    others += [f"docker.io/library/app{i}:v{i}" for i in range(50_000)]
    measured = sum(key in bloom for key in others) / len(others)
    # Theory for this geometry: (1 - e^(-kn/m))^k, about 0.65% for m=2^20 and
    # 0.83% for the range-reduced filter's 10 bits per key, k=7.
    assert (bloom.m, bloom.k) == (m, 7)
    theory = bloom.estimated_fp_rate()
    assert measured <= 0.01
    assert 0.7 * theory <= measured <= 1.3 * theory, (measured, theory)


@pytest.mark.parametrize("keys", [1_000, 20_000, 100_000])
def test_range_reduced_filters_take_at_most_10_5_bits_per_key_on_the_wire(keys: int) -> None:
    bloom = BloomFilter.for_capacity(keys)
    summary = Summary(epoch=1, k=bloom.k, m=bloom.m, count=keys, born_at_ms=0,
                      bits=bloom.bits.tobytes())
    assert len(summary.encode()) * 8 / keys <= 10.5


@given(st.text(max_size=40), st.integers(min_value=8, max_value=1 << 32))
def test_range_positions_fall_inside_any_size(key: str, m: int) -> None:
    h1, h2 = key_hashes(key)
    assert all(0 <= p < m for p in positions(h1, h2, 7, m))


def test_every_added_key_matches_digests_and_tags() -> None:
    keys = [digest_key(i) for i in range(2000)] + [f"r.io/a/b:{i}" for i in range(2000)]
    keys.append("sha512:" + hashlib.sha512(b"x").hexdigest())
    bloom = BloomFilter.build(keys)
    assert all(key in bloom for key in keys)


def test_vectorised_build_sets_the_same_bits_as_one_by_one_adds() -> None:
    keys = [digest_key(i) for i in range(500)] + [f"r.io/a:{i}" for i in range(500)]
    built = BloomFilter.build(keys, capacity=1000)
    added = BloomFilter.for_capacity(1000)
    for key in keys:
        added.add(key)
    assert built.bits.tobytes() == added.bits.tobytes()


def test_a_digest_key_is_indexed_by_its_own_bytes() -> None:
    hex_part = "0123456789abcdef" * 4
    h1, h2 = key_hashes("sha256:" + hex_part)
    raw = bytes.fromhex(hex_part)
    assert h1 == int.from_bytes(raw[:8], "little")
    assert h2 == int.from_bytes(raw[8:16], "little") | 1


def test_a_tag_key_is_indexed_by_its_sha256() -> None:
    raw = hashlib.sha256(b"docker.io/library/nginx:1.25").digest()
    assert key_hashes("docker.io/library/nginx:1.25") == (
        int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:16], "little") | 1)


def test_uppercase_hex_is_not_a_digest_key_so_it_is_hashed() -> None:
    upper = "sha256:" + "AB" * 32
    raw = hashlib.sha256(upper.encode()).digest()
    assert key_hashes(upper)[0] == int.from_bytes(raw[:8], "little")


def test_hashing_is_identical_in_another_process() -> None:
    """Python's hash() is salted per process; ours must not be."""
    keys = ["docker.io/library/nginx:1.25", digest_key(1)]
    code = ("from meshmirror.routing.bloom import key_hashes; "
            f"print([key_hashes(k) for k in {keys!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, env={"PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == str([key_hashes(k) for k in keys])


@given(st.text(max_size=40), st.integers(min_value=3, max_value=30))
def test_positions_for_a_smaller_power_of_two_are_the_larger_ones_masked(key: str, log_m: int
                                                                         ) -> None:
    h1, h2 = key_hashes(key)
    big = positions(h1, h2, 7, 1 << (log_m + 1), MASK)
    assert positions(h1, h2, 7, 1 << log_m, MASK) == [p & ((1 << log_m) - 1) for p in big]


def test_legacy_sizing_is_a_power_of_two_and_range_sizing_is_ten_bits_per_key() -> None:
    assert optimal_k(0.01) == 7
    assert optimal_k(0.001) == 10
    m = bits_for(20_000, 0.01, MASK)
    assert m & (m - 1) == 0
    assert 9.6 * 20_000 <= m < 2 * 9.6 * 20_000
    m = bits_for(20_000, 0.01)
    assert m % 64 == 0 and 9.6 * 20_000 <= m <= 10.0 * 20_000
    assert bits_for(0, 0.01) == bits_for(256, 0.01)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 2.0])
def test_an_impossible_fp_rate_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="false-positive rate"):
        BloomFilter.for_capacity(10, rate)


@pytest.mark.parametrize(("m", "k", "reduction"), [
    (1000, 7, MASK), (1001, 7, RANGE), (0, 7, RANGE), (1024, 0, RANGE), (1024, 33, RANGE),
    (1 << 33, 7, RANGE), (1024, 7, 2)])
def test_an_invalid_geometry_is_refused(m: int, k: int, reduction: int) -> None:
    with pytest.raises(ValueError):
        BloomFilter(m, k, reduction=reduction)


def test_fill_estimates_grow_as_keys_are_added() -> None:
    bloom = BloomFilter.for_capacity(1000)
    assert bloom.estimated_fp_rate() == 0
    bloom.add_many(digest_key(i) for i in range(1000))
    at_capacity = bloom.estimated_fp_rate()
    assert 0 < at_capacity <= 0.01
    bloom.add_many(digest_key(f"more{i}") for i in range(3000))
    assert bloom.estimated_fp_rate() > 2 * 0.01
