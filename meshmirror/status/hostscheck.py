"""``meshmirror_hosts_config_points_here{registry}``: does containerd still send pulls here?

A node serves nothing if containerd's ``<config_path>/<registry>/hosts.toml`` lost
its mirror entry (a node image upgrade, another tool rewriting it). The check reads
the files when Prometheus scrapes: a few small reads, no task to schedule. The node
knows the directory when ``MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH`` is set (the
chart mounts it read-only and sets it); without it the metric is not exported and
can be fed from outside (docs/metrics.md).
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshmirror.containerd.doctor import lookup_dirs
from meshmirror.containerd.hostsconfig import BACKUP_DIR, PARTIAL_BACKUP_DIR, RESTORING_DIR
from meshmirror.upstream.endpoints import entry_reaches

CONFIG_PATH_ENV = "MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH"
_NOT_REGISTRIES = frozenset({BACKUP_DIR, PARTIAL_BACKUP_DIR, RESTORING_DIR})


def points_here(hosts_toml: Path, own_url: str) -> bool:
    """Whether a ``[host."URL"]`` entry of ``hosts_toml`` reaches this node's registry."""
    try:
        config = tomllib.loads(hosts_toml.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    hosts = config.get("host")
    if not isinstance(hosts, dict):
        return False
    return any(entry_reaches(url, own_url) for url in hosts)


class HostsConfigCollector(Collector):
    """One gauge per ``<config_path>/<registry>/hosts.toml``: 1 if it points here, else 0."""

    def __init__(self, config_path: Path, own_url: str,
                 mirrored: Collection[str] = ()) -> None:
        """``mirrored``: the registries this node mirrors (--mirrored-registries); a
        directory of any other registry is the node owner's and not reported. Empty:
        every registry, through _default, which any other directory shadows."""
        self.config_path = config_path
        self.own_url = own_url
        self.wanted = {d for r in mirrored for d in lookup_dirs(r)[:-1]}

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        try:
            # configure's backups are no registry: a 0 for them would fire the alert.
            registries = sorted(p for p in self.config_path.iterdir() if p.is_dir() and
                                p.name not in _NOT_REGISTRIES and
                                (not self.wanted or p.name in self.wanted))
        except OSError:
            registries = []
        for directory in registries:
            family.add_metric([directory.name],
                              float(points_here(directory / "hosts.toml", self.own_url)))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "meshmirror_hosts_config_points_here",
            "1 if containerd's hosts.toml for the registry has a mirror entry for this node",
            labels=["registry"])
