"""A tag lookup in an outage asks the upstream once, never twice, until the breaker opens.

The mirror's tag policy and repository access over the real upstream client,
against an upstream that accepts connections and never answers (each question
costs the whole ``--upstream-timeout``) and one that refuses them. A lookup
asks for the tag's digest and then whether peers may serve the repository; the
second question must not go to an upstream that just failed to answer the
first, or the outage costs a lookup two timeouts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from meshmirror.mirror.options import MirrorConfig, UnknownVisibility
from meshmirror.mirror.tags import AskPeers, TagPolicy
from meshmirror.mirror.visibility import Access, RepositoryAccess
from meshmirror.upstream import UpstreamClient, UpstreamEndpoints
from tests.support.scripted_http import Blackhole, refused_url

REPO, TAG = "team/app", "latest"
TIMEOUT = 0.3
THRESHOLD = 3


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    with Blackhole() as hole:
        yield hole


def _policy(registry: str, url: str) -> tuple[TagPolicy, RepositoryAccess, UpstreamClient]:
    upstream = UpstreamClient(UpstreamEndpoints(overrides={registry: url}),
                              connect_timeout=TIMEOUT, total_timeout=TIMEOUT,
                              failure_threshold=THRESHOLD, cooldown=600)
    options = MirrorConfig(private_images_unknown=UnknownVisibility.SHARE)
    access = RepositoryAccess(upstream, options)
    return TagPolicy(upstream, options, access, mesh_encrypted=True), access, upstream


async def _lookup(policy: TagPolicy, access: RepositoryAccess, registry: str) -> float:
    """One tag lookup as the mirror makes it; its duration."""
    started = time.monotonic()
    decision = await policy.decide(registry, REPO, TAG)
    assert decision == AskPeers(outage=True)
    assert await access.check(registry, REPO, TAG) is Access.SHARE
    return time.monotonic() - started


async def test_a_silent_upstream_costs_one_timeout_per_lookup_then_none(
        blackhole: Blackhole) -> None:
    policy, access, upstream = _policy(blackhole.address, blackhole.url)
    async with upstream:
        for asked in range(1, THRESHOLD + 1):
            seconds = await _lookup(policy, access, blackhole.address)
            assert blackhole.accepted == asked, "the access check asked the upstream again"
            assert seconds < 1.8 * TIMEOUT, seconds
        for _ in range(5):  # the breaker is open: no connection, no wait
            assert await _lookup(policy, access, blackhole.address) < TIMEOUT
        assert blackhole.accepted == THRESHOLD


async def test_a_refusing_upstream_is_asked_once_per_lookup_until_the_breaker_opens() -> None:
    url = refused_url()
    registry = url.removeprefix("http://")
    policy, access, upstream = _policy(registry, url)
    async with upstream:
        for asked in range(1, THRESHOLD + 1):
            await _lookup(policy, access, registry)
            assert upstream.health(registry).consecutive_failures == asked
        for _ in range(3):
            await _lookup(policy, access, registry)
        assert upstream.health(registry).consecutive_failures == THRESHOLD


async def test_an_unanswered_tag_does_not_stand_in_for_a_later_check(
        blackhole: Blackhole) -> None:
    """The note lasts for the lookup's own check only: the next request asks again."""
    policy, access, upstream = _policy(blackhole.address, blackhole.url)
    async with upstream:
        await _lookup(policy, access, blackhole.address)
        assert blackhole.accepted == 1
        assert await access.check(blackhole.address, REPO, TAG) is Access.SHARE
        assert blackhole.accepted == 2
