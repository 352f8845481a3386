"""One structured log line and one set of metric updates per request.

Pure ASGI rather than Starlette middleware so it sees the final status even
when Starlette's error handler produced it, and counts body bytes as they are
actually handed to the server (a client that disconnects mid-blob is logged
with what it really got). Handlers annotate the scope with ``SCOPE_HANDLER``
and ``SCOPE_SOURCE`` so the line says which endpoint answered and whether the
bytes came from the local store or the fallback. The fallback is the mirror, whose
bytes come from a peer, so metrics and log lines call that source ``peer``.

Every line of a request not served carries a ``reason`` from the closed set
`MissReason` (docs/misses.md): the app's own when it set ``SCOPE_REASON``,
otherwise what the ending says (the client left, an exception, a 4xx the
request earned itself).
"""

from __future__ import annotations

import logging
import time
from typing import Final
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshmirror.registry.fallback import BodyAborted, MissReason
from meshmirror.registry.metrics import MissedRequest, RegistryMetrics
from meshmirror.registry.serveroptions import ZERO_COPY_SEND, SendAborted

SCOPE_HANDLER: Final = "meshmirror.handler"
SCOPE_SOURCE: Final = "meshmirror.source"
# A `MissReason` the app sets on every request it does not serve (see `_reason`).
SCOPE_REASON: Final = "meshmirror.reason"
_QUERY_LOG_MAX = 200
_METHOD_LOG_MAX = 20
# What the app puts on the scope -> what operators read: "fallback" bytes came from a peer.
_SOURCE_NAMES: Final = {"fallback": "peer"}


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, logger: logging.Logger,
                 metrics: RegistryMetrics | None = None) -> None:
        self.app = app
        self.logger = logger
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0
        completed = False

        async def counting_send(message: Message) -> None:
            nonlocal status, sent, completed
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                completed = not message.get("more_body", False)
            elif message["type"] == ZERO_COPY_SEND:
                try:
                    await send(message)
                except SendAborted as err:  # the client went: what did go out counts
                    sent += err.sent
                    raise
                sent += int(message["count"])
                completed = not message.get("more_body", False)
                return
            await send(message)

        if self.metrics is not None:
            self.metrics.in_flight.inc()
        ending: MissReason | None = None
        try:
            await self.app(scope, receive, counting_send)
        except BodyAborted as err:
            ending = err.miss_reason
            raise
        except Exception:
            ending = MissReason.ERROR
            raise
        except BaseException:  # cancelled: the server gave up on a client that left
            ending = MissReason.CLIENT_LEFT
            raise
        finally:
            reason = _reason(scope, status, completed, ending)
            self._record(scope, status, sent, completed, reason,
                         time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, sent: int, completed: bool,
                reason: MissReason | None, elapsed: float) -> None:
        handler = str(scope.get(SCOPE_HANDLER, "other"))
        raw_source = str(scope.get(SCOPE_SOURCE, "none"))
        source = _SOURCE_NAMES.get(raw_source, raw_source)
        method = str(scope.get("method", ""))
        if self.metrics is not None:
            self.metrics.in_flight.dec()
            self.metrics.observe(handler, method, status, source, sent, elapsed)
            if reason is not None:
                self.metrics.missed(_missed_request(scope, status, handler, method, reason))
        if not self.logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")[:_QUERY_LOG_MAX]
        fields: dict[str, object] = {
            "handler": handler,
            "method": method[:_METHOD_LOG_MAX],
            "path": str(scope.get("path", ""))[:_QUERY_LOG_MAX * 4],
            "query": query,
            "status": status,
            "bytes": sent,
            "latency_ms": round(elapsed * 1000, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "source": source,
        }
        if not completed:
            fields["aborted"] = True
        if reason is not None:
            fields["reason"] = reason.value
        self.logger.info("request", extra={"fields": fields})


def _reason(scope: Scope, status: int, completed: bool,
            ending: MissReason | None) -> MissReason | None:
    """Why the request was not served, or None when it was."""
    set_by_app = scope.get(SCOPE_REASON)
    if isinstance(set_by_app, MissReason):
        return set_by_app
    if ending is not None:
        return ending
    if status == 0 or not completed:
        return MissReason.CLIENT_LEFT
    if status >= 500:
        return MissReason.ERROR
    if status >= 400:
        return MissReason.BAD_REQUEST
    return None


def _missed_request(scope: Scope, status: int, handler: str, method: str,
                    reason: MissReason) -> MissedRequest:
    """The status page's record of a miss: client input cut to bounded lengths."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    ns = (query.get("ns") or [None])[0]
    return MissedRequest(
        reason=reason, handler=handler, method=method[:_METHOD_LOG_MAX], status=status,
        path=str(scope.get("path", ""))[:_QUERY_LOG_MAX],
        registry=ns[:_QUERY_LOG_MAX] if ns is not None else None,
        unix_seconds=time.time())
