"""Anonymous questions to upstream registries: a tag's digest, a repository's visibility.

Imports nothing of the mirror, peering or node: the mirror uses this package,
never the other way round.
"""

from meshmirror.upstream.breaker import BreakerHealth, BreakerState, CircuitBreaker
from meshmirror.upstream.challenge import (
    BearerChallenge,
    Challenge,
    ChallengeError,
    parse_challenges,
)
from meshmirror.upstream.client import UpstreamClient
from meshmirror.upstream.endpoints import EndpointError, UpstreamEndpoints, default_server
from meshmirror.upstream.options import UpstreamOptions
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
    "UpstreamEndpoints",
    "UpstreamOptions",
    "Visibility",
    "default_server",
    "parse_challenges",
    "parse_token_response",
]
