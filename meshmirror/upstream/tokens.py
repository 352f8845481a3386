"""Anonymous bearer tokens: the token endpoint's answer, parsed, and a cache of them.

Per the distribution token spec a token lives ``expires_in`` seconds (60 when
omitted). Caching per (registry, scope) turns a resolution into one request
instead of three (challenge, token, retry) for as long as the token lives; a
token is dropped a little before it expires so a request never carries one the
registry is about to refuse.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_EXPIRES_IN = 60.0
# Leave this much of a token's life unused (at most half of it), for clock and
# network delay between the token server's issue and the registry's check.
EXPIRY_MARGIN = 5.0
# Docker Hub's tokens are a few KiB; a token endpoint sending more is broken.
MAX_TOKEN_RESPONSE = 256 * 1024
_MAX_TOKEN_LENGTH = 64 * 1024


class TokenResponseError(ValueError):
    """The token endpoint answered 200 with something that is not a token response."""


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_in: float


def parse_token_response(body: bytes) -> Token:
    """``{"token": ..., "expires_in": ...}`` (or ``access_token``) -> :class:`Token`."""
    if len(body) > MAX_TOKEN_RESPONSE:
        raise TokenResponseError(f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenResponseError(f"token response is not JSON: {body[:80]!r}") from err
    if not isinstance(doc, dict):
        raise TokenResponseError("token response is not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenResponseError("token response has no token")
    if len(value) > _MAX_TOKEN_LENGTH or not value.isascii() or not value.isprintable():
        raise TokenResponseError("token is not a printable ASCII string of sane length")
    expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise TokenResponseError(f"expires_in is not a number: {expires_in!r}")
    if expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return Token(value, float(expires_in))


class TokenCache:
    """Tokens by (registry, scope) until they expire; least recently used dropped past a bound."""

    def __init__(self, max_entries: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def get(self, registry: str, scope: str) -> str | None:
        key = (registry, scope)
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, good_until = entry
        if self._clock() >= good_until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, registry: str, scope: str, token: Token) -> None:
        margin = min(EXPIRY_MARGIN, token.expires_in / 2)
        key = (registry, scope)
        self._entries[key] = (token.value, self._clock() + token.expires_in - margin)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, registry: str, scope: str) -> None:
        """Forget a token the registry refused before its time."""
        self._entries.pop((registry, scope), None)

    def __len__(self) -> int:
        return len(self._entries)
