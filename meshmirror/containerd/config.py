"""How this node reaches its containerd; one config for `run`, the startup checks and `doctor`."""

from __future__ import annotations

from dataclasses import dataclass


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
