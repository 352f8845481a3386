"""Why a peer fetch failed, as the mirror tells it apart.

The distinction matters for blame: a `PeerFailure` is charged to the peer that
caused it (it feeds the router's health and the failure metric by ``reason``),
a `SinkFailure` is this node's own problem and charges nobody, and a
`VerificationError` means the whole stream was sent and must be aborted.
"""

from __future__ import annotations

import enum

from meshmirror.registry.fallback import BodyAborted


class FailureReason(enum.StrEnum):
    """Why one peer could not serve: a closed set, as `mesh/wire.py`'s message types are.

    The circuit rules (`mirror/client.py`) and the metric's series at 0 are decided
    per reason, so a reason spelt wrong must not exist: it would silently turn a
    circuit trip into an ordinary error and get no series. The values are the
    ``reason`` label of ``meshmirror_mirror_peer_failures_total``.
    """

    CONNECT = "connect"  # refused, reset or unreachable before any answer
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within --mirror-resolve-timeout
    TIMEOUT = "timeout"  # no headers within --mirror-first-byte-timeout
    NOT_FOUND = "not_found"  # 404: a Bloom false positive, or content gone since
    BAD_STATUS = "bad_status"  # any other unexpected status
    BAD_HEADERS = "bad_headers"  # no Content-Length, or a Content-Range that does not fit
    BAD_DIGEST_HEADER = "bad_digest_header"  # a manifest's Docker-Content-Digest unparseable
    BAD_BODY = "bad_body"  # more bytes than announced
    DIGEST_MISMATCH = "digest_mismatch"  # bytes that do not hash to what was asked for
    TOO_LARGE = "too_large"  # a body over what this node holds in memory
    BROKEN = "broken"  # the body ended early or its connection broke
    STALLED = "stalled"  # no byte within the stall timeout
    SLOW = "slow"  # below the minimum rate
    QUEUE_STALLED = "queue_stalled"  # our own requests to it did not move: charges nobody
    EXHAUSTED = "exhausted"  # no peer (or source) left to resume from
    DEADLINE = "deadline"  # the whole fetch ran past its deadline (--mirror-deadline)
    NO_RANGES = "no_ranges"  # the upstream ignores Range: stripes cannot come from it


class PeerFailure(BodyAborted):
    """One peer could not serve; ``reason`` labels the metric, ``elapsed`` (when
    known) is how long the peer took to fail, which ranks it like a success's time."""

    def __init__(self, reason: FailureReason, detail: str = "", *,
                 elapsed: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.elapsed = elapsed


class SinkFailure(Exception):
    """We could not keep a chunk (e.g. the spool's disk is full): no peer is to blame,
    so no other peer is tried either."""

    @classmethod
    def of(cls, err: Exception) -> SinkFailure:
        """``err`` from keeping or hashing a chunk, as a SinkFailure."""
        return err if isinstance(err, SinkFailure) else cls(repr(err))


class VerificationError(BodyAborted):
    """Every byte was sent but the digest did not match: the stream must be aborted."""
