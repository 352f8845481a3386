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
import contextlib
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from meshmirror.flags import decimal
from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.reference import is_digest_reference, validate_repository, validate_tag
from meshmirror.upstream.breaker import (
    BreakerHealth,
    BreakerState,
    CircuitBreaker,
    behind_breaker,
)
from meshmirror.upstream.challenge import BearerChallenge, ChallengeError, parse_all
from meshmirror.upstream.endpoints import EndpointError, UpstreamEndpoints
from meshmirror.upstream.guard import (
    AddressGuard,
    ForbiddenAddress,
    GuardedResolver,
    permit,
    reset,
)
from meshmirror.upstream.guard import permitted as guard_permitted
from meshmirror.upstream.limits import ClientRateLimiter
from meshmirror.upstream.proxy import ProxySettings
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
_MAX_CACHED_TAGS = 4096
# How long a registry whose /v2/ answered is taken to be up, when a manifest HEAD
# gets a 5xx: that 5xx is the request's shape, not an outage (see `_shape_or_outage`).
_BASE_ANSWERED_TTL = 5.0
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_MEDIA_TYPE = 255


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]


class _RedirectError(Exception):
    """Too many redirects, or one without a usable Location."""


def _next_hop(target: URL, location: str, headers: dict[str, str]) -> URL:
    """Where a redirect from ``target`` leads: an http(s) URL with a host, or
    `_RedirectError`. Credentials in ``headers`` do not follow it to another host."""
    try:
        following = target.join(URL(location))
    except ValueError as err:
        raise _RedirectError(f"redirect to an unusable Location: {err}") from None
    if following.scheme not in ("http", "https") or not following.host:
        raise _RedirectError(f"redirect to {location[:200]!r}")
    if following.host != target.host:
        headers.pop("Authorization", None)
    return following


def status_failure(status: int, what: str) -> Unreachable:
    """A status that is neither an answer nor an auth decision."""
    if status == 429:
        return Unreachable(FailureKind.RATE_LIMITED, f"{what} answered 429 Too Many Requests")
    if status >= 500:
        return Unreachable(FailureKind.SERVER_ERROR, f"{what} answered {status}")
    return Unreachable(FailureKind.PROTOCOL, f"{what} answered unexpected status {status}")


def transport_failure(err: aiohttp.ClientError | ForbiddenAddress | _RedirectError,
                       what: str) -> Unreachable:
    if isinstance(err, ForbiddenAddress):
        return Unreachable(FailureKind.FORBIDDEN, f"{what}: {err}")
    if isinstance(err, aiohttp.ClientConnectorError) and isinstance(err.os_error,
                                                                    ForbiddenAddress):
        return Unreachable(FailureKind.FORBIDDEN, f"{what}: {err.os_error}")
    if isinstance(err, _RedirectError):
        return Unreachable(FailureKind.PROTOCOL, f"{what}: {err}")
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
    size = decimal(length)
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
    environment (``.netrc`` would add credentials; proxies come from ``proxies``,
    read with Go's rules), and a resolver that refuses forbidden addresses
    (``guard``). ``tag_ttl`` 0, no ``limiter`` and no ``max_registries`` turn
    those bounds off (tests); ``UpstreamConfig`` sets them for a node.
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
        proxies: ProxySettings | None = None,
        guard: AddressGuard | None = None,
        tag_ttl: float = 0.0,
        limiter: ClientRateLimiter | None = None,
        max_registries: int | None = None,
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
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._proxies = proxies or ProxySettings()
        self._guard = guard or AddressGuard()
        self._tag_ttl = tag_ttl
        self._tags: OrderedDict[tuple[str, str, str], tuple[TagResult, float]] = OrderedDict()
        self._tag_flights: dict[tuple[str, str, str], asyncio.Task[TagResult]] = {}
        self._limiter = limiter
        self._max_registries = max_registries
        self._base_answered: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No DNS cache: every lookup goes through the guard, in the context of the
            # question that makes it (a cached answer would skip the check).
            # ssl=True: aiohttp's default context, made once when it is imported; a new
            # one here cost the node's first pull 20-40 ms of loading CA certificates.
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True,
                                             resolver=GuardedResolver(self._guard),
                                             use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        return self._session

    async def close(self) -> None:
        for task in list(self._tag_flights.values()):
            task.cancel()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- public questions ----------------------------------------------------------

    def mirrors(self, registry: str) -> bool:
        """Whether containerd sends this registry's pulls here (see `UpstreamEndpoints`)."""
        try:
            return self._endpoints.sends_here(registry)
        except EndpointError:
            return False

    async def resolve_tag(self, registry: str, repository: str, tag: str, *,
                          client: str | None = None) -> TagResult:
        """What ``registry/repository:tag`` means upstream now. Raises only for invalid names.

        ``client``: the address of the registry client whose request asks; new
        questions are rate-limited per client. An answer is reused for
        ``tag_ttl`` seconds, and concurrent lookups of one tag share one question.
        """
        validate_tag(tag)
        if self._tag_ttl <= 0:
            return await self._ask(registry, repository, tag, client)
        key = (registry, repository, tag)
        cached = self._tags.get(key)
        if cached is not None:
            if self._clock() < cached[1]:
                return cached[0]
            del self._tags[key]
        task = self._tag_flights.get(key)
        if task is None:
            task = asyncio.create_task(self._remember_tag(key, client),
                                       name=f"tag {registry}/{repository}:{tag}")
            self._tag_flights[key] = task
            task.add_done_callback(lambda _: self._tag_flights.pop(key, None))
        return await asyncio.shield(task)

    async def _remember_tag(self, key: tuple[str, str, str], client: str | None) -> TagResult:
        """Ask, and keep an answer (not a failure: the breaker bounds those)."""
        result = await self._ask(*key, client)
        if isinstance(result, TagDigest | NotFound | AuthRequired):
            self._tags[key] = (result, self._clock() + self._tag_ttl)
            self._tags.move_to_end(key)
            while len(self._tags) > _MAX_CACHED_TAGS:
                self._tags.popitem(last=False)
        return result

    async def check_public(self, registry: str, repository: str, reference: str, *,
                           client: str | None = None) -> Visibility:
        """Whether an anonymous client may pull from the repository (HEAD of a tag or digest).

        Ask with a digest that names nothing (``visibility.BLOB_PROBE_REFERENCE``):
        a registry that wants credentials asks for them first, a public one answers
        404, and no registry mistakes it for a layer it cannot serve as a manifest.
        """
        if is_digest_reference(reference):
            Digest.parse(reference)
        else:
            validate_tag(reference)
        result = await self._ask(registry, repository, reference, client)
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

    def allows(self, client: str | None) -> bool:
        """Whether ``client`` may set off a new upstream request now (its pace; takes a
        token if so): for content fetched on a client's behalf (`upstream.blobs`)."""
        return self._limiter is None or self._limiter.allow(client)

    @property
    def tokens(self) -> TokenCache:
        return self._tokens

    async def open_content(self, url: str, headers: Mapping[str, str], *,
                           stall_timeout: float, max_redirects: int) -> aiohttp.ClientResponse:
        """A GET of content (a blob, a manifest) whose response the caller reads and
        releases. The one place `upstream.blobs` reaches the network, so it keeps this
        client's rules: the proxy Go's rules pick, and every hop's address checked by
        the guard (the registry's own host and the proxies are permitted), with
        redirects followed here and credentials dropped when one changes host. A
        refused hop raises `aiohttp.ClientError`, as any transport failure does."""
        target = URL(url)
        sent = dict(headers)
        permission = permit([target.host, *self._proxies.hosts])
        try:
            for hop in range(max_redirects + 1):
                proxy = self._proxies.proxy_for(str(target))
                await self._guard.check_url(str(target), guard_permitted(),
                                            proxied=proxy is not None)
                response = await self._client_session().get(
                    target, headers=sent, allow_redirects=False, proxy=proxy,
                    auto_decompress=False,
                    timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout,
                                                  sock_read=stall_timeout))
                location = response.headers.get("Location")
                if response.status not in _REDIRECTS or location is None:
                    return response
                response.release()
                if hop == max_redirects:
                    raise _RedirectError(f"more than {max_redirects} redirects")
                target = _next_hop(target, location, sent)
        except (ForbiddenAddress, _RedirectError) as err:
            raise aiohttp.ClientError(f"{url}: {err}") from err
        finally:
            reset(permission)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def anonymous_token(self, registry: str, scope: str, status: int,
                              headers: CIMultiDictProxy[str]) -> Token | AuthRequired | Unreachable:
        """Answer a 401 the way manifest questions do: an anonymous token, or why not
        (the realm passes the same guard, the registry's own host permitted)."""
        try:
            base = self._endpoints.url_for(registry)
        except EndpointError as err:
            return Unreachable(FailureKind.CONFIG, str(err))
        permission = permit([URL(base).host, *self._proxies.hosts])
        try:
            return await self._token_for(registry, scope, _Reply(status, headers))
        finally:
            reset(permission)

    # -- the flow ------------------------------------------------------------------

    def _breaker(self, registry: str) -> CircuitBreaker:
        """The registry's breaker; past ``max_registries`` one of the others is forgotten.

        A breaker closed and clean goes first (it costs nothing to start again),
        then the least recently asked one that is not open, then the least
        recently asked: a flood of invented names can neither grow the table
        nor keep a new honest registry from being asked.
        """
        breaker = self._breakers.get(registry)
        if breaker is not None:
            self._breakers.move_to_end(registry)
            return breaker
        if self._max_registries is not None and len(self._breakers) >= self._max_registries:
            states = [(name, b.health()) for name, b in self._breakers.items()]
            victim = next((name for name, h in states if h.consecutive_failures == 0), None)
            if victim is None:
                victim = next((name for name, h in states if h.state is not BreakerState.OPEN),
                              states[0][0])
            del self._breakers[victim]
        breaker = CircuitBreaker(self._failure_threshold, self._cooldown, self._clock)
        self._breakers[registry] = breaker
        return breaker

    async def _ask(self, registry: str, repository: str, reference: str,
                   client: str | None) -> TagResult:
        """One bounded manifest HEAD with the anonymous token flow, behind the breaker."""
        validate_repository(repository)
        try:
            base = self._endpoints.url_for(registry)
        except EndpointError as err:
            return Unreachable(FailureKind.CONFIG, str(err))
        if self._limiter is not None and not self._limiter.allow(client):
            return Unreachable(FailureKind.THROTTLED,
                               f"client {client} asks too many new questions")
        # The registry's own host may be private (an in-cluster registry); so may the
        # proxies the operator configured. Anything else private is the guard's to refuse.
        permission = permit([URL(base).host, *self._proxies.hosts])
        try:
            return await behind_breaker(
                self._breaker(registry), registry, self._total_timeout, base,
                lambda: self._head_manifest(registry, base, repository, reference))
        finally:
            reset(permission)

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
        result = self._interpret(reply, url, reference)
        if isinstance(result, Unreachable) and result.kind is FailureKind.SERVER_ERROR:
            return await self.shape_or_outage(registry, base, result)
        return result

    async def shape_or_outage(self, registry: str, base: str,
                              failure: Unreachable) -> Unreachable:
        """A manifest request's 5xx is an outage only if the registry's ``/v2/`` fails too.

        Some registries answer a reference they cannot serve as a manifest (a
        layer's digest, an odd tag) with a 500. Were that counted, any client
        could open the breaker for every honest lookup by asking for such
        references; so the 5xx is checked against the version endpoint (asked at
        most once per few seconds per registry), and when that answers the 5xx
        is the request's own fault: a protocol failure the breaker ignores.
        The content fetches (`upstream.blobs`) ask manifests by any digest a
        client names, tree requests included, so they take the same check.
        """
        now = self._clock()
        answered_until = self._base_answered.get(registry, 0.0)
        if now >= answered_until:
            permission = permit([URL(base).host, *self._proxies.hosts])
            try:
                reply = await self._request_reply("GET", f"{base}/v2/", {})
            finally:
                reset(permission)
            if isinstance(reply, Unreachable) or reply.status >= 500:
                return failure
            self._base_answered[registry] = now + _BASE_ANSWERED_TTL
            if len(self._base_answered) > 4 * (self._max_registries or 1024):
                self._base_answered.clear()
        return Unreachable(FailureKind.PROTOCOL,
                           f"{failure.reason} while {base}/v2/ answers: the request's shape, "
                           "not an outage")

    def _interpret(self, reply: _Reply, url: str, reference: str) -> TagResult:
        if reply.status == 200:
            return _tag_digest(reply, reference)
        if reply.status == 404:
            return NotFound()
        if reply.status == 403:
            return AuthRequired(f"{url}: 403 to an anonymous client")
        return status_failure(reply.status, url)

    @contextlib.asynccontextmanager
    async def _open(self, method: str, url: str,
                    headers: Mapping[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response, following up to ``_MAX_REDIRECTS`` redirects, each hop checked.

        Redirects are followed here rather than by aiohttp so that every hop's
        target passes the guard before it is asked, and goes through the proxy
        Go's rules pick for it; credentials never follow a redirect to another host.
        """
        target = URL(url)
        sent = dict(headers)
        for hop in range(_MAX_REDIRECTS + 1):
            proxy = self._proxies.proxy_for(str(target))
            await self._guard.check_url(str(target), guard_permitted(), proxied=proxy is not None)
            async with self._client_session().request(
                method, target, headers=sent, allow_redirects=False, proxy=proxy,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
            ) as response:
                location = response.headers.get("Location")
                if response.status not in _REDIRECTS or location is None:
                    yield response
                    return
                if hop == _MAX_REDIRECTS:
                    raise _RedirectError(f"more than {_MAX_REDIRECTS} redirects")
                target = _next_hop(target, location, sent)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _request_reply(self, method: str, url: str,
                             headers: Mapping[str, str]) -> _Reply | Unreachable:
        try:
            async with self._open(method, url, headers) as response:
                return _Reply(response.status, response.headers)
        except (aiohttp.ClientError, ForbiddenAddress, _RedirectError) as err:
            return transport_failure(err, url)

    async def _head(self, url: str, token: str | None) -> _Reply | Unreachable:
        headers = {"Accept": mediatypes.CONTAINERD_ACCEPT}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self._request_reply("HEAD", url, headers)

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
            async with self._open("GET", str(url), {"Accept": "application/json"}) as response:
                if response.status in (401, 403):
                    return AuthRequired(f"{what} refused anonymous access ({response.status})")
                if response.status != 200:
                    return status_failure(response.status, what)
                if (response.content_length or 0) > MAX_TOKEN_RESPONSE:
                    raise TokenResponseError(
                        f"token response larger than {MAX_TOKEN_RESPONSE} bytes")
                return parse_token_response(await _read_bounded(response, MAX_TOKEN_RESPONSE))
        except (aiohttp.ClientError, ForbiddenAddress, _RedirectError) as err:
            return transport_failure(err, what)
        except TokenResponseError as err:
            return Unreachable(FailureKind.PROTOCOL, f"{what}: {err}")
