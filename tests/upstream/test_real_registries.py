"""The client against real Distribution: public, token auth (Docker Hub's kind), htpasswd."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from meshmirror.oci import mediatypes
from meshmirror.oci.imagebuilder import BuiltImage
from meshmirror.upstream import (
    AuthRequired,
    BreakerState,
    FailureKind,
    NotFound,
    Private,
    Public,
    TagDigest,
    Unknown,
    Unreachable,
    UpstreamClient,
    UpstreamEndpoints,
)
from tests.support.distribution import DistributionRegistry
from tests.support.token_server import TokenServer
from tests.upstream.conftest import (
    PRIVATE_REPO,
    PUBLIC_REPO,
    TAG,
    FakeClock,
    Upstream,
    client_for,
)

pytestmark = pytest.mark.real


async def test_public_registry_resolves_to_the_pushed_digest(
        public_upstream: Upstream, image: BuiltImage) -> None:
    async with client_for(public_upstream) as client:
        result = await client.resolve_tag(public_upstream.name, PUBLIC_REPO, TAG)
        assert result == TagDigest(public_upstream.digest, mediatypes.OCI_MANIFEST,
                                   image.root.size)
        assert public_upstream.digest == image.digest
        assert await client.check_public(public_upstream.name, PUBLIC_REPO, TAG) == Public(True)
        by_digest = str(public_upstream.digest)
        assert await client.check_public(public_upstream.name, PUBLIC_REPO,
                                         by_digest) == Public(True)


async def test_missing_tag_is_not_found(public_upstream: Upstream,
                                        token_upstream: Upstream) -> None:
    async with client_for(public_upstream, token_upstream) as client:
        for upstream in (public_upstream, token_upstream):
            assert await client.resolve_tag(upstream.name, PUBLIC_REPO, "nope") == NotFound()
        assert await client.check_public(public_upstream.name, PUBLIC_REPO,
                                         "nope") == Public(found=False)


async def test_hosts_toml_server_names_the_upstream(public_upstream: Upstream,
                                                    tmp_path: Path) -> None:
    (tmp_path / public_upstream.name).mkdir()
    (tmp_path / public_upstream.name / "hosts.toml").write_text(
        f'server = "{public_upstream.registry.url}"\n')
    async with UpstreamClient(UpstreamEndpoints(tmp_path)) as client:
        result = await client.resolve_tag(public_upstream.name, PUBLIC_REPO, TAG)
    assert isinstance(result, TagDigest) and result.digest == public_upstream.digest


async def test_token_registry_grants_public_and_refuses_private(token_upstream: Upstream) -> None:
    async with client_for(token_upstream) as client:
        result = await client.resolve_tag(token_upstream.name, PUBLIC_REPO, TAG)
        assert isinstance(result, TagDigest) and result.digest == token_upstream.digest
        refused = await client.resolve_tag(token_upstream.name, PRIVATE_REPO, TAG)
        assert isinstance(refused, AuthRequired)
        assert "anonymous token" in refused.reason
        assert await client.check_public(token_upstream.name, PUBLIC_REPO, TAG) == Public(True)
        assert isinstance(await client.check_public(token_upstream.name, PRIVATE_REPO,
                                                    str(token_upstream.digest)), Private)


async def test_htpasswd_registry_requires_credentials(htpasswd_upstream: Upstream) -> None:
    async with client_for(htpasswd_upstream) as client:
        result = await client.resolve_tag(htpasswd_upstream.name, PRIVATE_REPO, TAG)
        assert isinstance(result, AuthRequired) and "basic" in result.reason
        assert isinstance(await client.check_public(htpasswd_upstream.name, PRIVATE_REPO, TAG),
                          Private)


async def test_token_is_cached_for_its_lifetime(token_upstream: Upstream) -> None:
    tokens = token_upstream.token_server
    assert tokens is not None
    clock = FakeClock()
    before = len(tokens.anonymous_requests())
    async with client_for(token_upstream, clock=clock) as client:
        for _ in range(2):
            result = await client.resolve_tag(token_upstream.name, PUBLIC_REPO, TAG)
            assert isinstance(result, TagDigest)
        assert len(tokens.anonymous_requests()) == before + 1
        clock.now += 300  # the token server's expires_in
        assert isinstance(await client.resolve_tag(token_upstream.name, PUBLIC_REPO, TAG),
                          TagDigest)
        assert len(tokens.anonymous_requests()) == before + 2
    asked = tokens.anonymous_requests()[-1]
    assert asked.query["scope"] == [f"repository:{PUBLIC_REPO}:pull"]


async def test_garbage_from_the_token_server_is_a_protocol_failure(
        token_upstream: Upstream, token_faults: TokenServer) -> None:
    token_faults.garbage = True
    async with client_for(token_upstream) as client:
        result = await client.resolve_tag(token_upstream.name, PUBLIC_REPO, TAG)
        assert isinstance(result, Unreachable)
        assert result.kind is FailureKind.PROTOCOL and "not JSON" in result.reason
        assert isinstance(await client.check_public(token_upstream.name, PUBLIC_REPO, TAG),
                          Unknown)


async def test_token_server_refusing_anonymous_means_auth_required(
        token_upstream: Upstream, token_faults: TokenServer) -> None:
    token_faults.refuse_anonymous = True
    async with client_for(token_upstream) as client:
        result = await client.resolve_tag(token_upstream.name, PUBLIC_REPO, TAG)
    assert isinstance(result, AuthRequired) and "refused anonymous" in result.reason


async def test_https_verifies_against_the_trust_store_it_is_given() -> None:
    """By default the system store, which does not hold a self-signed cert: a TLS failure."""
    with DistributionRegistry(tls=True) as registry:
        assert registry.tls_cert is not None and registry.url.startswith("https://")
        name = registry.address
        async with UpstreamClient(UpstreamEndpoints(overrides={name: registry.url}),
                                  failure_threshold=1) as client:
            result = await client.resolve_tag(name, PUBLIC_REPO, TAG)
            assert isinstance(result, Unreachable) and result.kind is FailureKind.TLS
            assert client.health(name).state is BreakerState.OPEN
        trusting = ssl.create_default_context(cafile=str(registry.tls_cert.cert))
        async with UpstreamClient(UpstreamEndpoints(overrides={name: registry.url}),
                                  ssl_context=trusting) as client:
            assert await client.resolve_tag(name, PUBLIC_REPO, TAG) == NotFound()
