"""The address of the client whose request is being served, for whatever it sets off.

A fallback bounds the work one client can cause (new upstream questions are
rate-limited per client address), but it is called with names and digests, not
with the request. The app sets this for each registry request; everything the
request runs, tasks it starts included, reads it.
"""

from __future__ import annotations

import contextvars

_client: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "meshmirror_registry_client", default=None)


def set_requester(address: str | None) -> None:
    """Called by the app at the start of each request, in the request's own task."""
    _client.set(address)


def requester() -> str | None:
    """The client's IP address; None outside a request (the node's own questions)."""
    return _client.get()
