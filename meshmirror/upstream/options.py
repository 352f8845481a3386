"""How a node asks upstream registries: bounds, breaker and where each registry lives.

Set by ``meshmirror run``'s ``--upstream-*`` flags and
``--containerd-registry-config-path``; the command line reads its defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshmirror.upstream.client import UpstreamClient
from meshmirror.upstream.endpoints import UpstreamEndpoints


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

    def client(self) -> UpstreamClient:
        """A client with these settings; the caller closes it."""
        return UpstreamClient(UpstreamEndpoints(self.registry_config_path),
                              connect_timeout=self.connect_timeout, total_timeout=self.timeout,
                              failure_threshold=self.failure_threshold, cooldown=self.cooldown)
