"""`meshmirror migrate-values`: Spegel's own default values file converts, and installs.

The converted values go through the real `helm template` and kubernetes-validate's
strict schemas, as tests/helm checks the chart's own value sets.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshmirror.migrate import RULES, migrate
from tests.helm import chart

DATA = Path(__file__).resolve().parent / "data"
SPEGEL_DEFAULTS = DATA / "spegel-values.yaml"
VALUES = chart.CHART / "values.yaml"


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshmirror", "migrate-values", *args],
                          capture_output=True, text=True, timeout=60, input=stdin,
                          cwd=chart.REPO, check=False)


def _render(values: Path) -> list[dict[str, Any]]:
    result = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                             "--namespace", chart.NAMESPACE, "-f", str(values)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_spegel_defaults_convert_and_install(helm: Path, tmp_path: Path) -> None:
    # Spegel's values as they are rejected outright by the schema...
    rejected = chart.run_helm(["template", chart.RELEASE, str(chart.CHART),
                               "-f", str(SPEGEL_DEFAULTS)])
    assert rejected.returncode != 0 and "additional properties" in rejected.stderr
    # ...and converted: every Spegel key is accounted for on stderr.
    done = _run(str(SPEGEL_DEFAULTS))
    assert done.returncode == 0, done.stderr
    notes = done.stderr
    for key in ("spegel.logLevel -> meshmirror.logLevel",
                "service.router.port: dropped", "spegel.persistence: dropped",
                "spegel.mirrorResolveTimeout: Spegel's default"):
        assert key in notes, notes
    assert "not a Spegel value" not in notes
    converted = tmp_path / "values.yaml"
    converted.write_text(done.stdout)
    manifests = _render(converted)
    for doc in manifests:
        kubernetes_validate.validate(doc, "1.35.0", strict=True)
    # Spegel's short resolve timeout and its NodePort are not carried over.
    args = chart.container(manifests, "meshmirror")
    env = chart.literal_env(args)
    assert env["MESHMIRROR_MIRROR_RESOLVE_TIMEOUT"] == "0.1"
    service = [m for m in chart.of_kind(manifests, "Service")
               if m["spec"].get("type") == "NodePort"]
    assert all(p.get("nodePort") != 30020 for s in service for p in s["spec"]["ports"])


def test_a_users_settings_are_carried(helm: Path, tmp_path: Path) -> None:
    spegel = yaml.safe_load(SPEGEL_DEFAULTS.read_text())
    spegel["spegel"].update(logLevel="WARN", mirrorResolveTimeout="50ms",
                            mirroredRegistries=["https://docker.io", "https://ghcr.io"],
                            registryFilters=[".*:latest$"])
    spegel["resources"] = {"requests": {"memory": "256Mi"}, "limits": {"memory": "256Mi"}}
    values, notes = migrate(spegel)
    assert values["meshmirror"]["logLevel"] == "WARN"
    assert values["meshmirror"]["mirrorResolveTimeout"] == "50ms"
    assert values["meshmirror"]["registryFilters"] == [".*:latest$"]
    assert values["resources"]["limits"]["memory"] == "256Mi"
    assert "spegel.mirrorResolveTimeout -> meshmirror.mirrorResolveTimeout" in "\n".join(
        n.split(" (")[0] for n in notes)
    out = tmp_path / "values.yaml"
    out.write_text(yaml.safe_dump(values))
    main = chart.container(_render(out), "meshmirror")
    assert main["resources"]["limits"]["memory"] == "256Mi"


def test_every_target_is_a_meshmirror_value() -> None:
    values = yaml.safe_load(VALUES.read_text())
    for source, rule in RULES.items():
        if rule.target is None:
            assert rule.why, f"{source} is dropped without saying why"
            continue
        node: Any = values
        for part in rule.target.split("."):
            assert isinstance(node, dict) and part in node, f"{source} -> {rule.target}"
            node = node[part]


def test_an_unknown_key_is_named() -> None:
    values, notes = migrate({"spegel": {"logLevel": "INFO", "frobnicate": 1}, "extra": 2})
    assert values == {"meshmirror": {"logLevel": "INFO"}}
    assert "spegel.frobnicate: not a Spegel value meshmirror knows; not carried" in notes
    assert "extra: not a Spegel value meshmirror knows; not carried" in notes


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    (("/nonexistent/values.yaml",), None, "No such file or directory"),
    (("-",), "[1", "while parsing a flow sequence"),
    (("-",), "- a\n- b\n", "the top level is not a mapping"),
])
def test_bad_input_is_one_line(argv: tuple[str, ...], stdin: str | None, message: str) -> None:
    done = _run(*argv, stdin=stdin)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
