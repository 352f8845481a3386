"""The address guard's decisions, and the per-client question limiter (no network)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from meshmirror.upstream.guard import (
    AddressGuard,
    ForbiddenAddress,
    GuardedResolver,
    permit,
    reset,
)
from meshmirror.upstream.limits import ClientRateLimiter
from tests.upstream.conftest import FakeClock

NOBODY: frozenset[str] = frozenset()


def refusal(guard: AddressGuard, host: str, ip: str,
            permitted: frozenset[str] = NOBODY) -> str | None:
    return guard.refusal(host, ipaddress.ip_address(ip), permitted)


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700::1111"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert refusal(AddressGuard(), "auth.example", ip) is None


@pytest.mark.parametrize("ip", ["10.0.0.5", "192.168.1.1", "172.16.0.1", "127.0.0.2", "::1",
                                "fd00::1", "100.64.0.1", "0.0.0.0"])
def test_private_and_loopback_need_the_registry_host_or_the_allow_list(ip: str) -> None:
    reason = refusal(AddressGuard(), "internal.example", ip)
    assert reason is not None and "--upstream-allow-hosts" in reason
    assert refusal(AddressGuard(), "internal.example", ip,
                   frozenset({"internal.example"})) is None
    assert refusal(AddressGuard.parse(["internal.example"]), "internal.example", ip) is None
    assert refusal(AddressGuard.parse([ip]), "internal.example", ip) is None


@pytest.mark.parametrize("ip", ["169.254.169.254", "169.254.1.1", "fe80::1",
                                "::ffff:169.254.169.254", "fd00:ec2::254", "100.100.100.200"])
def test_link_local_and_metadata_are_never_allowed(ip: str) -> None:
    permissive = AddressGuard.parse(["metadata.internal", "10.0.0.0/8"])
    assert refusal(permissive, "metadata.internal", ip, frozenset({"metadata.internal"}))


@pytest.mark.parametrize("entry", ["169.254.169.254", "169.254.0.0/16", "fe80::/64",
                                   "0.0.0.0/0"])
def test_the_allow_list_refuses_never_allowed_ranges(entry: str) -> None:
    with pytest.raises(ValueError, match="never"):
        AddressGuard.parse([entry])


def test_the_allow_list_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not a host"):
        AddressGuard.parse(["http://x/"])


class _Answers(AbstractResolver):
    def __init__(self, *ips: str) -> None:
        self.ips = ips

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=ip, port=port, family=family, proto=0,
                              flags=0) for ip in self.ips]

    async def close(self) -> None:
        return None


async def test_the_resolver_drops_refused_answers_and_fails_when_none_is_left() -> None:
    resolver = GuardedResolver(AddressGuard(), _Answers("10.0.0.5", "8.8.8.8"))
    assert [a["host"] for a in await resolver.resolve("mixed.example", 80)] == ["8.8.8.8"]
    only_private = GuardedResolver(AddressGuard(), _Answers("10.0.0.5"))
    with pytest.raises(ForbiddenAddress):
        await only_private.resolve("internal.example", 80)
    token = permit(["internal.example"])
    try:
        assert len(await only_private.resolve("internal.example", 80)) == 1
    finally:
        reset(token)
    metadata = GuardedResolver(AddressGuard(), _Answers("169.254.169.254"))
    token = permit(["metadata.example"])
    try:
        with pytest.raises(ForbiddenAddress, match="link-local"):
            await metadata.resolve("metadata.example", 80)
    finally:
        reset(token)


async def test_check_url_decides_address_literals() -> None:
    guard = AddressGuard()
    await guard.check_url("http://8.8.8.8/token", NOBODY, proxied=False)
    with pytest.raises(ForbiddenAddress):
        await guard.check_url("http://10.1.2.3/token", NOBODY, proxied=False)
    with pytest.raises(ForbiddenAddress):
        await guard.check_url("http://[fe80::1]/token", frozenset({"fe80::1"}), proxied=True)
    await guard.check_url("http://127.0.0.5:5000/x", frozenset({"127.0.0.5"}), proxied=False)


def test_limiter_paces_each_client_apart() -> None:
    clock = FakeClock()
    limiter = ClientRateLimiter(rate=2.0, burst=5, clock=clock)
    assert [limiter.allow("10.0.0.1") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("10.0.0.2")  # another client has its own bucket
    assert limiter.allow(None)  # the node's own questions are never limited
    clock.now += 1.0  # two more tokens
    assert [limiter.allow("10.0.0.1") for _ in range(3)] == [True, True, False]
    clock.now += 100.0  # refilled to the burst, no more
    assert sum(limiter.allow("10.0.0.1") for _ in range(10)) == 5


def test_limiter_forgets_the_least_recent_client_past_its_bound() -> None:
    limiter = ClientRateLimiter(rate=1.0, burst=1, max_clients=3, clock=FakeClock())
    for n in range(10):
        limiter.allow(f"10.0.0.{n}")
    assert len(limiter) == 3
