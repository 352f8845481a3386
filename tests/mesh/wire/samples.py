"""Messages every memberlist wire test round-trips: one of each kind, with the edge
values (largest seq, raw-byte addresses, empty and full push-pull)."""

from __future__ import annotations

from meshmirror.mesh.messages import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    Message,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
)

KEY = bytes(range(16))

SAMPLES: list[Message] = [
    Ping(seq_no=7, node="n1"),
    Ping(seq_no=2**32 - 1, node="n1", source_addr=b"\x7f\x00\x00\x02", source_port=7946,
         source_node="n2"),
    IndirectPing(seq_no=9, target=b"\x7f\x00\x00\x03", port=7000, node="t", nack=True,
                 source_addr=b"\x7f\x00\x00\x02", source_port=1, source_node="s"),
    AckResp(seq_no=3, payload=b"\x01\x02"),
    AckResp(seq_no=3),
    NackResp(seq_no=4),
    ErrResp(error="boom"),
    Suspect(incarnation=5, node="a", from_node="b"),
    Alive(incarnation=1, node="a", addr=b"\x7f\x00\x00\x02", port=7946, meta=b"\xffm",
          vsn=(1, 5, 2, 2, 5, 4)),
    Dead(incarnation=6, node="a", from_node="a"),
    User(payload=b"\x00user"),
]


PUSH = PushPull(
    join=True,
    nodes=(
        PushNodeState("a", b"\x7f\0\0\2", 7946, b"\xff\x80", 3, NodeState.ALIVE,
                      (1, 5, 2, 2, 5, 4)),
        PushNodeState("b", b"\x7f\0\0\3", 7947, b"", 9, NodeState.DEAD, (1, 5, 2, 2, 5, 4)),
    ),
    user_state=b"\x02serf-state",
)

STREAM_SAMPLES: list[Message] = [PUSH, PushPull(join=False), Ping(seq_no=1, node="x"),
                                 AckResp(seq_no=1), User(payload=b"hello" * 100),
                                 ErrResp(error="nope")]
