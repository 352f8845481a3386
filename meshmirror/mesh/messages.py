"""memberlist's protocol messages as immutable values.

Field names and types mirror memberlist's Go structs (net.go) one for one, since
the codec writes them as msgpack maps keyed by those names. The state machine
consumes and produces these values; only ``wire`` knows about bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK_RESP = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK_RESP = 11
    HAS_CRC = 12
    ERR = 13
    # Deliberately far from the others so it can't be mistaken for an
    # encryption version byte or a message type.
    HAS_LABEL = 244


class NodeState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(frozen=True, slots=True)
class AckResp:
    seq_no: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class NackResp:
    seq_no: int


@dataclass(frozen=True, slots=True)
class ErrResp:
    error: str


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    from_node: str  # "From" on the wire


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes = b""
    # pmin, pmax, pcur, dmin, dmax, dcur
    vsn: tuple[int, ...] = (1, 5, 2, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Dead:
    incarnation: int
    node: str
    from_node: str  # "From" on the wire; equal to node for a graceful leave


@dataclass(frozen=True, slots=True)
class User:
    """A user message: opaque bytes for the layers above membership."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PushNodeState:
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    vsn: tuple[int, ...] = (1, 5, 2, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class PushPull:
    """A full-state exchange over TCP: header, node states, then user state."""

    join: bool
    nodes: tuple[PushNodeState, ...] = field(default_factory=tuple)
    user_state: bytes = b""


Message = (
    Ping
    | IndirectPing
    | AckResp
    | NackResp
    | ErrResp
    | Suspect
    | Alive
    | Dead
    | User
    | PushPull
)
