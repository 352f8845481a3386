"""What ``meshmirror run`` is configured with: frozen dataclasses, each default written once.

The command line (``meshmirror.cli``) reads its flag defaults from these fields
and builds the values from flags; components take the values and never see a
flag. Fields are named for the flag that sets them, without the prefix their
dataclass already says (``ContainerdConfig.sock`` is ``--containerd-sock``).
This module imports only other config dataclasses, so ``meshmirror configure``
can declare every command's flags without loading the node.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from meshmirror.addresses import ANY_HOST
from meshmirror.containerd.config import ContainerdConfig
from meshmirror.containerd.hostsconfig import HostsConfig
from meshmirror.mesh.config import MeshConfig
from meshmirror.mirror.options import MirrorOptions, TagResolution
from meshmirror.oci.reference import DOCKER_HUB
from meshmirror.registry.serveroptions import ServerOptions
from meshmirror.upstream.options import UpstreamOptions

# A Kubernetes label value (the zone comes from topology.kubernetes.io/zone); it rides
# in the gossip metadata, whose 512 bytes this keeps it well inside.
ZONE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")

MEMBERLIST_PORT = 7946
"""memberlist's and Serf's gossip port: where we listen, and where a --join without a port
is dialled."""


@dataclass(frozen=True, slots=True)
class PeeringConfig:
    """Gossip, summaries and the mirror; absent when the node serves its own store only."""

    # The registry's URL as peers must use it, e.g. http://10.0.0.7:5000.
    http_base: str
    node_name: str = field(default_factory=socket.gethostname)
    mesh_addr: tuple[str, int] = (ANY_HOST, MEMBERLIST_PORT)
    # None: the bind address, which must then be concrete.
    advertise_addr: tuple[str, int] | None = None
    join: tuple[tuple[str, int], ...] = ()
    join_dns: str | None = None
    gossip_key_file: str | None = None
    summary_fp_rate: float = 0.01
    # The topology zone peers' routers compare with theirs; "" when unknown.
    zone: str = ""
    # Without a zone: the label of this node's Kubernetes Node to read it from at start.
    zone_label: str = ""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mirror: MirrorOptions = field(default_factory=MirrorOptions)
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything ``run`` needs, validated by the command line before anything starts."""

    # "containerd" or "oci:DIR".
    store: str = "containerd"
    registry_addr: tuple[str, int] = (ANY_HOST, 5000)
    metrics_addr: tuple[str, int] = (ANY_HOST, 9090)
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    default_registry: str = DOCKER_HUB
    # The registry port's bounds on clients (``--client-*``); the metrics port's too,
    # with a smaller connection cap.
    server: ServerOptions = field(default_factory=ServerOptions)
    # None serves the local store only (``--mesh-addr off``).
    peering: PeeringConfig | None = None
    # Write ``hosts`` into containerd's configuration at every start, as ``meshmirror
    # configure`` would. A container restarted in the same pod (a failed liveness probe)
    # runs no init container, so only ``run`` itself can put back an entry that was lost.
    write_hosts_config: bool = False
    hosts: HostsConfig = field(default_factory=lambda: HostsConfig(
        resolve_tags=MirrorOptions().resolve_tags is not TagResolution.OFF))
