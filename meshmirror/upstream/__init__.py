"""Anonymous questions to upstream registries: a tag's digest, a repository's visibility.

Imports nothing of the mirror, peering or node: the mirror uses this package,
never the other way round. `UpstreamClient` is imported on first use, so the
config (`upstream.options`, read by every CLI command) does not load aiohttp.
"""

from typing import TYPE_CHECKING, Any

from meshmirror.upstream.breaker import BreakerHealth, BreakerState, CircuitBreaker
from meshmirror.upstream.challenge import (
    BearerChallenge,
    Challenge,
    ChallengeError,
    parse_challenges,
)
from meshmirror.upstream.endpoints import EndpointError, UpstreamEndpoints, default_server
from meshmirror.upstream.options import UpstreamConfig
from meshmirror.upstream.results import (
    AuthRequired,
    FailureKind,
    NotFound,
    Private,
    Public,
    TagDigest,
    TagResult,
    Unknown,
    Unreachable,
    Visibility,
)
from meshmirror.upstream.tokens import Token, TokenCache, TokenResponseError, parse_token_response

if TYPE_CHECKING:
    from meshmirror.upstream.client import UpstreamClient


def __getattr__(name: str) -> Any:
    if name == "UpstreamClient":
        from meshmirror.upstream.client import UpstreamClient

        return UpstreamClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuthRequired",
    "BearerChallenge",
    "BreakerHealth",
    "BreakerState",
    "Challenge",
    "ChallengeError",
    "CircuitBreaker",
    "EndpointError",
    "FailureKind",
    "NotFound",
    "Private",
    "Public",
    "TagDigest",
    "TagResult",
    "Token",
    "TokenCache",
    "TokenResponseError",
    "Unknown",
    "Unreachable",
    "UpstreamClient",
    "UpstreamConfig",
    "UpstreamEndpoints",
    "Visibility",
    "default_server",
    "parse_challenges",
    "parse_token_response",
]
