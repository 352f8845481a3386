from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.routing.bloom import MASK, RANGE, BloomFilter
from meshmirror.routing.summary import (
    DELTA_HEADER_SIZE,
    HEADER_SIZE,
    VERSION_RANGE,
    Summary,
    SummaryDelta,
    SummaryFormatError,
)
from meshmirror.routing.vouches import Vouches
from tests.routing.fakes import digest_key


def _summary(keys: int = 100, reduction: int = MASK) -> Summary:
    """A version-1 summary unless told otherwise: the format the old tests pin."""
    bloom = BloomFilter.build((digest_key(i) for i in range(keys)), reduction=reduction)
    return Summary(epoch=1_700_000_000_123, k=bloom.k, m=bloom.m, count=keys,
                   born_at_ms=1_700_000_000_000, bits=bloom.bits.tobytes(), reduction=reduction)


def test_round_trip_keeps_every_field_and_every_key() -> None:
    summary = _summary()
    data = summary.encode()
    assert len(data) == HEADER_SIZE + summary.m // 8
    assert data[:4] == b"MMSF"
    back = Summary.decode(data)
    assert back == summary
    assert all(digest_key(i) in back for i in range(100))


@given(epoch=st.integers(0, 2**64 - 1), count=st.integers(0, 2**64 - 1),
       born=st.integers(0, 2**64 - 1), k=st.integers(1, 32), log_m=st.integers(3, 14),
       data=st.data())
def test_round_trip_any_valid_summary(epoch: int, count: int, born: int, k: int, log_m: int,
                                      data: st.DataObject) -> None:
    m = 1 << log_m
    bits = data.draw(st.binary(min_size=m // 8, max_size=m // 8))
    summary = Summary(epoch=epoch, k=k, m=m, count=count, born_at_ms=born, bits=bits,
                      reduction=MASK)
    assert Summary.decode(summary.encode()) == summary


@given(m_bytes=st.integers(1, 3000), data=st.data())
def test_round_trip_any_version_3_summary(m_bytes: int, data: st.DataObject) -> None:
    bits = data.draw(st.binary(min_size=m_bytes, max_size=m_bytes))
    summary = Summary(epoch=5, k=7, m=8 * m_bytes, count=3, born_at_ms=1, bits=bits)
    encoded = summary.encode()
    assert encoded[4] == VERSION_RANGE
    back = Summary.decode(encoded)
    assert back == summary and back.reduction == RANGE


def test_a_version_3_summary_holds_its_keys_at_any_size() -> None:
    summary = _summary(1234, RANGE)
    assert summary.m % 64 == 0 and summary.m & (summary.m - 1)
    back = Summary.decode(summary.encode())
    assert all(digest_key(i) in back for i in range(1234))


def _delta(positions: list[int], m: int = 1 << 16) -> SummaryDelta:
    return SummaryDelta(base_epoch=10, epoch=11, k=7, m=m, reduction=RANGE, count=5,
                        born_at_ms=9, positions=np.array(positions, dtype=np.uint64),
                        vouches=Vouches.of([(42, 1000)]))


@given(st.sets(st.integers(0, (1 << 32) - 1), max_size=300))
def test_a_delta_round_trips_any_positions(positions: set[int]) -> None:
    delta = _delta(sorted(positions), m=1 << 32)
    back = SummaryDelta.decode(delta.encode())
    assert back.positions.tolist() == sorted(positions)
    assert (back.base_epoch, back.epoch, back.k, back.m, back.count, back.born_at_ms) == (
        10, 11, 7, 1 << 32, 5, 9)
    assert back.vouches.checked_at(42) == 1000


def test_a_delta_of_a_few_dozen_keys_is_a_few_hundred_bytes() -> None:
    bloom = BloomFilter.for_capacity(21_500)
    fresh = bloom.add_fresh(digest_key(f"new-{i}") for i in range(30))
    data = _delta(fresh.tolist(), bloom.m).encode()
    assert len(data) < 500 < bloom.m // 8


def _delta_patched(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(_delta([1, 300, 70000]).encode())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"MMSD", "too short"),
    (b"XXXX" + _delta([1]).encode()[4:], "not a meshmirror delta"),
    (_delta_patched(4, ">B", 2), "unsupported delta version"),
    (_delta_patched(6, ">B", 5), "unknown position reduction"),
    (_delta_patched(16, ">Q", 10), "goes backwards"),
    (_delta_patched(24, ">Q", 1001), "not a multiple of 8"),
    (_delta_patched(24, ">Q", 70000), "outside a filter"),
    # More positions or position bytes than the body holds: refused before any allocation.
    (_delta_patched(48, ">I", 0xFFFFFFFF), "promises"),
    (_delta_patched(52, ">I", 0xFFFFFFFF), "promises"),
    (_delta_patched(48, ">I", 2), "do not hold exactly"),
    (_delta([5, 5 + 1]).encode()[:DELTA_HEADER_SIZE] + b"\x05\x00" + Vouches.of([]).encode(),
     "strictly increasing"),
    (_delta([1]).encode()[:DELTA_HEADER_SIZE] + b"\x81", "do not hold exactly"),
    (_delta([1, 2]).encode()[:DELTA_HEADER_SIZE - 4] + struct.pack(">I", 6)
     + b"\xff\xff\xff\xff\xff\x01" + b"\0\0\0\0", "do not hold exactly"),
    (_delta([1]).encode() + b"\0", "vouch section"),
])
def test_a_malformed_delta_is_rejected_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(SummaryFormatError, match=message):
        SummaryDelta.decode(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_delta_decoder(data: bytes) -> None:
    with contextlib.suppress(SummaryFormatError):
        SummaryDelta.decode(b"MMSD\x01\x07\x01\x00" + data)


def _patched(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(_summary().encode())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short"),
    (b"MMSF\x01", "too short"),
    (b"XXXX" + _summary().encode()[4:], "not a meshmirror summary"),
    (_patched(4, ">B", 4), "unsupported summary version 4"),
    (_patched(4, ">B", 3), "vouch section of 0 bytes has no count"),
    (_patched(4, ">B", 2), "vouch section of 0 bytes has no count"),
    (_patched(5, ">B", 0), "hash count k=0"),
    (_patched(5, ">B", 40), "hash count k=40"),
    (_patched(6, ">H", 7), "reserved header field"),
    (_patched(16, ">Q", 1000), "not a power of two"),
    (_patched(16, ">Q", 1 << 40), "not a power of two"),
    (_summary().encode()[:-1], "must be"),
    (_summary().encode() + b"\0", "must be"),
])
def test_malformed_input_is_rejected_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(SummaryFormatError, match=message):
        Summary.decode(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(SummaryFormatError):
        Summary.decode(data)


def test_a_summary_with_the_wrong_bit_count_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="needs 128 bytes"):
        Summary(epoch=1, k=7, m=1024, count=0, born_at_ms=0, bits=b"\0" * 10)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Summary(epoch=-1, k=7, m=1024, count=0, born_at_ms=0, bits=b"\0" * 128)
