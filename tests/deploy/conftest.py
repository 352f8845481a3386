"""The image index, built once per test session for every test that needs it.

scripts/build-image (which installs buildah, mmdebstrap and qemu-user-static when
they are missing) builds linux/amd64 and linux/arm64, the arm64 half under qemu.
The archive is cached under build/image-cache/, named by a hash of every input,
so a rerun with nothing changed skips the build. A cold build of both platforms
took 629 s on a 2-core machine shared with other test runs (load ~7); most of it is
the arm64 base's maintainer scripts and the arm64 pip install under qemu.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from meshmirror import __version__

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "image-cache"
BUILD_TIMEOUT = 1500.0
# The reference the built image is tagged and loaded as.
IMAGE = f"ghcr.io/meshmirror/meshmirror:{__version__}"


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


@pytest.fixture(scope="session")
def archive() -> Path:
    path = CACHE / f"meshmirror-{inputs_digest()}.tar"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        for stale in CACHE.glob("meshmirror-*.tar"):
            stale.unlink()
        started = time.monotonic()
        result = subprocess.run([str(REPO / "scripts" / "build-image"), str(path)],
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                check=False, cwd=REPO)
        assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr}"
        assert result.stdout.count("compressed layers:") == 2, result.stdout
        # The build's own report, for the log of a run with -s or a failure.
        print(f"scripts/build-image took {time.monotonic() - started:.0f} s:\n{result.stdout}")
    return path
