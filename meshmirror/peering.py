"""Peering: the parts that make a node share content with its peers.

One component ties together what each module does on its own:

    store --keys--> SummaryPublisher --epoch/keys tags--> MeshNode (gossip)
                         |                                    |
                  /_mesh/v1/summary                 membership events
                         ^                                    v
        peers fetch it --+            PeerDirectory --filters--> BloomRouter
                                                                  |
                         registry miss --> PeerMirror <--candidates
                                               |
                        UpstreamClient <-- tags' digests, repositories' visibility

A node advertises itself in its memberlist metadata as Serf tags: ``http``
(its registry's base URL), ``epoch`` and ``keys`` (its current summary) and,
when it knows it, ``zone`` (its topology zone, which peers' routers prefer). A
peer whose epoch moves is fetched again; a peer that dies or leaves is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute

from meshmirror.flags import decimal
from meshmirror.mesh.events import MemberJoined, MemberLeft, MemberUpdated, NodeInfo
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.metrics import register_mesh_metrics
from meshmirror.mesh.tags import decode_tags, encode_tags
from meshmirror.mesh.transport import MembershipEvent, MeshNode
from meshmirror.mesh.wire import WireError
from meshmirror.mirror.marker import MemberAddresses, PeerAuth, signing_middleware
from meshmirror.mirror.metrics import MirrorMetrics
from meshmirror.mirror.peer_mirror import PeerMirror
from meshmirror.mirror.rollout import Rollout, RolloutMetrics
from meshmirror.routing.directory import PeerDirectory
from meshmirror.routing.publisher import SummaryPublisher
from meshmirror.routing.router import BloomRouter
from meshmirror.routing.summary import Summary, summary_route
from meshmirror.routing.vouches import Vouches
from meshmirror.runconfig import PeeringConfig
from meshmirror.store.base import Store
from meshmirror.upstream.blobs import UpstreamContent

log = logging.getLogger(__name__)

TAG_HTTP = "http"
TAG_EPOCH = "epoch"
TAG_KEYS = "keys"
TAG_ZONE = "zone"


class Peering:
    """A node component: gossip membership, summaries, peer filters and the mirror.

    Construct it inside the running event loop (it opens the HTTP client session).
    """

    name = "peering"

    def __init__(self, store: Store, config: PeeringConfig, *,
                 metrics_registry: CollectorRegistry) -> None:
        self.config = config
        self.router = BloomRouter(registry=metrics_registry, zone=config.zone)
        self.directory = PeerDirectory(self.router, registry=metrics_registry, zone=config.zone,
                                       own_name=config.node_name)
        self.publisher = SummaryPublisher(store, config.summary_fp_rate,
                                          registry=metrics_registry,
                                          on_publish=self._on_publish,
                                          vouches=self._vouches)
        keyring = (Keyring.from_base64_file(config.gossip_key_file)
                   if config.gossip_key_file else None)
        # Peers believe our marked requests only from our advertised address, signed
        # with a key derived from the gossip key (`mirror.marker`); we theirs likewise.
        self.members = MemberAddresses()
        self.auth = PeerAuth(config.node_name, self.members,
                             (lambda: keyring.keys) if keyring is not None else tuple,
                             registry=metrics_registry)
        advertised = urlsplit(config.http_base).hostname
        # Built here, inside the running loop, because the registry app that
        # takes the mirror is assembled before any component starts.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            # Larger reads mean fewer, bigger chunks through the verifying stream.
            read_bufsize=4 * 1024 * 1024,
            connector=aiohttp.TCPConnector(
                limit=256, limit_per_host=32, ssl=False,
                local_addr=(advertised, 0) if advertised and bindable(advertised) else None),
            middlewares=(signing_middleware(self.auth),),
        )
        # Anonymous questions to upstreams: its own session (system trust store, no
        # cookies), apart from the peers' plain-HTTP one.
        self.upstream = config.upstream.client()
        mirror_metrics = MirrorMetrics(metrics_registry)
        mirror_metrics.watch_upstream(self.upstream.health_all,
                                      sorted(config.mirror.mirrored_registries))
        # The designated upstream fetch of cold public blobs (see `mirror.rollout`).
        self.rollout = (Rollout(config.node_name, self.router, self._session,
                                UpstreamContent(self.upstream), config.mirror,
                                RolloutMetrics(metrics_registry), mirror_metrics)
                        if config.mirror.rollout_fanout > 0 else None)
        self.mirror = PeerMirror(self.router, self._session, options=config.mirror,
                                 metrics=mirror_metrics, upstream=self.upstream,
                                 mesh_encrypted=keyring is not None,
                                 vouches=self.directory.vouches, store=store,
                                 rollout=self.rollout, pace=self.upstream.allows)
        # What this node heard the upstream call public rides in its summary.
        self.mirror.access.cache.on_vouches_changed = self.publisher.vouches_changed
        self.mesh = MeshNode(
            config.mesh, name=config.node_name, bind=config.mesh_addr,
            advertise=config.advertise_addr, meta=self._meta(None), keyring=keyring,
            join=config.join, join_dns=config.join_dns, rng=random.Random(),
        )
        # Suspicions, deaths and probe RTTs on /metrics: how operators see gossip health.
        register_mesh_metrics(metrics_registry, self.mesh)
        self._events_task: asyncio.Task[None] | None = None

    @property
    def routes(self) -> list[BaseRoute]:
        """Routes the registry must serve: peers fetch our summary there."""
        return [summary_route(self.publisher)]

    def _vouches(self) -> Vouches:
        return self.mirror.access.cache.vouches()

    def _meta(self, summary: Summary | None) -> bytes:
        tags = {TAG_HTTP: self.config.http_base}
        if self.config.zone:
            tags[TAG_ZONE] = self.config.zone
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
        if self.rollout is not None:
            self.rollout.close()
        await self._session.close()
        await self.upstream.close()

    async def _follow(self, events: asyncio.Queue[MembershipEvent]) -> None:
        while True:
            event = await events.get()
            # One member's metadata must never end this loop: every join and death
            # after it would go unapplied, and the node route to the dead.
            try:
                if isinstance(event, MemberJoined | MemberUpdated):
                    self._apply(event.node, alive=True)
                elif isinstance(event, MemberLeft):
                    self._apply(event.node, alive=False)
            except Exception:
                log.warning("membership event not applied: %r", event, exc_info=True)

    def _apply(self, member: NodeInfo, *, alive: bool) -> None:
        if member.name == self.config.node_name:
            return
        if not alive:
            self.members.remove(member.name)
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
        epoch = decimal(epoch_text)
        self.members.set(member.name, (member.addr, urlsplit(http_base).hostname or ""))
        keys_text = tags.get(TAG_KEYS)
        keys = decimal(keys_text)
        if keys_text is not None and keys is None:
            # Not "not said" (an older peer): a count no honest publisher writes, so
            # its summary's size cannot be budgeted. Never hold it.
            log.info("peer %s advertises an unreadable key count; not routing to it",
                     member.name)
            self.directory.remove_peer(member.name)
            return
        try:
            self.directory.update_peer(member.name, http_base, epoch, tags.get(TAG_ZONE, ""),
                                       keys)
        except ValueError as err:
            log.info("peer %s advertises an unusable registry address: %s", member.name, err)



def bindable(host: str) -> bool:
    """Whether peer requests can leave from ``host``: an IP of this machine. An address
    that is not (advertised through NAT, say) leaves the choice to the kernel."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as probe:
            probe.bind((host, 0))
    except OSError:
        log.info("advertised address %s is not this machine's: peer requests leave from "
                 "the kernel's choice, and peers may not believe their marker", host)
        return False
    return True
