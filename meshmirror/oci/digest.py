"""Content digests as the OCI image spec defines them.

Only algorithms we can verify are accepted: a digest we cannot check is a digest a
peer could forge, so parsing rejects anything but sha256 and sha512.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")


class DigestError(ValueError):
    """The text is not a digest meshmirror can verify."""


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.match(text)
        if match is None:
            raise DigestError(
                f"invalid digest {text[:80]!r}: want sha256:<64 hex> or sha512:<128 hex>"
            )
        algorithm, hex_part = match.groups()
        if len(hex_part) != _HEX_LENGTH[algorithm]:
            raise DigestError(
                f"invalid digest {text[:80]!r}: "
                f"{algorithm} needs {_HEX_LENGTH[algorithm]} hex digits"
            )
        return cls(algorithm, hex_part)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object, for verifying a stream chunk by chunk."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
