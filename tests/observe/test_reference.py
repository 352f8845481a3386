"""docs/metrics.md is what the code registers; the chart's rules and dashboard are valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm import chart

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm/meshmirror/rules/meshmirror.rules.yaml"
DASHBOARD = ROOT / "helm/meshmirror/dashboards/meshmirror.json"


def test_metrics_reference_is_in_sync() -> None:
    done = subprocess.run([sys.executable, "-m", "meshmirror.metrics_reference"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (ROOT / "docs/metrics.md").read_text(), (
        "docs/metrics.md is stale: python -m meshmirror.metrics_reference > docs/metrics.md")


def test_metrics_reference_has_spegel_names_and_labels() -> None:
    text = (ROOT / "docs/metrics.md").read_text()
    for row in ("| `meshmirror_mirror_requests_total` | counter | `cache`, `registry` |",
                "| `meshmirror_resolve_duration_seconds` | histogram | `router` |",
                "| `meshmirror_http_request_duration_seconds` | histogram | "
                "`code`, `handler`, `method` |",
                "| `meshmirror_http_response_size_bytes` | histogram | "
                "`code`, `handler`, `method` |",
                "| `meshmirror_mesh_probe_rtt_seconds` | histogram |"):
        assert row in text


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool missing: scripts/bootstrap installs Debian's prometheus",
                    pytrace=False)
    return found


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = RULES.read_text().count("- alert: ")
    assert f"SUCCESS: {rules} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules() -> None:
    done = subprocess.run([_promtool(), "test", "rules", "rules_test.yaml"],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_and_rules_are_off_by_default() -> None:
    manifests = chart.render()
    assert not chart.of_kind(manifests, "PrometheusRule")
    assert not [m for m in chart.of_kind(manifests, "ConfigMap")
                if m["metadata"]["labels"].get("grafana_dashboard")]


def test_chart_ships_dashboard_and_rules_when_enabled() -> None:
    manifests = chart.render(sets=["grafanaDashboard.enabled=true",
                                   "prometheusRule.enabled=true"])
    config_map = chart.one(manifests, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["meshmirror.json"]) == json.loads(
        DASHBOARD.read_text())
    rule = chart.one(manifests, "PrometheusRule")
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts == [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
                      for r in g["rules"]]
    assert "MeshmirrorGossipKeyMismatch" in alerts


def test_dashboard_has_node_and_registry_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "node", "registry"} <= set(variables)
    for name in ("node", "registry"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["allValue"] == ".*"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Every series a panel reads is narrowed to the chosen nodes; per-registry ones also
    # to the chosen registries.
    for expr in exprs:
        for selector in re.findall(r"meshmirror_[a-z_]+\{[^}]*\}|meshmirror_[a-z_]+", expr):
            assert 'instance=~"$node"' in selector, expr
            if selector.startswith("meshmirror_mirror_requests_total"):
                assert 'registry=~"$registry"' in selector, expr


def test_dashboard_label_is_configurable() -> None:
    manifests = chart.render(sets=["grafanaDashboard.enabled=true",
                                   "grafanaDashboard.label=dashboards",
                                   "grafanaDashboard.labelValue=meshmirror"])
    labels = chart.one(manifests, "ConfigMap")["metadata"]["labels"]
    assert labels["dashboards"] == "meshmirror" and "grafana_dashboard" not in labels
