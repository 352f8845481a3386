"""The node: ``meshmirror run`` composes a store, the registry and metrics.

A `Node` is a list of components, each with ``start()`` and ``stop()``, started
in order and stopped in reverse, so the registry accepts requests only once
everything it depends on runs, and stops accepting first. What plugs in:

- ``node.add_component(c)`` inserts a component after the store and metrics
  and before the registry listener, so the registry only accepts requests
  once everything it depends on runs, and stops accepting first;
- ``node.fallback`` (a `meshmirror.registry.fallback.Fallback`) is consulted
  by the registry on a local miss;
- ``node.registry_routes`` / ``node.metrics_routes`` add endpoints (the
  ``/_mesh/v1/summary`` route, a status page) to the two HTTP servers;
- ``node.metrics_registry`` is the one Prometheus registry every component
  registers on.

All of these must be set before ``start()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from meshmirror import eventloop
from meshmirror.mirror.marker import peer_dispatch, refuse_private
from meshmirror.mirror.rollout import tree_requests
from meshmirror.peering import Peering
from meshmirror.registry.app import RegistryConfig, create_app
from meshmirror.registry.fallback import Fallback
from meshmirror.registry.metrics import RegistryMetrics
from meshmirror.registry.server import (
    ServerConfig,
    ServerMetrics,
    bind_listener,
    listener_address,
    serve,
)
from meshmirror.registry.serveroptions import SOURCE_BACKLOG
from meshmirror.registry.steering import Listeners, bind_listeners, own_addresses
from meshmirror.runconfig import ZONE, NodeConfig
from meshmirror.status import status_routes
from meshmirror.store.base import Store

if TYPE_CHECKING:
    from meshmirror.containerd.checks import CheckResult

log = logging.getLogger(__name__)

# A component that does not stop within this long is abandoned so that
# SIGTERM always ends the process; Kubernetes would SIGKILL us anyway.
_STOP_TIMEOUT: Final = 10.0
# Scrapes, probes and the status page need few connections; a cap of its own keeps
# the metrics port answering while the registry port is at its cap, and the two
# caps together within the open-file limit.
_METRICS_MAX_CONNECTIONS: Final = 256


class StartError(Exception):
    """A component could not start (port in use, store unreachable); one line for the operator."""


class Component(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_store(config: NodeConfig) -> Store:
    """The store ``--store`` names; StartError when its implementation is unavailable."""
    if config.store.startswith("oci:"):
        module_name, class_name = "meshmirror.store.ocilayout", "OciLayoutStore"
        positional: tuple[object, ...] = (Path(config.store[4:]),)
    else:
        module_name, class_name = "meshmirror.containerd.store", "ContainerdStore"
        positional = (config.containerd.sock, config.containerd.namespace,
                      config.containerd.content_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise StartError(f"--store {config.store}: not available in this build "
                         f"({module_name} is missing)") from err
    store_class = getattr(module, class_name)
    try:
        store: Store = store_class(*positional)
    except (OSError, ValueError) as err:
        raise StartError(f"--store {config.store}: {err}") from err
    return store


class StoreComponent:
    """Starts a store that has a ``start()`` (the containerd store syncs) and closes it."""

    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store

    async def start(self) -> None:
        start = getattr(self.store, "start", None)
        if start is not None:
            try:
                await start()
            except (OSError, ValueError) as err:
                raise StartError(f"store: {err}") from err

    async def stop(self) -> None:
        await self.store.close()


class HttpServer:
    """One Hypercorn listener; binds in ``start()`` so a busy port fails the start.

    ``own``: the node's own hosts, whose connections get the reserved accept queue;
    given, the port is steered by source (`meshmirror.registry.steering`)."""

    def __init__(self, name: str, app: ASGIApp, host: str, port: int,
                 options: ServerConfig, metrics: ServerMetrics | None = None,
                 own: Sequence[str] | None = None) -> None:
        self.name = name
        self.own = own
        self.app = app
        self.host = host
        self.port = port
        self.options = options
        self.metrics = metrics
        self.address: str | None = None
        self._shutdown = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            if self.own is None:
                first = bind_listener(self.host, self.port, self.options.backlog)
                sock: socket.socket | Listeners = first
            else:
                sock, unsteered = bind_listeners(
                    self.host, self.port, self.options.backlog,
                    own_addresses([self.host, *self.own]), SOURCE_BACKLOG)
                first = sock.sockets[0]
                if unsteered is not None:
                    log.warning("one accept queue for every client: per-source queues "
                                "need SO_REUSEPORT and SO_ATTACH_REUSEPORT_CBPF (Linux "
                                "4.5+)", extra={"fields": {"server": self.name,
                                                           "error": unsteered}})
        except OSError as err:
            raise StartError(f"{self.name}: cannot listen on {self.host}:{self.port}: "
                             f"{err.strerror or err}") from err
        self.address = listener_address(first)
        self._task = asyncio.create_task(
            serve(self.app, sock, self._shutdown, self.options, name=self.name,
                  metrics=self.metrics),
            name=f"http-{self.name}")
        log.info("listening", extra={"fields": {"server": self.name, "address": self.address}})

    async def stop(self) -> None:
        if self._task is None:
            return
        self._shutdown.set()
        try:
            await asyncio.wait_for(self._task, self.options.graceful_timeout + 2.0)
        except TimeoutError:
            log.warning("server did not stop in time", extra={"fields": {"server": self.name}})
        self._task = None


def metrics_app(registry: CollectorRegistry, routes: list[BaseRoute]) -> ASGIApp:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET", "HEAD"]), *routes])


class Node:
    """The running node; an async context manager over its components."""

    def __init__(self, config: NodeConfig, *, store: Store | None = None,
                 containerd_checks: Sequence[CheckResult] = ()) -> None:
        """``containerd_checks``: the startup checks that passed or only warned; each
        warning is logged, shown on the status page and exported as a metric."""
        self.config = config
        self.metrics_registry = CollectorRegistry()
        ProcessCollector(registry=self.metrics_registry)
        PlatformCollector(registry=self.metrics_registry)
        self.server_metrics = ServerMetrics(self.metrics_registry)
        self.store = store if store is not None else build_store(config)
        self.fallback: Fallback | None = None
        self.registry_routes: list[BaseRoute] = []
        self.metrics_routes: list[BaseRoute] = []
        self._extra: list[Component] = []
        self._started: list[Component] = []
        self.peering: Peering | None = None
        if config.peering is not None:
            self.peering = Peering(self.store, config.peering,
                                   metrics_registry=self.metrics_registry)
            self.fallback = self.peering.mirror
            self.registry_routes.extend(self.peering.routes)
            self.add_component(self.peering)
        self.registry_metrics = RegistryMetrics(self.metrics_registry)
        problems: list[dict[str, str]] = []
        if containerd_checks:
            from meshmirror.containerd.checks import ConfigProblemCollector, conditions

            problems = conditions(containerd_checks)
            for problem in problems:
                log.warning("containerd config problem", extra={"fields": problem})
            self.metrics_registry.register(ConfigProblemCollector(containerd_checks))
        self.metrics_routes.extend(status_routes(self.store, self.peering,
                                                 self.registry_metrics, problems))
        self.registry_server: HttpServer | None = None
        self.metrics_server: HttpServer | None = None

    def add_component(self, component: Component) -> None:
        self._extra.append(component)

    def _own_hosts(self) -> list[str]:
        """The addresses this node's own containerd may connect from: the advertised
        host, the host of the URL peers are given and ``--client-own-addrs`` (the
        registry's listen host is added by `HttpServer`, loopback by `own_addresses`)."""
        hosts: list[str] = []
        if self.config.peering is not None:
            if self.config.peering.advertise_addr is not None:
                hosts.append(self.config.peering.advertise_addr[0])
            hosts.append(urlsplit(self.config.peering.http_base).hostname or "")
        return [*hosts, *self.config.server.own_addrs]

    def _assemble(self) -> list[Component]:
        options = RegistryConfig(default_registry=self.config.default_registry)
        registry_metrics = self.registry_metrics
        # containerd's own tag lookups go to the upstream-first mirror, never to this
        # store's record of what the tag meant when it was pulled.
        client_options = replace(options, tags_from_store=not (
            self.peering is not None and self.peering.mirror.tags.upstream_first))
        registry_app = create_app(self.store, options=client_options, fallback=self.fallback,
                                  metrics=registry_metrics, extra_routes=self.registry_routes)
        if self.fallback is not None:
            # Peers get the local store only, so a false positive cannot chain mirrors.
            # ... and, in a rollout, the blobs in flight here (see `mirror.rollout`).
            serve_flights = self.peering.mirror.peers_fallback if self.peering else None
            local_only = tree_requests(create_app(
                self.store, options=options, metrics=registry_metrics,
                extra_routes=self.registry_routes, fallback=serve_flights))
            if self.peering is not None:
                # ... and nothing of a repository this node knows to be private.
                local_only = refuse_private(
                    local_only, self.peering.mirror.access.refuses_peers,
                    self.config.default_registry)
            registry_app = peer_dispatch(registry_app, local_only,
                                         self.peering.auth.admit if self.peering else None)
        server = self.config.server
        self.metrics_server = HttpServer(
            "metrics", metrics_app(self.metrics_registry, self.metrics_routes),
            *self.config.metrics_addr, replace(server, max_connections=min(
                server.max_connections, _METRICS_MAX_CONNECTIONS)), self.server_metrics)
        self.registry_server = HttpServer("registry", registry_app, *self.config.registry_addr,
                                          server, self.server_metrics, self._own_hosts())
        return [StoreComponent(self.store), self.metrics_server, *self._extra,
                self.registry_server]

    async def start(self) -> None:
        for component in self._assemble():
            try:
                await component.start()
            except BaseException:
                # A component that failed half-way may hold resources too.
                self._started.append(component)
                await self.stop()
                raise
            self._started.append(component)

    async def stop(self) -> None:
        """Stop in reverse order; one component failing to stop does not keep others up."""
        while self._started:
            component = self._started.pop()
            try:
                await asyncio.wait_for(component.stop(), _STOP_TIMEOUT)
            except Exception:
                log.exception("component failed to stop",
                              extra={"fields": {"component": component.name}})

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def run_node(config: NodeConfig, checks: Sequence[CheckResult] = ()) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop, 1 when the node cannot start."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        node = Node(config, containerd_checks=checks)
        async with node:
            log.info("node started", extra={"fields": {
                "registry": node.registry_server.address if node.registry_server else None,
                "metrics": node.metrics_server.address if node.metrics_server else None,
                "store": config.store}})
            await stopping.wait()
            log.info("stopping")
    except StartError as err:
        print(f"meshmirror: {err}", file=sys.stderr)
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


def run_command(config: NodeConfig) -> int:
    """``meshmirror run`` with flags already checked: 1 when containerd is not fit to serve."""
    checks: Sequence[CheckResult] = ()
    if config.store == "containerd":
        # Fail at once with what to fix rather than serve 404s from a store that
        # can never fill (no socket, wrong namespace, layers discarded...).
        from meshmirror.containerd.checks import startup_checks

        code, checks = startup_checks(config.containerd)
        if code != 0:
            return code
    if config.write_hosts_config and (code := write_hosts_config(config)) != 0:
        return code
    return eventloop.run(run_node(with_node_zone(config), checks))


def with_node_zone(config: NodeConfig,
                   lookup: Callable[[str, str], str] | None = None) -> NodeConfig:
    """``config`` with the zone read from the node's Kubernetes Node when asked to
    (``lookup(node, label)``: `kubenode.node_label` unless a test gives its own).

    A zone only ranks peers, so a node that cannot learn it runs without one and
    says why, rather than not serving at all."""
    peering = config.peering
    if peering is None or peering.zone or not peering.zone_label:
        return config
    from meshmirror.kubenode import NodeLookupError, node_label

    try:
        zone = (lookup or node_label)(peering.node_name, peering.zone_label)
    except NodeLookupError as err:
        log.warning("no zone: %s", err)
        return config
    if zone and not ZONE.fullmatch(zone):
        log.warning("no zone: Node %s label %s is %r, not a zone name", peering.node_name,
                    peering.zone_label, zone)
        return config
    if not zone:
        log.warning("no zone: Node %s has no label %s", peering.node_name, peering.zone_label)
        return config
    log.info("zone from the Node's label", extra={"zone": zone, "label": peering.zone_label})
    return replace(config, peering=replace(peering, zone=zone))


def write_hosts_config(config: NodeConfig) -> int:
    """Point containerd at the mirror targets before serving, exactly as ``configure`` does.

    Done at every start, not only by the pod's init container: a container that
    Kubernetes restarts in place runs no init container, and an entry lost while it
    was down (removed by hand, by another tool, by a cleanup) would otherwise send
    every pull on the node upstream while the node still looks healthy. The step is
    idempotent, so an entry already in place is left byte for byte as it is.
    """
    from meshmirror.containerd.hostsconfig import HostsConfigError, configure

    hosts = config.hosts
    try:
        changed = configure(hosts.config_path, hosts.registries, hosts.targets,
                            hosts.resolve_tags, hosts.prepend_existing)
    except (HostsConfigError, OSError) as err:
        print(f"meshmirror: cannot write hosts.toml under {hosts.config_path}: {err}",
              file=sys.stderr)
        return 1
    log.info("hosts.toml", extra={"fields": {"path": str(hosts.config_path),
                                             "changed": changed or "nothing"}})
    return 0
