"""The chart lints, and what it renders is valid Kubernetes and clean YAML.

Validation runs offline against kubernetes-validate's bundled schemas, in strict
mode so a misspelt field is an error rather than silently dropped by the API
server. Each version is rendered with --kube-version, as helm would for a cluster
of that version. 1.27 is the oldest version Chart.yaml admits; 1.35 is the version of the
Kubernetes client inside the helm binary the project installs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from yamllint import config as yamllint_config
from yamllint import linter

from tests.helm import chart

VALUE_SETS = [
    (),
    ("custom-registries.yaml",),
    ("encryption-existing-secret.yaml",),
    ("encryption-off.yaml",),
    ("servicemonitor.yaml",),
    ("k3s-minimal.yaml",),
    ("spool-off.yaml",),
    ("spegel-style.yaml",),
    ("two-nodes.yaml",),
    ("switches.yaml",),
    ("custom-registries.yaml", "encryption-existing-secret.yaml", "servicemonitor.yaml"),
]
IDS = ["+".join(v) or "defaults" for v in VALUE_SETS]
KUBERNETES_VERSIONS = ["1.27.0", "1.35.0"]
YAMLLINT_CONFIG = Path(__file__).resolve().parent / "yamllint.yaml"


def _yamllint(text: str, name: str) -> list[str]:
    conf = yamllint_config.YamlLintConfig(file=str(YAMLLINT_CONFIG))
    return [f"{name}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
            for p in linter.run(text, conf)]


def test_helm_lint_strict_with_defaults(helm: Path) -> None:
    result = chart.run_helm(["lint", "--strict", str(chart.CHART)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("value_files", VALUE_SETS[1:], ids=IDS[1:])
def test_helm_lint_strict_with_value_sets(helm: Path, value_files: tuple[str, ...]) -> None:
    result = chart.run_helm(["lint", "--strict", str(chart.CHART),
                             *chart.value_args(value_files)])
    assert result.returncode == 0, result.stdout + result.stderr


def _check_service_monitor(doc: dict[str, Any]) -> None:
    """No schema for the prometheus-operator CRD is bundled, so check its shape by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout",
                                 "relabelings", "metricRelabelings"}, endpoint


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_files", VALUE_SETS, ids=IDS)
def test_rendered_manifests_pass_kubernetes_validate(
    helm: Path, value_files: tuple[str, ...], version: str
) -> None:
    manifests = chart.render(value_files, kube_version=version)
    assert manifests
    for doc in manifests:
        if doc["kind"] == "ServiceMonitor":
            _check_service_monitor(doc)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for "
                        f"Kubernetes {version}: {err.message}")


@pytest.mark.parametrize("value_files", VALUE_SETS, ids=IDS)
def test_rendered_manifests_pass_yamllint(helm: Path, value_files: tuple[str, ...]) -> None:
    problems = _yamllint(chart.template_text(value_files), "+".join(value_files) or "defaults")
    assert not problems, "\n".join(problems)


def test_chart_sources_pass_yamllint() -> None:
    files = [chart.CHART / "Chart.yaml", chart.CHART / "values.yaml",
             *sorted(chart.VALUE_SETS.glob("*.yaml"))]
    problems = [p for f in files for p in _yamllint(f.read_text(), f.name)]
    assert not problems, "\n".join(problems)


def test_yamllint_config_catches_a_broken_manifest() -> None:
    """The lint above can fail: a duplicated key and bad indentation are reported."""
    problems = _yamllint("---\nkind: Service\nkind: Pod\nspec:\n   ports: []\n", "broken")
    assert any("key-duplicates" in p for p in problems)
    assert any("indentation" in p for p in problems)


def test_kubernetes_validate_catches_a_string_port() -> None:
    """The validation above can fail: the same Service with a string port is refused."""
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "registry"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_object_lands_in_the_release_namespace(helm: Path) -> None:
    for doc in chart.render(("servicemonitor.yaml",)):
        assert doc["metadata"]["namespace"] == chart.NAMESPACE, doc["kind"]


def test_traffic_distribution_only_where_the_api_has_it(helm: Path) -> None:
    def field(version: str) -> object:
        service = chart.one(chart.render(("custom-registries.yaml",), kube_version=version),
                            "Service", f"{chart.RELEASE}-meshmirror-registry")
        return service["spec"].get("trafficDistribution")

    assert field("1.35.0") == "PreferClose"
    assert field("1.30.0") is None
