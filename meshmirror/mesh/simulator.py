"""A discrete-event simulator that runs many membership cores on one virtual clock.

Because the core is sans-IO, a thousand of them fit in one Python process: the
simulator owns the clock (an event heap), carries every packet as the real
encoded bytes from ``wire`` (so byte counts are what a real network would
carry), and models the network between them: one-way latency with jitter,
random loss, partitions between groups of nodes, crashed nodes. It answers
the questions the real-process tests cannot afford at scale: how fast does news
reach 99.9% of 1,000 nodes, how fast is a crash detected, how many healthy
nodes are wrongly declared dead at 10% loss.

Virtual addresses are 127.x.y.z strings: they only name nodes inside the
simulation and never reach a socket.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import Address, Effect, OpenStream, SendPacket
from meshmirror.mesh.messages import Message, NodeState, PushNodeState, PushPull
from meshmirror.mesh.state import Codec, Memberlist, ip_to_bytes

if TYPE_CHECKING:
    from meshmirror.mesh.keyring import Keyring

StreamDecode = Callable[[bytes], Message]
Observer = Callable[[float, str, Effect], None]


class _StreamMemo:
    """The real codec, remembering which message each stream's bytes encode.

    Streams are still encoded by ``wire`` (so their sizes are real), but the
    receiving side gets the original message back instead of parsing a
    thousand-entry push-pull again: in a 1,000-node run that parse is most of
    the CPU, and it proves nothing the wire tests do not.
    """

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._sent: dict[int, tuple[bytes, Message]] = {}

    def encode(self, msg: Message) -> bytes:
        return self._codec.encode(msg)

    def compound(self, parts: list[bytes]) -> bytes:
        return self._codec.compound(parts)

    def seal_packet(self, payload: bytes, *, keyring: Keyring | None, label: bytes = b"",
                    crc: bool = True, compress: bool = False) -> bytes:
        return self._codec.seal_packet(payload, keyring=keyring, label=label, crc=crc,
                                       compress=compress)

    def open_packet(self, data: bytes, *, keyring: Keyring | None, label: bytes = b"",
                    errors: list[wire.WireError] | None = None) -> list[Message]:
        return self._codec.open_packet(data, keyring=keyring, label=label, errors=errors)

    def encode_stream(self, msg: Message, *, keyring: Keyring | None, label: bytes,
                      compress: bool) -> bytes:
        data = self._codec.encode_stream(msg, keyring=keyring, label=label, compress=compress)
        self._sent[id(data)] = (data, msg)
        return data

    def take(self, data: bytes) -> Message | None:
        """The message these exact bytes were made from, once; None if unknown."""
        entry = self._sent.pop(id(data), None)
        if entry is None or entry[0] is not data:
            return None
        return entry[1]


def wire_stream_decode(data: bytes) -> Message:
    """Decode one complete TCP stream message with the real wire codec."""
    decoder = wire.StreamDecoder(None)
    msg = decoder.feed(data)
    if msg is None:
        raise wire.WireError("truncated", "incomplete stream message")
    return msg


@dataclass
class NetworkModel:
    """How packets fare between nodes. Times in seconds."""

    latency: float = 0.0005
    """One-way base latency (a LAN: half a millisecond)."""
    jitter: float = 0.0005
    """Uniform extra one-way delay in ``[0, jitter)``."""
    loss: float = 0.0
    """Probability that any one UDP packet is lost. TCP streams are not lossy, only slower."""


@dataclass
class _SimNode:
    name: str
    addr: Address
    core: Memberlist
    up: bool = True
    wake_at: float = float("inf")
    group: int = 0


@dataclass
class TrafficTotals:
    packets: int = 0
    bytes: int = 0
    stream_bytes: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0


class Simulator:
    """Many ``Memberlist`` cores, a virtual clock and a lossy, partitionable network."""

    def __init__(self, config: MeshConfig, *, seed: int = 1,
                 network: NetworkModel | None = None, codec: Codec | None = None,
                 stream_decode: StreamDecode | None = None) -> None:
        self.config = config
        self.network = network or NetworkModel()
        self.rng = random.Random(seed)
        self.now = 0.0
        self._memo = _StreamMemo(codec if codec is not None else wire)
        self.codec: Codec = self._memo
        self.stream_decode = stream_decode or wire_stream_decode
        self.nodes: dict[str, _SimNode] = {}
        self.by_addr: dict[Address, _SimNode] = {}
        self.traffic = TrafficTotals()
        # (time, tie-breaker, kind, args): plain tuples compare fastest.
        self._heap: list[tuple[float, int, str, tuple[object, ...]]] = []
        self._seq = itertools.count()
        self._observers: list[Observer] = []
        self._addr_counter = itertools.count(0)

    # ----------------------------------------------------------------- set-up

    def observe(self, fn: Observer) -> None:
        """Call ``fn(time, node_name, effect)`` for every membership/user effect."""
        self._observers.append(fn)

    def _next_addr(self) -> Address:
        i = next(self._addr_counter)
        return (f"127.{100 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}", 7946)

    def add_node(self, name: str, meta: bytes = b"") -> Memberlist:
        """Start one node (not yet joined to anyone)."""
        if name in self.nodes:
            raise ValueError(f"simulator: node {name!r} already exists")
        addr = self._next_addr()
        core = Memberlist(self.config, name=name, addr=addr[0], port=addr[1], meta=meta,
                          rng=random.Random(self.rng.getrandbits(64)), now=self.now,
                          codec=self.codec)
        node = _SimNode(name, addr, core)
        self.nodes[name] = node
        self.by_addr[addr] = node
        self._pump(node)
        return core

    def bootstrap(self, count: int, prefix: str = "n", meta: bytes = b"") -> list[str]:
        """``count`` nodes that already know each other, as if long since converged.

        Each gets the full member list through a real push-pull merge; the
        broadcasts that merge would queue are then dropped, so measurements
        start from a quiet, steady cluster instead of a join storm.
        """
        names = [f"{prefix}{i}" for i in range(count)]
        for name in names:
            self.add_node(name, meta)
        states = tuple(
            PushNodeState(n.name, ip_to_bytes(n.addr[0]), n.addr[1], meta, 1, NodeState.ALIVE,
                          self.config.vsn)
            for n in (self.nodes[name] for name in names))
        full = PushPull(join=False, nodes=states)
        for name in names:
            node = self.nodes[name]
            node.core.merge_state(full, self.now, quiet=True)
            node.core.reschedule_push_pull(self.now)
            node.core.broadcasts.reset()  # its own start-up alive: old news here
            node.core.drain()
            self._reschedule(node)
        return names

    # ----------------------------------------------------------------- faults

    def crash(self, name: str) -> None:
        """kill -9: the node stops answering and forgets nothing (it is simply gone)."""
        node = self.nodes[name]
        node.up = False
        node.core.stop()

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: nodes only reach nodes of their own group (others: group 0)."""
        for node in self.nodes.values():
            node.group = 0
        for i, group in enumerate(groups, start=1):
            for name in group:
                self.nodes[name].group = i

    def heal(self) -> None:
        for node in self.nodes.values():
            node.group = 0

    # ----------------------------------------------------------------- running

    def run_until(self, t: float) -> None:
        """Process every event up to virtual time ``t``."""
        heap = self._heap
        while heap and heap[0][0] <= t:
            at, _, kind, args = heapq.heappop(heap)
            self.now = at
            if kind == "wake":
                node = self.nodes[str(args[0])]
                if node.up and node.wake_at == at:
                    node.wake_at = float("inf")
                    node.core.tick(at)
                    self._pump(node)
            elif kind == "packet":
                self._deliver_packet(args)
            elif kind == "stream":
                self._deliver_stream(args)
            elif kind == "reply":
                self._deliver_reply(args)
            elif kind == "stream_late":
                self._deliver_late_stream(args)
            elif kind == "call":
                fn = args[0]
                assert callable(fn)
                fn()
        self.now = max(self.now, t)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``t`` (scenario steps: crash, join, update)."""
        self._push(t, "call", (fn,))

    def act(self, name: str, fn: Callable[[Memberlist, float], None]) -> None:
        """Call into one core now (join, update_meta, leave) and carry out its effects."""
        node = self.nodes[name]
        fn(node.core, self.now)
        self._pump(node)

    # ----------------------------------------------------------------- internals

    def _push(self, t: float, kind: str, args: tuple[object, ...]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, args))

    def _delay(self) -> float:
        net = self.network
        return net.latency + (self.rng.random() * net.jitter if net.jitter else 0.0)

    def _reachable(self, a: _SimNode, b: _SimNode) -> bool:
        return a.group == b.group

    def _reschedule(self, node: _SimNode) -> None:
        deadline = node.core.next_deadline()
        if deadline is not None and deadline < node.wake_at:
            node.wake_at = deadline
            self._push(deadline, "wake", (node.name,))

    def _pump(self, node: _SimNode) -> None:
        """Carry out everything a core asked for, then make sure it is woken in time."""
        if not node.up:
            return
        traffic = self.traffic
        for effect in node.core.drain():
            if isinstance(effect, SendPacket):
                traffic.packets += 1
                traffic.bytes += len(effect.data)
                self._send_packet(node, effect)
            elif isinstance(effect, OpenStream):
                traffic.stream_bytes += len(effect.data)
                self._push(self.now + self._delay(), "stream", (node.name, effect))
            else:
                for fn in self._observers:
                    fn(self.now, node.name, effect)
        self._reschedule(node)

    def _send_packet(self, src: _SimNode, effect: SendPacket) -> None:
        traffic = self.traffic
        if self.network.loss and self.rng.random() < self.network.loss:
            traffic.dropped_loss += 1
            return
        dst = self.by_addr.get(effect.addr)
        if dst is None or not dst.up:
            traffic.dropped_down += 1
            return
        if not self._reachable(src, dst):
            traffic.dropped_partition += 1
            return
        self._push(self.now + self._delay(), "packet", (dst.name, effect.data, src.addr))

    def _deliver_packet(self, args: tuple[object, ...]) -> None:
        name, data, source = args
        node = self.nodes[str(name)]
        if not node.up:
            self.traffic.dropped_down += 1
            return
        assert isinstance(data, bytes) and isinstance(source, tuple)
        node.core.packet_received(data, source, self.now)
        self._pump(node)

    def _deliver_stream(self, args: tuple[object, ...]) -> None:
        src_name, effect = args
        assert isinstance(effect, OpenStream)
        src = self.nodes[str(src_name)]
        dst = self.by_addr.get(effect.addr)
        if dst is None or not dst.up:
            # A dead process: the kernel answers the SYN with a reset at once.
            self._push(self.now + self._delay(), "reply", (src.name, effect.stream_id, None))
            return
        if not self._reachable(src, dst):
            self._push(self.now - self._delay() + effect.timeout, "reply",
                       (src.name, effect.stream_id, None))
            return
        stall = self._tcp_stall()
        if stall + 2 * self._delay() > effect.timeout:
            self._push(self.now - self._delay() + effect.timeout, "reply",
                       (src.name, effect.stream_id, None))
            return
        if stall:
            self._push(self.now + stall, "stream_late", (src.name, effect))
            return
        self._serve_stream(src, dst, effect)

    def _tcp_stall(self) -> float:
        """Extra time TCP spends retransmitting through loss (RTO 1 s, doubling).

        A stream is four segments that matter here (SYN, SYN-ACK, request,
        reply); each lost one costs a retransmission timeout. That is what
        makes a TCP fallback ping, with well under a second left, fail under
        loss, while a push-pull with ten seconds to spare gets through.
        """
        loss = self.network.loss
        if not loss:
            return 0.0
        stall, rto = 0.0, 1.0
        for _ in range(4):
            while self.rng.random() < loss:
                stall += rto
                rto *= 2
                if stall > 60.0:
                    return stall
        return stall

    def _serve_stream(self, src: _SimNode, dst: _SimNode, effect: OpenStream) -> None:
        reply = dst.core.stream_received(self._decode_stream(effect.data), src.addr, self.now)
        self._pump(dst)
        if reply is not None:
            self.traffic.stream_bytes += len(reply)
            self._push(self.now + self._delay(), "reply", (src.name, effect.stream_id, reply))
        else:
            self._push(self.now + self._delay(), "reply", (src.name, effect.stream_id, None))

    def _deliver_late_stream(self, args: tuple[object, ...]) -> None:
        src_name, effect = args
        assert isinstance(effect, OpenStream)
        src = self.nodes[str(src_name)]
        dst = self.by_addr.get(effect.addr)
        if dst is None or not dst.up or not self._reachable(src, dst):
            self._push(self.now + self._delay(), "reply", (src.name, effect.stream_id, None))
            return
        self._serve_stream(src, dst, effect)

    def _decode_stream(self, data: bytes) -> Message:
        msg = self._memo.take(data)
        return msg if msg is not None else self.stream_decode(data)

    def _deliver_reply(self, args: tuple[object, ...]) -> None:
        name, stream_id, data = args
        node = self.nodes[str(name)]
        if not node.up:
            return
        assert isinstance(stream_id, int)
        msg = self._decode_stream(data) if isinstance(data, bytes) else None
        node.core.stream_reply(stream_id, msg, self.now)
        self._pump(node)
