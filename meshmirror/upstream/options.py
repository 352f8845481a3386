"""How a node asks upstream registries: bounds, breaker and where each registry lives.

Set by ``meshmirror run``'s ``--upstream-*`` flags and
``--containerd-registry-config-path``; the command line reads its defaults here.
Every CLI command imports this module, so it imports no I/O library: the client
(aiohttp) is imported only when one is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from meshmirror.upstream.endpoints import UpstreamEndpoints
from meshmirror.upstream.limits import ClientRateLimiter
from meshmirror.upstream.proxy import ProxySettings

if TYPE_CHECKING:
    from meshmirror.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Knobs of the anonymous upstream client.

    ``timeout`` bounds a whole answer (challenge, token and HEAD together) and is
    therefore the most an upstream outage can add to one tag resolution before
    the breaker opens; after that it adds nothing until ``cooldown`` has passed.
    """

    connect_timeout: float = 0.5
    timeout: float = 2.0
    # Consecutive failures (refused, timeout, TLS, 5xx, 429) that open the breaker.
    failure_threshold: int = 3
    cooldown: float = 30.0
    # containerd's registry config_path (``run`` passes --containerd-registry-config-path):
    # a registry's hosts.toml ``server`` is asked instead of the registry's own name,
    # exactly as containerd would. None: every registry is asked at its own name.
    registry_config_path: Path | None = None
    # Seconds a tag's upstream answer (found, absent or private) is reused: a burst of
    # pulls of one tag costs one question, and a tag moved upstream is seen within
    # seconds, about as soon as containerd's own resolver would see it.
    tag_ttl: float = 3.0
    # New upstream questions per second per client address, and the burst allowed:
    # containerd is one client, and a node starting 50 pods asks about as many.
    client_rate: float = 5.0
    client_burst: int = 100
    # Distinct registries asked at most (their breakers kept, the least recently asked
    # forgotten): with a _default hosts.toml every ?ns= is mirrored, so a client could
    # otherwise invent registries.
    max_registries: int = 64
    # Private or loopback hosts (names, addresses, CIDRs) a token realm or redirect
    # may lead to besides the registry's own host.
    allow_hosts: tuple[str, ...] = ()
    # This node's registry URLs (not a flag: its advertised URL and --mirror-targets):
    # a registry is asked only if its hosts.toml has an entry reaching one of them.
    # Empty: every registry's hosts.toml is taken to point here.
    mirror_urls: tuple[str, ...] = ()
    # HTTP(S)_PROXY and NO_PROXY as containerd reads them (not flags: the environment).
    proxies: ProxySettings = field(default_factory=ProxySettings)

    def client(self) -> UpstreamClient:
        """A client with these settings; the caller closes it."""
        from meshmirror.upstream.client import UpstreamClient
        from meshmirror.upstream.guard import AddressGuard

        return UpstreamClient(
            UpstreamEndpoints(self.registry_config_path, mirror_urls=self.mirror_urls),
            connect_timeout=self.connect_timeout, total_timeout=self.timeout,
            failure_threshold=self.failure_threshold, cooldown=self.cooldown,
            proxies=self.proxies, guard=AddressGuard.parse(self.allow_hosts),
            tag_ttl=self.tag_ttl,
            limiter=ClientRateLimiter(self.client_rate, self.client_burst),
            max_registries=self.max_registries)
