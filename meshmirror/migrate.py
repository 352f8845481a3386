"""``meshmirror migrate-values``: a Spegel chart values file, as meshmirror chart values.

Why a command rather than friendlier chart errors: Helm checks values.schema.json
before any template runs, so a template could only explain Spegel's keys if the
schema let them through, and then a typo in a meshmirror key would no longer fail
the install. The command keeps the schema strict, runs before anything touches a
cluster, writes a file the user reviews and commits (GitOps), and says on stderr
what became of every key: carried to its meshmirror name, left to meshmirror's
default because it was Spegel's default, or dropped and why. The table below is
also what docs/migrating-from-spegel.md lists (tests/docs checks they agree).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

_UNSET: Any = object()


@dataclass(frozen=True)
class Rule:
    target: str | None
    """The meshmirror values path the value moves to; None: it has no equivalent."""
    why: str = ""
    """For a dropped key: why, and what to use instead. For a carried one: any caveat."""
    spegel_default: Any = _UNSET
    """Spegel's default, where meshmirror chose its own: that value is not carried."""

    @property
    def keeps_own_default(self) -> bool:
        """Whether meshmirror's default replaces Spegel's (``spegel_default``)."""
        return self.spegel_default is not _UNSET


_OWN_IMAGE = "names Spegel's image; the chart names meshmirror's (image.repository, image.tag)"
_STATELESS = ("keeps Spegel's libp2p identity on the host; meshmirror keeps no state: "
              "members are named by node")

RULES: dict[str, Rule] = {
    "image.repository": Rule(None, _OWN_IMAGE),
    "image.tag": Rule(None, _OWN_IMAGE),
    "image.digest": Rule(None, _OWN_IMAGE),
    "image.pullPolicy": Rule("image.pullPolicy"),
    "imagePullSecrets": Rule("imagePullSecrets"),
    "nameOverride": Rule("nameOverride"),
    "fullnameOverride": Rule("fullnameOverride"),
    "namespaceOverride": Rule("namespaceOverride"),
    "serviceAccount.annotations": Rule("serviceAccount.annotations"),
    "serviceAccount.name": Rule("serviceAccount.name"),
    "daemonsetAnnotations": Rule("daemonsetAnnotations"),
    "podAnnotations": Rule("podAnnotations"),
    "podSecurityContext": Rule("podSecurityContext", spegel_default={}),
    "revisionHistoryLimit": Rule("revisionHistoryLimit"),
    "securityContext": Rule("securityContext",
                            spegel_default={"readOnlyRootFilesystem": True}),
    "service.registry.nodeIp": Rule("service.registry.mirrorHost",
                                    "the host part of the mirror URLs in hosts.toml",
                                    spegel_default=""),
    "service.registry.port": Rule("service.registry.port"),
    "service.registry.nodePort": Rule(
        "service.registry.nodePort",
        "meshmirror's default (30023) differs so both charts can run side by side",
        spegel_default=30020),
    "service.registry.hostPort": Rule(
        "service.registry.hostPort",
        "meshmirror's default (30022) differs so both charts can run side by side",
        spegel_default=30021),
    "service.registry.usePreferSameNodeTrafficDistribution": Rule(
        None, "set service.registry.trafficDistribution: PreferSameNode",
        spegel_default=False),
    "service.registry.annotations": Rule("service.registry.annotations"),
    "service.router.port": Rule(None, "Spegel's libp2p router; meshmirror's mesh is "
                                "memberlist gossip on service.mesh.port (7946, UDP and TCP)"),
    "service.metrics.port": Rule("service.metrics.port"),
    "service.metrics.annotations": Rule("service.metrics.annotations"),
    "service.bootstrap.annotations": Rule("service.mesh.annotations",
                                          "the headless Service new pods join through"),
    "service.cleanup.port": Rule(None, "the uninstall hook needs no probe port "
                                 "(cleanup.onUninstall, cleanup.timeoutSeconds)"),
    "service.cleanup.annotations": Rule(None, "the uninstall hook has no Service"),
    "resources": Rule("resources", spegel_default={"requests": {"memory": "128Mi"},
                                                   "limits": {"memory": "128Mi"}}),
    "nodeSelector": Rule("nodeSelector"),
    "updateStrategy": Rule("updateStrategy", spegel_default={}),
    "tolerations": Rule("tolerations", "meshmirror's default tolerates every taint",
                        spegel_default=[
                            {"key": "CriticalAddonsOnly", "operator": "Exists"},
                            {"effect": "NoExecute", "operator": "Exists"},
                            {"effect": "NoSchedule", "operator": "Exists"}]),
    "affinity": Rule("affinity"),
    "commonLabels": Rule(None, "no labels on every object; podLabels labels the pods",
                         spegel_default={}),
    "clusterDomain": Rule("clusterDomain", spegel_default="cluster.local."),
    "serviceMonitor.enabled": Rule("serviceMonitor.enabled"),
    "serviceMonitor.interval": Rule("serviceMonitor.interval"),
    "serviceMonitor.scrapeTimeout": Rule("serviceMonitor.scrapeTimeout"),
    "serviceMonitor.labels": Rule("serviceMonitor.labels"),
    "serviceMonitor.relabelings": Rule("serviceMonitor.relabelings"),
    "serviceMonitor.metricRelabelings": Rule("serviceMonitor.metricRelabelings"),
    "grafanaDashboard.enabled": Rule("grafanaDashboard.enabled"),
    "grafanaDashboard.mode": Rule(None, "only the sidecar ConfigMap is offered",
                                  spegel_default="Sidecar"),
    "grafanaDashboard.labels": Rule(None, 'the ConfigMap is labelled grafana_dashboard: "1"',
                                    spegel_default={}),
    "grafanaDashboard.annotations": Rule("grafanaDashboard.annotations"),
    "grafanaDashboard.grafanaOperator": Rule(None, "no GrafanaDashboard object; the "
                                             "dashboard JSON is in the chart's dashboards/"),
    "priorityClassName": Rule("priorityClassName"),
    "basicAuthSecretName": Rule(None, "the registry port has no basic auth; peers are "
                                "admitted by the gossip key (gossip.*)", spegel_default=""),
    "spegel.logLevel": Rule("meshmirror.logLevel"),
    "spegel.persistence": Rule(None, _STATELESS),
    "spegel.mirroredRegistries": Rule("meshmirror.mirroredRegistries"),
    "spegel.additionalMirrorTargets": Rule("meshmirror.additionalMirrorTargets"),
    "spegel.mirrorResolveRetries": Rule("meshmirror.mirrorResolveRetries"),
    "spegel.mirrorResolveTimeout": Rule(
        "meshmirror.mirrorResolveTimeout",
        "meshmirror's is the time to connect to a peer (default 0.1 s)",
        spegel_default="20ms"),
    "spegel.containerdSock": Rule("meshmirror.containerdSock"),
    "spegel.containerdNamespace": Rule("meshmirror.containerdNamespace"),
    "spegel.containerdRegistryConfigPath": Rule("meshmirror.containerdRegistryConfigPath"),
    "spegel.containerdContentPath": Rule("meshmirror.containerdContentPath"),
    "spegel.containerdMirrorAdd": Rule("meshmirror.containerdMirrorAdd"),
    "spegel.resolveTags": Rule("meshmirror.resolveTags"),
    "spegel.registryFilters": Rule("meshmirror.registryFilters"),
    "spegel.prependExisting": Rule("meshmirror.prependExisting"),
    "spegel.otel": Rule(None, "no OpenTelemetry traces; the access log and metrics say "
                        "where each request went"),
    "spegel.debugWebEnabled": Rule(None, "the status page is always served at / on the "
                                   "metrics port"),
    "verticalPodAutoscaler": Rule(None, "no VerticalPodAutoscaler object; set resources"),
    "livenessProbe.enabled": Rule("livenessProbe.enabled", "meshmirror's default is on",
                                  spegel_default=False),
    "extraVolumes": Rule(None, "not offered; extraEnv and extraArgs are", spegel_default=[]),
    "extraInitContainers": Rule(None, "not offered", spegel_default=[]),
}


class MigrateError(ValueError):
    """The input is not a values file (one line for the CLI)."""


def _set(values: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = value


def migrate(spegel: Any) -> tuple[dict[str, Any], list[str]]:
    """meshmirror values and one note per Spegel key, in the input's order."""
    if spegel is None:
        spegel = {}
    if not isinstance(spegel, dict):
        raise MigrateError("not a values file: the top level is not a mapping")
    values: dict[str, Any] = {}
    notes: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            rule = RULES.get(path)
            if rule is None:
                if isinstance(value, dict) and any(r.startswith(path + ".") for r in RULES):
                    walk(value, path + ".")
                else:
                    notes.append(f"{path}: not a Spegel value meshmirror knows; not carried")
                continue
            if rule.target is None:
                if rule.keeps_own_default and value == rule.spegel_default:
                    continue  # Spegel's default of a feature meshmirror lacks: nothing lost
                notes.append(f"{path}: dropped: {rule.why}")
            elif rule.keeps_own_default and value == rule.spegel_default:
                notes.append(f"{path}: Spegel's default, so meshmirror's own default of "
                             f"{rule.target} applies" + (f" ({rule.why})" if rule.why else ""))
            else:
                _set(values, rule.target, value)
                notes.append(f"{path} -> {rule.target}" + (f" ({rule.why})" if rule.why else ""))

    walk(spegel, "")
    return values, notes


def migrate_command(source: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Read Spegel values from ``source`` (a path, or - for stdin); values to out, notes to err."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        values, notes = migrate(yaml.safe_load(text))
    except OSError as e:
        print(f"meshmirror migrate-values: {source}: {e.strerror}", file=err)
        return 2
    except (yaml.YAMLError, MigrateError) as e:
        print(f"meshmirror migrate-values: {source}: {' '.join(str(e).split())}", file=err)
        return 2
    for note in notes:
        print(f"# {note}", file=err)
    out.write("# meshmirror chart values migrated from Spegel's by `meshmirror migrate-values`\n")
    if values:
        out.write(yaml.safe_dump(values, sort_keys=False, default_flow_style=False))
    return 0
