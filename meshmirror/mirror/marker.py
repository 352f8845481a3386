"""The peer-request marker: how a node tells a peer's request from containerd's.

A peer asks us only for what our summary claims we hold. Answering a marked
request from the local store alone keeps a false positive from turning into a
chain of mirrors asking each other; `refuse_private` keeps what this node knows
to be private from leaving it at all.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from meshmirror.registry.errors import RegistryError
from meshmirror.registry.paths import parse_v2_path

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


def refuse_private(app: ASGIApp, known_private: Callable[[str, str], bool],
                   default_registry: str) -> ASGIApp:
    """Answer 404 to requests for a repository ``known_private(registry, repository)``.

    Put in front of the app that serves peers. The requesting node should
    never ask for a private repository's content (its own mirror checks
    first); a node that runs ``--private-images=share``, or a member acting on
    its own, still gets nothing this node knows to be private.
    """

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path.startswith("/v2/") and _private(path, scope, known_private,
                                                    default_registry):
                error = RegistryError("NAME_UNKNOWN", "not served to peers")
                response = error.response(head=scope.get("method") == "HEAD")
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return gate


def _private(path: str, scope: Scope, known_private: Callable[[str, str], bool],
             default_registry: str) -> bool:
    try:
        parsed = parse_v2_path(path)
    except RegistryError:
        return False  # the app answers malformed paths itself
    if not parsed.repository:
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    registry = (query.get("ns") or [default_registry])[0]
    return known_private(registry, parsed.repository)
