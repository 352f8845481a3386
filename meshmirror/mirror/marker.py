"""The peer-request marker: how a node tells a peer's request from containerd's.

A peer asks us only for what our summary claims we hold. Answering a marked
request from the local store alone keeps a false positive from turning into a
chain of mirrors asking each other.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

PEER_HEADER = "X-Meshmirror-Peer"
_PEER_HEADER_BYTES = PEER_HEADER.lower().encode()


def peer_dispatch(for_clients: ASGIApp, for_peers: ASGIApp) -> ASGIApp:
    """Route requests carrying `PEER_HEADER` to an app without a fallback.

    A peer asks us only for what our summary claims we hold; answering from the
    local store alone keeps a false positive from turning into a chain of mirrors.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(
            name == _PEER_HEADER_BYTES for name, _ in scope.get("headers", ())
        ):
            await for_peers(scope, receive, send)
        else:
            await for_clients(scope, receive, send)

    return app
