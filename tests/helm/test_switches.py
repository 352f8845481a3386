"""The switches a Spegel user looks for: containerdMirrorAdd, a NetworkPolicy, commonLabels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshmirror import cli
from tests.helm import chart

OFF = ["meshmirror.containerdMirrorAdd=false"]


def test_containerd_mirror_add_false_writes_no_hosts_toml(
        helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = chart.render(sets=OFF)
    spec = chart.pod_spec(manifests)
    assert "initContainers" not in spec  # no `configure`
    main = chart.container(manifests, "meshmirror")
    env = chart.literal_env(main)
    assert "MESHMIRROR_WRITE_HOSTS_CONFIG" not in env
    assert env["MESHMIRROR_CONTAINERD_MIRROR_ADD"] == "false"
    certs = next(m for m in main["volumeMounts"] if m["name"] == "containerd-certs")
    assert certs["readOnly"] is True  # still read: doctor and the hosts.toml gauge
    assert not chart.hooks(manifests)  # nothing to restore on uninstall
    # `meshmirror doctor` in the container reads the same variable.
    monkeypatch.setenv("MESHMIRROR_CONTAINERD_MIRROR_ADD", env["MESHMIRROR_CONTAINERD_MIRROR_ADD"])
    assert cli.parse_args(["doctor"]).containerd_mirror_add is False


def test_containerd_mirror_add_defaults_to_writing(helm: Path) -> None:
    manifests = chart.render()
    assert [c["name"] for c in chart.pod_spec(manifests)["initContainers"]] == ["configure"]
    env = chart.literal_env(chart.container(manifests, "meshmirror"))
    assert env["MESHMIRROR_WRITE_HOSTS_CONFIG"] == "true"
    assert "MESHMIRROR_CONTAINERD_MIRROR_ADD" not in env
    assert chart.hooks(manifests)


def _rules(policy: dict[str, Any]) -> dict[tuple[tuple[int, str], ...], list[dict[str, Any]]]:
    return {tuple((p["port"], p["protocol"]) for p in rule["ports"]): rule["from"]
            for rule in policy["spec"]["ingress"]}


def test_network_policy_is_optional_and_admits_only_what_is_needed(helm: Path) -> None:
    assert not chart.of_kind(chart.render(), "NetworkPolicy")
    manifests = chart.render(sets=["networkPolicy.enabled=true", "service.registry.port=5001",
                                   "networkPolicy.nodeCIDRs={10.0.0.0/16,fd00::/64}"])
    policy = chart.one(manifests, "NetworkPolicy")
    selector = chart.one(chart.installed(manifests), "DaemonSet")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    peers = {"podSelector": {"matchLabels": selector}}
    rules = _rules(policy)
    assert rules[((5001, "TCP"),)] == [peers, {"ipBlock": {"cidr": "10.0.0.0/16"}},
                                       {"ipBlock": {"cidr": "fd00::/64"}}]
    assert rules[((7946, "TCP"), (7946, "UDP"))] == [peers]
    assert rules[((9090, "TCP"),)] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def test_network_policy_without_metrics_sources_closes_the_metrics_port(helm: Path) -> None:
    policy = chart.one(chart.render(sets=["networkPolicy.enabled=true",
                                          "networkPolicy.metricsFrom=null"]), "NetworkPolicy")
    assert ((9090, "TCP"),) not in _rules(policy)  # an empty `from` would admit everyone
    assert all(rule["from"] for rule in policy["spec"]["ingress"])


def test_common_labels_on_every_object_and_pod_but_not_selectors(helm: Path) -> None:
    manifests = chart.render(["switches.yaml"], sets=["serviceMonitor.enabled=true",
                                                      "podLabels.team=mine"])
    assert len(manifests) >= 6
    for doc in manifests:
        labels = doc["metadata"]["labels"]
        assert labels["example.com/cost-center"] == "42", doc["kind"]
    daemonset = chart.one(chart.installed(manifests), "DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["team"] == "mine"  # podLabels win over commonLabels
    assert pod_labels["example.com/cost-center"] == "42"
    assert "team" not in daemonset["spec"]["selector"]["matchLabels"]
