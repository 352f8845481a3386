"""memberlist's wire format: messages, compound packets, CRC, LZW, AES-GCM, labels.

Pure functions and one incremental stream parser; no sockets, no clock. The
layout follows memberlist's net.go, util.go, security.go and label.go:

- a message is one type byte and a msgpack map keyed by the Go struct's field
  names. Go's codec (``MsgpackHandle`` without ``WriteExt``) writes strings
  *and* byte slices as old-spec raw strings, never ``bin`` or ``str8``; so do
  we, and on input every raw value is kept as bytes and turned into ``str``
  only for fields that are Go strings. ``Vsn`` is a Go ``[]uint8`` and so
  travels as a raw string too.
- a packet is, outermost first: optional label header ``[244][len][label]``,
  optional encryption (label as authenticated data), optional ``[12][crc32]``,
  then one message, a compound ``[7][n][n x u16 length][parts]`` or a
  compressed ``[9]{Algo, Buf}`` wrapper, which nest.
- a stream (TCP) carries one message each way: optional label header, then
  either ``[10][u32 length][sealed]`` (authenticated data: those five bytes
  plus the label) or the plain message, possibly inside a compress wrapper.
  A push-pull is ``[6]{Nodes, UserStateLen, Join}``, that many node-state
  maps, then the raw user state; a reliable user message is
  ``[8]{UserMsgLen}`` followed by the payload.

Every failure is a :class:`WireError` whose ``reason`` is one of
:data:`REASONS`, so the caller can count drops by reason; nothing else escapes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Generator
from typing import Any, Final, TypeVar

import msgpack

from meshmirror.mesh.compress import Decompressor, LZWError
from meshmirror.mesh.compress import compress as lzw_compress
from meshmirror.mesh.compress import decompress as lzw_decompress
from meshmirror.mesh.config import META_MAX_SIZE, NAME_MAX_SIZE
from meshmirror.mesh.keyring import DecryptError, Keyring, encrypted_length
from meshmirror.mesh.messages import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    Message,
    MessageType,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
)

REASONS: Final = frozenset(
    {
        "truncated",
        "bad_crc",
        "unknown_type",
        "decrypt_failed",
        "not_encrypted",
        "replayed",
        "bad_label",
        "too_large",
        "malformed",
        "decompress_failed",
        "too_many_nodes",
        "bad_name",
        "bad_meta",
        "bad_addr",
    }
)

# Limits on what one stream may make us hold or parse; anything beyond is
# refused as soon as it is declared or crosses the bound, before it is buffered.
MAX_PUSH_STATE_BYTES: Final = 20 * 1024 * 1024
"""memberlist's maxPushStateBytes: the most a stream (sealed or plain) may carry."""
MAX_STREAM_BYTES: Final = MAX_PUSH_STATE_BYTES
MAX_PUSH_STATE_NODES: Final = 8192
"""Node states one push-pull may declare. memberlist allows 1024*1024; a
meshmirror mesh is one member per Kubernetes node, and Kubernetes supports
5,000 nodes per cluster, so 8192 leaves room while bounding what one stream can
make us parse and merge (a million would hold the mesh loop for seconds)."""
MAX_USER_STATE_BYTES: Final = 4 * 1024 * 1024
"""Push-pull user state (Serf's event and query clocks, recent events: kilobytes
in practice). memberlist allows 20 MiB; with 128 inbound streams that would let
one peer pin 2.5 GiB."""
MAX_USER_MSG_BYTES: Final = 4 * 1024 * 1024
"""A reliable user message over TCP, bounded like the user state."""
MAX_DECOMPRESSED_BYTES: Final = 2 * MAX_PUSH_STATE_BYTES
"""memberlist's maxDecompressedBytes: bounds LZW bombs in streams."""
# A UDP datagram can never exceed 64 KiB, so neither can what it inflates to
# in any legitimate sender; this bounds LZW bombs in packets.
MAX_PACKET_DECOMPRESSED: Final = 1024 * 1024
MAX_STREAM_OBJECT: Final = 64 * 1024
"""One msgpack value in a stream (a header, a node state, a ping): a node
state is under 1.2 KiB even with the longest name and meta allowed."""
LABEL_MAX_SIZE: Final = 255
# Compound and compress wrappers may nest; memberlist recurses without bound,
# we stop at a depth no honest sender reaches.
_MAX_NESTING: Final = 4
ENCRYPTION_VERSION: Final = 1

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


class WireError(ValueError):
    """Bytes that are not a valid memberlist message; ``reason`` is in :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise AssertionError(f"unknown WireError reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------- msgpack layer


def _pack(obj: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=False)
    return data


def _name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _unpacker(limit: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(
        raw=True,
        strict_map_key=False,
        use_list=True,
        max_buffer_size=max(limit, 1024),
        max_str_len=limit,
        max_bin_len=limit,
        max_array_len=MAX_PUSH_STATE_NODES,
        max_map_len=4096,
        max_ext_len=0,
    )


_T = TypeVar("_T")


def unpacked(read: Callable[[], _T], what: str = "msgpack") -> _T:
    """What ``read`` (an msgpack unpack call) returns, or `WireError` "malformed".

    msgpack reports bad input with a variety of exception types (FormatError,
    StackError, ExtraData, ValueError for limits, TypeError for odd keys); all of
    them mean the same thing to us. Only `msgpack.OutOfData` passes through: a
    stream reader waits for more bytes, a packet reader calls it truncated.
    """
    try:
        return read()
    except msgpack.OutOfData:
        raise
    except Exception as err:
        raise WireError("malformed", f"{what}: {err}") from None


def _unpack_one(buf: bytes, offset: int) -> tuple[Any, int]:
    """One msgpack object from ``buf[offset:]`` (a whole packet) and the offset after it."""
    unpacker = _unpacker(max(len(buf) - offset, 1))
    unpacker.feed(buf[offset:])
    try:
        obj = unpacked(unpacker.unpack)
    except msgpack.OutOfData:
        raise WireError("truncated", "msgpack value cut short") from None
    return obj, offset + unpacker.tell()


def _map(obj: Any) -> dict[bytes, Any]:
    if not isinstance(obj, dict):
        raise WireError("malformed", f"expected a map, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, bytes)}


def _uint(m: dict[bytes, Any], key: bytes, bits: int) -> int:
    v = m.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits):
        raise WireError("malformed", f"{key.decode()} is not a uint{bits}: {v!r}")
    return v


def _int(m: dict[bytes, Any], key: bytes) -> int:
    v = m.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 63) <= v < (1 << 63):
        raise WireError("malformed", f"{key.decode()} is not an int: {v!r}")
    return v


def _bytes(m: dict[bytes, Any], key: bytes) -> bytes:
    v = m.get(key)
    if v is None:
        return b""
    if not isinstance(v, bytes):
        raise WireError("malformed", f"{key.decode()} is not bytes: {type(v).__name__}")
    return v


def _text(m: dict[bytes, Any], key: bytes) -> str:
    """Free text (an error message): shown to people, never an identity, so lossy is fine."""
    return _bytes(m, key).decode("utf-8", "replace")


def _node_name(m: dict[bytes, Any], key: bytes, *, required: bool = True) -> str:
    """A node name: strict UTF-8 of bounded length, since names end up in JSON and logs.

    Decoding leniently (``surrogateescape``) would let one spoofed packet put
    a name into the member list that no JSON encoder accepts.
    """
    raw = _bytes(m, key)
    if len(raw) > NAME_MAX_SIZE:
        raise WireError("bad_name", f"{key.decode()} is {len(raw)} bytes, over {NAME_MAX_SIZE}")
    if required and not raw:
        raise WireError("bad_name", f"{key.decode()} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("bad_name", f"{key.decode()} is not valid UTF-8") from None


def _ip(m: dict[bytes, Any], key: bytes, *, required: bool = True) -> bytes:
    """An IP address as Go's net.IP travels: 4 or 16 bytes (absent where optional)."""
    raw = _bytes(m, key)
    if len(raw) in (4, 16) or (not raw and not required):
        return raw
    raise WireError("bad_addr", f"{key.decode()} is {len(raw)} bytes, not an IPv4/IPv6 address")


def _meta(m: dict[bytes, Any]) -> bytes:
    raw = _bytes(m, b"Meta")
    if len(raw) > META_MAX_SIZE:
        raise WireError("bad_meta", f"Meta is {len(raw)} bytes, over {META_MAX_SIZE}")
    return raw


def _bool(m: dict[bytes, Any], key: bytes) -> bool:
    v = m.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise WireError("malformed", f"{key.decode()} is not a bool: {v!r}")
    return v


def _vsn(m: dict[bytes, Any]) -> tuple[int, ...]:
    v = m.get(b"Vsn")
    if v is None:
        return ()
    if isinstance(v, bytes):
        return tuple(v)
    if isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in v
    ):
        return tuple(v)
    raise WireError("malformed", f"Vsn is not a list of bytes: {v!r}")


def _state(m: dict[bytes, Any]) -> NodeState:
    value = _int(m, b"State")
    try:
        return NodeState(value)
    except ValueError:
        raise WireError("malformed", f"unknown node state {value}") from None


# ------------------------------------------------------------------- messages


def _encode_body(msg: Message) -> tuple[MessageType, dict[str, Any]]:
    if isinstance(msg, Ping):
        body: dict[str, Any] = {"SeqNo": msg.seq_no, "Node": _name(msg.node)}
        _source(body, msg.source_addr, msg.source_port, msg.source_node)
        return MessageType.PING, body
    if isinstance(msg, IndirectPing):
        body = {
            "SeqNo": msg.seq_no,
            "Target": msg.target,
            "Port": msg.port,
            "Node": _name(msg.node),
            "Nack": msg.nack,
        }
        _source(body, msg.source_addr, msg.source_port, msg.source_node)
        return MessageType.INDIRECT_PING, body
    if isinstance(msg, AckResp):
        return MessageType.ACK_RESP, {"SeqNo": msg.seq_no, "Payload": msg.payload}
    if isinstance(msg, NackResp):
        return MessageType.NACK_RESP, {"SeqNo": msg.seq_no}
    if isinstance(msg, ErrResp):
        return MessageType.ERR, {"Error": _name(msg.error)}
    if isinstance(msg, Suspect):
        return MessageType.SUSPECT, {
            "Incarnation": msg.incarnation,
            "Node": _name(msg.node),
            "From": _name(msg.from_node),
        }
    if isinstance(msg, Alive):
        return MessageType.ALIVE, {
            "Incarnation": msg.incarnation,
            "Node": _name(msg.node),
            "Addr": msg.addr,
            "Port": msg.port,
            "Meta": msg.meta,
            "Vsn": bytes(msg.vsn),
        }
    if isinstance(msg, Dead):
        return MessageType.DEAD, {
            "Incarnation": msg.incarnation,
            "Node": _name(msg.node),
            "From": _name(msg.from_node),
        }
    raise TypeError(f"not a packet message: {type(msg).__name__}")


def _source(body: dict[str, Any], addr: bytes, port: int, node: str) -> None:
    # Go's `codec:",omitempty"`: absent when empty.
    if addr:
        body["SourceAddr"] = addr
    if port:
        body["SourcePort"] = port
    if node:
        body["SourceNode"] = _name(node)


def _encode_push_node(n: PushNodeState) -> dict[str, Any]:
    return {
        "Name": _name(n.name),
        "Addr": n.addr,
        "Port": n.port,
        "Meta": n.meta,
        "Incarnation": n.incarnation,
        "State": int(n.state),
        "Vsn": bytes(n.vsn),
    }


def encode(msg: Message) -> bytes:
    """One message as memberlist writes it: the type byte, then its body.

    ``User`` is the packet form (type byte + raw payload, as memberlist's
    broadcasts carry it); ``PushPull`` is the stream body (header, node
    states, user state) without any stream framing.
    """
    if isinstance(msg, User):
        return bytes((MessageType.USER,)) + msg.payload
    if isinstance(msg, PushPull):
        header = {
            "Nodes": len(msg.nodes),
            "UserStateLen": len(msg.user_state),
            "Join": msg.join,
        }
        parts = [bytes((MessageType.PUSH_PULL,)), _pack(header)]
        parts.extend(_pack(_encode_push_node(n)) for n in msg.nodes)
        parts.append(msg.user_state)
        return b"".join(parts)
    mtype, body = _encode_body(msg)
    return bytes((mtype,)) + _pack(body)


def _decode_map(mtype: int, m: dict[bytes, Any]) -> Message:
    if mtype == MessageType.PING:
        return Ping(
            seq_no=_uint(m, b"SeqNo", 32),
            node=_node_name(m, b"Node", required=False),
            source_addr=_ip(m, b"SourceAddr", required=False),
            source_port=_uint(m, b"SourcePort", 16),
            source_node=_node_name(m, b"SourceNode", required=False),
        )
    if mtype == MessageType.INDIRECT_PING:
        return IndirectPing(
            seq_no=_uint(m, b"SeqNo", 32),
            target=_ip(m, b"Target"),
            port=_uint(m, b"Port", 16),
            node=_node_name(m, b"Node", required=False),
            nack=_bool(m, b"Nack"),
            source_addr=_ip(m, b"SourceAddr", required=False),
            source_port=_uint(m, b"SourcePort", 16),
            source_node=_node_name(m, b"SourceNode", required=False),
        )
    if mtype == MessageType.ACK_RESP:
        return AckResp(seq_no=_uint(m, b"SeqNo", 32), payload=_bytes(m, b"Payload"))
    if mtype == MessageType.NACK_RESP:
        return NackResp(seq_no=_uint(m, b"SeqNo", 32))
    if mtype == MessageType.ERR:
        return ErrResp(error=_text(m, b"Error"))
    if mtype == MessageType.SUSPECT:
        return Suspect(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_node_name(m, b"Node"),
            from_node=_node_name(m, b"From", required=False),
        )
    if mtype == MessageType.ALIVE:
        return Alive(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_node_name(m, b"Node"),
            addr=_ip(m, b"Addr"),
            port=_uint(m, b"Port", 16),
            meta=_meta(m),
            vsn=_vsn(m),
        )
    if mtype == MessageType.DEAD:
        return Dead(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_node_name(m, b"Node"),
            from_node=_node_name(m, b"From", required=False),
        )
    raise WireError("unknown_type", f"message type {mtype}")


def _push_node(m: dict[bytes, Any]) -> PushNodeState:
    return PushNodeState(
        name=_node_name(m, b"Name"),
        addr=_ip(m, b"Addr"),
        port=_uint(m, b"Port", 16),
        meta=_meta(m),
        incarnation=_uint(m, b"Incarnation", 32),
        state=_state(m),
        vsn=_vsn(m),
    )


_MAP_TYPES: Final = frozenset(
    {
        MessageType.PING,
        MessageType.INDIRECT_PING,
        MessageType.ACK_RESP,
        MessageType.NACK_RESP,
        MessageType.ERR,
        MessageType.SUSPECT,
        MessageType.ALIVE,
        MessageType.DEAD,
    }
)


def decode(data: bytes) -> Message:
    """One message (type byte + body) as :func:`encode` writes it."""
    if not data:
        raise WireError("truncated", "missing message type byte")
    mtype = data[0]
    if mtype == MessageType.USER:
        return User(payload=bytes(data[1:]))
    if mtype == MessageType.PUSH_PULL:
        return _parse_all(lambda inp: _plain(inp, []), bytes(data))
    if mtype not in _MAP_TYPES:
        raise WireError("unknown_type", f"message type {mtype}")
    obj, _ = _unpack_one(bytes(data), 1)
    return _decode_map(mtype, _map(obj))


# ----------------------------------------------------------- packet framing


def compound(parts: list[bytes]) -> bytes:
    """Pack up to 255 encoded messages into one compound message."""
    if len(parts) > 255:
        raise ValueError("a compound message holds at most 255 parts")
    out = bytearray((MessageType.COMPOUND, len(parts)))
    for part in parts:
        if len(part) > 0xFFFF:
            raise ValueError("a compound part is at most 65535 bytes")
        out += _U16.pack(len(part))
    for part in parts:
        out += part
    return bytes(out)


def compress_message(payload: bytes) -> bytes:
    """Wrap an encoded message in memberlist's ``compress{Algo: lzw, Buf}``."""
    return bytes((MessageType.COMPRESS,)) + _pack({"Algo": 0, "Buf": lzw_compress(payload)})


def _decompress_body(data: bytes, offset: int, limit: int) -> tuple[bytes, int]:
    obj, end = _unpack_one(data, offset)
    m = _map(obj)
    algo = _int(m, b"Algo")
    if algo != 0:
        raise WireError("decompress_failed", f"unknown compression algorithm {algo}")
    try:
        plain = lzw_decompress(_bytes(m, b"Buf"), max_size=limit)
    except LZWError as err:
        reason = "too_large" if "exceeds" in str(err) else "decompress_failed"
        raise WireError(reason, str(err)) from None
    if not plain:
        raise WireError("decompress_failed", "decompressed message is empty")
    return plain, end


def label_header(label: bytes) -> bytes:
    if not label:
        return b""
    if len(label) > LABEL_MAX_SIZE:
        raise ValueError(f"label is longer than {LABEL_MAX_SIZE} bytes")
    return bytes((MessageType.HAS_LABEL, len(label))) + label


def _strip_label(data: bytes, expected: bytes) -> bytes:
    """Remove a label header and check it against ours, as memberlist does."""
    got = b""
    if data and data[0] == MessageType.HAS_LABEL:
        if len(data) < 2:
            raise WireError("truncated", "label header cut short")
        size = data[1]
        if size < 1:
            raise WireError("bad_label", "label header present but empty")
        if len(data) < 2 + size:
            raise WireError("truncated", "label cut short")
        got, data = data[2 : 2 + size], data[2 + size :]
    if got != expected:
        raise WireError("bad_label", f"label {got!r} where {expected!r} is expected")
    return data


def _decrypt(keyring: Keyring, data: bytes, aad: bytes) -> bytes:
    try:
        return keyring.decrypt(data, aad)
    except DecryptError as err:
        raise WireError(err.reason, str(err)) from None


def seal_packet(
    payload: bytes,
    *,
    keyring: Keyring | None,
    label: bytes = b"",
    crc: bool = True,
    compress: bool = False,
) -> bytes:
    """Frame one encoded message (or compound) for UDP, outermost layer last.

    Order as memberlist's rawSendMsgPacket: compress (only if it helps), CRC,
    encrypt with the label as authenticated data, label header.
    """
    if compress:
        packed = compress_message(payload)
        if len(packed) < len(payload):
            payload = packed
    if crc:
        payload = bytes((MessageType.HAS_CRC,)) + _U32.pack(zlib.crc32(payload)) + payload
    if keyring is not None:
        payload = keyring.encrypt(payload, label, version=ENCRYPTION_VERSION)
    return label_header(label) + payload


def open_packet(
    data: bytes,
    *,
    keyring: Keyring | None,
    label: bytes = b"",
    errors: list[WireError] | None = None,
) -> list[Message]:
    """Every message in one received UDP packet.

    A bad frame (label, decryption, CRC) or a bad lone message raises
    :class:`WireError`. Inside a compound, a bad part does not spoil the
    others (memberlist handles each part on its own): it is appended to
    ``errors`` when given, and the good parts are returned.
    """
    data = _strip_label(bytes(data), label)
    if keyring is not None:
        data = _decrypt(keyring, data, label)
    if data and data[0] == MessageType.HAS_CRC:
        if len(data) < 5:
            raise WireError("truncated", "CRC header cut short")
        (expected,) = _U32.unpack_from(data, 1)
        data = data[5:]
        if zlib.crc32(data) != expected:
            raise WireError("bad_crc", "checksum mismatch")
    out: list[Message] = []
    _unwrap(data, 0, out, errors)
    return out


def _unwrap(data: bytes, depth: int, out: list[Message], errors: list[WireError] | None) -> None:
    if depth > _MAX_NESTING:
        raise WireError("malformed", "compound/compress nested too deeply")
    if not data:
        raise WireError("truncated", "missing message type byte")
    mtype = data[0]
    if mtype == MessageType.COMPOUND:
        parts, truncated = _split_compound(data)
        before = len(out)
        failed: list[WireError] = []
        for part in parts:
            try:
                _unwrap(part, depth + 1, out, errors)
            except WireError as err:
                failed.append(err)
        if truncated:
            failed.append(WireError("truncated", f"compound message lost {truncated} parts"))
        if failed and len(out) == before:
            # Nothing usable at all: report it like a bad lone message.
            if errors is not None:
                errors.extend(failed[1:])
            raise failed[0]
        if errors is not None:
            errors.extend(failed)
        return
    if mtype == MessageType.COMPRESS:
        plain, _ = _decompress_body(data, 1, MAX_PACKET_DECOMPRESSED)
        _unwrap(plain, depth + 1, out, errors)
        return
    if mtype == MessageType.PUSH_PULL:
        raise WireError("unknown_type", "push-pull is a stream message, not a packet")
    out.append(decode(data))


def _split_compound(data: bytes) -> tuple[list[bytes], int]:
    if len(data) < 2:
        raise WireError("truncated", "missing compound length byte")
    count = data[1]
    pos = 2
    if len(data) < pos + 2 * count:
        raise WireError("truncated", "compound length table cut short")
    lengths = [_U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]
    pos += 2 * count
    parts: list[bytes] = []
    for i, length in enumerate(lengths):
        if len(data) < pos + length:
            return parts, count - i
        parts.append(data[pos : pos + length])
        pos += length
    return parts, 0


# ----------------------------------------------------------- stream framing


def encode_stream(
    msg: Message, *, keyring: Keyring | None, label: bytes = b"", compress: bool = False
) -> bytes:
    """One message as written on a TCP stream (memberlist's rawSendMsgStream)."""
    if isinstance(msg, User):
        body = (
            bytes((MessageType.USER,)) + _pack({"UserMsgLen": len(msg.payload)}) + msg.payload
        )
    else:
        body = encode(msg)
    if compress:
        body = compress_message(body)
    if keyring is not None:
        sealed_len = encrypted_length(ENCRYPTION_VERSION, len(body))
        header = bytes((MessageType.ENCRYPT,)) + _U32.pack(sealed_len)
        body = header + keyring.encrypt(body, header + label, version=ENCRYPTION_VERSION)
    return label_header(label) + body


# A stream is parsed by generators that ``yield`` whenever they need more
# bytes: each reads its part of the message as straight-line code, and every
# byte is looked at once, however the stream is split into reads.
_Steps = Generator[None, None, Message]

_FEED_SLICE: Final = 16 * 1024
"""Input is handed to msgpack this much at a time, which bounds its buffer."""


class _Input:
    """Bytes arriving in pieces, read back as msgpack values or runs of raw bytes.

    One ``msgpack.Unpacker`` holds what is not consumed yet, which never
    exceeds :data:`MAX_STREAM_OBJECT` plus one slice: a value still incomplete
    past that size is refused rather than waited for.
    """

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=True,
            strict_map_key=False,
            use_list=True,
            max_buffer_size=MAX_STREAM_OBJECT + _FEED_SLICE,
            max_str_len=MAX_STREAM_OBJECT,
            max_bin_len=MAX_STREAM_OBJECT,
            max_array_len=MAX_STREAM_OBJECT,
            max_map_len=1024,
            max_ext_len=0,
        )
        self._fed = 0
        self._consumed = 0
        self.closed = False
        """No more bytes will come: a read that runs short is a truncated message."""

    def push(self, data: bytes | memoryview) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise WireError("too_large", "stream value beyond its size limit") from None
        self._fed += len(data)

    def _starve(self, what: str) -> None:
        if self.closed:
            raise WireError("truncated", f"{what} cut short")

    def value(self) -> Generator[None, None, Any]:
        """The next msgpack value, once all of it has arrived."""
        while True:
            try:
                obj = unpacked(self._unpacker.unpack)
            except msgpack.OutOfData:
                if self._fed - self._consumed > MAX_STREAM_OBJECT:
                    raise WireError("too_large",
                                    f"msgpack value beyond {MAX_STREAM_OBJECT} bytes") from None
                self._starve("msgpack value")
                yield
                continue
            self._consumed = self._unpacker.tell()
            return obj

    def map_header(self) -> Generator[None, None, int]:
        """The entry count of a msgpack map whose entries are read one by one after it."""
        while True:
            try:
                count: int = unpacked(self._unpacker.read_map_header)
            except msgpack.OutOfData:
                self._starve("msgpack map header")
                yield
                continue
            self._consumed = self._unpacker.tell()
            return count

    def some(self, limit: int) -> Generator[None, None, bytes]:
        """Between 1 and ``limit`` raw bytes: whatever has arrived, waiting for at least one."""
        while True:
            data: bytes = self._unpacker.read_bytes(limit)
            if data:
                self._consumed += len(data)
                return data
            self._starve("raw bytes")
            yield

    def exactly(self, size: int) -> Generator[None, None, bytes]:
        """``size`` raw bytes; the caller has bounded ``size``."""
        out = bytearray()
        while len(out) < size:
            out += yield from self.some(size - len(out))
        return bytes(out)

    def byte(self) -> Generator[None, None, int]:
        return (yield from self.some(1))[0]


class _Parser:
    """Drives one parsing generator over input handed in pieces of any size."""

    def __init__(self, steps: Callable[[_Input], _Steps]) -> None:
        self._input = _Input()
        self._steps = steps(self._input)
        self._started = False
        self.result: Message | None = None

    def feed(self, data: bytes) -> Message | None:
        """Parse ``data``; the message once complete (bytes after it are ignored)."""
        if self.result is not None:
            return None
        if not self._started:
            self._started = True
            if self._advance():
                return self.result
        view = memoryview(data)
        for start in range(0, len(view), _FEED_SLICE):
            self._input.push(view[start : start + _FEED_SLICE])
            if self._advance():
                return self.result
        return None

    def close(self) -> Message:
        """No more input: the message, or :class:`WireError` ``truncated``."""
        if self.result is None:
            self._input.closed = True
            if not self._started:
                self._started = True
            if not self._advance():
                raise WireError("truncated", "stream ended inside a message")
        assert self.result is not None
        return self.result

    def _advance(self) -> bool:
        try:
            next(self._steps)
        except StopIteration as done:
            self.result = done.value
            return True
        return False


def _parse_all(steps: Callable[[_Input], _Steps], data: bytes) -> Message:
    """Run ``steps`` over a complete buffer (decrypted or decompressed plaintext)."""
    parser = _Parser(steps)
    msg = parser.feed(data)
    return msg if msg is not None else parser.close()


def _stream(inp: _Input, keyring: Keyring | None, label: bytes,
            rejected: list[WireError]) -> _Steps:
    """A whole stream as memberlist's readStream reads it: label, encryption, body."""
    mtype = yield from inp.byte()
    got = b""
    if mtype == MessageType.HAS_LABEL:
        size = yield from inp.byte()
        if size < 1:
            raise WireError("bad_label", "label header present but empty")
        got = yield from inp.exactly(size)
        mtype = yield from inp.byte()
    if got != label:
        raise WireError("bad_label", f"label {got!r} where {label!r} is expected")
    if mtype == MessageType.ENCRYPT:
        if keyring is None:
            raise WireError("decrypt_failed", "stream is encrypted, encryption is off")
        size_bytes = yield from inp.exactly(4)
        (size,) = _U32.unpack(size_bytes)
        if size > MAX_PUSH_STATE_BYTES:
            raise WireError("too_large", f"encrypted stream of {size} bytes")
        sealed = yield from inp.exactly(size)
        plain = _decrypt(keyring, sealed, bytes((MessageType.ENCRYPT,)) + size_bytes + label)
        return _parse_all(lambda inner: _body(inner, rejected), plain)
    if keyring is not None:
        raise WireError("not_encrypted", "encryption is on but the stream is plain")
    return (yield from _body(inp, rejected, mtype))


def _body(inp: _Input, rejected: list[WireError], mtype: int | None = None) -> _Steps:
    """One message, possibly inside a compress wrapper."""
    if mtype is None:
        mtype = yield from inp.byte()
    if mtype == MessageType.COMPRESS:
        return (yield from _compressed(inp, rejected))
    return (yield from _plain(inp, rejected, mtype))


_RAW_HEADERS: Final = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}
"""msgpack str/bin type bytes and the width of the length that follows."""


def _compressed(inp: _Input, rejected: list[WireError]) -> _Steps:
    """memberlist's ``compress{Algo, Buf}``, inflated as ``Buf`` arrives, never buffered whole.

    Decompressing a buffered ``Buf`` in one go would cost the loop a
    second per few megabytes; inflating each piece as it comes keeps every
    step proportional to the bytes just read.
    """
    entries = yield from inp.map_header()
    if entries > 16:
        raise WireError("malformed", f"compress wrapper with {entries} fields")
    algo = 0
    inflater = Decompressor(max_size=MAX_DECOMPRESSED_BYTES)
    inner = _Parser(lambda plain: _plain(plain, rejected))
    produced = 0
    for _ in range(entries):
        key = yield from inp.value()
        if key != b"Buf":
            value = yield from inp.value()
            if key == b"Algo":
                algo = _int({key: value}, key)
                if algo != 0:
                    raise WireError("decompress_failed", f"unknown compression algorithm {algo}")
            continue
        remaining = yield from _raw_length(inp)
        if remaining > MAX_PUSH_STATE_BYTES:
            raise WireError("too_large", f"compressed body of {remaining} bytes")
        while remaining:
            piece = yield from inp.some(min(remaining, _FEED_SLICE))
            remaining -= len(piece)
            try:
                plain = inflater.feed(piece)
            except LZWError as err:
                reason = "too_large" if "exceeds" in str(err) else "decompress_failed"
                raise WireError(reason, str(err)) from None
            produced += len(plain)
            inner.feed(plain)
    try:
        inflater.close()
    except LZWError as err:
        raise WireError("decompress_failed", str(err)) from None
    if not produced:
        raise WireError("decompress_failed", "decompressed message is empty")
    return inner.close()


def _raw_length(inp: _Input) -> Generator[None, None, int]:
    """The length in a msgpack str/bin header; the bytes themselves are left to read."""
    tag = yield from inp.byte()
    if 0xA0 <= tag <= 0xBF:
        return tag & 0x1F
    width = _RAW_HEADERS.get(tag)
    if width is None:
        raise WireError("malformed", f"compress Buf is not a byte string (type 0x{tag:02x})")
    return int.from_bytes((yield from inp.exactly(width)), "big")


def _plain(inp: _Input, rejected: list[WireError], mtype: int | None = None) -> _Steps:
    """A plain stream message: push-pull, user message, or one of the packet messages.

    A node state whose fields are invalid (a name that is not UTF-8, an address
    of the wrong length, oversized meta) is left out and appended to
    ``rejected``; the rest of the push-pull still counts.
    """
    if mtype is None:
        mtype = yield from inp.byte()
    if mtype == MessageType.PUSH_PULL:
        header = _map((yield from inp.value()))
        count = _int(header, b"Nodes")
        user_len = _int(header, b"UserStateLen")
        if not 0 <= count <= MAX_PUSH_STATE_NODES:
            raise WireError("too_many_nodes",
                            f"push-pull claims {count} nodes, the limit is {MAX_PUSH_STATE_NODES}")
        if not 0 <= user_len <= MAX_USER_STATE_BYTES:
            raise WireError("too_large", f"push-pull user state of {user_len} bytes")
        nodes: list[PushNodeState] = []
        for _ in range(count):
            entry = _map((yield from inp.value()))
            try:
                nodes.append(_push_node(entry))
            except WireError as err:
                rejected.append(err)
        user_state = yield from inp.exactly(user_len)
        return PushPull(join=_bool(header, b"Join"), nodes=tuple(nodes), user_state=user_state)
    if mtype == MessageType.USER:
        size = _int(_map((yield from inp.value())), b"UserMsgLen")
        if not 0 <= size <= MAX_USER_MSG_BYTES:
            raise WireError("too_large", f"user message of {size} bytes")
        return User(payload=(yield from inp.exactly(size)))
    if mtype in _MAP_TYPES:
        return _decode_map(mtype, _map((yield from inp.value())))
    raise WireError("unknown_type", f"stream message type {mtype}")


class StreamDecoder:
    """Parses one message from a TCP stream as bytes arrive.

    ``feed`` returns ``None`` until the message is complete, then the message
    (and ``None`` again for anything fed afterwards: memberlist sends one
    message per direction). Every byte is parsed once, whatever the reads'
    sizes, so the work of a call is proportional to the bytes it is given. It
    raises only :class:`WireError`, as soon as the bytes so far cannot be a
    valid message or break a limit: ``max_size`` bytes in all,
    :data:`MAX_PUSH_STATE_NODES` node states, :data:`MAX_USER_STATE_BYTES`
    of user state, :data:`MAX_STREAM_OBJECT` per msgpack value.

    Push-pull node states that fail validation are left out of the message
    and listed in ``rejected``, so the caller can count them.
    """

    def __init__(
        self, keyring: Keyring | None, label: bytes = b"", *, max_size: int = MAX_STREAM_BYTES
    ) -> None:
        self._max_size = max_size
        self._received = 0
        self.rejected: list[WireError] = []
        self._parser = _Parser(lambda inp: _stream(inp, keyring, label, self.rejected))

    @property
    def done(self) -> bool:
        return self._parser.result is not None

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._received

    def feed(self, data: bytes) -> Message | None:
        if self.done:
            return None
        self._received += len(data)
        if self._received > self._max_size:
            raise WireError("too_large", f"stream message beyond {self._max_size} bytes")
        return self._parser.feed(data)

    def eof(self) -> None:
        """The peer closed its side: raise unless a whole message was read."""
        if not self.done:
            raise WireError("truncated", f"stream closed after {self._received} bytes")
