"""How this node reaches its containerd; one config for `run`, the startup checks and `doctor`.

Kept free of gRPC so the CLI can declare flags from these defaults without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshmirror.containerd.hostsconfig import HostsConfig


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    """How to reach this node's containerd; shared by ``run`` and ``doctor``."""

    sock: str = "/run/containerd/containerd.sock"
    # The namespace whose images are shared; the kubelet's is k8s.io.
    namespace: str = "k8s.io"
    # Read directly when readable, which is faster than streaming through the socket.
    content_path: str | None = "/var/lib/containerd/io.containerd.content.v1.content"
    # Checked for config_path and discard_unpacked_layers before starting.
    config: str = "/etc/containerd/config.toml"


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    """What doctor checks: the hosts.toml configure wrote, containerd, and the registry."""

    hosts: HostsConfig
    # Where this node's ``meshmirror run`` listens (its --registry-addr).
    registry_addr: tuple[str, int]
    containerd: ContainerdConfig
    # False: hosts.toml is the node owner's (Talos, Bottlerocket, user data; the chart's
    # containerdMirrorAdd=false), so its checks are information, not failures.
    containerd_mirror_add: bool = True
