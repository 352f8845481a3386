"""What the sans-IO membership core asks of the world, and tells it.

The core (``state.Memberlist``) never performs IO. Every call into it may queue
effects, which the caller collects with ``drain()`` and carries out: packets to
send, TCP streams to open, membership changes to announce. Keeping these as
plain frozen values lets the asyncio transport and the simulator execute the
very same core, and lets unit tests assert on exactly what would hit the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meshmirror.mesh.messages import NodeState

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A snapshot of one member, safe to hand to other threads."""

    name: str
    addr: str
    port: int
    meta: bytes
    incarnation: int
    state: NodeState


@dataclass(frozen=True, slots=True)
class SendPacket:
    """One UDP datagram, already sealed (label, CRC, compression, encryption)."""

    addr: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open a TCP connection, write ``data``, read one stream message back.

    The transport must answer with ``Memberlist.stream_reply(stream_id, msg, now)``
    exactly once: with the decoded reply, or with ``None`` on error or when
    ``timeout`` seconds have passed.
    """

    stream_id: int
    addr: Address
    data: bytes
    timeout: float


@dataclass(frozen=True, slots=True)
class MemberJoined:
    node: NodeInfo


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """A member's metadata (or address, after a reclaim) changed."""

    node: NodeInfo


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member is gone: ``dead`` after a failure, not dead after a graceful leave."""

    node: NodeInfo
    dead: bool


@dataclass(frozen=True, slots=True)
class UserMessage:
    """A user message for the layers above; ``source`` is a node name or "host:port"."""

    payload: bytes
    source: str


@dataclass(frozen=True, slots=True)
class JoinResult:
    """Outcome of one ``join`` call: how many seeds answered a push-pull, and why others failed."""

    contacted: int
    errors: tuple[str, ...]


Effect = (
    SendPacket
    | OpenStream
    | MemberJoined
    | MemberUpdated
    | MemberLeft
    | UserMessage
    | JoinResult
)


@runtime_checkable
class Delegate(Protocol):
    """The hook through which the layers above ride on membership.

    Every method is optional in spirit: the core checks with ``getattr`` and
    skips what a delegate does not define, so a delegate may implement only
    ``local_state``/``merge_remote_state`` (Serf-style user state in push-pull)
    or only ``notify_user``. The methods run on the core's thread, inside the
    call that triggered them, so they must be quick and must not call back
    into the core.
    """

    def local_state(self, join: bool) -> bytes: ...

    def merge_remote_state(self, data: bytes, join: bool) -> None: ...

    def notify_user(self, payload: bytes) -> None: ...
