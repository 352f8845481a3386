"""The container image builds from this checkout and runs on a real containerd.

The archive is built by scripts/build-image (which installs buildah and
mmdebstrap when they are missing) and cached under build/image-cache/, named
by a hash of every input, so a rerun with nothing changed skips the build.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshmirror import __version__
from tests.support.containerd import Containerd

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "image-cache"
IMAGE = f"ghcr.io/meshmirror/meshmirror:{__version__}"
BUILD_TIMEOUT = 1200.0

pytestmark = [pytest.mark.real, pytest.mark.slow]


def input_files() -> list[Path]:
    """Everything that goes into the image or decides how it is built."""
    files = [REPO / name for name in ("Containerfile", ".containerignore", "LICENSE",
                                       "pyproject.toml", "scripts/build-image",
                                       "helm/meshmirror/Chart.yaml")]
    files += [p for p in (REPO / "meshmirror").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def inputs_digest() -> str:
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def archive() -> Path:
    path = CACHE / f"meshmirror-{inputs_digest()}.tar"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        for stale in CACHE.glob("meshmirror-*.tar"):
            stale.unlink()
        result = subprocess.run([str(REPO / "scripts" / "build-image"), str(path)],
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                check=False, cwd=REPO)
        assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr}"
        assert "compressed layers:" in result.stdout, result.stdout
    return path


@pytest.fixture(scope="module")
def containerd(archive: Path) -> Iterator[Containerd]:
    with Containerd() as instance:
        instance.ctr("images", "import", str(archive), timeout=300)
        yield instance


def oci_json(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None, name
    return json.loads(member.read())


def run_in_image(containerd: Containerd, name: str, *argv: str) -> str:
    result = containerd.ctr("run", "--rm", "--net-host", IMAGE, name, *argv, timeout=120)
    return result.stdout


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_meshmirror_version_runs_in_the_image(containerd: Containerd) -> None:
    # The entrypoint is the console script: no argument but the flag.
    assert run_in_image(containerd, "version-entrypoint", "/opt/meshmirror/bin/meshmirror",
                        "--version").strip() == f"meshmirror {__version__}"
    # The chart calls it by name, through PATH.
    assert run_in_image(containerd, "version-path", "meshmirror",
                        "--version").strip() == f"meshmirror {__version__}"


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_image_holds_no_installer_and_no_wheels(containerd: Containerd) -> None:
    script = ("import importlib.util, pathlib, sys; "
              "print(sorted(m for m in ('pip', 'setuptools', 'wheel', 'ensurepip') "
              "if importlib.util.find_spec(m))); "
              "print(sorted(str(p) for p in pathlib.Path('/').glob('**/*.whl') "
              "if not str(p).startswith(('/proc', '/sys')))); "
              "print(sys.prefix)")
    lines = run_in_image(containerd, "contents", "/opt/meshmirror/bin/python", "-c",
                         script).splitlines()
    assert lines == ["[]", "[]", "/opt/meshmirror"]


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_archive_entrypoint_labels_and_size(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        index = oci_json(tar, "index.json")
        (entry,) = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == IMAGE
        manifest = oci_json(tar, "blobs/sha256/" + entry["digest"].removeprefix("sha256:"))
        config = oci_json(tar, "blobs/sha256/"
                          + manifest["config"]["digest"].removeprefix("sha256:"))
    assert config["config"]["Entrypoint"] == ["/opt/meshmirror/bin/meshmirror"]
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == "meshmirror"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]
    compressed = sum(layer["size"] for layer in manifest["layers"])
    assert all(layer["mediaType"].endswith("tar+gzip") for layer in manifest["layers"])
    # 77.5 MB when measured; a regression past 100 MB means something big crept in.
    assert compressed < 100_000_000, f"{compressed:,} compressed bytes"
