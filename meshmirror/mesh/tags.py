"""Node metadata as Serf tags, so ``serf members`` shows what meshmirror advertises.

Serf (protocol 3 and later) stores a member's tags in memberlist's node meta as
the byte 255 followed by a msgpack ``map[string]string`` (serf.go
``encodeTags``/``decodeTags``); meta without that prefix is read as the legacy
``role`` tag. Writing the same form lets the layers above put ``http=<addr>``,
``epoch=<n>`` or ``keys=<n>`` in node metadata and have Serf agents in the same
mesh display them, and lets us read Serf agents' tags.
"""

from __future__ import annotations

from typing import Final

import msgpack

from meshmirror.mesh.wire import WireError, unpacked

TAG_MAGIC: Final = 0xFF
META_MAX_SIZE: Final = 512


class TagError(ValueError):
    """Tags that do not fit in node metadata."""


def encode_tags(tags: dict[str, str]) -> bytes:
    """Serf's tag encoding; keys sorted so equal tags give equal bytes."""
    body = {k.encode("utf-8"): v.encode("utf-8") for k, v in sorted(tags.items())}
    packed: bytes = msgpack.packb(body, use_bin_type=False)
    meta = bytes((TAG_MAGIC,)) + packed
    if len(meta) > META_MAX_SIZE:
        raise TagError(f"tags encode to {len(meta)} bytes, node metadata holds {META_MAX_SIZE}")
    return meta


def decode_tags(meta: bytes) -> dict[str, str]:
    """Read another node's metadata as Serf does; raises :class:`WireError` if garbled."""
    if not meta or meta[0] != TAG_MAGIC:
        return {"role": meta.decode("utf-8", "replace")}
    obj = unpacked(lambda: msgpack.unpackb(
        meta[1:], raw=True, strict_map_key=False, max_map_len=META_MAX_SIZE), "node tags")
    if not isinstance(obj, dict):
        raise WireError("malformed", "node tags are not a map")
    tags: dict[str, str] = {}
    for key, value in obj.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise WireError("malformed", "node tags must map strings to strings")
        tags[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return tags
