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
from typing import Any, Final

import msgpack

from meshmirror.mesh.compress import LZWError
from meshmirror.mesh.compress import compress as lzw_compress
from meshmirror.mesh.compress import decompress as lzw_decompress
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
    }
)

# memberlist's limits (net.go): anything beyond is refused before it is buffered.
MAX_PUSH_STATE_BYTES: Final = 20 * 1024 * 1024
MAX_PUSH_STATE_NODES: Final = 1024 * 1024
MAX_USER_MSG_BYTES: Final = 20 * 1024 * 1024
MAX_DECOMPRESSED_BYTES: Final = 2 * MAX_PUSH_STATE_BYTES
# A UDP datagram can never exceed 64 KiB, so neither can what it inflates to
# in any legitimate sender; this bounds LZW bombs in packets.
MAX_PACKET_DECOMPRESSED: Final = 1024 * 1024
MAX_STREAM_BYTES: Final = MAX_PUSH_STATE_BYTES + MAX_DECOMPRESSED_BYTES
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


class _NeedMore(Exception):
    """A stream message is not complete yet (internal to the stream parser)."""


def _unpack_one(buf: bytes, offset: int, *, complete: bool) -> tuple[Any, int]:
    """One msgpack object from ``buf[offset:]`` and the offset after it."""
    unpacker = _unpacker(max(len(buf) - offset, 1))
    unpacker.feed(buf[offset:])
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        if complete:
            raise WireError("truncated", "msgpack value cut short") from None
        raise _NeedMore() from None
    # msgpack reports bad input with a variety of exception types (FormatError,
    # StackError, ValueError for limits, TypeError for odd keys); all of them
    # mean the same thing here.
    except Exception as err:
        raise WireError("malformed", f"msgpack: {err}") from None
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


def _str(m: dict[bytes, Any], key: bytes) -> str:
    return _bytes(m, key).decode("utf-8", "surrogateescape")


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
            node=_str(m, b"Node"),
            source_addr=_bytes(m, b"SourceAddr"),
            source_port=_uint(m, b"SourcePort", 16),
            source_node=_str(m, b"SourceNode"),
        )
    if mtype == MessageType.INDIRECT_PING:
        return IndirectPing(
            seq_no=_uint(m, b"SeqNo", 32),
            target=_bytes(m, b"Target"),
            port=_uint(m, b"Port", 16),
            node=_str(m, b"Node"),
            nack=_bool(m, b"Nack"),
            source_addr=_bytes(m, b"SourceAddr"),
            source_port=_uint(m, b"SourcePort", 16),
            source_node=_str(m, b"SourceNode"),
        )
    if mtype == MessageType.ACK_RESP:
        return AckResp(seq_no=_uint(m, b"SeqNo", 32), payload=_bytes(m, b"Payload"))
    if mtype == MessageType.NACK_RESP:
        return NackResp(seq_no=_uint(m, b"SeqNo", 32))
    if mtype == MessageType.ERR:
        return ErrResp(error=_str(m, b"Error"))
    if mtype == MessageType.SUSPECT:
        return Suspect(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_str(m, b"Node"),
            from_node=_str(m, b"From"),
        )
    if mtype == MessageType.ALIVE:
        return Alive(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_str(m, b"Node"),
            addr=_bytes(m, b"Addr"),
            port=_uint(m, b"Port", 16),
            meta=_bytes(m, b"Meta"),
            vsn=_vsn(m),
        )
    if mtype == MessageType.DEAD:
        return Dead(
            incarnation=_uint(m, b"Incarnation", 32),
            node=_str(m, b"Node"),
            from_node=_str(m, b"From"),
        )
    raise WireError("unknown_type", f"message type {mtype}")


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
        msg, _ = _parse_plain_stream(bytes(data), 0, complete=True)
        return msg
    if mtype not in _MAP_TYPES:
        raise WireError("unknown_type", f"message type {mtype}")
    obj, _ = _unpack_one(bytes(data), 1, complete=True)
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


def _decompress_body(data: bytes, offset: int, limit: int, *, complete: bool) -> tuple[bytes, int]:
    obj, end = _unpack_one(data, offset, complete=complete)
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
        plain, _ = _decompress_body(data, 1, MAX_PACKET_DECOMPRESSED, complete=True)
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


def _parse_plain_stream(data: bytes, offset: int, *, complete: bool) -> tuple[Message, int]:
    """A stream message starting at ``data[offset]`` (its type byte)."""
    if offset >= len(data):
        if complete:
            raise WireError("truncated", "missing message type byte")
        raise _NeedMore()
    mtype = data[offset]
    pos = offset + 1
    if mtype == MessageType.PUSH_PULL:
        obj, pos = _unpack_one(data, pos, complete=complete)
        header = _map(obj)
        count = _int(header, b"Nodes")
        user_len = _int(header, b"UserStateLen")
        if not 0 <= count <= MAX_PUSH_STATE_NODES:
            raise WireError("too_large", f"push-pull claims {count} nodes")
        if not 0 <= user_len <= MAX_PUSH_STATE_BYTES:
            raise WireError("too_large", f"push-pull user state of {user_len} bytes")
        nodes: list[PushNodeState] = []
        for _ in range(count):
            obj, pos = _unpack_one(data, pos, complete=complete)
            m = _map(obj)
            vsn = _vsn(m)
            nodes.append(
                PushNodeState(
                    name=_str(m, b"Name"),
                    addr=_bytes(m, b"Addr"),
                    port=_uint(m, b"Port", 16),
                    meta=_bytes(m, b"Meta"),
                    incarnation=_uint(m, b"Incarnation", 32),
                    state=_state(m),
                    vsn=vsn,
                )
            )
        user_state = _take(data, pos, user_len, complete=complete)
        return PushPull(join=_bool(header, b"Join"), nodes=tuple(nodes), user_state=user_state), (
            pos + user_len
        )
    if mtype == MessageType.USER:
        obj, pos = _unpack_one(data, pos, complete=complete)
        size = _int(_map(obj), b"UserMsgLen")
        if not 0 <= size <= MAX_USER_MSG_BYTES:
            raise WireError("too_large", f"user message of {size} bytes")
        return User(payload=_take(data, pos, size, complete=complete)), pos + size
    if mtype in _MAP_TYPES:
        obj, pos = _unpack_one(data, pos, complete=complete)
        return _decode_map(mtype, _map(obj)), pos
    raise WireError("unknown_type", f"stream message type {mtype}")


def _take(data: bytes, pos: int, size: int, *, complete: bool) -> bytes:
    if len(data) < pos + size:
        if complete:
            raise WireError("truncated", f"want {size} bytes, have {len(data) - pos}")
        raise _NeedMore()
    return data[pos : pos + size]


class StreamDecoder:
    """Parses one message from a TCP stream as bytes arrive.

    ``feed`` returns ``None`` until the message is complete, then the message
    (and ``None`` again for anything fed afterwards: memberlist sends one
    message per direction). It raises only :class:`WireError`, as soon as the
    bytes so far cannot be a valid message or exceed ``max_size``.
    """

    def __init__(
        self, keyring: Keyring | None, label: bytes = b"", *, max_size: int = MAX_STREAM_BYTES
    ) -> None:
        self._keyring = keyring
        self._label = label
        self._max_size = max_size
        self._buf = bytearray()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Message | None:
        if self._done:
            return None
        self._buf += data
        if len(self._buf) > self._max_size:
            raise WireError("too_large", f"stream message beyond {self._max_size} bytes")
        buf = bytes(self._buf)
        try:
            msg = self._parse(buf)
        except _NeedMore:
            return None
        self._done = True
        self._buf.clear()
        return msg

    def eof(self) -> None:
        """The peer closed its side: raise unless a whole message was read."""
        if not self._done:
            raise WireError("truncated", f"stream closed after {len(self._buf)} bytes")

    def _parse(self, buf: bytes) -> Message:
        pos = self._parse_label(buf)
        if pos >= len(buf):
            raise _NeedMore()
        if buf[pos] == MessageType.ENCRYPT:
            if self._keyring is None:
                raise WireError("decrypt_failed", "stream is encrypted, encryption is off")
            if len(buf) < pos + 5:
                raise _NeedMore()
            (size,) = _U32.unpack_from(buf, pos + 1)
            if size > MAX_PUSH_STATE_BYTES:
                raise WireError("too_large", f"encrypted stream of {size} bytes")
            if len(buf) < pos + 5 + size:
                raise _NeedMore()
            aad = buf[pos : pos + 5] + self._label
            plain = _decrypt(self._keyring, buf[pos + 5 : pos + 5 + size], aad)
            return self._parse_inner(plain, complete=True)
        if self._keyring is not None:
            raise WireError("not_encrypted", "encryption is on but the stream is plain")
        return self._parse_inner(buf[pos:], complete=False)

    def _parse_label(self, buf: bytes) -> int:
        if not buf:
            raise _NeedMore()
        if buf[0] != MessageType.HAS_LABEL:
            if self._label:
                raise WireError("bad_label", "stream has no label, one is required")
            return 0
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            raise _NeedMore()
        _strip_label(buf[: 2 + buf[1]], self._label)
        return 2 + buf[1]

    def _parse_inner(self, data: bytes, *, complete: bool) -> Message:
        if data and data[0] == MessageType.COMPRESS:
            plain, _ = _decompress_body(data, 1, MAX_DECOMPRESSED_BYTES, complete=complete)
            msg, _ = _parse_plain_stream(plain, 0, complete=True)
            return msg
        msg, _ = _parse_plain_stream(data, 0, complete=complete)
        return msg

