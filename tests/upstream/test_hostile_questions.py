"""A hostile client of the registry port cannot steer, flood or trip the upstream questions.

Real ``meshmirror run`` nodes, a real Distribution upstream (its access log says
what really reached it) and scripted "registries" that an attacker runs:

- a registry whose 401 realm, or whose redirect, points at another loopback
  address or at a link-local one gets no request through (the target's own log
  is empty), while a node told to allow that host does reach it;
- ``?ns=`` naming a registry whose hosts.toml does not send pulls here is never asked;
- 100 lookups of one tag, present or absent, make at most 2 upstream requests;
- probe-shaped requests (a layer's digest on the manifests endpoint) never open
  the breaker: honest tags are still resolved by the upstream;
- 1,000 requests naming new repositories from one client are paced, while
  another client's honest lookups are all asked.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshmirror.oci.imagebuilder import BuiltImage, build_image
from meshmirror.upstream import BreakerState, Private, Public, UpstreamClient, UpstreamEndpoints
from meshmirror.upstream.guard import AddressGuard, ForbiddenAddress
from tests.support.distribution import DistributionRegistry
from tests.support.http import http_status
from tests.support.metrics import Metrics, metric, scrape
from tests.support.netns import NetNamespace
from tests.support.node import RunningNode, start_node
from tests.support.ports import loopback_host
from tests.support.processes import stop
from tests.support.scripted_http import Reply, Request, ScriptedHTTPServer
from tests.support.skopeo import push_layout

pytestmark = pytest.mark.real

REPO, TAG = "honest/app", "1"
UPSTREAM_FIRST = ("--resolve-tags", "upstream-first", "--private-images", "upstream-only")
METADATA_REALM = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def _node(tmp: Path, name: str, *flags: str) -> RunningNode:
    store = tmp / name
    store.mkdir()
    return start_node(f"oci:{store}", tmp / f"{name}.log", extra=(*UPSTREAM_FIRST, *flags))


def _metrics(node: RunningNode) -> Metrics:
    return scrape(node.metrics)


def _answers(node: RunningNode, registry: str, result: str) -> float:
    return metric(_metrics(node), "meshmirror_upstream_answers_total", registry=registry,
                  result=result)


# -- an open door no more -------------------------------------------------------------


def test_realms_and_redirects_to_private_or_link_local_hosts_get_nothing_through(
        tmp_path: Path) -> None:
    """All inside a namespace with nothing but loopback: even a wrong guard could not
    send a packet off this machine. The guard refuses before connecting anyway."""
    with NetNamespace("ssrf") as ns, ns.inside(), \
            ScriptedHTTPServer(lambda _r: Reply(200, body=b'{"token": "t"}')) as target:
        internal = f"{target.url}/internal/admin/delete-everything"

        def attacker(request: Request) -> Reply:
            kind = request.path.split("/")[2] if request.path.count("/") > 2 else ""
            if kind == "redirect":
                return Reply(307, (("Location", internal),))
            realm = {"private": internal, "metadata": METADATA_REALM,
                     "metadata6": "http://[fe80::a9fe:a9fe]/latest/"}.get(kind, internal)
            return Reply(401, (("WWW-Authenticate",
                                f'Bearer realm="{realm}",service="evil"'),))

        with ScriptedHTTPServer(attacker) as evil:
            registry = f"{evil.host}:{evil.port}"
            kinds = ("private", "metadata", "metadata6", "redirect")
            node = _node(tmp_path, "guarded", "--mirrored-registries", registry)
            try:
                for kind in kinds:
                    url = f"http://{node.address}/v2/{kind}/app/manifests/{TAG}?ns={registry}"
                    assert http_status(url) == 404
                assert _answers(node, registry, "forbidden") == len(kinds)
            finally:
                stop(node.proc)
            asked = {r.path.split("/")[2] for r in evil.requests if r.method == "HEAD"}
            assert asked == set(kinds)  # the attacker was asked; nobody else was
            assert target.requests == []

            # The same node with the target listed does reach it: the test can see.
            allowed = _node(tmp_path, "allowed", "--mirrored-registries", registry,
                            "--upstream-allow-hosts", target.host)
            try:
                assert http_status(f"http://{allowed.address}/v2/private/app/manifests/{TAG}"
                                   f"?ns={registry}") == 404
            finally:
                stop(allowed.proc)
            assert [r.path for r in target.requests] == ["/internal/admin/delete-everything"]


async def test_the_guard_refuses_link_local_before_any_connection() -> None:
    """What keeps the node test above from ever dialling 169.254.169.254."""
    guard = AddressGuard.parse(["127.0.0.0/8"])
    for url in (METADATA_REALM, "http://[fe80::a9fe:a9fe]/latest/"):
        with pytest.raises(ForbiddenAddress, match="link-local"):
            await guard.check_url(url, frozenset({"169.254.169.254", "fe80::a9fe:a9fe"}),
                                  proxied=False)


def test_only_registries_whose_hosts_toml_points_here_are_asked(tmp_path: Path) -> None:
    with ScriptedHTTPServer(lambda _r: Reply(404)) as mirrored, \
            ScriptedHTTPServer(lambda _r: Reply(404)) as elsewhere, \
            ScriptedHTTPServer(lambda _r: Reply(404)) as other:
        hosts = tmp_path / "certs.d"
        node = _node(tmp_path, "hosts", "--containerd-registry-config-path", str(hosts))
        try:
            for server, target in ((mirrored, node.address), (elsewhere, "127.0.0.1:1")):
                directory = hosts / f"{server.host}:{server.port}"
                directory.mkdir(parents=True)
                (directory / "hosts.toml").write_text(
                    f'server = "{server.url}"\n[host."http://{target}"]\n'
                    '  capabilities = ["pull", "resolve"]\n')
            for server in (mirrored, elsewhere, other):
                assert http_status(f"http://{node.address}/v2/{REPO}/manifests/{TAG}"
                                   f"?ns={server.host}:{server.port}") == 404
        finally:
            stop(node.proc)
        assert [r.method for r in mirrored.requests] == ["HEAD"]
        assert elsewhere.requests == [] and other.requests == []


# -- a real upstream ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_image(f"example.com/{REPO}:{TAG}", tmp_path_factory.mktemp("image"),
                       (4096,), seed=23)


@pytest.fixture(scope="module")
def upstream(image: BuiltImage) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(access_log=True) as registry:
        push_layout(image.layout, TAG, registry.address, REPO)
        yield registry


def test_a_hundred_lookups_of_one_tag_make_at_most_two_upstream_requests(
        upstream: DistributionRegistry, tmp_path: Path) -> None:
    # No designated manifest fetch: only the tag questions are counted here.
    node = _node(tmp_path, "cached", "--mirrored-registries", upstream.address,
                 "--rollout-fanout", "0")
    try:
        for tag in (TAG, "missing"):
            url = f"http://{node.address}/v2/{REPO}/manifests/{tag}?ns={upstream.address}"
            path = f"/v2/{REPO}/manifests/{tag} "
            before = upstream.requests_seen("HEAD", path)
            with ThreadPoolExecutor(max_workers=16) as pool:
                statuses = list(pool.map(http_status, [url] * 100, ["HEAD"] * 100))
            assert set(statuses) == {404}  # no peer holds it / the upstream has no such tag
            asked = upstream.requests_seen("HEAD", path) - before
            assert 1 <= asked <= 2, (tag, asked)
    finally:
        stop(node.proc)


def test_probe_shaped_requests_never_open_the_breaker(
        upstream: DistributionRegistry, image: BuiltImage, tmp_path: Path) -> None:
    layer = image.platforms[0].layers[0].digest
    node = _node(tmp_path, "probed", "--mirrored-registries", upstream.address,
                 "--upstream-failure-threshold", "1", "--upstream-tag-ttl", "0")
    try:
        base = f"http://{node.address}/v2"
        for n in range(30):
            # A layer's digest on the manifests endpoint, each in a repository never seen.
            assert http_status(f"{base}/probe/r{n}/manifests/{layer}?ns={upstream.address}") == 404
        metrics = _metrics(node)
        assert metric(metrics, "meshmirror_upstream_breaker_state", registry=upstream.address,
                      state="closed") == 1
        before = _answers(node, upstream.address, "answered")
        for _ in range(3):
            http_status(f"{base}/{REPO}/manifests/{TAG}?ns={upstream.address}")
        # Honest tags are the upstream's word (its digest), not peers'.
        assert _answers(node, upstream.address, "answered") - before == 3
        assert _answers(node, upstream.address, "circuit_open") == 0
    finally:
        stop(node.proc)


async def test_a_5xx_for_the_probes_shape_does_not_count_against_real_distribution(
        upstream: DistributionRegistry, image: BuiltImage) -> None:
    """Asked with a layer's digest, Distribution answers the manifest HEAD with a 5xx;
    its /v2/ answers, so the breaker (threshold 1 here) stays closed."""
    layer = str(image.platforms[0].layers[0].digest)
    async with UpstreamClient(UpstreamEndpoints(overrides={upstream.address: upstream.url}),
                              failure_threshold=1) as client:
        for _ in range(5):
            visibility = await client.check_public(upstream.address, REPO, layer)
            assert not isinstance(visibility, Private)
        assert client.health(upstream.address).state is BreakerState.CLOSED
        assert isinstance(await client.check_public(upstream.address, REPO, TAG), Public)


def _flood(node: RunningNode, source: str, registry: str, count: int) -> None:
    """``count`` tag lookups in repositories never seen, over one keep-alive connection."""
    host, port = node.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10,
                                            source_address=(source, 0))
    try:
        for n in range(count):
            connection.request("HEAD", f"/v2/flood/r{n}/manifests/latest?ns={registry}")
            response = connection.getresponse()
            response.read()
            assert response.status == 404
    finally:
        connection.close()


def test_new_questions_are_paced_per_client(upstream: DistributionRegistry,
                                            tmp_path: Path) -> None:
    rate, burst, flood = 5.0, 20, 1000
    node = _node(tmp_path, "paced", "--mirrored-registries", upstream.address,
                 "--upstream-client-rate", str(rate), "--upstream-client-burst", str(burst),
                 "--upstream-tag-ttl", "0")
    attacker, honest = loopback_host(), loopback_host()
    honest_path = f"/v2/{REPO}/manifests/{TAG} "
    honest_before = upstream.requests_seen("HEAD", honest_path)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            flooding = pool.submit(_flood, node, attacker, upstream.address, flood)
            honest_lookups = 0
            while not flooding.done() or honest_lookups < 5:
                host, port = node.address.rsplit(":", 1)
                connection = http.client.HTTPConnection(host, int(port), timeout=10,
                                                        source_address=(honest, 0))
                connection.request("HEAD", f"/v2/{REPO}/manifests/{TAG}?ns={upstream.address}")
                connection.getresponse().read()
                connection.close()
                honest_lookups += 1
                time.sleep(0.3)  # below the pace: an honest client is never held back
            flooding.result()
        elapsed = time.monotonic() - started
    finally:
        stop(node.proc)
    flood_heads = upstream.requests_seen("HEAD", "/v2/flood/")
    assert flood_heads <= burst + rate * elapsed + 1, (flood_heads, elapsed)
    assert flood_heads < flood / 4
    # Every honest lookup was asked upstream: the attacker's pace is its own.
    assert upstream.requests_seen("HEAD", honest_path) - honest_before == honest_lookups
