"""The config and the command line load no I/O library: every CLI command, and every
`--help`, pays for what it imports, and `runconfig` promises config dataclasses only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("aiohttp", "grpc", "grpclib", "numpy")

_PROBE = """
import runpy, sys
sys.argv = ["meshmirror", *sys.argv[1:]]
try:
    runpy.run_module("meshmirror", run_name="__main__")
except SystemExit:
    pass
print("LOADED:", *sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["configure", "--help"], ["run", "--help"], ["--help"]])
def test_help_loads_no_io_library(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), *argv], cwd=ROOT,
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    loaded = done.stderr.strip().splitlines()[-1]
    assert loaded == "LOADED:", f"meshmirror {' '.join(argv)} imported {loaded}"


def test_config_modules_load_no_io_library() -> None:
    modules = ["meshmirror.runconfig", "meshmirror.upstream.options",
               "meshmirror.mirror.options", "meshmirror.registry.serveroptions",
               "meshmirror.mesh.config", "meshmirror.containerd.config"]
    probe = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
             f"print(*sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"config modules imported {done.stdout.strip()}"


def test_the_upstream_client_is_still_reachable_from_its_package() -> None:
    from meshmirror.upstream import UpstreamClient
    from meshmirror.upstream.client import UpstreamClient as direct

    assert UpstreamClient is direct
