"""The hook through which a mirror serves what the local store does not hold.

The registry app asks its store first. On a miss, and only then, it asks an
optional `Fallback` (the mirror, which streams from peers) before answering
404. The contract is deliberately small:

- ``open_manifest(registry, repository, reference, want_body)`` and
  ``open_blob(registry, repository, digest, byte_range, want_body)`` return a
  `FallbackContent`, or None for a miss (the app then answers 404 so containerd
  falls back upstream). A miss must be quick; a slow peer is the fallback's
  problem to bound, not the app's. A hit may take as long as verifying the
  content needs (the mirror holds a large blob until its digest checks out);
  if the client disconnects meanwhile, the app cancels the call, so the
  fallback must clean up on cancellation.
- ``want_body`` is False for HEAD: return the metadata and ``body=None``.
- ``byte_range`` is the client's parsed Range (see `ranges.RangeSpec`), or
  None for the whole blob. The fallback learns the blob's size, then its body
  must yield exactly the bytes ``byte_range.resolve(size)`` selects (all of
  them when that is None). If the range turns out unsatisfiable, return the
  content anyway with ``body=None`` (or a body; the app closes it): the app
  answers 416 itself from ``size``.
- The app iterates ``body`` to the end or, if the client goes away, calls its
  ``aclose()`` when it has one, so an async generator's cleanup runs promptly.
- Exceptions other than cancellation are logged and treated as a miss.
"""

from __future__ import annotations

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


class Fallback(Protocol):
    async def open_manifest(self, registry: str, repository: str, reference: str,
                            want_body: bool) -> FallbackContent | None:
        """A manifest by tag or digest (``reference`` as in the request path)."""
        ...

    async def open_blob(self, registry: str, repository: str, digest: Digest,
                        byte_range: RangeSpec | None, want_body: bool) -> FallbackContent | None:
        """A blob, or part of it."""
        ...
