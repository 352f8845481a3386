"""How a node asks upstream registries: bounds, breaker and where each registry lives.

Set by ``meshmirror run``'s ``--upstream-*`` flags and
``--containerd-registry-config-path``; the command line reads its defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meshmirror.upstream.client import (
    DEFAULT_CLIENT_BURST,
    DEFAULT_CLIENT_RATE,
    DEFAULT_MAX_REGISTRIES,
    DEFAULT_TAG_TTL,
    UpstreamClient,
)
from meshmirror.upstream.endpoints import UpstreamEndpoints
from meshmirror.upstream.guard import AddressGuard
from meshmirror.upstream.limits import ClientRateLimiter
from meshmirror.upstream.proxy import ProxySettings


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
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
    # Seconds a tag's upstream answer (found, absent or private) is reused.
    tag_ttl: float = DEFAULT_TAG_TTL
    # New upstream questions per second per client address, and the burst allowed.
    client_rate: float = DEFAULT_CLIENT_RATE
    client_burst: int = DEFAULT_CLIENT_BURST
    # Distinct registries asked at most.
    max_registries: int = DEFAULT_MAX_REGISTRIES
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
        return UpstreamClient(
            UpstreamEndpoints(self.registry_config_path, mirror_urls=self.mirror_urls),
            connect_timeout=self.connect_timeout, total_timeout=self.timeout,
            failure_threshold=self.failure_threshold, cooldown=self.cooldown,
            proxies=self.proxies, guard=AddressGuard.parse(self.allow_hosts),
            tag_ttl=self.tag_ttl,
            limiter=ClientRateLimiter(self.client_rate, self.client_burst),
            max_registries=self.max_registries)
