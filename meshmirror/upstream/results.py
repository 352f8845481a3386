"""What an anonymous question to the upstream can come back with.

Small immutable values rather than exceptions, because every outcome is an
ordinary answer to the mirror: "the tag now means this digest", "only with
credentials", "the upstream is not answering". The caller matches on the type;
nothing here needs a try block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshmirror.oci.digest import Digest


class FailureKind(enum.Enum):
    """Why the upstream gave no usable answer; the breaker counts only network, 5xx and 429."""

    CONNECTION = "connection"  # refused, reset, DNS or another transport error
    TIMEOUT = "timeout"  # no complete answer within the bound
    TLS = "tls"  # certificate not trusted or handshake failed
    SERVER_ERROR = "server_error"  # 5xx from the registry or its token realm
    RATE_LIMITED = "rate_limited"  # 429: asking again soon only makes it worse
    PROTOCOL = "protocol"  # an answer that breaks the distribution or token spec
    CONFIG = "config"  # this node's hosts.toml for the registry cannot be read
    CIRCUIT_OPEN = "circuit_open"  # not asked at all: the breaker holds it unreachable
    # Not asked: a realm or redirect led to an address this node never asks (guard).
    FORBIDDEN = "forbidden"
    # Not asked: the client asked new questions faster than its pace.
    THROTTLED = "throttled"


@dataclass(frozen=True, slots=True)
class TagDigest:
    """The upstream's current answer for a tag (from a manifest HEAD)."""

    digest: Digest
    media_type: str | None
    size: int | None


@dataclass(frozen=True, slots=True)
class NotFound:
    """The upstream, asked with whatever anonymous access it grants, has no such manifest."""


@dataclass(frozen=True, slots=True)
class AuthRequired:
    """The upstream answers this repository only to clients with credentials."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No usable answer; ``kind`` says whether it was the network, the server or garbage."""

    kind: FailureKind
    reason: str


TagResult = TagDigest | NotFound | AuthRequired | Unreachable


@dataclass(frozen=True, slots=True)
class Public:
    """Anonymous pull is allowed; ``found`` is False when the reference itself is absent."""

    found: bool


@dataclass(frozen=True, slots=True)
class Private:
    """Only clients with credentials may pull from this repository."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """The upstream could not be asked; nothing may be concluded about the repository."""

    kind: FailureKind
    reason: str


Visibility = Public | Private | Unknown
