"""Every membership tunable in one place, defaulting to memberlist's LAN profile.

The defaults are HashiCorp memberlist's ``DefaultLANConfig``, so a meshmirror
node behaves like a Serf or Consul agent on the same network and published
memberlist measurements apply to it. Changing one of these changes failure
detection time, false-positive rate or bandwidth; the docstrings say which.
"""

from __future__ import annotations

from dataclasses import dataclass

META_MAX_SIZE = 512
"""memberlist's MetaMaxSize: node metadata has to fit in one alive message in a UDP packet."""

NAME_MAX_SIZE = 512
"""Longest node name, in UTF-8 bytes. memberlist has no bound (Serf's optional
check allows 128 characters); names reach logs, events and the status page, so
ours has one, and peers' names longer than this are dropped at the wire."""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    probe_interval: float = 1.0
    """Seconds between failure-detection probes; with ``suspicion_mult`` it sets detection time."""

    probe_timeout: float = 0.5
    """Seconds to wait for a direct ack before asking ``indirect_checks`` peers (a LAN RTT)."""

    indirect_checks: int = 3
    """Peers asked to ping a target that missed a direct probe (SWIM's k)."""

    retransmit_mult: int = 4
    """Each broadcast is sent ``retransmit_mult * ceil(log10(N+1))`` times: surer vs costlier."""

    suspicion_mult: int = 4
    """Minimum suspicion timeout is ``suspicion_mult * max(1, log10(N)) * probe_interval``."""

    suspicion_max_timeout_mult: int = 6
    """Lifeguard: an unconfirmed suspicion lasts this multiple of the minimum timeout."""

    push_pull_interval: float = 30.0
    """Seconds between full-state TCP syncs with one random peer, scaled up above 32 nodes."""

    tcp_timeout: float = 10.0
    """Bound on one TCP exchange (push-pull, fallback ping) so a stuck peer cannot stall us."""

    disable_tcp_pings: bool = False
    """Skip the TCP fallback ping that saves nodes whose UDP alone is broken."""

    awareness_max_multiplier: int = 8
    """Lifeguard: a locally unhealthy node stretches its probe interval up to this factor."""

    gossip_nodes: int = 3
    """Peers that each gossip round sends queued broadcasts to (the fanout)."""

    gossip_interval: float = 0.2
    """Seconds between gossip rounds; with ``gossip_nodes`` sets convergence and bandwidth."""

    gossip_to_the_dead_time: float = 30.0
    """Keep gossiping to (and remembering) dead nodes this long, so they learn of it and refute."""

    dead_node_reclaim_time: float = 0.0
    """After this long a dead node's name may come back at another address; 0 = never."""

    udp_buffer_size: int = 1400
    """Largest datagram we build; keeps packets under common MTUs to avoid IP fragmentation."""

    enable_compression: bool = True
    """LZW-compress outgoing packets when that makes them smaller, as memberlist does."""

    label: str = ""
    """memberlist packet label: a cheap guard that keeps two clusters from merging; empty = none."""

    protocol_min: int = 1
    """Lowest memberlist protocol version we understand (Vsn[0])."""

    protocol_max: int = 5
    """Highest memberlist protocol version we understand (Vsn[1]); 5 enables CRC-checked packets."""

    protocol_version: int = 2
    """The memberlist protocol version we speak (Vsn[2]); memberlist and Serf both default to 2."""

    delegate_protocol_min: int = 2
    """Lowest delegate (Serf) protocol understood (Vsn[3]); Serf verifies these on push-pull."""

    delegate_protocol_max: int = 5
    """Highest delegate (Serf) protocol version understood (Vsn[4])."""

    delegate_protocol_version: int = 4
    """Delegate protocol spoken (Vsn[5]); Serf agents speak 4, so push-pull with them verifies."""

    def __post_init__(self) -> None:
        positive = {
            "probe_interval": self.probe_interval,
            "probe_timeout": self.probe_timeout,
            "gossip_interval": self.gossip_interval,
            "push_pull_interval": self.push_pull_interval,
            "tcp_timeout": self.tcp_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"mesh config: {name} must be > 0 seconds, got {value!r}")
        if self.probe_timeout > self.probe_interval:
            raise ValueError(
                f"mesh config: probe_timeout ({self.probe_timeout}s) must not exceed "
                f"probe_interval ({self.probe_interval}s)"
            )
        for name, ivalue in {
            "indirect_checks": self.indirect_checks,
            "gossip_nodes": self.gossip_nodes,
            "dead_node_reclaim_time": self.dead_node_reclaim_time,
            "gossip_to_the_dead_time": self.gossip_to_the_dead_time,
        }.items():
            if ivalue < 0:
                raise ValueError(f"mesh config: {name} must be >= 0, got {ivalue!r}")
        for name, ivalue in {
            "retransmit_mult": self.retransmit_mult,
            "suspicion_mult": self.suspicion_mult,
            "suspicion_max_timeout_mult": self.suspicion_max_timeout_mult,
            "awareness_max_multiplier": self.awareness_max_multiplier,
        }.items():
            if ivalue < 1:
                raise ValueError(f"mesh config: {name} must be >= 1, got {ivalue!r}")
        if self.udp_buffer_size < 576:
            raise ValueError(
                f"mesh config: udp_buffer_size must be >= 576 bytes, got {self.udp_buffer_size}"
            )
        if not self.protocol_min <= self.protocol_version <= self.protocol_max:
            raise ValueError(
                "mesh config: need protocol_min <= protocol_version <= protocol_max, got "
                f"{self.protocol_min} <= {self.protocol_version} <= {self.protocol_max}"
            )
        if len(self.label.encode()) > 255:
            raise ValueError("mesh config: label must be at most 255 bytes")

    @property
    def vsn(self) -> tuple[int, int, int, int, int, int]:
        """The six version bytes every alive message and push-pull entry carries."""
        return (
            self.protocol_min,
            self.protocol_max,
            self.protocol_version,
            self.delegate_protocol_min,
            self.delegate_protocol_max,
            self.delegate_protocol_version,
        )
