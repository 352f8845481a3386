"""Every command in the user docs runs, so the pages cannot drift from the code.

Commands are the ``$ `` lines of the docs' ```console blocks (a ``\\`` at a line's
end continues it). They run in bash from the repository root against real local
processes standing in for one Kubernetes node: a containerd 1.6 with CRI whose
certs.d meshmirror configured, a `meshmirror run` node ("b") whose env is what the
chart gives the pod (MESHMIRROR_*), and a peer ("a") holding an image b pulls
through its mirror. What only a cluster has is rewritten to its local equivalent:

- ``kubectl ... exec ... -- CMD`` runs CMD (the pod's env is set, as in the pod);
- ``kubectl ... logs ...`` reads node b's log file;
- ``helm install|upgrade --install NAME CHART ARGS`` runs ``helm template`` with them;
  the published chart (``oci://ghcr.io/meshmirror/charts/meshmirror --version V``) is
  this checkout's chart, which the release packages, and V must be its version;
- ``kubectl port-forward`` and ``crictl pull`` are done by the test itself: the
  docs then use ``$METRICS`` (b's metrics address, where port-forward would put it)
  and the pull is made through b's registry before the commands run.

Any other kubectl or crictl line fails this test: add a rewrite, or keep the
command out of a console block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshmirror.oci.imagebuilder import build_image
from tests.support.containerd import Containerd
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]

REPO = Path(__file__).resolve().parents[2]
PAGES = ["getting-started.md", "faq.md", "migrating-from-spegel.md"]
IMAGE = "127.0.0.1:1/library/docs-demo:1"  # no registry there: peers are the only source


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """Each ``$`` command of the page's console blocks, with the output lines shown
    under it (which a real run must print, each line as shown)."""
    found: list[tuple[str, list[str]]] = []
    in_console = False
    pending = ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_console = line.strip() == "```console"
            continue
        if not in_console:
            continue
        if pending:
            pending += "\n" + line
        elif line.startswith("$ "):
            pending = line[2:]
        else:
            if found and line.strip():
                found[-1][1].append(line)
            continue
        if not pending.endswith("\\"):
            found.append((pending, []))
            pending = ""
    return found


_EXEC = re.compile(r"^kubectl\b[^|]*?\bexec\b.*? -- (.*)$", re.S)
_LOGS = re.compile(r"^kubectl\b[^|]*?\blogs\b[^|]*(\|.*)$", re.S)
_HELM_INSTALL = re.compile(r"^helm (?:install|upgrade --install) (.*)$", re.S)
_DONE_BY_TEST = re.compile(r"^(kubectl\b.*\bport-forward\b|crictl pull\b)")


_PUBLISHED_CHART = re.compile(r"oci://ghcr\.io/meshmirror/charts/meshmirror(\s+\\\n\s*|\s+)"
                              r"--version\s+(\S+)")


def published_chart_is_local(args: str) -> str:
    """The release publishes ./helm/meshmirror as it is: the docs name its version."""
    if not (m := _PUBLISHED_CHART.search(args)):
        return args
    chart = yaml.safe_load((REPO / "helm" / "meshmirror" / "Chart.yaml").read_text())
    assert m.group(2) == chart["version"], (
        f"the docs install chart version {m.group(2)}; the chart is {chart['version']}")
    return args[:m.start()] + "./helm/meshmirror" + args[m.end():]


def local(command: str) -> str | None:
    """The command as it runs here, or None for what the test does itself."""
    if _DONE_BY_TEST.match(command):
        return None
    if m := _EXEC.match(command):
        return m.group(1)
    if m := _LOGS.match(command):
        return 'cat "$NODE_LOG" ' + m.group(1)
    if m := _HELM_INSTALL.match(command):
        return "helm template " + published_chart_is_local(m.group(1))
    if re.match(r"^(kubectl|crictl)\b", command):
        raise AssertionError(f"no local equivalent for a docs command: {command}")
    return command


def test_every_page_has_commands() -> None:
    for name in PAGES:
        assert commands(REPO / "docs" / name), f"docs/{name} has no console commands"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("docs")
    certs = tmp / "certs.d"
    layout_a, layout_b = tmp / "a", tmp / "b"
    image = build_image(IMAGE, tmp / "image", (64 << 10,), seed=22, archive=tmp / "image.tar")
    layout_a.mkdir()
    layout_b.mkdir()
    assert image.archive is not None
    subprocess.run([sys.executable, "-m", "meshmirror", "import", str(image.archive),
                    "--store", f"oci:{layout_a}"], check=True, timeout=60, cwd=REPO)
    with Containerd(cri=True, registry_config_path=str(certs)) as containerd:
        containerd.ctr("namespaces", "create", "k8s.io", namespace="default")
        a = start_node(f"oci:{layout_a}", tmp / "a.log", ("--node-name", "a"))
        b = None
        try:
            b = start_node(f"oci:{layout_b}", tmp / "b.log", ("--node-name", "b",
                                                               "--join", a.mesh))
            # What the chart's init container does on the node, then what the pod's
            # env gives `meshmirror doctor` inside it.
            env = {
                "MESHMIRROR_CONTAINERD_SOCK": str(containerd.socket),
                "MESHMIRROR_CONTAINERD_NAMESPACE": "k8s.io",
                "MESHMIRROR_CONTAINERD_CONFIG": str(containerd.config),
                "MESHMIRROR_CONTAINERD_REGISTRY_CONFIG_PATH": str(certs),
                "MESHMIRROR_MIRRORED_REGISTRIES": "docker.io",
                "MESHMIRROR_REGISTRY_ADDR": b.address,
                "MESHMIRROR_METRICS_ADDR": b.metrics,
            }
            subprocess.run([sys.executable, "-m", "meshmirror", "configure",
                            "--mirror-targets", f"http://{b.address}"],
                           env={**os.environ, **env}, check=True, timeout=60, cwd=REPO)

            def meshed() -> bool:
                with urllib.request.urlopen(f"http://{b.metrics}/status", timeout=2) as r:
                    return bool(json.load(r)["mesh"]["members_by_state"]["alive"] == 2)

            wait_until(meshed, 30, "a and b see each other")
            # The pull `crictl pull` makes on the node, through b's mirror.
            blob = image.platforms[0].layers[0].digest
            url = (f"http://{b.address}/v2/{image.repository}/blobs/{blob}"
                   f"?ns={image.registry}")
            wait_until(lambda: urllib.request.urlopen(url, timeout=5).status == 200, 30,
                       "b serves the blob from a")
            env.update(METRICS=b.metrics, NODE_LOG=str(b.log))
            yield b, env
        finally:
            if b is not None:
                stop(b.proc)
            stop(a.proc)


@pytest.mark.parametrize("page", PAGES)
def test_docs_commands_run(page: str, node: tuple[RunningNode, dict[str, str]],
                           tmp_path: Path) -> None:
    _, env = node
    path = os.pathsep.join([str(REPO / "tools" / "helm"), str(Path(sys.executable).parent),
                            os.environ.get("PATH", "")])
    ran = 0
    for command, shown in commands(REPO / "docs" / page):
        script = local(command)
        if script is None:
            continue
        done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True,
                              text=True, timeout=120, cwd=REPO,
                              env={**os.environ, **env, "PATH": path,
                                   "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
        assert done.returncode == 0, (
            f"docs/{page}: `{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        if dump := os.environ.get("MESHMIRROR_DOCS_OUTPUT"):  # to refresh the pages' examples
            with open(dump, "a") as f:
                f.write(f"## docs/{page}\n$ {command}\n{done.stdout}\n")
        printed = done.stdout.splitlines()
        for line in shown:
            assert line in printed, (
                f"docs/{page}: `{command}` did not print {line!r}:\n{done.stdout}")
        ran += 1
    assert ran, f"docs/{page}: no command ran"
