"""The release workflow: linted, calling the scripts the tests run, and those
scripts publishing the image index and the chart to a real registry on loopback.

.github/workflows/release.yml runs scripts/build-image and then scripts/release on
a version tag. Here scripts/release takes the session's image index (the same
scripts/build-image output the workflow's first step writes) and publishes to a
Distribution on 127.0.0.N, or with --dry-run to nothing.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshmirror import __version__
from tests.deploy.conftest import BUILD_TIMEOUT
from tests.helm import chart
from tests.support.distribution import DistributionRegistry

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
PUBLISHED = "ghcr.io/meshmirror"


def release(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "release"), *args], capture_output=True,
                          text=True, timeout=300, check=False, cwd=REPO)


def images_named(chart_ref: str, *extra: str) -> set[str]:
    result = chart.run_helm(["template", "r", chart_ref, *extra])
    assert result.returncode == 0, result.stderr
    images = set()
    for doc in yaml.safe_load_all(result.stdout):
        spec = (doc or {}).get("spec", {})
        for pod in (spec, spec.get("template", {}).get("spec", {})):
            for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                images.add(str(container["image"]))
    return images


def test_workflow_passes_actionlint() -> None:
    lint = REPO / "scripts" / "lint-workflows"
    done = subprocess.run([str(lint)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    # The linter really reads the file: an unknown context property fails it.
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOW.read_text().replace("github.ref_name", "github.no_such_name"))
    done = subprocess.run([str(REPO / "scripts" / "lint-workflows"), str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "no_such_name" in done.stdout, done.stdout + done.stderr


def test_workflow_runs_the_tested_scripts_on_a_version_tag() -> None:
    workflow: Any = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # YAML 1.1 reads `on` as True
    runs = {job: [step.get("run", "") for step in spec["steps"]]
            for job, spec in workflow["jobs"].items()}
    assert ".ci/run" in runs["test"]
    assert workflow["jobs"]["publish"]["needs"] == "test"
    publish = "\n".join(runs["publish"])
    assert "scripts/build-image dist/meshmirror-image.tar" in publish
    assert ("scripts/release --version \"$VERSION\" --image-archive dist/meshmirror-image.tar"
            " dist") in publish


def test_release_refuses_a_version_the_tree_does_not_have(tmp_path: Path) -> None:
    done = release("--dry-run", "--version", "v99.0.0", str(tmp_path / "dist"))
    assert done.returncode == 1
    assert f"releasing 99.0.0, but pyproject.toml version is {__version__}" in done.stderr
    assert not list((tmp_path / "dist").iterdir())


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_dry_run_packages_the_index_and_a_chart_naming_the_published_image(
        archive: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    done = release("--dry-run", "--version", f"v{__version__}", "--image-archive", str(archive),
                   str(dist))
    assert done.returncode == 0, done.stderr
    image = f"{PUBLISHED}/meshmirror:{__version__}"
    assert f"would run: skopeo copy --all --preserve-digests oci-archive:{dist}" \
           f"/meshmirror-image.tar docker://{image}" in done.stdout
    assert f"push {dist}/meshmirror-{__version__}.tgz oci://{PUBLISHED}/charts" in done.stdout
    packaged = dist / f"meshmirror-{__version__}.tgz"
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        ["IMAGE", "SHA256SUMS", "meshmirror-image.tar", packaged.name])
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"],
                           capture_output=True, text=True, cwd=dist, timeout=120, check=False)
    assert check.returncode == 0 and check.stdout.count(": OK") == 2, check.stdout
    # The packaged chart's default image is the one the workflow publishes, and the
    # index it names is the one in the archive.
    assert images_named(str(packaged)) == {image}
    with tarfile.open(dist / "meshmirror-image.tar") as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        (index,) = json.load(member)["manifests"]
    assert (dist / "IMAGE").read_text() == f"{image}@{index['digest']}\n"
    assert f"image: {image}@{index['digest']}" in done.stdout


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_release_publishes_both_platforms_and_the_chart_to_a_registry(
        archive: Path, tmp_path: Path) -> None:
    with DistributionRegistry() as registry:
        target = f"{registry.address}/meshmirror"
        done = release("--registry", target, "--plain-http", "--image-archive", str(archive),
                       str(tmp_path / "dist"))
        assert done.returncode == 0, done.stderr
        image = f"{target}/meshmirror:{__version__}"
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{image}"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        index = json.loads(raw)
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
        assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == \
            ["amd64", "arm64"]
        digest = subprocess.run(["skopeo", "manifest-digest", "/dev/stdin"], input=raw,
                                capture_output=True, text=True, timeout=60, check=True)
        # Pushed as built: the digest the release printed is the registry's.
        assert f"image: {image}@{digest.stdout.strip()}" in done.stdout
        # The chart installs from the registry and names the image pushed beside it.
        assert images_named(f"oci://{target}/charts/meshmirror", "--version", __version__,
                            "--plain-http") == {image}
