"""Property-based fuzzing: random and mutated input only ever yields WireError."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from meshmirror.mesh import wire
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import Message
from meshmirror.mesh.tags import decode_tags
from meshmirror.mesh.wire import StreamDecoder, WireError
from tests.mesh.wire.samples import KEY, SAMPLES, STREAM_SAMPLES

VALID_PACKETS = [wire.seal_packet(wire.encode(m), keyring=None) for m in SAMPLES] + [
    wire.seal_packet(wire.compound([wire.encode(m) for m in SAMPLES]), keyring=None,
                     compress=True),
    wire.seal_packet(wire.compound([wire.encode(m) for m in SAMPLES[:4]]), keyring=None,
                     crc=False),
]
VALID_STREAMS = [wire.encode_stream(m, keyring=None, compress=c) for m in STREAM_SAMPLES
                 for c in (False, True)]


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=4))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xCE, 0xDA,
                                            0xDB, 0xDC, 0xDE, 0xDF, 0x0C, 0x07, 0x09, 0xF4]))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i]
    return bytes(data)


def only_wire_errors_from_packet(data: bytes) -> None:
    errors: list[WireError] = []
    try:
        msgs = wire.open_packet(data, keyring=None, errors=errors)
    except WireError:
        return
    for msg in msgs:
        assert wire.decode(wire.encode(msg)) == msg
    for err in errors:
        assert err.reason in wire.REASONS


def only_wire_errors_from_stream(data: bytes, *, chunk: int) -> Message | None:
    dec = StreamDecoder(None, max_size=1 << 20)
    try:
        for i in range(0, len(data), chunk):
            got = dec.feed(data[i : i + chunk])
            if got is not None:
                return got
        dec.eof()
    except WireError:
        return None
    raise AssertionError("eof() returned without a message")


@given(st.binary(max_size=2000))
def test_random_packets(data: bytes) -> None:
    only_wire_errors_from_packet(data)


@given(mutated(VALID_PACKETS))
def test_mutated_packets(data: bytes) -> None:
    only_wire_errors_from_packet(data)


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_random_streams(data: bytes, chunk: int) -> None:
    only_wire_errors_from_stream(data, chunk=chunk)


@given(mutated(VALID_STREAMS), st.integers(1, 512))
def test_mutated_streams(data: bytes, chunk: int) -> None:
    only_wire_errors_from_stream(data, chunk=chunk)


@given(st.binary(max_size=600))
def test_random_decode(data: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.decode(data)


@given(mutated([wire.seal_packet(wire.encode(m), keyring=Keyring([KEY])) for m in SAMPLES]))
def test_mutated_encrypted_packets(data: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.open_packet(data, keyring=Keyring([KEY]))


@given(st.binary(max_size=600))
def test_random_tags(data: bytes) -> None:
    try:
        tags = decode_tags(data)
    except WireError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
