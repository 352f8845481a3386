"""The status page on the metrics port: ``/`` (HTML that refreshes itself) and ``/status``.

The page is a static file with an inline script that polls ``/status`` (no build step);
everything it shows comes from the JSON, so a script sees exactly what a human sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from meshmirror.peering import Peering
from meshmirror.registry.metrics import RegistryMetrics
from meshmirror.status.activity import MirrorActivity, RecentMisses
from meshmirror.status.hostscheck import CONFIG_PATH_ENV, HostsConfigCollector
from meshmirror.status.model import node_status
from meshmirror.store.base import Store

__all__ = ["node_status", "status_routes"]


def status_routes(store: Store, peering: Peering | None,
                  registry_metrics: RegistryMetrics | None = None,
                  conditions: Sequence[Mapping[str, str]] = ()) -> list[BaseRoute]:
    """Routes for the metrics server; hooks the mirror's activity, the registry's misses
    and the hosts.toml check; ``conditions``: containerd config problems found at start."""
    misses: RecentMisses | None = None
    if registry_metrics is not None:
        misses = RecentMisses()
        registry_metrics.miss_observers.append(misses.observe)
    activity: MirrorActivity | None = None
    if peering is not None:
        activity = MirrorActivity()
        metrics = peering.mirror.metrics
        metrics.observers.append(activity.observe)
        config_path = os.environ.get(CONFIG_PATH_ENV)
        if config_path:
            metrics.registry.register(
                HostsConfigCollector(Path(config_path), peering.config.http_base,
                                     peering.config.mirror.mirrored_registries))
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    async def as_json(request: Request) -> Response:
        return JSONResponse(await node_status(store, peering, activity, misses, conditions),
                            headers={"Cache-Control": "no-store"})

    async def as_html(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return [Route("/status", as_json, methods=["GET", "HEAD"]),
            Route("/", as_html, methods=["GET", "HEAD"])]
