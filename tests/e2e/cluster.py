"""Real nodes for end-to-end tests: each a private containerd plus `meshmirror run`.

A node here is what a Kubernetes node would be: containerd with its content
store, a `meshmirror run --store containerd` process reading that store, and a
hosts.toml directory written by `meshmirror configure` that sends containerd's
pulls to the node's own mirror first. Pulls are ``ctr images pull --hosts-dir``
(ctr fetches in its own process, with containerd 1.6's resolver and fetcher).

Everything is a subprocess in its own process group with a log file, stopped
(or killed) with bounded waits, so a failing test leaves no process behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshmirror.oci.imagebuilder import BuiltImage
from tests.support.containerd import NAMESPACE, SYSTEM_VERSION, Containerd
from tests.support.metrics import Metrics, metric, scrape
from tests.support.ports import free_port, loopback_host
from tests.support.processes import spawn, stop, wait_until

# Python on a shared, loaded 2-core machine needs more than Spegel's 20 ms to
# connect and answer headers; the bound still applies, just with headroom.
MIRROR_RESOLVE_TIMEOUT = 0.5
# Every node gets this gossip key unless told otherwise, as the chart does: an
# encrypted mesh is also what lets peers resolve tags during an upstream outage.
GOSSIP_KEY = "bWVzaG1pcnJvci1lMmUxNg=="  # base64 of 16 bytes

@dataclass(frozen=True, slots=True)
class PullResult:
    ok: bool
    seconds: float
    started: float  # time.monotonic() at start
    finished: float
    output: str


class E2ENode:
    """One node: private containerd, its hosts dir, and a meshmirror process over it."""

    def __init__(self, name: str, *, join: str | None = None,
                 resolve_timeout: float = MIRROR_RESOLVE_TIMEOUT,
                 extra_args: Sequence[str] = (), gossip_key: str | None = GOSSIP_KEY,
                 containerd_version: str = SYSTEM_VERSION, cri: bool = False,
                 images_config: str = "", extra_config_paths: Sequence[str] = ()) -> None:
        """``cri``: containerd's CRI plugin reads hosts.toml from this node's hosts dir
        (then ``extra_config_paths``: a config_path list), so ``containerd.cri_pull``
        pulls as the kubelet does."""
        self.name = name
        self.host = loopback_host()
        self.registry_port = free_port(self.host)
        self.metrics_port = free_port(self.host)
        self.mesh_port = free_port(self.host)
        self.join = join
        self.resolve_timeout = resolve_timeout
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"e2e-{name}-", dir="/tmp"))
        self.hosts_dir = self.dir / "hosts"
        self.log = self.dir / "meshmirror.log"
        self.key_file: Path | None = None
        if gossip_key is not None:
            self.key_file = self.dir / "gossip-key"
            self.key_file.write_text(gossip_key)
        self.containerd = Containerd(
            version=containerd_version, cri=cri, images_config=images_config,
            registry_config_path=":".join([str(self.hosts_dir), *extra_config_paths])
            if cri else None)
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses ---------------------------------------------------------------

    @property
    def registry_address(self) -> str:
        return f"{self.host}:{self.registry_port}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.registry_address}"

    @property
    def mesh_address(self) -> str:
        return f"{self.host}:{self.mesh_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- lifecycle ---------------------------------------------------------------

    def start_containerd(self) -> None:
        self.containerd.start()
        # A fresh containerd has no namespaces; run's startup check wants k8s.io.
        self.containerd.ctr("namespaces", "create", NAMESPACE, check=False)

    def start_meshmirror(self, timeout: float = 30.0, join: str | None = None) -> None:
        """Start (or restart, same ports and name) this node's meshmirror; ``join`` overrides."""
        if join is not None:
            self.join = join
        argv = [
            sys.executable, "-m", "meshmirror", "--log-level", "info", "run",
            "--store", "containerd",
            "--containerd-sock", str(self.containerd.socket),
            "--containerd-namespace", NAMESPACE,
            "--containerd-content-path", str(self.containerd.content_path),
            "--containerd-config", str(self.containerd.config),
            "--registry-addr", self.registry_address,
            "--metrics-addr", f"{self.host}:{self.metrics_port}",
            "--mesh-addr", self.mesh_address,
            "--node-name", self.name,
            "--mirror-resolve-timeout", str(self.resolve_timeout),
            # The upstream is asked where containerd would ask it: hosts.toml's server.
            "--containerd-registry-config-path", str(self.hosts_dir),
            *(("--gossip-key-file", str(self.key_file)) if self.key_file else ()),
            *self.extra_args,
        ]
        if self.join:
            argv += ["--join", self.join]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = spawn(argv, self.log, env=env)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"meshmirror {self.name} exited {proc.returncode}: "
                                   f"{self.log_tail()}")
            with urllib.request.urlopen(f"{self.registry_url}/v2/", timeout=1) as r:
                return bool(r.status == 200)

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except RuntimeError:
                raise
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"meshmirror {self.name} not ready in {timeout}s: "
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def start(self) -> E2ENode:
        """Start containerd, then meshmirror; a node that fails to start stops what it
        started (the caller never got it, so nothing else would close it)."""
        self.start_containerd()
        try:
            self.start_meshmirror()
        except BaseException:
            self.close()
            raise
        return self

    def kill_meshmirror(self) -> None:
        """kill -9 the meshmirror process group: no leave message, sockets just vanish."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop_meshmirror(self) -> int | None:
        code = stop(self.proc) if self.proc is not None else None
        self.proc = None
        return code

    @property
    def meshmirror_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        try:
            self.kill_meshmirror()
        finally:
            self.containerd.close()
            keep = os.environ.get("MESHMIRROR_E2E_KEEP")
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_records(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    # -- containerd --------------------------------------------------------------

    def configure(self, registry_url: str, targets: Iterable[str],
                  hosts_dir: Path | None = None) -> None:
        """`meshmirror configure`, exactly as the DaemonSet's init step runs it."""
        argv = [sys.executable, "-m", "meshmirror", "configure",
                "--containerd-registry-config-path", str(hosts_dir or self.hosts_dir),
                "--mirrored-registries", registry_url]
        for target in targets:
            argv += ["--mirror-targets", target]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"meshmirror configure failed: {done.stderr.strip()}")

    def _pull_argv(self, ref: str, hosts_dir: Path | None,
                   user: str | None = None) -> list[str]:
        argv = [self.containerd.ctr_binary, "--address", str(self.containerd.socket),
                "-n", NAMESPACE, "images", "pull", "--plain-http"]
        if user is not None:
            argv += ["--user", user]
        if hosts_dir is not None:
            argv += ["--hosts-dir", str(hosts_dir)]
        return [*argv, ref]

    def pull(self, ref: str, timeout: float = 120.0, hosts_dir: Path | None = None,
             direct: bool = False, user: str | None = None) -> PullResult:
        """``ctr images pull`` through this node's hosts dir (``direct``: none at all);
        ``user`` is ``NAME:PASSWORD``, the pull secret."""
        started = time.monotonic()
        done = subprocess.run(
            self._pull_argv(ref, None if direct else hosts_dir or self.hosts_dir, user),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        finished = time.monotonic()
        return PullResult(done.returncode == 0, finished - started, started, finished,
                          (done.stdout + done.stderr)[-3000:])

    def start_pull(self, ref: str, log: Path, hosts_dir: Path | None = None,
                   user: str | None = None) -> subprocess.Popen[bytes]:
        return spawn(self._pull_argv(ref, hosts_dir or self.hosts_dir, user), log)

    def pull_until(self, ref: str, deadline_s: float, interval: float = 0.1) -> PullResult:
        """Retry a pull until it succeeds or ``deadline_s`` passes (summaries may lag)."""
        first = time.monotonic()
        while True:
            result = self.pull(ref, timeout=max(5.0, deadline_s))
            if result.ok or time.monotonic() - first > deadline_s:
                return PullResult(result.ok, result.finished - first, first, result.finished,
                                  result.output)
            time.sleep(interval)

    def import_archive(self, archive: Path) -> None:
        self.containerd.ctr("images", "import", "--no-unpack", str(archive), timeout=300)

    def remove_image(self, ref: str, digests: Iterable[str] = ()) -> None:
        """Delete the image and wait until garbage collection dropped its blobs."""
        self.containerd.ctr("images", "rm", "--sync", ref, check=False)
        wanted = set(digests)
        # Aborted pulls may leave ingests holding partial data; drop them too.
        for line in self.containerd.ctr("content", "active", check=False).stdout.splitlines()[1:]:
            fields = line.split()
            if fields:
                self.containerd.ctr("content", "rm", fields[0], check=False)
        wait_until(lambda: not (wanted & self.content_digests()), 20,
                   f"containerd on {self.name} to drop {ref}'s blobs")

    def content_digests(self) -> set[str]:
        return set(self.containerd.ctr("content", "ls", "-q").stdout.split())

    def image_digest(self, ref: str) -> str | None:
        for row in self.containerd.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = row.split()
            if fields and fields[0] == ref:
                return next((f for f in fields if f.startswith("sha256:")), None)
        return None

    def verify_image(self, image: BuiltImage) -> None:
        """The image record points at the right manifest and every blob hashes right."""
        assert self.image_digest(image.name) == str(image.digest), self.name
        check = self.containerd.ctr("images", "check").stdout
        row = next(r for r in check.splitlines() if r.startswith(image.name + " "))
        assert "complete" in row and "incomplete" not in row, row
        held = self.content_digests()
        for record in image.blobs():
            assert str(record.digest) in held, (self.name, record.digest)
            assert self.blob_sha256(str(record.digest)) == record.digest.hex, \
                (self.name, record.digest)

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.containerd.content_path / "blobs" / algorithm / hex_

    def corrupt_blob(self, digest: str) -> Callable[[], None]:
        """Flip one byte in the middle of the blob file meshmirror serves from (a peer
        whose bytes fail verification); returns what puts the byte back."""
        path = self.blob_path(digest)
        offset = path.stat().st_size // 2
        with path.open("r+b") as f:
            f.seek(offset)
            original = f.read(1)
            f.seek(offset)
            f.write(bytes([original[0] ^ 0xFF]))

        def restore() -> None:
            with path.open("r+b") as f:
                f.seek(offset)
                f.write(original)

        return restore

    def blob_sha256(self, digest: str) -> str:
        """Hash what containerd stored (the file, read as containerd would serve it)."""
        h = hashlib.sha256()
        with self.blob_path(digest).open("rb") as f:
            while chunk := f.read(4 * 1024 * 1024):
                h.update(chunk)
        return h.hexdigest()

    # -- metrics -----------------------------------------------------------------

    def metrics(self) -> Metrics:
        return scrape(f"{self.host}:{self.metrics_port}")

    def alive_members(self) -> float:
        return metric(self.metrics(), "meshmirror_mesh_members", state="alive")

    def status(self) -> dict[str, Any]:
        """The ``/status`` JSON of the metrics port."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/status",
                                    timeout=5) as r:
            document = json.loads(r.read())
        assert isinstance(document, dict)
        return document

    def requests_logged(self, since: int = 0) -> list[dict[str, object]]:
        """Access-log lines of the registry port, from the ``since``-th log record on."""
        return [r for r in self.log_records()[since:] if r.get("msg") == "request"]


def wait_summary_known(holder: E2ENode, others: Sequence[E2ENode],
                       timeout: float = 30.0) -> None:
    """Every node in ``others`` holds ``holder``'s summary as it is now, store caught up.

    After a pull, the holder's publisher takes a moment to fold the new keys into a
    new epoch, and gossip another to tell the others; a test asserting on where
    bytes came from must wait for both, or it measures the race.
    """

    def caught_up() -> bool:
        status = holder.status()
        summary = status["mesh"]["summary"]
        if summary is None or summary["keys"] < status["store"]["keys"]:
            return False
        for other in others:
            member = next((m for m in other.status()["mesh"]["members"]
                           if m["name"] == holder.name), None)
            if member is None or member["held_epoch"] != summary["epoch"]:
                return False
        return True

    wait_until(caught_up, timeout, f"{holder.name}'s summary to reach its peers", 0.1)


def wait_mesh(nodes: Sequence[E2ENode], timeout: float = 30.0) -> None:
    """Every running node sees every running node alive and holds each peer's summary."""
    running = [n for n in nodes if n.meshmirror_running]

    def converged() -> bool:
        for node in running:
            m = node.metrics()
            if metric(m, "meshmirror_mesh_members", state="alive") != len(running):
                return False
            if metric(m, "meshmirror_peer_summaries_share") < 1.0:
                return False
        return True

    wait_until(converged, timeout, f"{len(running)} nodes to see each other alive", 0.1)


FIGURES = Path("/tmp/meshmirror-e2e-figures.jsonl")


def record_figures(test: str, figures: Mapping[str, object]) -> None:
    """Figures for benchmarks/RESULTS.md: printed (``-s`` shows them) and appended to
    FIGURES, one JSON line a call, so a run's report can gather every test's."""
    line = json.dumps({"test": test, **figures}, sort_keys=True, default=str)
    print(line)
    with FIGURES.open("a") as f:
        f.write(line + "\n")


def image_bytes(image: BuiltImage) -> int:
    return sum(record.size for record in image.blobs())
