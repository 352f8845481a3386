"""Where an upstream question may send a request: not wherever a stranger says.

The registry port is open to every pod, and ``?ns=`` names the registry. A
registry's ``401`` names a token realm and its ``3xx`` a redirect target, both
URLs of its choosing; followed blindly, they make this node send requests
inside the cluster for whoever runs a registry (a blind server-side request
forgery with the node's network position). So a realm or a redirect must lead
to a public address or to the registry's own host; any other private or
loopback host only when the operator lists it (``--upstream-allow-hosts``);
link-local addresses (``169.254.0.0/16``, ``fe80::/10``: the cloud metadata
endpoints live there) and the other metadata addresses never.

Names are resolved before deciding, and the connection goes to the addresses
that were checked: the check runs inside the connector's resolver
(:class:`GuardedResolver`), so no second lookup can answer differently. An
address literal skips aiohttp's resolver, so URLs are also checked before each
request (:meth:`AddressGuard.check_url`). Through a forward proxy the proxy
resolves the target; a name that resolves here is checked here, one that does
not is left to the proxy (the cluster's own fence).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never asked, whatever the allow-list says: link-local (the metadata services of
# AWS, GCP and Azure answer on 169.254.169.254) and the other clouds' metadata
# addresses that are not link-local.
NEVER: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IMDS over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
    ipaddress.ip_network("192.0.0.192/32"),  # Oracle Cloud metadata (legacy)
)

# The hosts the request in progress may reach although they are not public: the
# registry's own host and the proxy it goes through. Set per question, read by the
# resolver, so one shared connector serves every registry with its own answer.
_permitted: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "meshmirror_upstream_permitted_hosts", default=frozenset())


class ForbiddenAddress(OSError):
    """A realm or redirect leads to an address this node does not send requests to."""


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:169.254.169.254`` is 169.254.169.254 to the kernel."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class AddressGuard:
    """The allow-list (host names, addresses, CIDRs) and the decision."""

    allow_names: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressGuard:
        """``--upstream-allow-hosts`` values: ``host``, ``10.0.0.5`` or ``10.0.0.0/8``.

        Raises ValueError for an entry in a never-allowed range: listing the
        metadata endpoint would be a mistake, not a wish.
        """
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                network = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                if "/" in entry or not all(c.isalnum() or c in "-._" for c in entry):
                    raise ValueError(f"{raw!r}: not a host name, address or CIDR") from None
                names.add(entry.rstrip("."))
                continue
            if any(network.overlaps(never) for never in NEVER if
                   network.version == never.version):
                raise ValueError(f"{raw!r}: link-local and metadata addresses are never "
                                 "allowed")
            networks.append(network)
        return cls(frozenset(names), tuple(networks))

    def refusal(self, host: str, ip: IPAddress, permitted: frozenset[str]) -> str | None:
        """Why ``host`` (resolved to ``ip``) may not be asked; None if it may."""
        ip = _unmapped(ip)
        if any(ip in network for network in NEVER):
            return f"{host} ({ip}) is link-local or a metadata address"
        if ip.is_global:
            return None
        name = host.strip("[]").lower().rstrip(".")
        if name in permitted or name in self.allow_names:
            return None
        if any(ip in network for network in self.allow_networks):
            return None
        return (f"{host} ({ip}) is not a public address nor the registry's own host; "
                "list it in --upstream-allow-hosts to allow it")

    async def check_url(self, url: str, permitted: frozenset[str], *, proxied: bool) -> None:
        """Raise :class:`ForbiddenAddress` before a request whose target is refused.

        An address literal is decided here (the resolver never sees it); a name
        is decided by the resolver on a direct connection, and here when a proxy
        will resolve it (by a lookup of our own, skipped when it fails).
        """
        host = urlsplit(url).hostname
        if host is None:
            raise ForbiddenAddress(f"{url[:200]!r} has no host")
        ip = _ip(host)
        if ip is not None:
            reason = self.refusal(host, ip, permitted)
            if reason is not None:
                raise ForbiddenAddress(reason)
            return
        if proxied:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, None, proto=socket.IPPROTO_TCP)
            except OSError:
                return  # unknown here: the proxy resolves it, under the cluster's rules
            for info in infos:
                reason = self.refusal(host, ipaddress.ip_address(info[4][0]), permitted)
                if reason is not None:
                    raise ForbiddenAddress(reason)


def permit(hosts: Iterable[str | None]) -> contextvars.Token[frozenset[str]]:
    """Let the current task reach these hosts (a registry's own, its proxy) privately."""
    return _permitted.set(frozenset(h.lower() for h in hosts if h))


def reset(token: contextvars.Token[frozenset[str]]) -> None:
    _permitted.reset(token)


def permitted() -> frozenset[str]:
    return _permitted.get()


class GuardedResolver(AbstractResolver):
    """The connector's resolver: every answer checked, refused addresses dropped.

    If nothing is left the lookup fails with :class:`ForbiddenAddress`, before any
    connection is attempted.
    """

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed = _permitted.get()
        kept: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            reason = self._guard.refusal(host, ipaddress.ip_address(answer["host"]), allowed)
            if reason is None:
                kept.append(answer)
            else:
                reasons.append(reason)
        if not kept:
            raise ForbiddenAddress(reasons[0] if reasons else f"{host}: no address")
        return kept

    async def close(self) -> None:
        await self._inner.close()
