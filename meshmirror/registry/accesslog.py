"""One structured log line and one set of metric updates per request.

Pure ASGI rather than Starlette middleware so it sees the final status even
when Starlette's error handler produced it, and counts body bytes as they are
actually handed to the server (a client that disconnects mid-blob is logged
with what it really got). Handlers annotate the scope with ``SCOPE_HANDLER``
and ``SCOPE_SOURCE`` so the line says which endpoint answered and whether the
bytes came from the local store or the fallback. The fallback is the mirror, whose
bytes come from a peer, so metrics and log lines call that source ``peer``.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshmirror.registry.metrics import RegistryMetrics

SCOPE_HANDLER: Final = "meshmirror.handler"
SCOPE_SOURCE: Final = "meshmirror.source"
_QUERY_LOG_MAX = 200
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
            await send(message)

        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self._record(scope, status, sent, completed, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, sent: int, completed: bool,
                elapsed: float) -> None:
        handler = str(scope.get(SCOPE_HANDLER, "other"))
        raw_source = str(scope.get(SCOPE_SOURCE, "none"))
        source = _SOURCE_NAMES.get(raw_source, raw_source)
        method = str(scope.get("method", ""))
        if self.metrics is not None:
            self.metrics.in_flight.dec()
            self.metrics.observe(handler, method, status, source, sent, elapsed)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")[:_QUERY_LOG_MAX]
        fields: dict[str, object] = {
            "handler": handler,
            "method": method,
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
        self.logger.info("request", extra={"fields": fields})
