"""Serf tag encoding of node metadata, and the keyring's operations and key files."""

from __future__ import annotations

import base64
from pathlib import Path

import msgpack
import pytest

from meshmirror.mesh.keyring import Keyring, KeyringError
from meshmirror.mesh.tags import META_MAX_SIZE, TagError, decode_tags, encode_tags
from meshmirror.mesh.wire import WireError


def test_tags_are_serf_encoded() -> None:
    meta = encode_tags({"http": "127.0.0.2:5000", "epoch": "3"})
    # Serf: magic byte 255, then a msgpack map[string]string (raw strings).
    assert meta[0] == 0xFF
    assert msgpack.unpackb(meta[1:], raw=True) == {b"epoch": b"3", b"http": b"127.0.0.2:5000"}
    assert decode_tags(meta) == {"http": "127.0.0.2:5000", "epoch": "3"}
    assert encode_tags({"b": "1", "a": "2"}) == encode_tags({"a": "2", "b": "1"})


def test_legacy_role_meta() -> None:
    assert decode_tags(b"web") == {"role": "web"}
    assert decode_tags(b"") == {"role": ""}


def test_tags_too_large() -> None:
    with pytest.raises(TagError, match=str(META_MAX_SIZE)):
        encode_tags({"big": "x" * 600})


@pytest.mark.parametrize("meta", [b"\xff\x01", b"\xff\x81\xa1a\x01", b"\xff\xc1", b"\xff"])
def test_garbled_tags(meta: bytes) -> None:
    with pytest.raises(WireError):
        decode_tags(meta)


def keys_of(ring: Keyring) -> tuple[bytes, ...]:
    """``ring.keys`` read afresh: mypy would keep the 2-tuple narrowed by
    ``assert ring.keys == (a, b)`` across the calls that then change the ring."""
    return ring.keys


def test_keyring_operations() -> None:
    a, b, c = bytes(16), bytes(range(24)), bytes(range(32))
    ring = Keyring([a, b])
    assert ring.primary_key == a and keys_of(ring) == (a, b)
    ring.add_key(c)
    ring.add_key(c)
    assert keys_of(ring) == (a, b, c)
    ring.use_key(c)
    assert keys_of(ring) == (c, a, b)
    with pytest.raises(KeyringError, match="primary"):
        ring.remove_key(c)
    ring.remove_key(a)
    assert keys_of(ring) == (c, b)
    with pytest.raises(KeyringError, match="not in the keyring"):
        ring.use_key(a)
    with pytest.raises(KeyringError, match="16, 24 or 32"):
        ring.add_key(b"short")
    with pytest.raises(KeyringError):
        Keyring([])


def test_key_file(tmp_path: Path) -> None:
    key = bytes(range(32))
    good = tmp_path / "key"
    good.write_text(base64.b64encode(key).decode() + "\n")
    assert Keyring.from_base64_file(good).primary_key == key
    bad = tmp_path / "bad"
    bad.write_text("not base64!!")
    with pytest.raises(KeyringError, match="base64"):
        Keyring.from_base64_file(bad)
    wrong = tmp_path / "wrong"
    wrong.write_text(base64.b64encode(b"12345").decode())
    with pytest.raises(KeyringError, match="16, 24 or 32"):
        Keyring.from_base64_file(wrong)
    with pytest.raises(KeyringError, match="cannot read"):
        Keyring.from_base64_file(tmp_path / "missing")
