"""``GET /_mesh/v1/summary``: this node's Bloom summary, for peers.

Peers fetch it whenever this node's advertised epoch changes, and usually
already hold the previous version, so the response carries ``ETag: "<epoch>"``
and a matching ``If-None-Match`` costs a 304 with no body. The bytes are the
publisher's pre-encoded payload: serving never re-encodes.

Wiring (the registry app)::

    routes = [..., summary_route(publisher)]
"""

from __future__ import annotations

from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshmirror.mesh.summary import MEDIA_TYPE, SUMMARY_PATH, Summary


class SummarySource(Protocol):
    """What the endpoint needs from a SummaryPublisher."""

    @property
    def current(self) -> Summary | None: ...

    @property
    def payload(self) -> bytes: ...


def etag_for(summary: Summary) -> str:
    return f'"{summary.epoch}"'


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison against a comma-separated If-None-Match list."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        tag = tag.removeprefix("W/")
        if tag == etag:
            return True
    return False


def summary_route(source: SummarySource) -> Route:
    """A Starlette route serving ``source``'s current summary (GET and HEAD)."""

    async def summary(request: Request) -> Response:
        current = source.current
        if current is None:
            # Only before the publisher's first version; peers retry with backoff.
            return Response("summary not published yet\n", status_code=503,
                            headers={"Retry-After": "1"}, media_type="text/plain")
        payload = source.payload
        etag = etag_for(current)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        return Response(payload, media_type=MEDIA_TYPE, headers=headers)

    return Route(SUMMARY_PATH, summary, methods=["GET"], name="mesh-summary")
