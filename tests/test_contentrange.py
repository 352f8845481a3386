"""The one Content-Range parser: what a 206 may say, and everything it may not."""

from __future__ import annotations

import pytest

from meshmirror.contentrange import ContentRange, ContentRangeError, parse_content_range
from meshmirror.registry.ranges import ByteRange

MAX = 10**19 - 1  # 19 digits, the most a value may have


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 0-0/1", ContentRange(0, 0, 1)),
    ("bytes 5-9/10", ContentRange(5, 9, 10)),
    ("bytes 100-199/*", ContentRange(100, 199, None)),
    (f"bytes 0-{MAX - 1}/{MAX}", ContentRange(0, MAX - 1, MAX)),
])
def test_valid_values_parse(value: str, expected: ContentRange) -> None:
    said = parse_content_range(value)
    assert said == expected
    assert said.header() == value


@pytest.mark.parametrize("value", ["Bytes 0-0/1", "BYTES 0-0/1", "bYtEs 0-0/1"])
def test_the_unit_is_case_insensitive(value: str) -> None:
    """RFC 9110 section 14.1: range unit names are case-insensitive; an upstream that
    spells it otherwise sends a valid 206, and its resume must not fail."""
    assert parse_content_range(value) == ContentRange(0, 0, 1)


@pytest.mark.parametrize("value", [
    None,
    "",
    "bytes",
    "bytes */10",                # a 416's unsatisfied range, no 206's
    "items 0-9/10",              # another unit
    "bytes=0-9/10",              # the Range request's spelling
    " bytes 0-9/10",
    "bytes 0-9/10 ",
    "bytes  0-9/10",
    "bytes\t0-9/10",
    "bytes 0 -9/10",
    "bytes 0-9 /10",
    "bytes 0-9/10\n",
    "bytes 0-9/",
    "bytes 0-/10",
    "bytes -9/10",
    "bytes 0-9",
    "bytes 0-9/10,20-29/30",
    "bytes +0-9/10",
    "bytes 0-9/-10",
    "bytes 0x0-9/10",
    "bytes \u0660-\u0669/\u0661\u0660",  # Arabic-Indic digits, which int() reads
    "byte\u017f 0-9/10",          # a long s, which matches "s" in Unicode's case folding
    "bytes 9-5/10",              # last before first
    "bytes 0-10/10",             # ends past the blob
    "bytes 0-9/9",
    f"bytes 0-{MAX}/{MAX + 1}",  # 20 digits: past a signed 64-bit integer
    "bytes 0-9/" + "9" * 5000,   # past int()'s digit limit
])
def test_invalid_values_raise(value: str | None) -> None:
    with pytest.raises(ContentRangeError):
        parse_content_range(value)


def test_the_error_names_the_value_briefly() -> None:
    with pytest.raises(ContentRangeError, match=r"'bytes 9-5/10'.*first <= last"):
        parse_content_range("bytes 9-5/10")
    with pytest.raises(ContentRangeError) as raised:
        parse_content_range("x" * 10_000)
    assert len(str(raised.value)) < 200


def test_it_is_a_value_error_for_callers_that_catch_those() -> None:
    assert issubclass(ContentRangeError, ValueError)


def test_the_registry_writes_what_the_parser_reads() -> None:
    written = ByteRange(offset=3, length=4, size=10).content_range()
    assert written == "bytes 3-6/10"
    assert parse_content_range(written) == ContentRange(3, 6, 10)
