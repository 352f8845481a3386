"""Drive sans-IO cores by hand: step clocks, read what they would send, deliver it."""

from __future__ import annotations

import random
from collections.abc import Iterable

from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import Delegate, Effect, NodeInfo, OpenStream, SendPacket
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.messages import Message, NodeState, Ping, PushNodeState, PushPull
from meshmirror.mesh.simulator import wire_stream_decode
from meshmirror.mesh.state import Codec, Memberlist, ip_to_bytes

CFG = MeshConfig()


def make(name: str, n: int, *, cfg: MeshConfig = CFG, now: float = 0.0, meta: bytes = b"",
         seed: int | None = None, keyring: Keyring | None = None,
         delegate: Delegate | None = None, codec: Codec | None = None) -> Memberlist:
    """A core at 127.50.0.<n>:7946."""
    rng = random.Random(seed if seed is not None else n)
    return Memberlist(cfg, name=name, addr=f"127.50.0.{n}", port=7946, meta=meta, rng=rng,
                      now=now, keyring=keyring, delegate=delegate, codec=codec)


def member(core: Memberlist, name: str) -> NodeInfo:
    """``core``'s view of ``name``, which the test knows ``core`` has."""
    info = core.member(name)
    assert info is not None, f"{core.name} does not know {name}"
    return info


def addr(core: Memberlist) -> tuple[str, int]:
    return (core.addr, core.port)


def state_of(core: Memberlist, inc: int = 1, state: NodeState = NodeState.ALIVE,
             meta: bytes = b"") -> PushNodeState:
    return PushNodeState(core.name, ip_to_bytes(core.addr), core.port, meta, inc, state,
                         core.config.vsn)


def introduce(target: Memberlist, others: Iterable[Memberlist], now: float = 0.0) -> None:
    """Tell ``target`` about ``others`` through a push-pull merge, then forget the side effects."""
    nodes = tuple(state_of(o, o.incarnation, meta=member(o, o.name).meta)
                  for o in others)
    target.stream_received(PushPull(False, nodes), ("127.0.0.1", 1), now)
    target.broadcasts.reset()
    target.drain()


def mesh(cores: list[Memberlist], now: float = 0.0) -> None:
    for c in cores:
        introduce(c, [o for o in cores if o is not c], now)


def sent(effects: Iterable[Effect]) -> list[SendPacket]:
    return [e for e in effects if isinstance(e, SendPacket)]


def opened(effects: Iterable[Effect]) -> list[OpenStream]:
    return [e for e in effects if isinstance(e, OpenStream)]


def decode(packet: SendPacket, keyring: Keyring | None = None) -> list[Message]:
    return wire.open_packet(packet.data, keyring=keyring)


def messages(effects: Iterable[Effect]) -> list[tuple[tuple[str, int], Message]]:
    """Every (destination, message) in the packets among ``effects``."""
    return [(p.addr, m) for p in sent(effects) for m in decode(p)]


def of_type(effects: Iterable[Effect], kind: type) -> list[Message]:
    return [m for _, m in messages(effects) if isinstance(m, kind)]


def step(core: Memberlist, until: float) -> list[Effect]:
    """Run ``core``'s timers up to ``until``; every effect they produced."""
    out: list[Effect] = []
    while True:
        deadline = core.next_deadline()
        if deadline is None or deadline > until:
            break
        core.tick(deadline)
        out.extend(core.drain())
    return out


def until_ping(core: Memberlist, limit: float = 5.0) -> tuple[float, list[Effect]]:
    """Step ``core`` until it sends a probe ping; the time and what it sent."""
    out: list[Effect] = []
    while True:
        deadline = core.next_deadline()
        assert deadline is not None and deadline <= limit, "no probe before the limit"
        core.tick(deadline)
        effects = core.drain()
        out.extend(effects)
        if of_type(effects, Ping):
            return deadline, out


def deliver(effects: Iterable[Effect], cores: Iterable[Memberlist], now: float,
            source: Memberlist) -> list[Effect]:
    """Hand each packet to the core it is addressed to; what they produced in turn."""
    by_addr = {addr(c): c for c in cores}
    out: list[Effect] = []
    for p in sent(effects):
        dst = by_addr.get(p.addr)
        if dst is not None:
            dst.packet_received(p.data, addr(source), now)
            out.extend(dst.drain())
    return out


def push_pull(src: Memberlist, dst: Memberlist, effect: OpenStream, now: float) -> None:
    """Carry out one push-pull stream between two cores."""
    reply = dst.stream_received(wire_stream_decode(effect.data), addr(src), now)
    assert reply is not None
    src.stream_reply(effect.stream_id, wire_stream_decode(reply), now)


__all__ = ["CFG", "MeshConfig"]
