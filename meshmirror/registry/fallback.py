"""The hook through which a mirror serves what the local store does not hold.

The registry app asks its store first. On a miss, and only then, it asks an
optional `Fallback` (the mirror, which streams from peers) before answering
404. The contract is deliberately small:

- ``open_manifest(registry, repository, reference, want_body)`` and
  ``open_blob(registry, repository, digest, byte_range, want_body)`` return a
  `FallbackContent`, or a `Miss` saying why not (the app then answers 404 so
  containerd falls back upstream, and logs the reason). A miss must be quick; a
  slow peer is the fallback's problem to bound, not the app's. A hit may take
  as long as verifying the content needs (the mirror holds a large blob until
  its digest checks out); if the client disconnects meanwhile, the app cancels
  the call, so the fallback must clean up on cancellation.
- ``want_body`` is False for HEAD: return the metadata and ``body=None``.
- ``byte_range`` is the client's parsed Range (see `ranges.RangeSpec`), or
  None for the whole blob. The fallback learns the blob's size, then its body
  must yield exactly the bytes ``byte_range.resolve(size)`` selects (all of
  them when that is None). If the range turns out unsatisfiable, return the
  content anyway with ``body=None`` (or a body; the app closes it): the app
  answers 416 itself from ``size``.
- The app iterates ``body`` to the end or, if the client goes away, calls its
  ``aclose()`` when it has one, so an async generator's cleanup runs promptly.
  A body that cannot finish raises `BodyAborted`.
- Exceptions other than cancellation are logged and treated as a miss (``error``).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from meshmirror.oci.digest import Digest
from meshmirror.registry.ranges import RangeSpec


@dataclass(frozen=True, slots=True)
class FallbackContent:
    """What a fallback found: the whole object's digest, size and media type, and a body."""

    digest: Digest
    size: int
    media_type: str | None
    body: AsyncIterator[bytes] | None


class MissReason(enum.Enum):
    """Why a request was not served: a closed set, so log lines and metric labels
    stay bounded whatever a client sends, and each value has one documented
    remedy for operators (docs list them)."""

    NOT_MIRRORED = "not_mirrored"  # the registry is not one this node mirrors
    FILTERED = "filtered"  # --registry-filters excludes the reference
    BAD_REFERENCE = "bad_reference"  # not a digest or tag this mirror can look up (400)
    NO_PEER = "no_peer"  # no alive peer's summary matches the key
    PEERS_FAILED = "peers_failed"  # every candidate peer failed, stalled or lied
    DEADLINE = "deadline"  # the request's deadline passed before verified bytes
    PRIVATE_REPOSITORY = "private_repository"  # the upstream wants credentials
    UNKNOWN_REPOSITORY_OUTAGE = "unknown_repository_outage"  # no verdict, no trusted vouch
    VOUCH_NOT_TRUSTED = "vouch_not_trusted"  # only vouches, and the mesh is unencrypted
    TAG_NOT_FOUND = "tag_not_found"  # the upstream has no such tag
    TAGS_OFF = "tags_off"  # --resolve-tags off
    TAG_OUTAGE_UNTRUSTED = "tag_outage_untrusted"  # upstream down, peer tags not trusted
    UPSTREAM_FAILED = "upstream_failed"  # the designated fetch from the upstream failed
    BUSY = "busy"  # memory, spool, cache or rate bounds refused the request
    # Not from the mirror: this node's store does not hold it and nothing else is
    # asked: a peer's request (peers get the local store only; e.g. a Bloom false
    # positive), or any request with the mesh off.
    NOT_HELD = "not_held"
    # Not from the mirror: the request itself is invalid (405 method, 400 name, 416 range).
    BAD_REQUEST = "bad_request"
    CLIENT_LEFT = "client_left"  # the client went away before an answer
    ERROR = "error"  # an unexpected failure (logged with its traceback)


@dataclass(frozen=True, slots=True)
class Miss:
    """A fallback's miss with its reason; the app answers 404 and logs the reason."""

    reason: MissReason
    detail: str = ""


class BodyAborted(Exception):
    """Raised by a fallback's body that cannot finish (the bytes did not verify, every
    peer failed mid-stream): the server aborts the response short of its length, and
    the access log gives ``miss_reason``."""

    miss_reason = MissReason.PEERS_FAILED


class Fallback(Protocol):
    async def open_manifest(self, registry: str, repository: str, reference: str,
                            want_body: bool) -> FallbackContent | Miss:
        """A manifest by tag or digest (``reference`` as in the request path)."""
        ...

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool
                        ) -> FallbackContent | Miss:
        """A blob, or part of it."""
        ...
