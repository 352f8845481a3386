"""``python -m meshmirror.metrics_reference``: docs/metrics.md, from the code's own registry.

It assembles what ``meshmirror run`` registers (node, peering with mesh, mirror and
routing, registry, the hosts.toml check) on one registry without starting anything,
and lists every ``meshmirror_`` family's name, type, labels and help. A test compares
the output with the checked-in file, so the reference cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from meshmirror.containerd.checks import TRANSFER_CHECK, CheckResult, ConfigProblemCollector
from meshmirror.node import Node
from meshmirror.runconfig import NodeConfig, PeeringConfig
from meshmirror.status.hostscheck import HostsConfigCollector
from meshmirror.store.memory import MemoryStore

_HEADER = """\
# Metrics reference

Every metric a node serves on `--metrics-addr` at `/metrics`, generated from the code by
`python -m meshmirror.metrics_reference > docs/metrics.md` (a test keeps this file in
sync). Names that mean what a Spegel metric means carry Spegel's name after the
`meshmirror_` prefix and its labels: `mirror_requests_total{registry,cache}`,
`resolve_duration_seconds{router}`, `advertised_image_tags{registry}`,
`advertised_content_digests{registry}` (Spegel's `advertised_keys`),
`mirror_last_success_timestamp_seconds`, and `http_request_duration_seconds`,
`http_response_size_bytes` (`handler,method,code`), `http_requests_inflight`.

Labelled series with a known set of values (`cache`, `kind`, `result`, `reason`,
`mode`, `source`, `state`, summary fetch `result`) exist at 0 from start, so a
failure panel shows 0 rather than no data.

No label value comes from what a client sends: `method` is `GET`, `HEAD` or `other`;
the mirror's `registry` is one of `--mirrored-registries` or `other` (with every
registry mirrored, the first 16 seen get their own); `reason` of
`mirror_misses_total` is one of the reasons in docs/misses.md.

`meshmirror_hosts_config_points_here{registry}` is exported when the node knows
containerd's registry config directory: set `MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH`
(the chart mounts `certs.d` and sets it). A node that cannot read the directory can have
the same gauge fed from outside, e.g. a node-exporter textfile written by
`meshmirror doctor`-style checks: `meshmirror_hosts_config_points_here{registry="docker.io"} 1`.

`meshmirror_containerd_config_problem{check}` is exported with `--store containerd`: one
series per startup check that warns rather than stops the node (`transfer_service`,
`config_v3_keys`; docs/compatibility.md), 1 while the problem stands.

| Name | Type | Labels | Help |
|---|---|---|---|
"""


async def _registry() -> CollectorRegistry:
    config = NodeConfig(
        store="oci:/nonexistent", registry_addr=("127.0.0.1", 5000),
        metrics_addr=("127.0.0.1", 9090),
        peering=PeeringConfig(node_name="reference", mesh_addr=("127.0.0.1", 7946),
                              http_base="http://127.0.0.1:5000"))
    node = Node(config, store=MemoryStore())
    registry = node.metrics_registry
    registry.register(HostsConfigCollector(Path("/nonexistent"), "http://127.0.0.1:5000"))
    # Registered by `run --store containerd` with its startup checks' results.
    registry.register(ConfigProblemCollector([CheckResult(TRANSFER_CHECK, True)]))
    if node.peering is not None:
        await node.peering.stop()
    return registry


def _sample_name(family_name: str, family_type: str) -> str:
    return family_name + "_total" if family_type == "counter" else family_name


def _declared_labels(registry: CollectorRegistry) -> dict[str, tuple[str, ...]]:
    """Label names per family as declared, for families with no series yet.

    prometheus_client keeps them only on its private attributes; a family with a
    sample shows its labels there too, so this is only a complement.
    """
    declared: dict[str, tuple[str, ...]] = {}
    for collector in list(getattr(registry, "_collector_to_names", {})):
        names = tuple(getattr(collector, "_labelnames", ()))
        name = getattr(collector, "_name", None)
        if names and isinstance(name, str):
            declared[name] = names
    return declared


def render(registry: CollectorRegistry) -> str:
    """The Markdown reference of ``registry``'s ``meshmirror_`` families."""
    rows = []
    declared = _declared_labels(registry)
    for family in registry.collect():
        if not family.name.startswith("meshmirror_"):
            continue
        labels = set(getattr(family, "_labelnames", ())) | set(declared.get(family.name, ()))
        for sample in family.samples:
            labels.update(sample.labels)
        labels -= {"le", "quantile"}
        label_text = ", ".join(f"`{name}`" for name in sorted(labels)) or "-"
        documentation = family.documentation.replace("|", "\\|")
        rows.append(f"| `{_sample_name(family.name, family.type)}` | {family.type} | "
                    f"{label_text} | {documentation} |")
    return _HEADER + "\n".join(sorted(rows)) + "\n"


def main() -> int:
    sys.stdout.write(render(asyncio.run(_registry())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
