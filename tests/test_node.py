"""`meshmirror run`: the Node in-process, and the real command with real clients (skopeo)."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshmirror.cli import build_parser, main, node_config
from meshmirror.node import Node, StartError, build_store
from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.runconfig import NodeConfig
from meshmirror.store.ocilayout import OciLayoutStore
from tests.support.node import NO_UPSTREAM, RunningNode, start_node
from tests.support.ports import free_port, loopback_host
from tests.support.processes import stop


def run_args(*extra: str) -> Namespace:
    return build_parser().parse_args(["run", *extra])


def config_for(layout: Path, host: str) -> NodeConfig:
    return node_config(run_args(
        "--store", f"oci:{layout}",
        "--registry-addr", f"{host}:{free_port(host)}",
        "--metrics-addr", f"{host}:{free_port(host)}",
        "--mesh-addr", f"{host}:{free_port(host)}", *NO_UPSTREAM))


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout"
    path.mkdir()
    return path


@pytest.fixture
def image(layout: Path) -> BuiltImage:
    return build_image("docker.io/library/demo:1", layout, layer_sizes=(300_000, 5_000), seed=7)


# -- flags -------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--store", "s3:bucket"], "want 'containerd' or 'oci:DIR'"),
    (["--store", "oci:"], "want 'containerd' or 'oci:DIR'"),
    (["--registry-addr", "nohostport:"], "invalid address"),
    (["--registry-addr", "h:99999"], "port must be 0-65535"),
    (["--metrics-addr", "::1:80"], "brackets"),
])
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("meshmirror: ")


def test_store_file_not_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "file"
    plain.write_text("x")
    assert main(["run", "--store", f"oci:{plain}"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_build_store_oci(layout: Path) -> None:
    store = build_store(config_for(layout, "127.0.0.1"))
    assert isinstance(store, OciLayoutStore) and store.root == layout
    with pytest.raises(StartError, match="is not a directory"):
        build_store(config_for(layout / "absent", "127.0.0.1"))


# -- the Node in-process -----------------------------------------------------------------

async def test_node_serves_registry_and_metrics(layout: Path, image: BuiltImage) -> None:
    host = loopback_host()
    config = config_for(layout, host)
    async with Node(config) as node, httpx.AsyncClient() as client:
        assert node.registry_server is not None and node.metrics_server is not None
        base = f"http://{node.registry_server.address}"
        r = await client.get(f"{base}/v2/library/demo/manifests/1?ns=docker.io")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == str(image.digest)
        layer = image.platforms[0].layers[0]
        b = await client.get(f"{base}/v2/library/demo/blobs/{layer.digest}")
        assert b.status_code == 200 and hashlib.sha256(b.content).hexdigest() == layer.digest.hex
        assert (await client.get(f"{base}/readyz")).status_code == 200
        m = await client.get(f"http://{node.metrics_server.address}/metrics")
        assert m.status_code == 200
        assert ('meshmirror_http_request_duration_seconds_count'
                '{code="200",handler="blob",method="GET"} 1.0') in m.text
        assert "process_resident_memory_bytes" in m.text
    # Both listeners are closed once the node has stopped.
    for address in (config.registry_addr[1], config.metrics_addr[1]):
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, address))


async def test_node_start_failure_stops_what_started(layout: Path) -> None:
    host = loopback_host()
    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = node_config(run_args(
            "--store", f"oci:{layout}", "--registry-addr", f"{host}:{port}",
            "--metrics-addr", f"{host}:{free_port(host)}",
        "--mesh-addr", f"{host}:{free_port(host)}"))
        node = Node(config)
        with pytest.raises(StartError, match="cannot listen"):
            await node.start()
        # The metrics server had started first; it must be closed again.
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, config.metrics_addr[1]))


# -- the real command ---------------------------------------------------------------------

@pytest.fixture
def running(tmp_path: Path, layout: Path, image: BuiltImage) -> Iterator[RunningNode]:
    node = start_node(f"oci:{layout}", tmp_path / "node.log")
    try:
        yield node
    finally:
        stop(node.proc)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def skopeo_copy(source: str, dest: str, *extra: str) -> None:
    result = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--preserve-digests",
         *extra, source, dest], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr


def copied_files(out: Path, oci: bool) -> dict[str, Path]:
    """hex digest -> file, for what skopeo wrote to an oci: or dir: destination."""
    if oci:
        return {p.name: p for p in (out / "blobs" / "sha256").iterdir()}
    files = {p.name.split(".")[0]: p for p in out.iterdir() if p.name not in {"version"}}
    files[sha256_file(out / "manifest.json")] = out / "manifest.json"
    return files


@pytest.mark.real
@pytest.mark.parametrize(("docker", "platforms"), [
    (False, ("linux/amd64",)),
    (False, ("linux/amd64", "linux/arm64")),
    (True, ("linux/amd64", "linux/arm64")),
])
def test_skopeo_copy_reproduces_every_digest(tmp_path: Path, docker: bool,
                                             platforms: tuple[str, ...]) -> None:
    layout = tmp_path / "served"
    layout.mkdir()
    image = build_image("docker.io/library/demo:1", layout, layer_sizes=(2_000_000, 1_000),
                        seed=3, docker=docker, platforms=platforms)
    node = start_node(f"oci:{layout}", tmp_path / "node.log")
    out = tmp_path / "copied"
    # oci: cannot hold a Docker manifest list unconverted; dir: keeps anything as is.
    dest = f"dir:{out}" if docker else f"oci:{out}:1"
    try:
        skopeo_copy(f"docker://{node.address}/library/demo:1", dest, "--all")
    finally:
        assert stop(node.proc) == 0
    if not docker:
        index = json.loads((out / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [str(image.digest)]
    else:
        assert sha256_file(out / "manifest.json") == image.digest.hex
    files = copied_files(out, oci=not docker)
    for record in image.blobs():
        copied = files[record.digest.hex]
        assert copied.stat().st_size == record.size
        assert sha256_file(copied) == record.digest.hex
    requests = [line for line in node.log_lines() if line.get("msg") == "request"]
    served = {(line["handler"], line["status"]) for line in requests}
    assert ("manifest", 200) in served and ("blob", 200) in served
    for line in requests:
        assert {"handler", "method", "path", "status", "bytes", "latency_ms", "client"} <= set(line)


@pytest.mark.real
def test_sigterm_exits_zero_promptly(running: RunningNode) -> None:
    # A keep-alive connection left open must not hold up the shutdown.
    host, port = running.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as idle:
        idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(1024).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    messages = [line.get("msg") for line in running.log_lines()]
    assert "stopping" in messages and messages[-1] == "stopped"


@pytest.mark.real
def test_sigint_exits_zero(running: RunningNode) -> None:
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(15) == 0


@pytest.mark.real
def test_metrics_endpoint(running: RunningNode, image: BuiltImage) -> None:
    with urllib.request.urlopen(
            f"http://{running.address}/v2/library/demo/manifests/1", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://{running.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert ('meshmirror_http_request_duration_seconds_count'
            '{code="200",handler="manifest",method="GET"}') in text


@pytest.mark.real
def test_busy_port_is_a_one_line_error(tmp_path: Path, layout: Path) -> None:
    host = loopback_host()
    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        result = subprocess.run(
            [sys.executable, "-m", "meshmirror", "run", "--store", f"oci:{layout}",
             "--registry-addr", f"{host}:{busy.getsockname()[1]}",
             "--metrics-addr", f"{host}:{free_port(host)}", "--mesh-addr", "off"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("meshmirror:")]
    assert len(errors) == 1 and "cannot listen" in errors[0], result.stderr


@pytest.mark.real
def test_missing_store_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshmirror", "run", "--store", f"oci:{tmp_path / 'nope'}",
         "--registry-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--mesh-addr", "off"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("meshmirror: --store oci:")
