"""The incremental stream decoder: any split of a stream parses like the whole, within limits.

A hostile peer chooses how its bytes arrive and what they claim; the decoder
must give the same answer for every split, refuse what breaks a limit as soon
as it is declared, and name what went wrong.
"""

from __future__ import annotations

import itertools
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmirror.mesh import wire
from meshmirror.mesh.config import META_MAX_SIZE, NAME_MAX_SIZE
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import (
    AckResp,
    Alive,
    ErrResp,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    User,
)
from meshmirror.mesh.wire import StreamDecoder, WireError

KEY = bytes(range(16))
VSN = (1, 5, 2, 2, 5, 4)


def node(i: int, *, meta: bytes = b"", name: str | None = None) -> PushNodeState:
    return PushNodeState(name or f"node-{i}", bytes((10, 0, i >> 8 & 255, i & 255)), 7946,
                         meta, i, NodeState(i % 4), VSN)


BIG_PUSH = PushPull(join=False, nodes=tuple(node(i, meta=b"t" * (i % 90)) for i in range(300)),
                    user_state=bytes(range(256)) * 40)
MESSAGES: list[Message] = [
    BIG_PUSH,
    PushPull(join=True),
    PushPull(join=True, nodes=(node(1, name="ünïcødé-名前"),), user_state=b"x"),
    Ping(seq_no=7, node="n"),
    AckResp(seq_no=3, payload=b"p" * 100),
    User(payload=bytes(range(256)) * 300),
    ErrResp(error="nope"),
]
FRAMINGS = [(False, False, b""), (False, True, b""), (True, False, b"lbl"), (True, True, b"")]


def encoded(msg: Message, encrypted: bool, compressed: bool, label: bytes) -> bytes:
    ring = Keyring([KEY]) if encrypted else None
    return wire.encode_stream(msg, keyring=ring, label=label, compress=compressed)


STREAMS = [(msg, f, encoded(msg, *f)) for msg in MESSAGES for f in FRAMINGS]


def decode_split(data: bytes, cuts: list[int], encrypted: bool, label: bytes) -> Message:
    """Feed ``data`` cut at ``cuts``; the message must complete exactly at the last byte."""
    dec = StreamDecoder(Keyring([KEY]) if encrypted else None, label)
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        got = dec.feed(data[start:end])
        if got is not None:
            assert end == len(data), f"message complete at byte {end} of {len(data)}"
            return got
    dec.eof()
    raise AssertionError("eof() accepted an incomplete message")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(range(len(STREAMS))), st.data())
def test_any_split_decodes_like_one_shot(index: int, data: st.DataObject) -> None:
    msg, (encrypted, _, label), raw = STREAMS[index]
    cuts = data.draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=40))
    assert decode_split(raw, cuts, encrypted, label) == msg


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_small_and_odd_reads(chunk: int) -> None:
    for msg, (encrypted, compressed, label), raw in STREAMS:
        if chunk == 1 and len(raw) > 20_000:
            continue  # bytewise through a 100 KB stream proves nothing more and takes long
        cuts = list(range(chunk, len(raw), chunk))
        assert decode_split(raw, cuts, encrypted, label) == msg, (type(msg), compressed)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(range(len(STREAMS))), st.data())
def test_truncated_streams_say_truncated(index: int, data: st.DataObject) -> None:
    _, (encrypted, _, label), raw = STREAMS[index]
    cut = data.draw(st.integers(0, len(raw) - 1))
    dec = StreamDecoder(Keyring([KEY]) if encrypted else None, label)
    assert dec.feed(raw[:cut]) is None
    with pytest.raises(WireError) as info:
        dec.eof()
    assert info.value.reason == "truncated"


def test_reads_are_parsed_once() -> None:
    """Small reads of a large push-pull cost about what one read does (it used to be quadratic)."""
    push = PushPull(join=False, nodes=tuple(node(i) for i in range(3000)))
    raw = wire.encode_stream(push, keyring=None)
    t0 = time.perf_counter()
    assert StreamDecoder(None).feed(raw) == push
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert decode_split(raw, list(range(100, len(raw), 100)), False, b"") == push
    split = time.perf_counter() - t0
    assert split < 10 * whole + 0.5, (whole, split)


def packb(obj: dict[str, object]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=False)
    return data


def header(nodes: int, user_state: int = 0) -> bytes:
    return bytes((6,)) + packb({"Nodes": nodes, "UserStateLen": user_state,
                                "Join": False})


def reason_of(*chunks: bytes, keyring: Keyring | None = None) -> str:
    dec = StreamDecoder(keyring)
    with pytest.raises(WireError) as info:
        for chunk in chunks:
            dec.feed(chunk)
        dec.eof()
    return info.value.reason


def test_limits_are_refused_when_declared() -> None:
    assert reason_of(header(1_000_000)) == "too_many_nodes"
    assert reason_of(header(wire.MAX_PUSH_STATE_NODES + 1)) == "too_many_nodes"
    assert reason_of(header(0, wire.MAX_USER_STATE_BYTES + 1)) == "too_large"
    user = bytes((8,)) + packb({"UserMsgLen": wire.MAX_USER_MSG_BYTES + 1})
    assert reason_of(user) == "too_large"
    sealed = bytes((10,)) + (wire.MAX_PUSH_STATE_BYTES + 1).to_bytes(4, "big")
    assert reason_of(sealed, keyring=Keyring([KEY])) == "too_large"
    # A compressed body whose declared size is over the stream limit.
    wrapper = bytes((9, 0x82, 0xA4)) + b"Algo" + b"\x00\xa3Buf\xdb" + (1 << 30).to_bytes(4, "big")
    assert reason_of(wrapper) == "too_large"


def test_a_huge_value_is_refused_before_it_is_buffered() -> None:
    """A node state that never ends is dropped once it passes the per-value bound."""
    endless = header(1) + b"\x81\xa4Name\xdb" + (1 << 31).to_bytes(4, "big")
    dec = StreamDecoder(None)
    dec.feed(endless)
    with pytest.raises(WireError) as info:
        for _ in range(wire.MAX_STREAM_OBJECT // 8192 + 2):
            dec.feed(b"a" * 8192)
    assert info.value.reason == "too_large"
    assert dec.received < wire.MAX_STREAM_OBJECT + 3 * 8192


def test_stream_size_bound() -> None:
    raw = wire.encode_stream(BIG_PUSH, keyring=None)
    dec = StreamDecoder(None, max_size=len(raw) - 1)
    with pytest.raises(WireError) as info:
        dec.feed(raw)
    assert info.value.reason == "too_large"


def test_decompression_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_DECOMPRESSED_BYTES", 50_000)
    raw = wire.encode_stream(User(payload=bytes(60_000)), keyring=None, compress=True)
    assert len(raw) < 5_000
    assert reason_of(raw) == "too_large"


def raw_node(name: bytes = b"ok", addr: bytes = b"\x7f\0\0\2", meta: bytes = b"") -> bytes:
    return packb({"Name": name, "Addr": addr, "Port": 1, "Meta": meta, "Incarnation": 1,
                  "State": 0, "Vsn": bytes(VSN)})


@pytest.mark.parametrize(("bad", "reason"), [
    (raw_node(name=b"\xff\xfe-not-utf8"), "bad_name"),
    (raw_node(name=b""), "bad_name"),
    (raw_node(name=b"n" * (NAME_MAX_SIZE + 1)), "bad_name"),
    (raw_node(addr=b"\x7f\0\0"), "bad_addr"),
    (raw_node(meta=b"m" * (META_MAX_SIZE + 1)), "bad_meta"),
])
def test_bad_push_pull_entries_are_left_out_and_counted(bad: bytes, reason: str) -> None:
    dec = StreamDecoder(None)
    got = dec.feed(header(2) + bad + raw_node())
    assert isinstance(got, PushPull)
    assert [n.name for n in got.nodes] == ["ok"]
    assert [err.reason for err in dec.rejected] == [reason]


def alive(name: bytes = b"ok", addr: bytes = b"\x7f\0\0\2", meta: bytes = b"") -> bytes:
    return bytes((4,)) + packb({"Incarnation": 1, "Node": name, "Addr": addr, "Port": 1,
                                "Meta": meta, "Vsn": bytes(VSN)})


@pytest.mark.parametrize(("packet", "reason"), [
    (alive(name=b"caf\xe9"), "bad_name"),
    (alive(name=b"x" * (NAME_MAX_SIZE + 1)), "bad_name"),
    (alive(addr=b"\x7f\0\0\1\0"), "bad_addr"),
    (alive(addr=b""), "bad_addr"),
    (alive(meta=b"m" * (META_MAX_SIZE + 1)), "bad_meta"),
])
def test_bad_packets_are_refused_with_a_reason(packet: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        wire.open_packet(packet, keyring=None)
    assert info.value.reason == reason


def test_longest_allowed_name_and_meta_pass() -> None:
    name = "é" * (NAME_MAX_SIZE // 2)
    msg = Alive(1, name, b"\x7f\0\0\2", 1, b"m" * META_MAX_SIZE, VSN)
    assert wire.open_packet(wire.encode(msg), keyring=None) == [msg]
