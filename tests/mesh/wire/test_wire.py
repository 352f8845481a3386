"""memberlist wire format: message bodies, packets, streams, and drops by reason."""

from __future__ import annotations

import os
import struct
import zlib

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshmirror.mesh import wire
from meshmirror.mesh.compress import compress as lzw
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import (
    AckResp,
    Alive,
    Message,
    NackResp,
    Ping,
    PushPull,
    User,
)
from meshmirror.mesh.wire import StreamDecoder, WireError
from tests.mesh.wire.samples import KEY, PUSH, SAMPLES, STREAM_SAMPLES


def go_raw(text: bytes) -> bytes:
    """A raw string as Go's MsgpackHandle (no WriteExt) writes it: fixraw or raw16."""
    if len(text) < 32:
        return bytes((0xA0 | len(text),)) + text
    return b"\xda" + struct.pack(">H", len(text)) + text


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert wire.decode(wire.encode(msg)) == msg


def test_ping_bytes_are_what_go_writes() -> None:
    # ping{SeqNo: 1, Node: "x"}; omitempty drops the Source* fields.
    expected = (b"\x00\x82" + go_raw(b"SeqNo") + b"\x01" + go_raw(b"Node") + go_raw(b"x"))
    assert wire.encode(Ping(seq_no=1, node="x")) == expected


def test_alive_vsn_and_bytes_are_raw_strings_never_bin() -> None:
    data = wire.encode(Alive(incarnation=1, node="n" * 40, addr=b"\x7f\0\0\1", port=1,
                             meta=b"m" * 40, vsn=(1, 5, 2, 2, 5, 4)))
    body = msgpack.unpackb(data[1:], raw=True)
    assert body[b"Vsn"] == bytes([1, 5, 2, 2, 5, 4])
    # no bin8/16/32 and no str8: Go's old-spec handle does not write those.
    for marker in (b"\xc4", b"\xc5", b"\xc6", b"\xd9"):
        assert marker not in data


def test_decodes_go_encodings() -> None:
    # ackResp{SeqNo: 70000, Payload: nil} with SeqNo as uint32 and nil bytes.
    data = (b"\x02\x82" + go_raw(b"SeqNo") + b"\xce\x00\x01\x11\x70" + go_raw(b"Payload")
            + b"\xc0")
    assert wire.decode(data) == AckResp(seq_no=70000, payload=b"")
    # bin-typed bytes and a Vsn array from a newer encoder are accepted too.
    alive = msgpack.packb({"Incarnation": 2, "Node": "z", "Addr": b"\x7f\0\0\1", "Port": 5,
                           "Meta": b"", "Vsn": [1, 5, 2, 2, 5, 4], "Extra": 1},
                          use_bin_type=True)
    assert wire.decode(b"\x04" + alive) == Alive(2, "z", b"\x7f\0\0\1", 5, b"",
                                                 (1, 5, 2, 2, 5, 4))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x63", "unknown_type"),
        (b"\x00", "truncated"),
        (b"\x00\x82\xa5SeqNo", "truncated"),
        (b"\x00\x01", "malformed"),  # not a map
        (b"\x00\x81\xa5SeqNo\xa1x", "malformed"),  # SeqNo is a string
        (b"\x00\x81\xa5SeqNo\xcf\x00\x00\x00\x01\x00\x00\x00\x00", "malformed"),  # > uint32
        (b"\x0b\x81\xa5SeqNo\xff", "malformed"),  # negative
        (b"\x01\x82\xa6Target\xa4\x7f\0\0\1\xa4Nack\x01", "malformed"),  # bool expected
        (b"\x00\xc1", "malformed"),  # never-used msgpack byte
    ],
)
def test_decode_errors_have_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode(data)
    assert info.value.reason == reason


def test_wire_error_rejects_unknown_reason() -> None:
    with pytest.raises(AssertionError):
        WireError("bogus")


# ------------------------------------------------------------------ packets


def test_packet_plain_with_crc() -> None:
    payload = wire.encode(SAMPLES[0])
    sealed = wire.seal_packet(payload, keyring=None)
    assert sealed[0] == 12 and struct.unpack(">I", sealed[1:5])[0] == zlib.crc32(payload)
    assert wire.open_packet(sealed, keyring=None) == [SAMPLES[0]]
    assert wire.open_packet(payload, keyring=None) == [SAMPLES[0]]  # CRC is optional


def test_bad_crc_dropped() -> None:
    sealed = bytearray(wire.seal_packet(wire.encode(SAMPLES[0]), keyring=None))
    sealed[-1] ^= 1
    with pytest.raises(WireError) as info:
        wire.open_packet(bytes(sealed), keyring=None)
    assert info.value.reason == "bad_crc"


def test_compound_and_compressed_nesting() -> None:
    inner = wire.compound([wire.encode(m) for m in SAMPLES[:3]])
    packed = wire.compound([wire.compress_message(inner), wire.encode(SAMPLES[3])])
    assert wire.open_packet(wire.seal_packet(packed, keyring=None), keyring=None) == [
        *SAMPLES[:3], SAMPLES[3]]


def test_compound_bad_part_spares_the_rest() -> None:
    packed = wire.compound([b"\x63junk", wire.encode(SAMPLES[5])])
    errors: list[WireError] = []
    assert wire.open_packet(packed, keyring=None, errors=errors) == [SAMPLES[5]]
    assert [e.reason for e in errors] == ["unknown_type"]


def test_truncated_compound() -> None:
    packed = wire.compound([wire.encode(SAMPLES[5]), wire.encode(SAMPLES[6])])
    errors: list[WireError] = []
    assert wire.open_packet(packed[:-2], keyring=None, errors=errors) == [SAMPLES[5]]
    assert [e.reason for e in errors] == ["truncated"]
    with pytest.raises(WireError) as info:
        wire.open_packet(packed[:5], keyring=None)
    assert info.value.reason == "truncated"


def test_compressed_packet_as_memberlist_builds_it() -> None:
    payload = wire.encode(SAMPLES[8])
    compressed = b"\x09" + msgpack.packb({"Algo": 0, "Buf": lzw(payload)}, use_bin_type=False)
    assert wire.open_packet(compressed, keyring=None) == [SAMPLES[8]]
    unknown_algo = b"\x09" + msgpack.packb({"Algo": 1, "Buf": b""}, use_bin_type=False)
    with pytest.raises(WireError) as info:
        wire.open_packet(unknown_algo, keyring=None)
    assert info.value.reason == "decompress_failed"


def test_compression_only_when_smaller() -> None:
    small = wire.encode(NackResp(1))
    assert wire.seal_packet(small, keyring=None, crc=False, compress=True) == small
    big = wire.encode(User(payload=b"abc" * 200))
    sealed = wire.seal_packet(big, keyring=None, crc=False, compress=True)
    assert sealed[0] == 9 and len(sealed) < len(big)
    assert wire.open_packet(sealed, keyring=None) == [User(payload=b"abc" * 200)]


def test_encrypted_packet_known_answer() -> None:
    """A packet sealed by hand exactly as memberlist's encryptPayload (version 1) does."""
    payload = wire.encode(SAMPLES[7])
    nonce = os.urandom(12)
    sealed = b"\x01" + nonce + AESGCM(KEY).encrypt(nonce, payload, b"lbl")
    packet = b"\xf4\x03lbl" + sealed
    assert wire.open_packet(packet, keyring=Keyring([KEY]), label=b"lbl") == [SAMPLES[7]]


def test_encrypted_packet_version_0_pkcs7() -> None:
    payload = wire.encode(SAMPLES[7])
    pad = 16 - len(payload) % 16
    nonce = os.urandom(12)
    sealed = b"\x00" + nonce + AESGCM(KEY).encrypt(nonce, payload + bytes([pad]) * pad, None)
    assert wire.open_packet(sealed, keyring=Keyring([KEY])) == [SAMPLES[7]]


def test_encryption_round_trip_wrong_key_replay_and_plaintext() -> None:
    ring = Keyring([KEY])
    sealed = wire.seal_packet(wire.encode(SAMPLES[0]), keyring=ring)
    assert len(sealed) == 1 + 12 + 5 + len(wire.encode(SAMPLES[0])) + 16
    assert wire.open_packet(sealed, keyring=ring) == [SAMPLES[0]]
    reasons = []
    for data, keyring in [
        (sealed, ring),  # the same packet again
        (sealed, Keyring([os.urandom(32)])),
        (wire.seal_packet(wire.encode(SAMPLES[0]), keyring=None), ring),  # plaintext
        (sealed[:20], Keyring([KEY])),
        (b"\x05" + sealed[1:], Keyring([KEY])),  # unknown encryption version
    ]:
        with pytest.raises(WireError) as info:
            wire.open_packet(data, keyring=keyring)
        reasons.append(info.value.reason)
    assert reasons == ["replayed", "decrypt_failed", "decrypt_failed", "decrypt_failed",
                       "decrypt_failed"]


def test_label_checks() -> None:
    payload = wire.encode(SAMPLES[0])
    labelled = wire.seal_packet(payload, keyring=None, label=b"east")
    assert labelled.startswith(b"\xf4\x04east")
    assert wire.open_packet(labelled, keyring=None, label=b"east") == [SAMPLES[0]]
    for data, label in [(labelled, b""), (labelled, b"west"), (payload, b"east"),
                        (b"\xf4\x00" + payload, b"")]:
        with pytest.raises(WireError) as info:
            wire.open_packet(data, keyring=None, label=label)
        assert info.value.reason == "bad_label"
    with pytest.raises(WireError) as info:
        wire.open_packet(b"\xf4\x09ab", keyring=None, label=b"ab")
    assert info.value.reason == "truncated"


def test_nesting_bounded() -> None:
    data = wire.encode(SAMPLES[0])
    for _ in range(8):
        data = wire.compound([data])
    with pytest.raises(WireError) as info:
        wire.open_packet(data, keyring=None)
    assert info.value.reason == "malformed"


def test_push_pull_is_not_a_packet() -> None:
    with pytest.raises(WireError) as info:
        wire.open_packet(wire.encode(PushPull(join=True)), keyring=None)
    assert info.value.reason == "unknown_type"


# ------------------------------------------------------------------ streams

def feed_bytewise(dec: StreamDecoder, data: bytes) -> Message | None:
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        if got is not None:
            assert i == len(data) - 1, "message completed before its last byte"
            return got
    return None


@pytest.mark.parametrize("msg", STREAM_SAMPLES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize(("encrypted", "compressed", "label"),
                         [(False, False, b""), (True, False, b""), (False, True, b""),
                          (True, True, b"lbl"), (False, False, b"lbl")])
def test_stream_round_trip_bytewise(msg: Message, encrypted: bool, compressed: bool,
                                    label: bytes) -> None:
    ring = Keyring([KEY]) if encrypted else None
    data = wire.encode_stream(msg, keyring=ring, label=label, compress=compressed)
    assert feed_bytewise(StreamDecoder(ring, label), data) == msg
    # A fresh keyring: the first one remembers the nonce and would call this a replay.
    fresh = Keyring([KEY]) if encrypted else None
    assert StreamDecoder(fresh, label).feed(data) == msg


def test_push_pull_stream_layout() -> None:
    data = wire.encode_stream(PUSH, keyring=None)
    unpacker = msgpack.Unpacker(raw=True)
    unpacker.feed(data[1:])
    assert data[0] == 6
    assert next(unpacker) == {b"Nodes": 2, b"UserStateLen": 11, b"Join": True}
    first = next(unpacker)
    assert first[b"Name"] == b"a" and first[b"Vsn"] == bytes([1, 5, 2, 2, 5, 4])
    assert data.endswith(b"\x02serf-state")


def test_encrypted_stream_layout() -> None:
    ring = Keyring([KEY])
    data = wire.encode_stream(AckResp(seq_no=5), keyring=ring, label=b"L")
    assert data[:3] == b"\xf4\x01L" and data[3] == 10
    (size,) = struct.unpack(">I", data[4:8])
    assert size == len(data) - 8
    sealed = data[8:]
    plain = AESGCM(KEY).decrypt(sealed[1:13], sealed[13:], data[3:8] + b"L")
    assert plain == wire.encode(AckResp(seq_no=5))


@pytest.mark.parametrize(
    ("data", "keyring", "label", "reason"),
    [
        (b"\x63", None, b"", "unknown_type"),
        (b"\x0a\x00\x00\x00\x05abcde", None, b"", "decrypt_failed"),
        (wire.encode_stream(PUSH, keyring=None), Keyring([KEY]), b"", "not_encrypted"),
        (b"\x0a\x7f\xff\xff\xff", Keyring([KEY]), b"", "too_large"),
        (b"\x06\x81\xa5Nodes\xce\x7f\x00\x00\x00", None, b"", "too_many_nodes"),
        (b"\x08\x81\xaaUserMsgLen\xce\x7f\x00\x00\x00", None, b"", "too_large"),
        (wire.encode_stream(PUSH, keyring=None), None, b"x", "bad_label"),
        (wire.encode_stream(PUSH, keyring=None, label=b"y"), None, b"x", "bad_label"),
    ],
)
def test_stream_errors(data: bytes, keyring: Keyring | None, label: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        StreamDecoder(keyring, label).feed(data)
    assert info.value.reason == reason


def test_stream_truncated_at_eof_and_size_bound() -> None:
    data = wire.encode_stream(PUSH, keyring=None)
    dec = StreamDecoder(None)
    assert dec.feed(data[:-3]) is None
    with pytest.raises(WireError) as info:
        dec.eof()
    assert info.value.reason == "truncated"
    small = StreamDecoder(None, max_size=10)
    with pytest.raises(WireError) as info:
        small.feed(data)
    assert info.value.reason == "too_large"


def test_stream_wrong_key() -> None:
    data = wire.encode_stream(PUSH, keyring=Keyring([KEY]))
    with pytest.raises(WireError) as info:
        StreamDecoder(Keyring([bytes(16)])).feed(data)
    assert info.value.reason == "decrypt_failed"


def test_keyring_rotation_across_peers() -> None:
    old, new = bytes(16), bytes(range(1, 17))
    sender = Keyring([old])
    receiver = Keyring([old])
    receiver.add_key(new)
    sender.add_key(new)
    sender.use_key(new)
    packet = wire.seal_packet(wire.encode(SAMPLES[0]), keyring=sender)
    assert wire.open_packet(packet, keyring=receiver) == [SAMPLES[0]]
    receiver.use_key(new)
    receiver.remove_key(old)
    assert receiver.keys == (new,)
    with pytest.raises(WireError):
        wire.open_packet(wire.seal_packet(wire.encode(SAMPLES[0]), keyring=Keyring([old])),
                         keyring=receiver)
