"""Whatever arrives, the core counts and drops what it cannot use and never raises."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshmirror.mesh import wire
from meshmirror.mesh.messages import Alive, Dead, Ping, Suspect

from .helpers import make, mesh

_VALID = [
    wire.encode(Ping(1, "a")),
    wire.encode(Suspect(1, "b", "c")),
    wire.encode(Alive(3, "b", bytes([127, 50, 0, 2]), 7946, b"m", (1, 5, 2, 2, 5, 4))),
    wire.encode(Dead(2, "c", "b")),
]


@given(st.binary(max_size=300))
def test_random_packets_never_raise(data: bytes) -> None:
    a = make("a", 1)
    a.packet_received(data, ("127.50.0.9", 1), 0.0)
    a.drain()


@given(st.sampled_from(_VALID), st.integers(min_value=0, max_value=200),
       st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=200))
def test_mutated_packets_never_raise(base: bytes, pos: int, byte: int, cut: int) -> None:
    cores = [make(n, i + 1) for i, n in enumerate("abc")]
    mesh(cores)
    a = cores[0]
    data = bytearray(base)
    if data:
        data[pos % len(data)] = byte
    data = data[: max(1, len(data) - cut % (len(data) + 1))]
    before = sum(a.stats.dropped.values())
    a.packet_received(bytes(data), ("127.50.0.9", 1), 0.0)
    a.drain()
    a.tick(100.0)
    a.drain()
    assert sum(a.stats.dropped.values()) >= before
