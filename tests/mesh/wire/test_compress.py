"""LZW must match Go's compress/lzw (LSB, litWidth 8) bit for bit."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmirror.mesh.compress import LZWError, compress, decompress


def pack_lsb(codes: list[tuple[int, int]]) -> bytes:
    """Pack (code, width) pairs LSB-first, the way Go's writeLSB does; for golden bytes."""
    value = 0
    nbits = 0
    for code, width in codes:
        value |= code << nbits
        nbits += width
    return value.to_bytes((nbits + 7) // 8, "little")


CLEAR, EOF = 256, 257

# Golden streams derived by hand from Go's writer: a clear code first, the
# literal/phrase codes, then (after Close bumps hi) the EOF code.
GOLDEN = [
    (b"", [(CLEAR, 9), (EOF, 9)]),
    (b"a", [(CLEAR, 9), (97, 9), (EOF, 9)]),
    # "aaaa": a, then the phrase "aa" (258) that is defined by its own first use
    # in the decoder (the KwKwK case), then a.
    (b"aaaa", [(CLEAR, 9), (97, 9), (258, 9), (97, 9), (EOF, 9)]),
    # "abab": a, b, then "ab" = 258.
    (b"abab", [(CLEAR, 9), (97, 9), (98, 9), (258, 9), (EOF, 9)]),
]


@pytest.mark.parametrize(("plain", "codes"), GOLDEN)
def test_golden_bytes_both_ways(plain: bytes, codes: list[tuple[int, int]]) -> None:
    golden = pack_lsb(codes)
    assert compress(plain) == golden
    assert decompress(golden, max_size=1 << 20) == plain


def test_known_literal_values() -> None:
    # Computed by hand: 256 | 97<<9 | 257<<18 = 0x0404C300, little-endian.
    assert compress(b"a") == bytes.fromhex("00c30404")
    assert compress(b"") == bytes.fromhex("000302")


def test_width_grows_to_ten_bits_at_code_512() -> None:
    # 255 distinct byte pairs assign codes 258..512; once hi reaches 512 the
    # writer switches to 10-bit codes. Build the input so each step is a miss.
    plain = bytes(range(256)) + bytes(range(256))
    out = compress(plain)
    assert decompress(out, max_size=1 << 20) == plain
    # 256 literals then 128 two-byte phrases + final: more than 9*256 bits.
    assert len(out) * 8 > 9 * 256


def test_decoder_accepts_stream_without_leading_clear() -> None:
    # Go before 1.17 did not write the leading clear code; readers accept both.
    assert decompress(pack_lsb([(104, 9), (105, 9), (EOF, 9)]), max_size=100) == b"hi"


def test_table_reset_after_4095_codes_round_trips() -> None:
    import random

    rng = random.Random(7)
    plain = bytes(rng.randrange(256) for _ in range(60_000))
    assert decompress(compress(plain), max_size=1 << 20) == plain


def test_truncated_stream_is_an_error() -> None:
    data = compress(b"hello hello hello")
    with pytest.raises(LZWError, match="truncated"):
        decompress(data[:-2], max_size=1000)


def test_invalid_code_is_an_error() -> None:
    with pytest.raises(LZWError, match="invalid"):
        decompress(pack_lsb([(CLEAR, 9), (300, 9), (EOF, 9)]), max_size=1000)


def test_output_bounded() -> None:
    data = compress(b"x" * 100_000)
    with pytest.raises(LZWError, match="exceeds"):
        decompress(data, max_size=10_000)


@given(st.binary(max_size=5000))
def test_round_trip(plain: bytes) -> None:
    assert decompress(compress(plain), max_size=1 << 20) == plain


@given(st.lists(st.sampled_from([b"a", b"b", b"ab", b"ba", b"aaa"]), max_size=3000))
def test_round_trip_repetitive(chunks: list[bytes]) -> None:
    plain = b"".join(chunks)
    assert decompress(compress(plain), max_size=1 << 20) == plain


@given(st.binary(max_size=300))
def test_garbage_only_raises_lzw_error(data: bytes) -> None:
    with contextlib.suppress(LZWError):
        decompress(data, max_size=1 << 16)
