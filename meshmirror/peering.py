"""Peering: the parts that make a node share content with its peers.

One component ties together what each module does on its own:

    store --keys--> SummaryPublisher --epoch/keys tags--> MeshNode (gossip)
                         |                                    |
                  /_mesh/v1/summary                 membership events
                         ^                                    v
        peers fetch it --+            PeerDirectory --filters--> BloomRouter
                                                                  |
                         registry miss --> PeerMirror <--candidates

A node advertises itself in its memberlist metadata as Serf tags: ``http``
(its registry's base URL), ``epoch`` and ``keys`` (its current summary). A
peer whose epoch moves is fetched again; a peer that dies or leaves is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import tempfile
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute

from meshmirror.addresses import AddressError, parse_host_port
from meshmirror.flags import UsageError, split_list
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import MemberJoined, MemberLeft, MemberUpdated, NodeInfo
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.metrics import register_mesh_metrics
from meshmirror.mesh.tags import decode_tags, encode_tags
from meshmirror.mesh.transport import MembershipEvent, MeshNode
from meshmirror.mesh.wire import WireError
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.options import MirrorOptions
from meshmirror.mirror.options import registry_host as registry_host_of
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.mirror.spool import check_spool_directory
from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.router import BloomRouter
from meshmirror.routing.summary import Summary, summary_route
from meshmirror.store.base import Store

log = logging.getLogger("meshmirror.peering")

TAG_HTTP = "http"
TAG_EPOCH = "epoch"
TAG_KEYS = "keys"


@dataclass(frozen=True, slots=True)
class PeeringConfig:
    node_name: str
    mesh_bind: tuple[str, int]
    # The registry's URL as peers must use it, e.g. http://10.0.0.7:5000.
    http_base: str
    mesh_advertise: tuple[str, int] | None = None
    join: tuple[tuple[str, int], ...] = ()
    join_dns: str | None = None
    gossip_key_file: str | None = None
    summary_fp_rate: float = 0.01
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mirror: MirrorOptions = field(default_factory=MirrorOptions)

    @classmethod
    def from_args(cls, args: Namespace, registry_host: str, registry_port: int
                  ) -> PeeringConfig | None:
        """The peering half of ``meshmirror run``'s flags; None for ``--mesh-addr off``."""
        if str(args.mesh_addr).strip().lower() in {"off", "none", ""}:
            return None
        try:
            bind, advertise, http_base = mesh_addresses(
                args.mesh_addr, args.advertise_addr, registry_host, registry_port)
            join = tuple(parse_host_port(j, default_port=7946) for j in split_list(args.join))
        except AddressError as err:
            raise UsageError(str(err)) from err
        filters: list[re.Pattern[str]] = []
        for text in split_list(args.registry_filters):
            try:
                filters.append(re.compile(text))
            except re.error as err:
                raise UsageError(f"--registry-filters {text!r}: not a regex: {err}") from err
        if args.gossip_key_file and not Path(args.gossip_key_file).is_file():
            raise UsageError(f"--gossip-key-file {args.gossip_key_file}: no such file")
        if (args.mirror_resolve_timeout <= 0 or args.mirror_first_byte_timeout <= 0
                or args.mirror_resolve_retries < 1):
            raise UsageError("--mirror-resolve-timeout and --mirror-first-byte-timeout must be "
                             "> 0 and --mirror-resolve-retries >= 1")
        if not 0 < args.summary_fp_rate < 1:
            raise UsageError("--summary-fp-rate must be between 0 and 1, e.g. 0.01")
        spool_dir = Path(args.mirror_spool_dir) if args.mirror_spool_dir else None
        if args.mirror_spool_limit > 0:
            try:
                check_spool_directory(spool_dir or Path(tempfile.gettempdir()))
            except OSError as err:
                flag = "--mirror-spool-dir" if spool_dir else "the temporary directory"
                raise UsageError(f"{flag}: {err}; point --mirror-spool-dir at a writable "
                                 "directory or set --mirror-spool-limit 0") from err
        mirror = MirrorOptions(
            connect_timeout=args.mirror_resolve_timeout,
            first_byte_timeout=args.mirror_first_byte_timeout,
            hedge_delay=args.mirror_resolve_timeout / 2,
            max_attempts=args.mirror_resolve_retries,
            spool_dir=spool_dir,
            spool_limit=args.mirror_spool_limit,
            resolve_tags=args.resolve_tags,
            registry_filters=tuple(filters),
            mirrored_registries=frozenset(
                registry_host_of(r) for r in split_list(args.mirrored_registries)),
        )
        return cls(node_name=args.node_name, mesh_bind=bind, http_base=http_base,
                   mesh_advertise=advertise, join=join, join_dns=args.join_dns,
                   gossip_key_file=args.gossip_key_file,
                   summary_fp_rate=args.summary_fp_rate, mirror=mirror)


def advertised_host(*candidates: str) -> str:
    """The first concrete host among the flags, else this machine's primary address.

    ``0.0.0.0`` and ``::`` bind everywhere but cannot be dialled, so peers need
    something else; in Kubernetes the chart passes the pod IP explicitly.
    """
    for host in candidates:
        if host and host not in {"0.0.0.0", "::", "[::]"}:
            return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as err:
        raise UsageError(f"cannot tell which address peers should use ({err}); "
                         "pass --advertise-addr") from err


class Peering:
    """A node component: gossip membership, summaries, peer filters and the mirror.

    Construct it inside the running event loop (it opens the HTTP client session).
    """

    name = "peering"

    def __init__(self, store: Store, config: PeeringConfig, *,
                 metrics_registry: CollectorRegistry) -> None:
        self.config = config
        self.router = BloomRouter(registry=metrics_registry)
        self.directory = PeerDirectory(self.router, registry=metrics_registry)
        self.publisher = SummaryPublisher(store, config.summary_fp_rate,
                                          registry=metrics_registry,
                                          on_publish=self._on_publish)
        # Built here, inside the running loop, because the registry app that
        # takes the mirror is assembled before any component starts.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            # Larger reads mean fewer, bigger chunks through the verifying stream.
            read_bufsize=4 * 1024 * 1024,
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=32, ssl=False),
        )
        self.mirror = PeerMirror(self.router, self._session, options=config.mirror,
                                 metrics=MirrorMetrics(metrics_registry))
        keyring = (Keyring.from_base64_file(config.gossip_key_file)
                   if config.gossip_key_file else None)
        self.mesh = MeshNode(
            config.mesh, name=config.node_name, bind=config.mesh_bind,
            advertise=config.mesh_advertise, meta=self._meta(None), keyring=keyring,
            join=config.join, join_dns=config.join_dns, rng=random.Random(),
        )
        # Suspicions, deaths and probe RTTs on /metrics: how operators see gossip health.
        register_mesh_metrics(metrics_registry, self.mesh)
        self._events_task: asyncio.Task[None] | None = None

    @property
    def routes(self) -> list[BaseRoute]:
        """Routes the registry must serve: peers fetch our summary there."""
        return [summary_route(self.publisher)]

    def _meta(self, summary: Summary | None) -> bytes:
        tags = {TAG_HTTP: self.config.http_base}
        if summary is not None:
            tags[TAG_EPOCH] = str(summary.epoch)
            tags[TAG_KEYS] = str(summary.count)
        return encode_tags(tags)

    def _on_publish(self, summary: Summary) -> None:
        # Gossip carries the epoch; the filter itself is fetched over HTTP.
        self.mesh.update_meta(self._meta(summary))

    async def start(self) -> None:
        # Gossip first: the publisher's first version updates the mesh metadata.
        await asyncio.to_thread(self.mesh.start)
        await self.publisher.start()
        events = self.mesh.subscribe()
        for member in self.mesh.members():
            self._apply(member, alive=True)
        self._events_task = asyncio.create_task(self._follow(events), name="peering-events")

    async def stop(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
        await asyncio.to_thread(self.mesh.stop, leave=True, timeout=5.0)
        await self.directory.close()
        await self.publisher.close()
        self.mirror.close()
        await self._session.close()

    async def _follow(self, events: asyncio.Queue[MembershipEvent]) -> None:
        while True:
            event = await events.get()
            if isinstance(event, MemberJoined | MemberUpdated):
                self._apply(event.node, alive=True)
            elif isinstance(event, MemberLeft):
                self._apply(event.node, alive=False)

    def _apply(self, member: NodeInfo, *, alive: bool) -> None:
        if member.name == self.config.node_name:
            return
        if not alive:
            self.directory.remove_peer(member.name)
            return
        try:
            tags = decode_tags(member.meta)
        except WireError:
            log.info("peer %s has unreadable metadata; ignoring it", member.name)
            return
        http_base = tags.get(TAG_HTTP)
        if not http_base:
            return  # a plain Serf agent or another memberlist user: no registry to ask
        epoch_text = tags.get(TAG_EPOCH)
        epoch = int(epoch_text) if epoch_text and epoch_text.isdigit() else None
        try:
            self.directory.update_peer(member.name, http_base, epoch)
        except ValueError as err:
            log.info("peer %s advertises an unusable registry address: %s", member.name, err)


def mesh_addresses(mesh_addr: str, advertise_addr: str | None, registry_host: str,
                   registry_port: int) -> tuple[tuple[str, int], tuple[str, int] | None, str]:
    """Bind and advertise addresses for gossip, and the registry URL peers should use."""
    bind = parse_host_port(mesh_addr, default_port=7946)
    advertise: tuple[str, int] | None = None
    if advertise_addr:
        advertise = parse_host_port(advertise_addr, default_host="", default_port=bind[1])
    host = advertise[0] if advertise is not None else ""
    public = advertised_host(host, bind[0], registry_host)
    if advertise is None and bind[0] in {"0.0.0.0", "::"}:
        advertise = (public, bind[1])
    url_host = f"[{public}]" if ":" in public else public
    return bind, advertise, f"http://{url_host}:{registry_port}"
