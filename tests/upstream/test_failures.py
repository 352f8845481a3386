"""Refused, blackholed, failing and misbehaving upstreams: bounded, typed answers, a breaker.

Scripted HTTP servers play the upstream so each fault is exact and every request
it received can be counted: "the breaker is open" is asserted as "the server
never saw the call", not as a wall-clock time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshmirror.oci import mediatypes
from meshmirror.oci.digest import Digest
from meshmirror.upstream import (
    AuthRequired,
    BreakerState,
    FailureKind,
    NotFound,
    TagDigest,
    Unknown,
    Unreachable,
    UpstreamClient,
    UpstreamEndpoints,
)
from tests.support.scripted_http import (
    Blackhole,
    RawReplyServer,
    Reply,
    Request,
    ScriptedHTTPServer,
    refused_url,
)
from tests.upstream.conftest import FakeClock, client_for

NAME = "upstream.test"
DIGEST = Digest.of(b"manifest")
FOUND = Reply(200, (("Docker-Content-Digest", str(DIGEST)),
                    ("Content-Type", mediatypes.OCI_MANIFEST)), length=8)
TIMEOUT = 0.5


def always(reply: Reply) -> Callable[[Request], Reply]:
    return lambda _request: reply


def bearer(realm: str) -> Reply:
    return Reply(401, (("WWW-Authenticate",
                        f'Bearer realm="{realm}",service="svc",scope="repository:a/b:pull"'),))


async def test_refused_port_is_unreachable_at_once() -> None:
    async with client_for((NAME, refused_url()), total_timeout=TIMEOUT) as client:
        started = time.monotonic()
        result = await client.resolve_tag(NAME, "a/b", "1")
        assert time.monotonic() - started < TIMEOUT
    assert isinstance(result, Unreachable) and result.kind is FailureKind.CONNECTION


async def test_blackhole_is_unreachable_within_the_bound_then_the_breaker_opens() -> None:
    with Blackhole() as hole:
        async with client_for((NAME, hole.url), total_timeout=TIMEOUT,
                              failure_threshold=1) as client:
            started = time.monotonic()
            result = await asyncio.wait_for(client.resolve_tag(NAME, "a/b", "1"), 5)
            elapsed = time.monotonic() - started
            assert isinstance(result, Unreachable) and result.kind is FailureKind.TIMEOUT
            assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 0.5
            assert client.health(NAME).state is BreakerState.OPEN
            again = await client.resolve_tag(NAME, "a/b", "1")
            assert isinstance(again, Unreachable) and again.kind is FailureKind.CIRCUIT_OPEN
            assert "timeout" in again.reason


async def test_server_errors_open_the_breaker_and_then_no_request_is_sent() -> None:
    """A 5xx counts when the registry's /v2/ fails too (a whole-registry outage)."""
    replies = [Reply(500)]
    clock = FakeClock()

    def heads(server: ScriptedHTTPServer) -> int:
        return sum(r.method == "HEAD" for r in server.requests)

    with ScriptedHTTPServer(lambda _r: replies[-1]) as server:
        async with client_for((NAME, server.url), failure_threshold=3, cooldown=30.0,
                              clock=clock) as client:
            for n in range(3):
                assert client.health(NAME).state is BreakerState.CLOSED
                result = await client.resolve_tag(NAME, "a/b", "1")
                assert isinstance(result, Unreachable)
                assert result.kind is FailureKind.SERVER_ERROR
                assert heads(server) == n + 1
            health = client.health(NAME)
            assert health.state is BreakerState.OPEN and health.consecutive_failures == 3
            assert health.last_error is not None and "500" in health.last_error
            result = await client.resolve_tag(NAME, "a/b", "1")
            assert isinstance(result, Unreachable)
            assert result.kind is FailureKind.CIRCUIT_OPEN
            assert heads(server) == 3  # never reached the server

            clock.now += 30.0  # cool-down over: one probe, which fails
            assert client.health(NAME).state is BreakerState.HALF_OPEN
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), Unreachable)
            assert heads(server) == 4
            assert client.health(NAME).state is BreakerState.OPEN

            replies.append(FOUND)  # the upstream is back
            clock.now += 30.0
            assert await client.resolve_tag(NAME, "a/b", "1") == TagDigest(
                DIGEST, mediatypes.OCI_MANIFEST, 8)
            assert client.health(NAME).state is BreakerState.CLOSED
            assert dict(client.health_all()).keys() == {NAME}


async def test_a_5xx_while_v2_answers_is_the_requests_shape_and_never_opens_the_breaker(
        ) -> None:
    """Distribution answers some references (a layer's digest) on the manifests endpoint
    with a 500; a client asking for such references must not open the breaker."""
    def reply(request: Request) -> Reply:
        return Reply(401) if request.path == "/v2/" else Reply(500)

    with ScriptedHTTPServer(reply) as server:
        async with client_for((NAME, server.url), failure_threshold=1) as client:
            for _ in range(5):
                result = await client.resolve_tag(NAME, "a/b", "1")
                assert isinstance(result, Unreachable) and result.kind is FailureKind.PROTOCOL
                assert "shape" in result.reason
            assert client.health(NAME).state is BreakerState.CLOSED
        # /v2/ was asked once: its answer stands for a few seconds.
        assert sum(r.path == "/v2/" for r in server.requests) == 1


async def test_rate_limited_counts_as_a_failure() -> None:
    with ScriptedHTTPServer(always(Reply(429))) as server:
        async with client_for((NAME, server.url), failure_threshold=1) as client:
            result = await client.resolve_tag(NAME, "a/b", "1")
            assert isinstance(result, Unreachable)
            assert result.kind is FailureKind.RATE_LIMITED
            assert client.health(NAME).state is BreakerState.OPEN


async def test_answers_that_are_not_failures_keep_the_breaker_closed() -> None:
    with ScriptedHTTPServer(always(Reply(404))) as server:
        async with client_for((NAME, server.url), failure_threshold=1) as client:
            for _ in range(3):
                assert await client.resolve_tag(NAME, "a/b", "1") == NotFound()
            assert client.health(NAME).state is BreakerState.CLOSED


async def test_only_a_head_with_containerds_accept_and_no_credentials() -> None:
    with ScriptedHTTPServer(always(FOUND)) as server:
        async with client_for((NAME, server.url)) as client:
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), TagDigest)
    (request,) = server.requests
    assert (request.method, request.path) == ("HEAD", "/v2/a/b/manifests/1")
    assert request.headers["accept"] == mediatypes.CONTAINERD_ACCEPT
    assert "authorization" not in request.headers and "cookie" not in request.headers


async def test_bearer_flow_on_the_wire() -> None:
    def registry(request: Request) -> Reply:
        if request.headers.get("authorization") == "Bearer tok-1":
            return FOUND
        return bearer(f"{tokens.url}/token?extra=1")

    with ScriptedHTTPServer(always(Reply(200, body=b'{"token": "tok-1"}'))) as tokens, \
            ScriptedHTTPServer(registry) as server:
        async with client_for((NAME, server.url)) as client:
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), TagDigest)
    (token_request,) = tokens.requests
    assert token_request.method == "GET"
    assert token_request.query == {"extra": ["1"], "service": ["svc"],
                                   "scope": ["repository:a/b:pull"]}
    assert "authorization" not in token_request.headers
    assert [r.method for r in server.requests] == ["HEAD", "HEAD"]


async def test_a_token_refused_before_its_time_is_fetched_afresh() -> None:
    issued = ["tok-1"]

    def registry(request: Request) -> Reply:
        if request.headers.get("authorization") == f"Bearer {issued[-1]}":
            return FOUND
        return bearer(f"{tokens.url}/token")

    def token(_request: Request) -> Reply:
        return Reply(200, body=f'{{"token": "{issued[-1]}", "expires_in": 300}}'.encode())

    with ScriptedHTTPServer(token) as tokens, ScriptedHTTPServer(registry) as server:
        async with client_for((NAME, server.url)) as client:
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), TagDigest)
            issued.append("tok-2")  # the upstream revoked tok-1
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), TagDigest)
    assert len(tokens.requests) == 2


@pytest.mark.parametrize(("reply", "kind", "words"), [
    (Reply(401, (("WWW-Authenticate", 'Bearer realm="unterminated'),)),
     FailureKind.PROTOCOL, "malformed challenge"),
    (Reply(401, (("WWW-Authenticate", 'Bearer service="no realm"'),)),
     FailureKind.PROTOCOL, "without a realm"),
    (Reply(200, (("Content-Type", mediatypes.OCI_MANIFEST),)),
     FailureKind.PROTOCOL, "without Docker-Content-Digest"),
    (Reply(200, (("Docker-Content-Digest", "md5:abc"),)), FailureKind.PROTOCOL, "invalid digest"),
    (Reply(302, (("Location", "/v2/a/b/manifests/1"),)), FailureKind.PROTOCOL, "redirect"),
    (Reply(418), FailureKind.PROTOCOL, "unexpected status 418"),
])
async def test_malformed_answers_are_protocol_failures(
        reply: Reply, kind: FailureKind, words: str) -> None:
    with ScriptedHTTPServer(always(reply)) as server:
        async with client_for((NAME, server.url)) as client:
            result = await client.resolve_tag(NAME, "a/b", "1")
    assert isinstance(result, Unreachable) and result.kind is kind
    assert words.lower() in result.reason.lower()


async def test_digest_answer_must_match_the_digest_asked_for() -> None:
    other = Reply(200, (("Docker-Content-Digest", str(Digest.of(b"other"))),))
    with ScriptedHTTPServer(always(other)) as server:
        async with client_for((NAME, server.url)) as client:
            result = await client.check_public(NAME, "a/b", str(DIGEST))
    assert isinstance(result, Unknown) and result.kind is FailureKind.PROTOCOL


@pytest.mark.parametrize(("challenge", "kind"), [
    ('Basic realm="registry"', AuthRequired),
    (None, AuthRequired),
])
async def test_credentials_challenges(challenge: str | None, kind: type) -> None:
    headers = (("WWW-Authenticate", challenge),) if challenge else ()
    with ScriptedHTTPServer(always(Reply(401, headers))) as server:
        async with client_for((NAME, server.url)) as client:
            assert isinstance(await client.resolve_tag(NAME, "a/b", "1"), kind)


@pytest.mark.parametrize(("token_reply", "kind"), [
    (Reply(200, body=b"<html>"), FailureKind.PROTOCOL),
    (Reply(200, body=b'{"token": "a\\u0000b"}'), FailureKind.PROTOCOL),
    (Reply(200, body=b"x" * (300 * 1024)), FailureKind.PROTOCOL),
    (Reply(503), FailureKind.SERVER_ERROR),
    (Reply(404), FailureKind.PROTOCOL),
])
async def test_token_endpoint_faults(token_reply: Reply, kind: FailureKind) -> None:
    with ScriptedHTTPServer(always(token_reply)) as tokens, \
            ScriptedHTTPServer(always(bearer(f"{tokens.url}/token"))) as server:
        async with client_for((NAME, server.url)) as client:
            result = await client.resolve_tag(NAME, "a/b", "1")
    assert isinstance(result, Unreachable) and result.kind is kind


async def test_token_endpoint_refused_counts_against_the_breaker() -> None:
    with ScriptedHTTPServer(always(bearer(f"{refused_url()}/token"))) as server:
        async with client_for((NAME, server.url), failure_threshold=1) as client:
            result = await client.resolve_tag(NAME, "a/b", "1")
            assert isinstance(result, Unreachable) and result.kind is FailureKind.CONNECTION
            assert client.health(NAME).state is BreakerState.OPEN


async def test_a_server_that_is_not_http_is_a_protocol_failure() -> None:
    with RawReplyServer(b"SSH-2.0-OpenSSH_9.2\r\n") as server:
        async with client_for((NAME, server.url), failure_threshold=1) as client:
            result = await client.resolve_tag(NAME, "a/b", "1")
            assert isinstance(result, Unreachable) and result.kind is FailureKind.PROTOCOL
            assert "bad status line" in result.reason.lower()
            assert client.health(NAME).state is BreakerState.CLOSED  # fast: no latency to save


async def test_unreadable_hosts_toml_is_a_config_failure(tmp_path: Path) -> None:
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "hosts.toml").write_text("server = [\n")
    async with UpstreamClient(UpstreamEndpoints(tmp_path)) as client:
        result = await client.resolve_tag(NAME, "a/b", "1")
    assert isinstance(result, Unreachable) and result.kind is FailureKind.CONFIG


async def test_the_registries_kept_are_bounded_and_a_new_one_is_always_asked() -> None:
    with ScriptedHTTPServer(always(Reply(500))) as server:
        names = [f"r{n}.test" for n in range(6)]
        async with client_for(*((n, server.url) for n in names), max_registries=3,
                              failure_threshold=1) as client:
            for name in names[:3]:  # three registries, each with its breaker open
                await client.resolve_tag(name, "a/b", "1")
                assert client.health(name).state is BreakerState.OPEN
            for name in names[3:]:
                result = await client.resolve_tag(name, "a/b", "1")
                assert isinstance(result, Unreachable)
                assert result.kind is FailureKind.SERVER_ERROR  # asked, not refused
            assert len(client.health_all()) == 3
