"""Calling an ASGI app directly, to see exactly what it sends (chunks, raw paths)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message


@dataclass
class Sent:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def call(app: ASGIApp, method: str, path: str, *, query: bytes = b"",
               headers: list[tuple[bytes, bytes]] | None = None,
               leave_after: float | None = None) -> Sent:
    """Send one request; the client disconnects after ``leave_after`` seconds (never
    when None: the app must then finish on its own)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"), "query_string": query,
        "root_path": "", "headers": headers or [], "client": ("127.0.0.9", 4242),
        "server": ("127.0.0.1", 5000),
    }
    sent = Sent()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600 if leave_after is None else leave_after)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent.status = message["status"]
            sent.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                            for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body" and message.get("body"):
            sent.chunks.append(message["body"])

    await app(scope, receive, send)
    return sent
