"""Asking the upstream registry itself, anonymously, about one manifest.

The mirror needs the upstream's word in two places: what a tag means right now
(so peers never serve a stale tag while the upstream answers) and whether a
repository is public (so content the upstream serves only with credentials is
never served from peers). Both are one manifest ``HEAD``: it carries the digest
in ``Docker-Content-Digest`` and does not count against Docker Hub's pull limit.

The client holds no credentials. A ``401`` with a ``Bearer`` challenge is met
with the distribution token flow, anonymously; a ``Basic`` challenge, a refused
token or a 401/403 after the token means credentials are required. Every
request is bounded (connect and whole-answer timeouts), tokens are cached for
their lifetime, and a per-registry circuit breaker turns an outage into an
immediate :class:`Unreachable` instead of a timeout per call.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.reference import is_digest_reference, validate_repository, validate_tag
from meshmirror.upstream.breaker import BreakerHealth, BreakerState, CircuitBreaker
from meshmirror.upstream.challenge import BearerChallenge, ChallengeError, parse_all
from meshmirror.upstream.endpoints import EndpointError, UpstreamEndpoints
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
from meshmirror.upstream.tokens import (
    MAX_TOKEN_RESPONSE,
    Token,
    TokenCache,
    TokenResponseError,
    parse_token_response,
)

DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_TOTAL_TIMEOUT = 3.0
DEFAULT_FAILURE_THRESHOLD = 3
DEFAULT_COOLDOWN = 30.0
_MAX_REDIRECTS = 3
_MAX_MEDIA_TYPE = 255
# Outcomes that say the upstream is down or overloaded, as opposed to answering.
_BREAKER_FAILURES = frozenset({FailureKind.CONNECTION, FailureKind.TIMEOUT, FailureKind.TLS,
                               FailureKind.SERVER_ERROR, FailureKind.RATE_LIMITED})


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]


def _status_failure(status: int, what: str) -> Unreachable:
    """A status that is neither an answer nor an auth decision."""
    if status == 429:
        return Unreachable(FailureKind.RATE_LIMITED, f"{what} answered 429 Too Many Requests")
    if status >= 500:
        return Unreachable(FailureKind.SERVER_ERROR, f"{what} answered {status}")
    return Unreachable(FailureKind.PROTOCOL, f"{what} answered unexpected status {status}")


def _transport_failure(err: aiohttp.ClientError, what: str) -> Unreachable:
    if isinstance(err, aiohttp.ClientSSLError):
        return Unreachable(FailureKind.TLS, f"{what}: TLS: {err}")
    if isinstance(err, TimeoutError):  # aiohttp's connect and read timeouts are both
        return Unreachable(FailureKind.TIMEOUT, f"{what}: timed out ({err or 'connect'})")
    if isinstance(err, aiohttp.ClientResponseError):  # not HTTP, or a redirect loop
        return Unreachable(FailureKind.PROTOCOL, f"{what}: {type(err).__name__}: {err.message}")
    return Unreachable(FailureKind.CONNECTION, f"{what}: {type(err).__name__}: {err}")


def _tag_digest(reply: _Reply, reference: str) -> TagDigest | Unreachable:
    """The 200 answer of a manifest HEAD, from its headers (a HEAD has no body to hash)."""
    header = reply.headers.get("Docker-Content-Digest")
    try:
        if header is not None:
            digest = Digest.parse(header.strip())
        elif is_digest_reference(reference):
            digest = Digest.parse(reference)
        else:
            return Unreachable(FailureKind.PROTOCOL,
                               "manifest HEAD answered 200 without Docker-Content-Digest")
    except DigestError as err:
        return Unreachable(FailureKind.PROTOCOL, f"manifest HEAD: {err}")
    if is_digest_reference(reference) and str(digest) != reference:
        return Unreachable(FailureKind.PROTOCOL,
                           f"asked for {reference}, upstream answered {digest}")
    content_type = reply.headers.get("Content-Type")
    media_type = (content_type.split(";", 1)[0].strip()
                  if content_type and len(content_type) <= _MAX_MEDIA_TYPE else None)
    length = reply.headers.get("Content-Length", "")
    size = int(length) if length.isdigit() and len(length) < 20 else None
    return TagDigest(digest, media_type or None, size)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or TokenResponseError past ``limit`` bytes: never buffer what a server pours."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise TokenResponseError(f"token response larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class UpstreamClient:
    """Anonymous manifest questions to upstream registries; one per process is enough.

    ``session``: an aiohttp session to use (and not close); by default the client
    owns one, created on first use, with the system trust store, no cookies and no
    environment (``.netrc`` would add credentials).
    """

    def __init__(
        self,
        endpoints: UpstreamEndpoints | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
        max_cached_tokens: int = 1024,
    ) -> None:
        if connect_timeout <= 0 or total_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._endpoints = endpoints or UpstreamEndpoints()
        self._session = session
        self._owns_session = session is None
        self._connect_timeout = connect_timeout
        self._total_timeout = total_timeout
        self._failure_threshold = failure_threshold
        self._cooldown = cooldown
        self._clock = clock
        self._ssl = ssl_context
        self._tokens = TokenCache(max_cached_tokens, clock)
        self._breakers: dict[str, CircuitBreaker] = {}

    # -- lifecycle -----------------------------------------------------------------

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl or ssl.create_default_context())
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- public questions ----------------------------------------------------------

    async def resolve_tag(self, registry: str, repository: str, tag: str) -> TagResult:
        """What ``registry/repository:tag`` means upstream now. Raises only for invalid names."""
        validate_tag(tag)
        return await self._ask(registry, repository, tag)

    async def check_public(self, registry: str, repository: str, reference: str) -> Visibility:
        """Whether an anonymous client may pull from the repository (HEAD of a tag or digest)."""
        if is_digest_reference(reference):
            Digest.parse(reference)
        else:
            validate_tag(reference)
        result = await self._ask(registry, repository, reference)
        if isinstance(result, TagDigest):
            return Public(found=True)
        if isinstance(result, NotFound):
            return Public(found=False)
        if isinstance(result, AuthRequired):
            return Private(result.reason)
        return Unknown(result.kind, result.reason)

    def health(self, registry: str) -> BreakerHealth:
        """The breaker's view of one registry (closed for one never asked)."""
        breaker = self._breakers.get(registry)
        if breaker is None:
            return BreakerHealth(BreakerState.CLOSED, 0, None, None)
        return breaker.health()

    def health_all(self) -> Mapping[str, BreakerHealth]:
        return {registry: b.health() for registry, b in self._breakers.items()}

    # -- for upstream.blobs: content fetches share this session, tokens and breakers --

    def base_url(self, registry: str) -> str:
        """The registry's URL as containerd would use it; raises EndpointError."""
        return self._endpoints.url_for(registry)

    def breaker(self, registry: str) -> CircuitBreaker:
        return self._breaker(registry)

    @property
    def tokens(self) -> TokenCache:
        return self._tokens

    async def open_content(self, url: str, headers: Mapping[str, str], *,
                           stall_timeout: float, max_redirects: int) -> aiohttp.ClientResponse:
        """A GET of content (a blob, a manifest) whose response the caller reads and
        releases. The one place `upstream.blobs` reaches the network: whatever rules
        apply to this client's requests (proxies, address checks) belong here too."""
        return await self._client_session().get(
            url, headers=headers, allow_redirects=True, max_redirects=max_redirects,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                          sock_read=stall_timeout))

    async def anonymous_token(self, registry: str, scope: str, status: int,
                              headers: CIMultiDictProxy[str]) -> Token | AuthRequired | Unreachable:
        """Answer a 401 the way manifest questions do: an anonymous token, or why not."""
        return await self._token_for(registry, scope, _Reply(status, headers))

    # -- the flow ------------------------------------------------------------------

    def _breaker(self, registry: str) -> CircuitBreaker:
        breaker = self._breakers.get(registry)
        if breaker is None:
            breaker = CircuitBreaker(self._failure_threshold, self._cooldown, self._clock)
            self._breakers[registry] = breaker
        return breaker

    async def _ask(self, registry: str, repository: str, reference: str) -> TagResult:
        """One bounded manifest HEAD with the anonymous token flow, behind the breaker."""
        validate_repository(repository)
        try:
            base = self._endpoints.url_for(registry)
        except EndpointError as err:
            return Unreachable(FailureKind.CONFIG, str(err))
        breaker = self._breaker(registry)
        if not breaker.allow():
            return Unreachable(FailureKind.CIRCUIT_OPEN,
                               f"{registry} held unreachable after: {breaker.health().last_error}")
        try:
            async with asyncio.timeout(self._total_timeout):
                result = await self._head_manifest(registry, base, repository, reference)
        except TimeoutError:
            result = Unreachable(FailureKind.TIMEOUT,
                                 f"{base}: no answer within {self._total_timeout:g}s")
        except BaseException:
            breaker.abandon()
            raise
        if isinstance(result, Unreachable) and result.kind in _BREAKER_FAILURES:
            breaker.record_failure(f"{result.kind.value}: {result.reason}")
        else:
            breaker.record_success()
        return result

    async def _head_manifest(self, registry: str, base: str, repository: str,
                             reference: str) -> TagResult:
        url = f"{base}/v2/{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        token = self._tokens.get(registry, scope)
        reply = await self._head(url, token)
        if isinstance(reply, Unreachable):
            return reply
        if reply.status == 401 and token is not None:
            # Revoked or expired early: forget it and start the flow afresh.
            self._tokens.discard(registry, scope)
            reply = await self._head(url, None)
            if isinstance(reply, Unreachable):
                return reply
        if reply.status == 401:
            fresh = await self._token_for(registry, scope, reply)
            if not isinstance(fresh, Token):
                return fresh
            self._tokens.put(registry, scope, fresh)
            reply = await self._head(url, fresh.value)
            if isinstance(reply, Unreachable):
                return reply
            if reply.status in (401, 403):
                self._tokens.discard(registry, scope)
                return AuthRequired(f"{url}: {reply.status} with an anonymous token")
        return self._interpret(reply, url, reference)

    def _interpret(self, reply: _Reply, url: str, reference: str) -> TagResult:
        if reply.status == 200:
            return _tag_digest(reply, reference)
        if reply.status == 404:
            return NotFound()
        if reply.status == 403:
            return AuthRequired(f"{url}: 403 to an anonymous client")
        return _status_failure(reply.status, url)

    async def _head(self, url: str, token: str | None) -> _Reply | Unreachable:
        headers = {"Accept": mediatypes.CONTAINERD_ACCEPT}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._client_session().head(
                url, headers=headers, allow_redirects=True, max_redirects=_MAX_REDIRECTS,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
            ) as response:
                return _Reply(response.status, response.headers)
        except aiohttp.ClientError as err:
            return _transport_failure(err, url)

    async def _token_for(self, registry: str, scope: str,
                         reply: _Reply) -> Token | AuthRequired | Unreachable:
        """Answer a 401: an anonymous token for a Bearer challenge; otherwise credentials."""
        values = reply.headers.getall("WWW-Authenticate", [])
        if not values:
            return AuthRequired(f"{registry}: 401 without a challenge")
        try:
            challenges = parse_all(values)
        except ChallengeError as err:
            return Unreachable(FailureKind.PROTOCOL, f"{registry}: malformed challenge: {err}")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is None:
            schemes = ", ".join(sorted({c.scheme for c in challenges}))
            return AuthRequired(f"{registry}: 401 {schemes}: credentials required")
        try:
            flow = BearerChallenge.of(bearer)
        except ChallengeError as err:
            return Unreachable(FailureKind.PROTOCOL, f"{registry}: {err}")
        return await self._fetch_token(flow, flow.scope or scope)

    async def _fetch_token(self, flow: BearerChallenge,
                           scope: str) -> Token | AuthRequired | Unreachable:
        query = {"scope": scope}
        if flow.service is not None:
            query["service"] = flow.service
        url = URL(flow.realm).extend_query(query)
        what = f"token realm {flow.realm}"
        try:
            async with self._client_session().get(
                url, headers={"Accept": "application/json"}, allow_redirects=True,
                max_redirects=_MAX_REDIRECTS,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
            ) as response:
                if response.status in (401, 403):
                    return AuthRequired(f"{what} refused anonymous access ({response.status})")
                if response.status != 200:
                    return _status_failure(response.status, what)
                if (response.content_length or 0) > MAX_TOKEN_RESPONSE:
                    raise TokenResponseError(
                        f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
                return parse_token_response(await _read_bounded(response, MAX_TOKEN_RESPONSE))
        except aiohttp.ClientError as err:
            return _transport_failure(err, what)
        except TokenResponseError as err:
            return Unreachable(FailureKind.PROTOCOL, f"{what}: {err}")
