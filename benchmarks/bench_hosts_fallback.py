"""What a mirror entry in hosts.toml costs a pull when the mirror cannot help.

Runs real containerd 1.6 (`ctr images pull --hosts-dir`, containerd's own resolver)
against a real docker-registry upstream, with the hosts.toml `meshmirror configure`
writes, in four cases:

* baseline: hosts.toml with only `server` (no mirror entry),
* live: the mirror is a second registry holding the image,
* refused: nothing listens on the mirror address (a node whose meshmirror is down),
* blackholed (``--blackhole``, root): SYNs to the mirror are dropped by an iptables
  rule on a loopback address, removed afterwards; this is what ``dial_timeout``
  is meant to bound, and containerd 1.6 ignores that key.

Writes median seconds and the ratio to the baseline measured in the same run to
its section of RESULTS.md.
Usage: ``python -m benchmarks.bench_hosts_fallback [--rounds N] [--blackhole]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.results import BenchRun, Section, Table, load_since, utc_now
from meshmirror.cli import main as meshmirror
from meshmirror.oci.imagebuilder import build_image
from tests.support.containerd import Containerd
from tests.support.distribution import DistributionRegistry
from tests.support.ports import free_port, loopback_host

REPO, TAG = "bench/app", "1"
BASELINE = "baseline (server only)"


def _push(layout: Path, registry: DistributionRegistry) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:{TAG}", f"docker://{registry.address}/{REPO}:{TAG}"],
                   check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def _pull_seconds(containerd: Containerd, hosts_dir: Path, reference: str) -> float:
    containerd.ctr("images", "rm", "--sync", reference, check=False)
    containerd.ctr("content", "prune", "references", check=False)
    start = time.perf_counter()
    containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), reference, timeout=600)
    return time.perf_counter() - start


def _configure(hosts_dir: Path, upstream: DistributionRegistry, target: str | None) -> None:
    subprocess.run(["rm", "-rf", str(hosts_dir)], check=True)
    if target is None:
        (hosts_dir / upstream.address).mkdir(parents=True)
        (hosts_dir / upstream.address / "hosts.toml").write_text(f'server = "{upstream.url}"\n')
        return
    code = meshmirror(["configure", "--containerd-registry-config-path", str(hosts_dir),
                       "--mirrored-registries", upstream.url, "--mirror-targets", target])
    assert code == 0


def run(rounds: int, blackhole: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, DistributionRegistry() as upstream, \
            DistributionRegistry() as mirror, Containerd() as containerd:
        work = Path(tmp)
        build_image(f"{upstream.address}/{REPO}:{TAG}", work / "layout",
                    (8 * 1024 * 1024, 1024 * 1024, 4096), seed=3)
        _push(work / "layout", upstream)
        _push(work / "layout", mirror)
        reference = f"{upstream.address}/{REPO}:{TAG}"
        hosts_dir = work / "certs.d"
        dead_host = loopback_host()
        dead = f"http://{dead_host}:{free_port(dead_host)}"
        cases: list[tuple[str, str | None, int]] = [
            (BASELINE, None, rounds),
            ("live mirror", mirror.url, rounds),
            ("refused mirror", dead, rounds),
        ]
        if blackhole:
            cases.append(("blackholed mirror", dead, 1))
        for name, target, n in cases:
            _configure(hosts_dir, upstream, target)
            rule = ["INPUT", "-d", dead_host, "-p", "tcp", "-j", "DROP"]
            if name.startswith("blackholed"):
                subprocess.run(["iptables", "-A", *rule], check=True)
            try:
                times = [_pull_seconds(containerd, hosts_dir, reference) for _ in range(n)]
            finally:
                if name.startswith("blackholed"):
                    subprocess.run(["iptables", "-D", *rule], check=True)
            results[name] = statistics.median(times)
    return results


def section(rounds: int, blackhole: bool, results: dict[str, float], load_before: str
            ) -> Section:
    """The benchmark's block in RESULTS.md: median seconds per hosts.toml case."""
    base = results[BASELINE]
    return Section(
        name="bench_hosts_fallback", title="hosts.toml fallback cost",
        command=f"python -m benchmarks.bench_hosts_fallback --rounds {rounds}"
                + (" --blackhole" if blackhole else ""),
        date=utc_now(), load=load_since(load_before),
        setup="`ctr images pull --hosts-dir` (containerd 1.6) of a 3-layer image (8 MiB + 1 MiB "
              "+ 4 KiB) from a docker-registry upstream on loopback, with the hosts.toml "
              f"`meshmirror configure` writes; median of {rounds} pulls"
              + (" (blackholed: 1 pull)." if blackhole else "."),
        tables=[Table(("hosts.toml", "seconds", "x baseline"),
                      [(name, f"{seconds:.3f}", f"{seconds / base:.2f}")
                       for name, seconds in results.items()])])


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blackhole", action="store_true",
                        help="also measure a mirror whose SYNs are dropped (root; ~90 s)")
    bench = BenchRun(parser, argv)
    args = bench.args
    result = section(args.rounds, args.blackhole, run(args.rounds, args.blackhole),
                     bench.load_before)
    bench.publish(result)


if __name__ == "__main__":
    cli()
