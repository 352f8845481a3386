from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.routing.bloom import BloomFilter
from meshmirror.routing.summary import HEADER_SIZE, Summary, SummaryFormatError
from tests.routing.fakes import digest_key


def _summary(keys: int = 100) -> Summary:
    bloom = BloomFilter.build(digest_key(i) for i in range(keys))
    return Summary(epoch=1_700_000_000_123, k=bloom.k, m=bloom.m, count=keys,
                   born_at_ms=1_700_000_000_000, bits=bloom.bits.tobytes())


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
    summary = Summary(epoch=epoch, k=k, m=m, count=count, born_at_ms=born, bits=bits)
    assert Summary.decode(summary.encode()) == summary


def _patched(offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(_summary().encode())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short"),
    (b"MMSF\x01", "too short"),
    (b"XXXX" + _summary().encode()[4:], "not a meshmirror summary"),
    (_patched(4, ">B", 3), "unsupported summary version 3"),
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
