"""Why a peer fetch failed, as the mirror tells it apart.

The distinction matters for blame: a `PeerFailure` is charged to the peer that
caused it (it feeds the router's health and the failure metric by ``reason``),
a `SinkFailure` is this node's own problem and charges nobody, and a
`VerificationError` means the whole stream was sent and must be aborted.
"""

from __future__ import annotations

from meshmirror.registry.fallback import BodyAborted


class PeerFailure(BodyAborted):
    """One peer could not serve; ``reason`` labels the metric, ``elapsed`` (when
    known) is how long the peer took to fail, which ranks it like a success's time."""

    def __init__(self, reason: str, detail: str = "", *, elapsed: float | None = None) -> None:
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
