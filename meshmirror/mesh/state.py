"""The sans-IO SWIM + Lifeguard state machine, a port of HashiCorp memberlist's state.go.

Nothing here touches a socket, the clock or a thread. Every input carries
``now`` (seconds, any monotonic origin); every output is an effect value
(``events.py``) the caller collects with ``drain()``; timers are deadlines the
caller honours by calling ``tick`` at ``next_deadline()``. Randomness comes
from an injected ``random.Random``. That makes one core drivable by the asyncio
transport, by a simulator with a virtual clock and thousands of nodes, and by
unit tests that step it message by message.

What it implements, following memberlist closely so that published memberlist
numbers and a real Serf agent both apply:

- probing: one member per ``probe_interval`` in shuffled round-robin, ping,
  then after ``probe_timeout`` indirect pings through ``indirect_checks``
  members (with nacks) and a TCP fallback ping, then suspicion;
- Lifeguard: awareness stretches probing when we ourselves look unhealthy;
  suspicion timeouts start long and shrink with independent confirmations;
  the buddy system tells a suspect directly, piggybacked on its probe;
- refutation by incarnation number, dead and left states, dead-node reclaim
  and the gossip-to-the-dead window;
- transmit-limited broadcasts piggybacked on every packet and gossiped to
  ``gossip_nodes`` members each ``gossip_interval``, packed into compound
  messages that fit ``udp_buffer_size``;
- push-pull full-state sync over TCP at join and periodically (scaled with
  cluster size), user messages and a user-state hook for the layers above;
- metadata up to 512 bytes, graceful leave.
"""

from __future__ import annotations

import heapq
import importlib
import ipaddress
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from meshmirror.mesh.awareness import Awareness
from meshmirror.mesh.config import META_MAX_SIZE, NAME_MAX_SIZE, MeshConfig
from meshmirror.mesh.events import (
    Address,
    Delegate,
    Effect,
    JoinResult,
    MemberJoined,
    MemberLeft,
    MemberUpdated,
    NodeInfo,
    OpenStream,
    SendPacket,
    UserMessage,
)
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
from meshmirror.mesh.queue import TransmitLimitedQueue
from meshmirror.mesh.suspicion import Suspicion

if TYPE_CHECKING:
    from meshmirror.mesh.keyring import Keyring
    from meshmirror.mesh.wire import WireError

__all__ = [
    "Codec",
    "Delegate",
    "Memberlist",
    "MeshStats",
    "Undecryptable",
    "push_pull_scale",
    "suspicion_timeout",
]

# memberlist's framing overheads (net.go), used to pack broadcasts into one datagram.
COMPOUND_HEADER_OVERHEAD = 2  # type byte + part count
COMPOUND_OVERHEAD = 2  # per part: its uint16 length
MAX_COMPOUND_PARTS = 255
PUSH_PULL_SCALE_THRESHOLD = 32
_SEQ_MASK = 0xFFFFFFFF
_RTT_SAMPLES = 1024
UNDECRYPTABLE_SOURCES = 16
"""Source addresses counted one by one; gossip from any further address counts as "other"."""
KEY_MISMATCH_REASONS = frozenset({"decrypt_failed", "not_encrypted"})
"""Drop reasons that mean the sender's gossip key (or lack of one) differs from ours."""


class Codec(Protocol):
    """The bytes side of the protocol; ``meshmirror.mesh.wire`` satisfies it.

    Injected rather than imported so the core can be unit-tested against a fake
    and the simulator can put real wire bytes through the same core.
    """

    def encode(self, msg: Message) -> bytes: ...

    def compound(self, parts: list[bytes]) -> bytes: ...

    def seal_packet(self, payload: bytes, *, keyring: Keyring | None, label: bytes = b"",
                    crc: bool = True, compress: bool = False) -> bytes: ...

    def open_packet(self, data: bytes, *, keyring: Keyring | None, label: bytes = b"",
                    errors: list[WireError] | None = None) -> list[Message]: ...

    def encode_stream(self, msg: Message, *, keyring: Keyring | None, label: bytes,
                      compress: bool) -> bytes: ...


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """The minimum suspicion timeout: grows with log10 of the cluster size."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    # memberlist computes in whole milliseconds of node scale.
    return suspicion_mult * math.floor(node_scale * 1000) * interval / 1000


def push_pull_scale(interval: float, n: int) -> float:
    """Push-pull interval for ``n`` nodes: doubling the cluster past 32 adds one interval."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return multiplier * interval


def ip_to_bytes(addr: str) -> bytes:
    """An advertised IP as memberlist puts it on the wire (4 bytes for IPv4)."""
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError as err:
        raise ValueError(f"mesh: advertise address must be an IP address, got {addr!r}") from err


def ip_from_bytes(raw: bytes) -> str | None:
    """Wire IP to text; Go's 16-byte IPv4-mapped form comes back as plain IPv4."""
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        v6 = ipaddress.IPv6Address(raw)
        mapped = v6.ipv4_mapped
        return str(mapped) if mapped is not None else str(v6)
    return None


class Undecryptable:
    """Gossip this node could not decrypt, by source address.

    A node whose gossip key differs from the others' (a Secret redrawn by a GitOps
    render, say) is cut off from the mesh without failing: it just never hears
    anyone. Counting by source tells which side holds the odd key. Addresses come
    from the network, and UDP sources can be forged, so only the first
    ``UNDECRYPTABLE_SOURCES`` addresses get their own count; later ones share
    "other", which keeps the metric's label set bounded.
    """

    def __init__(self, limit: int = UNDECRYPTABLE_SOURCES) -> None:
        self.limit = limit
        self.by_source: dict[str, int] = {}
        self.total = 0
        self.last: float | None = None
        """``now`` (the caller's monotonic clock) of the latest one, or None."""

    def record(self, host: str, now: float) -> None:
        source = host if host in self.by_source or len(self.by_source) < self.limit else "other"
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.total += 1
        self.last = now


@dataclass
class MeshStats:
    """Plain counters the transport's Prometheus collector reads at scrape time.

    Integers and dicts only, updated in place, so reading them from another
    thread sees a slightly stale but consistent-enough value without locks.
    """

    messages_sent: dict[str, int] = field(default_factory=dict)
    messages_received: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Encoded message bytes by type, before compound framing, sealing and compression."""
    packets_sent: int = 0
    packets_received: int = 0
    packet_bytes_sent: int = 0
    packet_bytes_received: int = 0
    streams_opened: int = 0
    streams_received: int = 0
    stream_bytes_sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0
    tcp_fallback_rescues: int = 0
    probe_rtt_count: int = 0
    probe_rtt_sum: float = 0.0
    probe_rtt_samples: deque[float] = field(default_factory=lambda: deque(maxlen=_RTT_SAMPLES))
    suspicions: int = 0
    refutations: int = 0
    deaths: int = 0
    push_pulls: int = 0
    awareness: int = 0
    members_by_state: dict[NodeState, int] = field(
        default_factory=lambda: dict.fromkeys(NodeState, 0))
    undecryptable: Undecryptable = field(default_factory=Undecryptable)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(slots=True)
class _Node:
    name: str
    addr: str
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    state_change: float
    vsn: tuple[int, ...]
    addr_bytes: bytes

    @property
    def pmax(self) -> int:
        return self.vsn[1] if len(self.vsn) > 1 else 0

    @property
    def address(self) -> Address:
        return (self.addr, self.port)

    def info(self) -> NodeInfo:
        return NodeInfo(self.name, self.addr, self.port, self.meta, self.incarnation, self.state)


class _Timer:
    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[float], None]) -> None:
        self.fn = fn
        self.cancelled = False


@dataclass(slots=True)
class _AckHandler:
    on_ack: Callable[[bytes, float], None]
    on_nack: Callable[[], None] | None
    expiry: _Timer | None = None


@dataclass(slots=True)
class _Probe:
    seq: int
    node: _Node
    incarnation: int
    start: float
    deadline: float
    timers: list[_Timer] = field(default_factory=list)
    expected_nacks: int = 0
    nacks: int = 0
    fallback: str = "none"  # none | pending | ok | failed
    awaiting_fallback: bool = False
    done: bool = False


@dataclass(slots=True)
class _JoinBatch:
    pending: int
    contacted: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Stream:
    kind: str  # "push_pull" | "ping"
    addr: Address
    join_batch: _JoinBatch | None = None
    join: bool = False
    seq: int = 0


class Memberlist:
    """One member's view of the cluster, driven entirely by its caller."""

    def __init__(self, config: MeshConfig, *, name: str, addr: str, port: int, meta: bytes,
                 rng: random.Random, now: float, keyring: Keyring | None = None,
                 delegate: Delegate | None = None, codec: Codec | None = None) -> None:
        if not name:
            raise ValueError("mesh: node name must not be empty")
        try:
            name_size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"mesh: node name {name!r} is not valid Unicode") from None
        if name_size > NAME_MAX_SIZE:
            raise ValueError(f"mesh: node name is {name_size} bytes in UTF-8, "
                             f"the limit is {NAME_MAX_SIZE}")
        if not 0 < port <= 65535:
            raise ValueError(f"mesh: port must be 1-65535, got {port}")
        _check_meta(meta)
        if codec is None:
            # Imported here so the core does not depend on the codec at import time.
            codec = cast(Codec, importlib.import_module("meshmirror.mesh.wire"))
        self.config = config
        self.name = name
        self.addr = addr
        self.port = port
        self._addr_bytes = ip_to_bytes(addr)
        self._ip_text: dict[bytes, str | None] = {}
        self._rng = rng
        self._keyring = keyring
        self._delegate = delegate
        self._codec: Codec = codec
        self._label = config.label.encode()
        self._now = now
        self.stats = MeshStats()
        self.awareness = Awareness(config.awareness_max_multiplier)

        self._effects: list[Effect] = []
        self._timers: list[tuple[float, int, _Timer]] = []
        self._timer_seq = itertools.count()
        self._nodes: list[_Node] = []
        self._node_map: dict[str, _Node] = {}
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._probe_pending = False
        self._suspicions: dict[str, Suspicion] = {}
        self._ack_handlers: dict[int, _AckHandler] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._seq = 0
        self._incarnation = 0
        self._left = False
        self._stopped = False
        self._quiet = False
        self._push_pull_timer = _Timer(lambda _now: None)  # replaced by _schedule
        self._pp_nodes: tuple[PushNodeState, ...] | None = None
        self.broadcasts = TransmitLimitedQueue(config.retransmit_mult)
        self.user_broadcasts = TransmitLimitedQueue(config.retransmit_mult)

        self._alive_node(
            Alive(self._next_incarnation(), name, self._addr_bytes, port, meta, config.vsn),
            now, bootstrap=True)
        self._schedule(now)

    # ------------------------------------------------------------------ outputs

    def drain(self) -> list[Effect]:
        """Every effect queued since the last drain, in order."""
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float | None:
        """When ``tick`` must next be called; None when no timer is pending."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def tick(self, now: float) -> None:
        """Run every timer due by ``now``, oldest first."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.fn(now)

    # ------------------------------------------------------------------ queries

    @property
    def incarnation(self) -> int:
        return self._node_map[self.name].incarnation

    @property
    def has_left(self) -> bool:
        return self._left

    @property
    def leave_broadcast_done(self) -> bool:
        """True once our leave was gossiped its full transmit count (or nobody is there to hear)."""
        return self._left and (not self.broadcasts.contains(self.name) or not self._any_alive())

    def members(self, *, include_dead: bool = False) -> list[NodeInfo]:
        """Known members, self included; alive and suspect only unless ``include_dead``."""
        return [n.info() for n in self._nodes
                if include_dead or n.state in (NodeState.ALIVE, NodeState.SUSPECT)]

    def member(self, name: str) -> NodeInfo | None:
        node = self._node_map.get(name)
        return node.info() if node is not None else None

    def num_members(self) -> int:
        """memberlist's estNumNodes: every node still remembered, whatever its state."""
        return len(self._nodes)

    # ------------------------------------------------------------------ inputs

    def packet_received(self, data: bytes, source: Address, now: float) -> None:
        """A UDP datagram arrived. Anything undecodable is counted and dropped."""
        self._now = now
        stats = self.stats
        stats.packets_received += 1
        stats.packet_bytes_received += len(data)
        bad_parts: list[WireError] = []
        try:
            msgs = self._codec.open_packet(data, keyring=self._keyring, label=self._label,
                                           errors=bad_parts)
        except ValueError as err:
            reason = getattr(err, "reason", "malformed")
            stats.drop(reason)
            if reason in KEY_MISMATCH_REASONS:
                stats.undecryptable.record(source[0], now)
            return
        for bad in bad_parts:  # a compound's bad parts, dropped without spoiling the rest
            stats.drop(bad.reason)
        for msg in msgs:
            self._handle_packet_msg(msg, source, now)

    def stream_received(self, msg: Message, source: Address, now: float) -> bytes | None:
        """An inbound TCP stream message; returns the bytes to write back, if any."""
        self._now = now
        self.stats.streams_received += 1
        self._count_in(msg)
        if isinstance(msg, PushPull):
            # memberlist sends its own state before merging the remote one.
            reply = self._encode_stream(self._local_push_pull(msg.join))
            self._merge_remote(msg, now)
            return reply
        if isinstance(msg, Ping):
            if msg.node and msg.node != self.name:
                self.stats.drop("wrong_node")
                return None
            return self._encode_stream(AckResp(msg.seq_no, b""))
        if isinstance(msg, User):
            self._deliver_user(msg.payload, f"{source[0]}:{source[1]}")
            return None
        self.stats.drop("unexpected_stream")
        return None

    def stream_reply(self, stream_id: int, msg: Message | None, now: float) -> None:
        """The answer to an ``OpenStream`` we asked for; None means it failed or timed out."""
        self._now = now
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if msg is not None:
            self._count_in(msg)
        if stream.kind == "ping":
            self._fallback_reply(stream.seq, isinstance(msg, AckResp) and msg.seq_no == stream.seq,
                                 now)
            return
        error: str | None = None
        if msg is None:
            error = f"{stream.addr[0]}:{stream.addr[1]}: push-pull failed or timed out"
        elif isinstance(msg, ErrResp):
            error = f"{stream.addr[0]}:{stream.addr[1]}: remote error: {msg.error}"
        elif not isinstance(msg, PushPull):
            error = f"{stream.addr[0]}:{stream.addr[1]}: unexpected reply {type(msg).__name__}"
        else:
            error = self._merge_remote(msg, now)
            if error is not None:
                error = f"{stream.addr[0]}:{stream.addr[1]}: {error}"
        batch = stream.join_batch
        if batch is not None:
            if error is None:
                batch.contacted += 1
            else:
                batch.errors.append(error)
            batch.pending -= 1
            if batch.pending == 0:
                self._effects.append(JoinResult(batch.contacted, tuple(batch.errors)))

    def merge_state(self, state: PushPull, now: float, *, quiet: bool = False) -> str | None:
        """Merge a full state obtained out of band (simulator bootstrap, tests).

        The same merge a push-pull reply gets, without building a reply;
        returns why the state was refused, or None. ``quiet`` skips the version
        check and queues no broadcasts, for seeding a cluster that is meant to
        have converged long ago.
        """
        self._now = now
        if not quiet:
            return self._merge_remote(state, now)
        self._quiet = True
        try:
            self._merge_nodes(state.nodes, now)
        finally:
            self._quiet = False
        return None

    def reschedule_push_pull(self, now: float) -> None:
        """Draw the next periodic push-pull anew within the interval scaled to today's size.

        A cold start spreads first push-pulls over the unscaled interval, as
        memberlist does; a node seeded with a large state out of band uses this
        to look like a member of a long-running cluster instead.
        """
        self._now = now
        self._push_pull_timer.cancelled = True
        interval = push_pull_scale(self.config.push_pull_interval, len(self._nodes))
        self._push_pull_timer = self._at(now + self._rng.random() * interval,
                                         self._push_pull_tick)

    def join(self, addresses: Sequence[Address], now: float) -> None:
        """Push-pull with every seed; a ``JoinResult`` effect follows once all have answered."""
        self._now = now
        if not addresses:
            self._effects.append(JoinResult(0, ("no addresses to join",)))
            return
        batch = _JoinBatch(pending=len(addresses))
        for addr in addresses:
            self._open_push_pull(addr, join=True, batch=batch)

    def leave(self, now: float) -> None:
        """Announce a graceful leave; keep calling ``tick`` until ``leave_broadcast_done``."""
        self._now = now
        if self._left:
            return
        self._left = True
        me = self._node_map[self.name]
        self._dead_node(Dead(me.incarnation, self.name, self.name), now)

    def stop(self) -> None:
        """Stop all timers; the core answers nothing more on its own."""
        self._stopped = True
        for _, _, timer in self._timers:
            timer.cancelled = True
        self._timers.clear()

    def update_meta(self, meta: bytes, now: float) -> None:
        """Publish new node metadata with a fresh incarnation, as memberlist's UpdateNode."""
        _check_meta(meta)
        self._now = now
        me = self._node_map[self.name]
        self._alive_node(
            Alive(self._next_incarnation(), self.name, me.addr_bytes, me.port, meta,
                  self.config.vsn), now, bootstrap=True)

    def send_user(self, node_name: str, payload: bytes) -> None:
        """Best-effort user message to one member over UDP (memberlist's SendBestEffort)."""
        node = self._node_map.get(node_name)
        if node is None:
            raise KeyError(f"mesh: no member named {node_name!r}")
        self._raw_send(node.address, self._encode(User(payload)), node)

    def broadcast_user(self, payload: bytes) -> None:
        """Gossip a user message to everyone, with the same transmit limit as membership news."""
        self.user_broadcasts.queue(self._encode(User(payload)))

    # ------------------------------------------------------------------ timers

    def _after(self, delay: float, fn: Callable[[float], None]) -> _Timer:
        return self._at(self._now + delay, fn)

    def _at(self, deadline: float, fn: Callable[[float], None]) -> _Timer:
        timer = _Timer(fn)
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), timer))
        return timer

    def _schedule(self, now: float) -> None:
        """Start the probe, gossip and push-pull loops, each at a random offset.

        The stagger stops nodes started together from probing and gossiping in
        lockstep, as memberlist's triggerFunc does.
        """
        cfg = self.config
        self._at(now + self._rng.random() * cfg.probe_interval, self._probe_tick)
        self._at(now + self._rng.random() * cfg.gossip_interval, self._gossip_tick)
        self._push_pull_timer = self._at(now + self._rng.random() * cfg.push_pull_interval,
                                         self._push_pull_tick)

    def _probe_tick(self, now: float) -> None:
        # A fixed-rate ticker; a probe still running (waiting out its scaled
        # interval) holds at most one tick back, like Go's ticker channel.
        self._after(self.config.probe_interval, self._probe_tick)
        if self._probe is not None:
            self._probe_pending = True
            return
        self._probe_next(now)

    def _gossip_tick(self, now: float) -> None:
        self._after(self.config.gossip_interval, self._gossip_tick)
        self._gossip(now)

    def _push_pull_tick(self, now: float) -> None:
        self._push_pull_timer = self._after(
            push_pull_scale(self.config.push_pull_interval, len(self._nodes)), self._push_pull_tick)
        candidates = self._k_random(1, lambda n: n.name == self.name or n.state != NodeState.ALIVE)
        if candidates:
            self._open_push_pull(candidates[0].address, join=False, batch=None)

    # ------------------------------------------------------------------ probing

    def _probe_next(self, now: float) -> None:
        num_check = 0
        while num_check < len(self._nodes):
            if self._probe_index >= len(self._nodes):
                self._reset_nodes(now)
                self._probe_index = 0
                num_check += 1
                continue
            node = self._nodes[self._probe_index]
            self._probe_index += 1
            if node.name == self.name or node.state in (NodeState.DEAD, NodeState.LEFT):
                num_check += 1
                continue
            self._probe_node(node, now)
            return

    def _probe_node(self, node: _Node, now: float) -> None:
        self.stats.probes += 1
        interval = self.awareness.scale(self.config.probe_interval)
        seq = self._next_seq()
        ping = Ping(seq, node.name, self._addr_bytes, self.port, self.name)
        probe = _Probe(seq, node, node.incarnation, now, now + interval)
        self._probe = probe

        def on_ack(_payload: bytes, at: float) -> None:
            if probe.done:
                return
            rtt = at - probe.start
            stats = self.stats
            stats.probe_rtt_count += 1
            stats.probe_rtt_sum += rtt
            stats.probe_rtt_samples.append(rtt)
            self._finish_probe(probe, -1, at)

        def on_nack() -> None:
            probe.nacks += 1

        handler = _AckHandler(on_ack, on_nack)
        self._ack_handlers[seq] = handler
        if node.state == NodeState.ALIVE:
            self._send_msg(node.address, self._encode(ping))
        else:
            # The buddy system: tell a suspect it is suspected, so it can refute
            # at once instead of waiting for the rumour to reach it.
            parts = [self._encode(ping),
                     self._encode(Suspect(node.incarnation, node.name, self.name))]
            self._raw_send(node.address, self._codec.compound(parts), node)
        probe.timers.append(self._after(self.config.probe_timeout,
                                        lambda at: self._probe_direct_timeout(probe, at)))
        probe.timers.append(self._at(probe.deadline, lambda at: self._probe_deadline(probe, at)))

    def _probe_direct_timeout(self, probe: _Probe, now: float) -> None:
        """No direct ack in time: ask k others to ping the target, and try TCP ourselves."""
        if probe.done:
            return
        node = probe.node
        peers = self._k_random(
            self.config.indirect_checks,
            lambda n: n.name == self.name or n.name == node.name or n.state != NodeState.ALIVE)
        for peer in peers:
            nack = peer.pmax >= 4
            probe.expected_nacks += nack
            self.stats.indirect_probes += 1
            ind = IndirectPing(probe.seq, node.addr_bytes, node.port, node.name, nack,
                               self._addr_bytes, self.port, self.name)
            self._send_msg(peer.address, self._encode(ind))
        if not self.config.disable_tcp_pings and node.pmax >= 3:
            stream_id = next(self._stream_ids)
            self._streams[stream_id] = _Stream("ping", node.address, seq=probe.seq)
            probe.fallback = "pending"
            ping = Ping(probe.seq, node.name, self._addr_bytes, self.port, self.name)
            self._open_stream(stream_id, node.address, ping,
                              max(probe.deadline - now, 0.001))

    def _probe_deadline(self, probe: _Probe, now: float) -> None:
        if probe.done:
            return
        self._ack_handlers.pop(probe.seq, None)
        if probe.fallback == "pending":
            # Wait for the TCP attempt, which the transport bounds by the same
            # deadline; a short guard keeps a lost reply from stalling probing.
            probe.awaiting_fallback = True
            probe.timers.append(self._after(1.0, lambda at: self._probe_fail(probe, at)))
            return
        if probe.fallback == "ok":
            self.stats.tcp_fallback_rescues += 1
            self._finish_probe(probe, -1, now)
            return
        self._probe_fail(probe, now)

    def _fallback_reply(self, seq: int, contacted: bool, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.done:
            return
        probe.fallback = "ok" if contacted else "failed"
        if probe.awaiting_fallback:
            if contacted:
                self.stats.tcp_fallback_rescues += 1
                self._finish_probe(probe, -1, now)
            else:
                self._probe_fail(probe, now)

    def _probe_fail(self, probe: _Probe, now: float) -> None:
        if probe.done:
            return
        self.stats.probe_failures += 1
        # Lifeguard: missing nacks mean *we* may be the one cut off.
        delta = 0
        if probe.expected_nacks > 0:
            if probe.nacks < probe.expected_nacks:
                delta += probe.expected_nacks - probe.nacks
        else:
            delta += 1
        self._finish_probe(probe, delta, now)
        node = probe.node
        self._suspect_node(Suspect(probe.incarnation, node.name, self.name), now)

    def _finish_probe(self, probe: _Probe, awareness_delta: int, now: float) -> None:
        probe.done = True
        for timer in probe.timers:
            timer.cancelled = True
        self._ack_handlers.pop(probe.seq, None)
        self._apply_awareness(awareness_delta)
        if self._probe is probe:
            self._probe = None
            if self._probe_pending:
                self._probe_pending = False
                self._probe_next(now)

    def _apply_awareness(self, delta: int) -> None:
        self.awareness.apply_delta(delta)
        self.stats.awareness = self.awareness.score

    # ------------------------------------------------------------------ packet handlers

    def _handle_packet_msg(self, msg: Message, source: Address, now: float) -> None:
        self._count_in(msg)
        if isinstance(msg, Alive):
            self._alive_node(msg, now)
        elif isinstance(msg, Suspect):
            self._suspect_node(msg, now)
        elif isinstance(msg, Dead):
            self._dead_node(msg, now)
        elif isinstance(msg, AckResp):
            handler = self._ack_handlers.pop(msg.seq_no, None)
            if handler is not None:
                if handler.expiry is not None:
                    handler.expiry.cancelled = True
                handler.on_ack(msg.payload, now)
        elif isinstance(msg, NackResp):
            handler = self._ack_handlers.get(msg.seq_no)
            if handler is not None and handler.on_nack is not None:
                handler.on_nack()
        elif isinstance(msg, Ping):
            self._handle_ping(msg, source)
        elif isinstance(msg, IndirectPing):
            self._handle_indirect_ping(msg, source, now)
        elif isinstance(msg, User):
            self._deliver_user(msg.payload, f"{source[0]}:{source[1]}")
        elif isinstance(msg, ErrResp):
            pass
        else:
            self.stats.drop("unexpected_packet")

    def _handle_ping(self, ping: Ping, source: Address) -> None:
        if ping.node and ping.node != self.name:
            self.stats.drop("wrong_node")
            return
        self._send_msg(self._reply_addr(ping.source_addr, ping.source_port, source),
                       self._encode(AckResp(ping.seq_no, b"")))

    def _handle_indirect_ping(self, ind: IndirectPing, source: Address, now: float) -> None:
        target_ip = self._ip_from_bytes(ind.target)
        if target_ip is None:
            self.stats.drop("malformed")
            return
        target = (target_ip, ind.port or self.port)
        reply_to = self._reply_addr(ind.source_addr, ind.source_port, source)
        local_seq = self._next_seq()
        state = {"answered": False}

        def on_ack(_payload: bytes, _at: float) -> None:
            state["answered"] = True
            self._send_msg(reply_to, self._encode(AckResp(ind.seq_no, b"")))

        handler = _AckHandler(on_ack, None)
        handler.expiry = self._after(self.config.probe_timeout,
                                     lambda _at: self._expire_ack(local_seq, handler))
        self._ack_handlers[local_seq] = handler
        ping = Ping(local_seq, ind.node, self._addr_bytes, self.port, self.name)
        self._send_msg(target, self._encode(ping))
        if ind.nack:
            def send_nack(_at: float) -> None:
                if not state["answered"]:
                    self._send_msg(reply_to, self._encode(NackResp(ind.seq_no)))

            self._after(self.config.probe_timeout, send_nack)

    def _expire_ack(self, seq: int, handler: _AckHandler) -> None:
        if self._ack_handlers.get(seq) is handler:
            del self._ack_handlers[seq]

    def _reply_addr(self, addr: bytes, port: int, source: Address) -> Address:
        if addr and port > 0:
            ip = self._ip_from_bytes(addr)
            if ip is not None:
                return (ip, port)
        return source

    def _deliver_user(self, payload: bytes, source: str) -> None:
        notify = getattr(self._delegate, "notify_user", None)
        if notify is not None:
            notify(payload)
        self._effects.append(UserMessage(payload, source))

    # ------------------------------------------------------------------ state transitions

    def _set_state(self, node: _Node, state: NodeState, now: float) -> None:
        counts = self.stats.members_by_state
        counts[node.state] -= 1
        counts[state] += 1
        node.state = state
        node.state_change = now
        self._pp_nodes = None

    def _alive_node(self, a: Alive, now: float, *, bootstrap: bool = False) -> None:
        is_local = a.node == self.name
        node = self._node_map.get(a.node)
        if (node is not None and not is_local and a.incarnation <= node.incarnation
                and a.addr == node.addr_bytes and (a.port or self.port) == node.port):
            return  # old news, by far the commonest case in a push-pull merge
        if self._left and is_local:
            return
        vsn = a.vsn
        if len(vsn) >= 3 and (vsn[0] == 0 or vsn[1] == 0 or vsn[0] > vsn[1]):
            self.stats.drop("bad_version")
            return
        addr = self._ip_from_bytes(a.addr)
        if addr is None:
            self.stats.drop("malformed")
            return
        port = a.port or self.port
        updates_node = False
        if node is None:
            node = _Node(a.node, addr, port, a.meta, 0, NodeState.DEAD, now,
                         tuple(vsn) if len(vsn) > 5 else (0, 0, 0, 0, 0, 0),
                         a.addr if len(a.addr) == 4 else ip_to_bytes(addr))
            self.stats.members_by_state[NodeState.DEAD] += 1
            self._node_map[a.node] = node
            # Insert at a random position so that probe order stays unpredictable.
            n = len(self._nodes)
            self._nodes.append(node)
            offset = self._rng.randrange(n + 1) if n else 0
            self._nodes[offset], self._nodes[n] = self._nodes[n], self._nodes[offset]
        elif node.addr != addr or node.port != port:
            reclaim = (self.config.dead_node_reclaim_time > 0
                       and now - node.state_change > self.config.dead_node_reclaim_time)
            if node.state == NodeState.LEFT or (node.state == NodeState.DEAD and reclaim):
                updates_node = True
            else:
                self.stats.drop("address_conflict")
                return
        if a.incarnation <= node.incarnation and not is_local and not updates_node:
            return
        if a.incarnation < node.incarnation and is_local:
            return
        self._suspicions.pop(a.node, None)
        old_state, old_meta = node.state, node.meta
        old_addr = (node.addr, node.port)
        if not bootstrap and is_local:
            if (a.incarnation == node.incarnation and a.meta == node.meta
                    and tuple(vsn) == node.vsn):
                return
            self._refute(node, a.incarnation)
        else:
            self._queue_broadcast(a.node, a)
            self._pp_nodes = None
            if len(vsn) >= 6:
                node.vsn = tuple(vsn)
            node.incarnation = a.incarnation
            node.meta = a.meta
            if node.addr != addr:
                node.addr, node.addr_bytes = addr, ip_to_bytes(addr)
            node.port = port
            if node.state != NodeState.ALIVE:
                self._set_state(node, NodeState.ALIVE, now)
        if self._quiet:
            return
        if old_state in (NodeState.DEAD, NodeState.LEFT):
            self._effects.append(MemberJoined(node.info()))
        elif old_meta != node.meta or old_addr != (node.addr, node.port):
            self._effects.append(MemberUpdated(node.info()))

    def _suspect_node(self, s: Suspect, now: float) -> None:
        node = self._node_map.get(s.node)
        if node is None or s.incarnation < node.incarnation:
            return
        existing = self._suspicions.get(s.node)
        if existing is not None:
            if existing.confirm(s.from_node, now):
                self._queue_broadcast(s.node, s)
                self._at(existing.deadline,
                         lambda at: self._suspicion_timeout(s.node, existing, at))
            return
        if node.state != NodeState.ALIVE:
            return
        if node.name == self.name:
            self._refute(node, s.incarnation)
            return
        self._queue_broadcast(s.node, s)
        self.stats.suspicions += 1
        node.incarnation = s.incarnation
        self._set_state(node, NodeState.SUSPECT, now)
        n = len(self._nodes)
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        min_timeout = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        max_timeout = self.config.suspicion_max_timeout_mult * min_timeout
        suspicion = Suspicion(s.from_node, k, min_timeout, max_timeout, now)
        self._suspicions[s.node] = suspicion
        self._at(suspicion.deadline, lambda at: self._suspicion_timeout(s.node, suspicion, at))

    def _suspicion_timeout(self, name: str, suspicion: Suspicion, now: float) -> None:
        # Confirmations re-arm the timer earlier; a stale or superseded timer is a no-op.
        if self._suspicions.get(name) is not suspicion or now < suspicion.deadline:
            return
        node = self._node_map.get(name)
        if node is None or node.state != NodeState.SUSPECT:
            return
        self._dead_node(Dead(node.incarnation, name, self.name), now)

    def _dead_node(self, d: Dead, now: float) -> None:
        node = self._node_map.get(d.node)
        if node is None or d.incarnation < node.incarnation:
            return
        self._suspicions.pop(d.node, None)
        if node.state in (NodeState.DEAD, NodeState.LEFT):
            return
        if node.name == self.name and not self._left:
            self._refute(node, d.incarnation)
            return
        self._queue_broadcast(d.node, d)
        node.incarnation = d.incarnation
        left = d.node == d.from_node
        if not left:
            self.stats.deaths += 1
        self._set_state(node, NodeState.LEFT if left else NodeState.DEAD, now)
        self._effects.append(MemberLeft(node.info(), dead=not left))

    def _refute(self, me: _Node, accused_incarnation: int) -> None:
        """Someone thinks we are suspect or dead: outbid them with a higher incarnation."""
        inc = self._next_incarnation()
        if accused_incarnation >= inc:
            self._incarnation = accused_incarnation + 1
            inc = self._incarnation
        me.incarnation = inc
        self._pp_nodes = None
        self.stats.refutations += 1
        self._apply_awareness(1)
        self._queue_broadcast(me.name, Alive(inc, me.name, me.addr_bytes, me.port, me.meta,
                                             me.vsn))

    def _reset_nodes(self, now: float) -> None:
        """Forget nodes dead or left for longer than gossip_to_the_dead_time, then reshuffle."""
        keep: list[_Node] = []
        counts = self.stats.members_by_state
        for node in self._nodes:
            if (node.state in (NodeState.DEAD, NodeState.LEFT)
                    and now - node.state_change > self.config.gossip_to_the_dead_time):
                del self._node_map[node.name]
                counts[node.state] -= 1
            else:
                keep.append(node)
        self._rng.shuffle(keep)
        self._nodes = keep
        self._pp_nodes = None

    # ------------------------------------------------------------------ gossip

    def _queue_broadcast(self, node_name: str, msg: Message) -> None:
        if self._quiet:
            return
        self.broadcasts.queue(self._encode(msg), node_name)

    def _get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        n = len(self._nodes)
        out = self.broadcasts.get_broadcasts(overhead, limit, n) if len(self.broadcasts) else []
        if len(self.user_broadcasts):
            used = sum(len(m) + overhead for m in out)
            avail = limit - used
            if avail > overhead + 1:
                out.extend(self.user_broadcasts.get_broadcasts(overhead, avail, n))
        return out

    def _packet_overhead(self) -> int:
        overhead = COMPOUND_HEADER_OVERHEAD
        if self._label:
            overhead += 2 + len(self._label)
        if self._keyring is not None:
            overhead += self._keyring.encrypt_overhead()
        return overhead

    def _gossip(self, now: float) -> None:
        dead_time = self.config.gossip_to_the_dead_time

        def exclude(n: _Node) -> bool:
            if n.name == self.name:
                return True
            if n.state in (NodeState.ALIVE, NodeState.SUSPECT):
                return False
            if n.state == NodeState.DEAD:
                return now - n.state_change > dead_time
            return True

        if not len(self.broadcasts) and not len(self.user_broadcasts):
            return
        targets = self._k_random(self.config.gossip_nodes, exclude)
        avail = self.config.udp_buffer_size - self._packet_overhead()
        for node in targets:
            msgs = self._get_broadcasts(COMPOUND_OVERHEAD, avail)
            if not msgs:
                return
            if len(msgs) == 1:
                self._raw_send(node.address, msgs[0], node)
            else:
                for i in range(0, len(msgs), MAX_COMPOUND_PARTS):
                    self._raw_send(node.address,
                                   self._codec.compound(msgs[i:i + MAX_COMPOUND_PARTS]), node)

    def _k_random(self, k: int, exclude: Callable[[_Node], bool]) -> list[_Node]:
        """Up to ``k`` distinct random nodes not excluded, as memberlist's kRandomNodes."""
        nodes = self._nodes
        n = len(nodes)
        out: list[_Node] = []
        if k <= 0 or n == 0:
            return out
        if n < 3 * k:
            pool = nodes[:]
            self._rng.shuffle(pool)
            for node in pool:
                if not exclude(node):
                    out.append(node)
                    if len(out) >= k:
                        break
            return out
        seen: set[int] = set()
        rand = self._rng.random
        for _ in range(3 * n):
            idx = int(rand() * n)
            if idx in seen:
                continue
            seen.add(idx)
            node = nodes[idx]
            if exclude(node):
                continue
            out.append(node)
            if len(out) >= k:
                break
        return out

    def _any_alive(self) -> bool:
        return any(n.name != self.name and n.state == NodeState.ALIVE for n in self._nodes)

    # ------------------------------------------------------------------ push-pull

    def _local_push_pull(self, join: bool) -> PushPull:
        nodes = self._pp_nodes
        if nodes is None:
            # Cached between changes: in a large quiet cluster most push-pulls
            # would otherwise rebuild the same thousand entries.
            nodes = self._pp_nodes = tuple(
                PushNodeState(n.name, n.addr_bytes, n.port, n.meta, n.incarnation, n.state, n.vsn)
                for n in self._nodes)
        local_state = getattr(self._delegate, "local_state", None)
        user_state = local_state(join) if local_state is not None else b""
        return PushPull(join, nodes, user_state)

    def _open_push_pull(self, addr: Address, *, join: bool, batch: _JoinBatch | None) -> None:
        self.stats.push_pulls += 1
        stream_id = next(self._stream_ids)
        self._streams[stream_id] = _Stream("push_pull", addr, join_batch=batch, join=join)
        self._open_stream(stream_id, addr, self._local_push_pull(join), self.config.tcp_timeout)

    def _merge_remote(self, pp: PushPull, now: float) -> str | None:
        """Merge a peer's full state; returns why it was refused, if it was."""
        error = self._verify_protocol(pp.nodes)
        if error is not None:
            self.stats.drop("incompatible_version")
            return error
        self._merge_nodes(pp.nodes, now)
        merge = getattr(self._delegate, "merge_remote_state", None)
        if pp.user_state and merge is not None:
            merge(pp.user_state, pp.join)
        return None

    def _merge_nodes(self, nodes: Sequence[PushNodeState], now: float) -> None:
        for r in nodes:
            if r.state == NodeState.ALIVE:
                self._alive_node(Alive(r.incarnation, r.name, r.addr, r.port, r.meta, r.vsn), now)
            elif r.state == NodeState.LEFT:
                self._dead_node(Dead(r.incarnation, r.name, r.name), now)
            elif r.state in (NodeState.DEAD, NodeState.SUSPECT):
                # Never trust a remote death outright: suspect, so the node may refute.
                self._suspect_node(Suspect(r.incarnation, r.name, self.name), now)

    def _verify_protocol(self, remote: Sequence[PushNodeState]) -> str | None:
        """memberlist's verifyProtocol: every node's current versions must suit everyone."""
        max_pmin = max_dmin = 0
        min_pmax = min_dmax = 255
        vsns = [tuple(r.vsn) for r in remote if r.state == NodeState.ALIVE]
        vsns += [n.vsn for n in self._nodes if n.state == NodeState.ALIVE]
        for vsn in set(vsns):  # a handful of distinct version sets, however large the cluster
            if len(vsn) < 5:
                continue
            max_pmin = max(max_pmin, vsn[0])
            min_pmax = min(min_pmax, vsn[1])
            max_dmin = max(max_dmin, vsn[3])
            min_dmax = min(min_dmax, vsn[4])
        checks: list[tuple[str, tuple[int, ...]]] = [(r.name, tuple(r.vsn)) for r in remote]
        checks += [(n.name, n.vsn) for n in self._nodes]
        for name, vsn in checks:
            pcur, dcur = (vsn[2], vsn[5]) if len(vsn) >= 6 else (0, 0)
            if not (max_pmin <= pcur <= min_pmax and max_dmin <= dcur <= min_dmax):
                if not max_pmin <= pcur <= min_pmax:
                    return (f"node {name!r} protocol version {pcur} is incompatible: "
                            f"[{max_pmin}, {min_pmax}]")
                return (f"node {name!r} delegate protocol version {dcur} is incompatible: "
                        f"[{max_dmin}, {min_dmax}]")
        return None

    # ------------------------------------------------------------------ sending

    def _encode(self, msg: Message) -> bytes:
        data = self._codec.encode(msg)
        kind = type(msg).__name__
        stats = self.stats
        stats.messages_sent[kind] = stats.messages_sent.get(kind, 0) + 1
        stats.bytes_sent[kind] = stats.bytes_sent.get(kind, 0) + len(data)
        return data

    def _count_in(self, msg: Message) -> None:
        kind = type(msg).__name__
        received = self.stats.messages_received
        received[kind] = received.get(kind, 0) + 1

    def _encode_stream(self, msg: Message) -> bytes:
        data = self._codec.encode_stream(msg, keyring=self._keyring, label=self._label,
                                         compress=self.config.enable_compression)
        kind = type(msg).__name__
        stats = self.stats
        stats.messages_sent[kind] = stats.messages_sent.get(kind, 0) + 1
        stats.bytes_sent[kind] = stats.bytes_sent.get(kind, 0) + len(data)
        stats.stream_bytes_sent += len(data)
        return data

    def _open_stream(self, stream_id: int, addr: Address, msg: Message, timeout: float) -> None:
        self.stats.streams_opened += 1
        self._effects.append(OpenStream(stream_id, addr, self._encode_stream(msg), timeout))

    def _send_msg(self, addr: Address, msg: bytes) -> None:
        """Send one message, piggybacking as many queued broadcasts as still fit."""
        avail = self.config.udp_buffer_size - len(msg) - self._packet_overhead()
        extra = self._get_broadcasts(COMPOUND_OVERHEAD, avail) if avail > 0 else []
        if extra:
            extra.insert(0, msg)
            msg = self._codec.compound(extra)
        self._raw_send(addr, msg, None)

    def _raw_send(self, addr: Address, payload: bytes, node: _Node | None) -> None:
        data = self._seal(payload, crc=node is not None and node.pmax >= 5)
        stats = self.stats
        stats.packets_sent += 1
        stats.packet_bytes_sent += len(data)
        self._effects.append(SendPacket(addr, data))

    def _seal(self, payload: bytes, *, crc: bool) -> bytes:
        return self._codec.seal_packet(payload, keyring=self._keyring, label=self._label, crc=crc,
                                       compress=self.config.enable_compression)

    # ------------------------------------------------------------------ counters

    def _ip_from_bytes(self, raw: bytes) -> str | None:
        """``ip_from_bytes`` memoised: the same few addresses arrive in every packet."""
        try:
            return self._ip_text[raw]
        except KeyError:
            pass
        if len(self._ip_text) > 4096:
            self._ip_text.clear()
        text = self._ip_text[raw] = ip_from_bytes(raw)
        return text

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    def _next_incarnation(self) -> int:
        self._incarnation += 1
        return self._incarnation


def _check_meta(meta: bytes) -> None:
    if len(meta) > META_MAX_SIZE:
        raise ValueError(
            f"mesh: node metadata is {len(meta)} bytes, the limit is {META_MAX_SIZE}")

