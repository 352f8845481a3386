"""What an anonymous upstream tag resolution costs, against a plain HEAD in the same run.

Real Distribution with ``auth: token`` (Docker Hub's kind) and the test token
server, on loopback. Cases, interleaved round by round so load on the machine
hits them alike:

* baseline: a plain aiohttp HEAD of the manifest with a token already in hand,
  the least any correct client can do against a token-auth registry;
* baseline-noauth: a plain aiohttp HEAD to a public Distribution (no auth);
* warm: ``UpstreamClient.resolve_tag`` with its token cached (one HEAD);
* cold: a client with an empty token cache (401, token GET, HEAD), same session;
* open breaker: a registry held unreachable, answered without any request.

Prints median and p90 milliseconds and each median's ratio to the baseline,
and writes them into RESULTS.md (``--no-write`` only prints).
Usage: ``python -m benchmarks.bench_upstream_resolve [--rounds N] [--no-write]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from benchmarks.results import BenchRun, Section, Table, Target, load_since, utc_now
from meshmirror.oci import mediatypes
from meshmirror.oci.imagebuilder import build_image
from meshmirror.upstream import TagDigest, Unreachable, UpstreamClient, UpstreamEndpoints
from tests.support.distribution import DistributionRegistry, TokenAuth
from tests.support.scripted_http import refused_url
from tests.support.skopeo import push_layout
from tests.support.token_server import ISSUER, LOOPBACK_ALLOWED, SERVICE, TokenServer

REPO, TAG = "bench/app", "1"
DOWN = "down.test"
BASELINE = "baseline (HEAD, token in hand)"
WARM = "warm (resolve_tag, token cached)"

Case = Callable[[], Awaitable[None]]


async def _token(session: aiohttp.ClientSession, realm: str) -> str:
    params = {"service": SERVICE, "scope": f"repository:{REPO}:pull"}
    async with session.get(realm, params=params) as response:
        return str((await response.json())["token"])


async def _measure(cases: dict[str, Case], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():  # warm connections and caches
        await case()
    for _ in range(rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            await case()
            times[name].append(time.perf_counter() - start)
    return times


async def _run(token_reg: DistributionRegistry, public_reg: DistributionRegistry, realm: str,
               rounds: int) -> dict[str, list[float]]:
    headers = {"Accept": mediatypes.CONTAINERD_ACCEPT}
    endpoints = UpstreamEndpoints(overrides={token_reg.address: token_reg.url,
                                             DOWN: refused_url()})
    async with aiohttp.ClientSession() as session, \
            UpstreamClient(endpoints, session=session, failure_threshold=1,
                           cooldown=3600, guard=LOOPBACK_ALLOWED) as warm:
        bearer = {**headers, "Authorization": f"Bearer {await _token(session, realm)}"}
        url = f"{token_reg.url}/v2/{REPO}/manifests/{TAG}"
        noauth_url = f"{public_reg.url}/v2/{REPO}/manifests/{TAG}"
        await warm.resolve_tag(DOWN, REPO, TAG)  # opens the breaker for DOWN

        async def baseline() -> None:
            async with session.head(url, headers=bearer) as response:
                assert response.status == 200

        async def baseline_noauth() -> None:
            async with session.head(noauth_url, headers=headers) as response:
                assert response.status == 200

        async def resolve_warm() -> None:
            assert isinstance(await warm.resolve_tag(token_reg.address, REPO, TAG), TagDigest)

        async def resolve_cold() -> None:
            client = UpstreamClient(endpoints, session=session, guard=LOOPBACK_ALLOWED)
            assert isinstance(await client.resolve_tag(token_reg.address, REPO, TAG), TagDigest)

        async def breaker_open() -> None:
            assert isinstance(await warm.resolve_tag(DOWN, REPO, TAG), Unreachable)

        return await _measure({BASELINE: baseline,
                               "baseline-noauth (HEAD, public registry)": baseline_noauth,
                               WARM: resolve_warm,
                               "cold (resolve_tag, 401+token+HEAD)": resolve_cold,
                               "open breaker (resolve_tag, no request)": breaker_open}, rounds)


def section(rounds: int, times: dict[str, list[float]], load: str) -> Section:
    """The RESULTS.md block: each case's median and p90, and its ratio to the baseline."""
    base = statistics.median(times[BASELINE])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        rows.append([name, f"{median * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{median / base:.2f}"])
    warm = statistics.median(times[WARM]) / base
    return Section(
        name="bench_upstream_resolve",
        title="Upstream tag resolution: the anonymous client against a plain HEAD",
        command=f"python -m benchmarks.bench_upstream_resolve --rounds {rounds}",
        date=utc_now(), load=load,
        setup="Real Distribution with `auth: token` and the test token server on loopback, "
              "one aiohttp session; cases interleaved round by round.",
        tables=[Table(["case", "median ms", "p90 ms", "x baseline"], rows)],
        notes=["warm is what every upstream-first tag lookup pays: one HEAD, the token "
               "cached and the connection kept alive; cold adds the 401 and the token GET "
               "once per token lifetime; an open breaker costs no request at all"],
        targets=[Target("warm upstream tag resolution / plain HEAD with a token", "<=", 1.5,
                        warm)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    bench = BenchRun(parser, argv)
    args = bench.args
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        directory = Path(tmp)
        image = build_image(f"example.com/{REPO}:{TAG}", directory / "layout")
        with TokenServer(directory, public={REPO}) as tokens, \
                DistributionRegistry(auth=TokenAuth(tokens.realm, SERVICE, ISSUER,
                                                    tokens.rootcertbundle)) as token_reg, \
                DistributionRegistry() as public_reg:
            push_layout(image.layout, TAG, token_reg.address, REPO, tokens.pusher)
            push_layout(image.layout, TAG, public_reg.address, REPO)
            times = asyncio.run(_run(token_reg, public_reg, tokens.realm, args.rounds))
    result = section(args.rounds, times, load_since(bench.load_before))
    bench.publish(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
