"""Gossip encryption keys and AES-GCM sealing, compatible with ``serf agent -encrypt``.

memberlist (security.go) frames an encrypted payload as
``[version:1][nonce:12][ciphertext+tag]``. Version 0 PKCS7-pads the plaintext
first; version 1 (used by every node speaking protocol 2 or later, Serf
included) does not. The first key of the ring is the primary: it encrypts, and
every installed key is tried to decrypt, so keys can be rotated across a live
cluster with install, use, remove, as memberlist's keyring does.

A small window of recently seen nonces is remembered so that a captured packet
replayed verbatim is dropped (memberlist has no such check; a random 96-bit
nonce never repeats between honest senders).
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION_SIZE = 1
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_SIZE = 16
MAX_ENCRYPTION_VERSION = 1
DEFAULT_REPLAY_WINDOW = 8192


class KeyringError(ValueError):
    """A key or keyring operation that cannot work (wrong size, unknown key, bad file)."""


class DecryptError(ValueError):
    """A payload no installed key opens: ``reason`` says why, for drop counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def validate_key(key: bytes) -> None:
    if len(key) not in (16, 24, 32):
        raise KeyringError(f"key size must be 16, 24 or 32 bytes, got {len(key)}")


def encrypted_length(version: int, plain_len: int) -> int:
    """Size of the sealed form of ``plain_len`` bytes, as memberlist computes it."""
    if version >= 1:
        return VERSION_SIZE + NONCE_SIZE + plain_len + TAG_SIZE
    padding = BLOCK_SIZE - (plain_len % BLOCK_SIZE)
    return VERSION_SIZE + NONCE_SIZE + plain_len + padding + TAG_SIZE


class Keyring:
    """An ordered set of AES keys; the first is the primary. Thread-safe."""

    def __init__(self, keys: list[bytes], *, replay_window: int = DEFAULT_REPLAY_WINDOW) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key")
        ordered: list[bytes] = []
        for key in keys:
            validate_key(key)
            if key not in ordered:
                ordered.append(bytes(key))
        self._lock = threading.Lock()
        self._keys: tuple[bytes, ...] = tuple(ordered)
        self._ciphers: dict[bytes, AESGCM] = {k: AESGCM(k) for k in ordered}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._replay_window = replay_window

    @classmethod
    def from_base64(cls, text: str) -> Keyring:
        """One key in base64, the form ``serf keygen`` prints and ``-encrypt`` takes."""
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as err:
            raise KeyringError(f"gossip key is not valid base64: {err}") from err
        return cls([key])

    @classmethod
    def from_base64_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read ``--gossip-key-file``: a file holding one base64 key."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise KeyringError(f"cannot read gossip key file {os.fspath(path)!r}: {err}") from err
        try:
            return cls.from_base64(text)
        except KeyringError as err:
            raise KeyringError(f"{os.fspath(path)}: {err}") from err

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    @property
    def primary_key(self) -> bytes:
        return self._keys[0]

    def add_key(self, key: bytes) -> None:
        """Install a key for decryption; the primary is unchanged."""
        validate_key(key)
        with self._lock:
            if key in self._keys:
                return
            self._ciphers[bytes(key)] = AESGCM(key)
            self._keys = (*self._keys, bytes(key))

    def use_key(self, key: bytes) -> None:
        """Make an installed key the primary, so it encrypts from now on."""
        with self._lock:
            if key not in self._keys:
                raise KeyringError("requested key is not in the keyring")
            self._keys = (key, *(k for k in self._keys if k != key))

    def remove_key(self, key: bytes) -> None:
        """Uninstall a key; the primary cannot be removed (use another first)."""
        with self._lock:
            if key == self._keys[0]:
                raise KeyringError("removing the primary key is not allowed")
            self._keys = tuple(k for k in self._keys if k != key)
            self._ciphers.pop(key, None)

    @staticmethod
    def encrypt_overhead(version: int = 1) -> int:
        """Worst-case bytes that sealing adds, for packing broadcasts into a packet:
        29 for version 1 (what `encrypt` and wire.py seal with); version 0 pads a whole
        block when the plaintext fills its last one."""
        return encrypted_length(version, 0)

    def encrypt(self, plain: bytes, aad: bytes, *, version: int = 1) -> bytes:
        """Seal with the primary key: ``[version][nonce][ciphertext+tag]``."""
        if version not in (0, 1):
            raise KeyringError(f"unsupported encryption version {version}")
        key = self._keys[0]
        nonce = os.urandom(NONCE_SIZE)
        if version == 0:
            pad = BLOCK_SIZE - (len(plain) % BLOCK_SIZE)
            plain = plain + bytes((pad,)) * pad
        sealed = self._ciphers[key].encrypt(nonce, plain, aad or None)
        return bytes((version,)) + nonce + sealed

    def decrypt(self, data: bytes, aad: bytes) -> bytes:
        """Open a sealed payload with any installed key.

        Raises :class:`DecryptError` with reason ``decrypt_failed`` (unknown
        version, too short, no key fits, bad padding) or ``replayed``.
        """
        if not data:
            raise DecryptError("decrypt_failed", "cannot decrypt empty payload")
        version = data[0]
        if version > MAX_ENCRYPTION_VERSION:
            raise DecryptError("decrypt_failed", f"unsupported encryption version {version}")
        if len(data) < encrypted_length(version, 0):
            raise DecryptError("decrypt_failed", f"payload too small to decrypt: {len(data)}")
        nonce = data[VERSION_SIZE : VERSION_SIZE + NONCE_SIZE]
        body = data[VERSION_SIZE + NONCE_SIZE :]
        keys = self._keys
        for key in keys:
            cipher = self._ciphers.get(key)
            if cipher is None:
                continue
            try:
                plain = cipher.decrypt(nonce, body, aad or None)
            except InvalidTag:
                continue
            self._check_replay(data[: VERSION_SIZE + NONCE_SIZE] + body[-TAG_SIZE:])
            if version == 0:
                pad = plain[-1] if plain else 0
                if not 1 <= pad <= BLOCK_SIZE or pad > len(plain):
                    raise DecryptError("decrypt_failed", "bad PKCS7 padding")
                plain = plain[:-pad]
            return plain
        raise DecryptError("decrypt_failed", "no installed key could decrypt the message")

    def _check_replay(self, fingerprint: bytes) -> None:
        if self._replay_window <= 0:
            return
        with self._lock:
            if fingerprint in self._seen:
                raise DecryptError("replayed", "packet already seen (replay)")
            self._seen[fingerprint] = None
            while len(self._seen) > self._replay_window:
                self._seen.popitem(last=False)
