"""Every miss says why: one request per reason against real nodes, one log line each.

Real processes on loopback: two ``meshmirror run`` nodes, three real Distribution
registries as upstreams (a public one, one that wants credentials, and one started
and then stopped: the outage) and two rogue mesh members (`tests.reliability.rogue`)
whose summaries claim one blob each, one answering 404 and one dripping a byte every
two seconds. The node under test (``upstream``) resolves tags upstream-first, keeps
private repositories from peers and denies unknown ones in an outage, all in a mesh
without a gossip key, so peers' tags are not trusted in an outage. A second node
runs ``--resolve-tags off``.

Each `Case` sends one request and names the reason its access-log line must carry;
the node's ``meshmirror_mirror_misses_total{reason}`` must count exactly it, and
``/status`` must list it among the recent misses. A reason a feature of its own
produces (a vouch, the designated upstream fetch) is added as a `Case` by that
feature; `NOT_ON_REAL_NODES` names the ones only unit tests can provoke, with where.
"""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshmirror.mirror.marker import PEER_HEADER
from meshmirror.oci.digest import Digest
from meshmirror.registry.fallback import MissReason
from tests.reliability.rogue import Rogue, claiming_summary
from tests.support.browser import launch_chromium
from tests.support.distribution import DistributionRegistry, HtpasswdAuth
from tests.support.metrics import metric, scrape
from tests.support.node import RunningNode, start_node
from tests.support.processes import stop, wait_until

pytestmark = [pytest.mark.real]

# Reasons no request to a real node can provoke on purpose, and the test that shows each.
NOT_ON_REAL_NODES = {
    # A failure of this node's own disk or budgets:
    # tests/mirror/test_mirror.py::test_spool_write_failure_is_a_miss_not_a_peer_fault.
    MissReason.BUSY,
    # A bug: tests/registry/test_app.py::test_failing_fallback_is_a_404.
    MissReason.ERROR,
    # Produced by the vouch and designated-fetcher features, whose tests add their Case
    # (upstream_failed: tests/mirror/test_rollout.py, an upstream that is down).
    MissReason.VOUCH_NOT_TRUSTED,
    MissReason.UPSTREAM_FAILED,
}
DEADLINE = 1.0  # --mirror-deadline; the dripping rogue needs far longer for 100 bytes
DRIP_SIZE = 100


def _digest(name: str) -> str:
    return str(Digest.of(name.encode()))


PEERS_FAILED_BLOB = _digest("claimed by the rogue that answers 404")
DEADLINE_BLOB = _digest("claimed by the dripping rogue")
CLIENT_LEFT_BLOB = _digest("claimed by the dripping rogue, the client leaves")


@dataclass
class Setup:
    upstream: RunningNode  # the node under test
    tags_off: RunningNode
    public: str  # host:port of each upstream
    private: str
    down: str
    member: str = ""  # a member's address: marked requests from it are believed


@dataclass(frozen=True)
class Case:
    reason: MissReason
    node: str  # a `Setup` attribute
    method: str
    path: str  # with its query
    status: int  # what the client gets (0: it left first)
    headers: tuple[tuple[str, str], ...] = ()
    leave_after: float | None = None  # close the connection after this many seconds
    from_member: bool = False  # sent from `Setup.member`, as a peer's request would be


def _cases(s: Setup) -> list[Case]:
    blob = _digest("held by nobody")
    return [
        Case(MissReason.NO_PEER, "upstream", "GET", f"/v2/pub/app/blobs/{blob}?ns={s.public}",
             404),
        Case(MissReason.PEERS_FAILED, "upstream", "GET",
             f"/v2/pub/app/blobs/{PEERS_FAILED_BLOB}?ns={s.public}", 404),
        Case(MissReason.DEADLINE, "upstream", "GET",
             f"/v2/pub/app/blobs/{DEADLINE_BLOB}?ns={s.public}", 404),
        Case(MissReason.CLIENT_LEFT, "upstream", "GET",
             f"/v2/pub/app/blobs/{CLIENT_LEFT_BLOB}?ns={s.public}", 0, leave_after=0.3),
        Case(MissReason.NOT_MIRRORED, "upstream", "GET",
             "/v2/pub/app/manifests/1?ns=127.0.0.1:1", 404),
        Case(MissReason.FILTERED, "upstream", "GET",
             f"/v2/pub/app/manifests/filtered?ns={s.public}", 404),
        Case(MissReason.BAD_REFERENCE, "upstream", "GET",
             f"/v2/pub/app/manifests/sha256:0123?ns={s.public}", 400),
        Case(MissReason.BAD_REQUEST, "upstream", "BREW", "/v2/pub/app/manifests/1", 405),
        Case(MissReason.TAG_NOT_FOUND, "upstream", "HEAD",
             f"/v2/pub/app/manifests/absent?ns={s.public}", 404),
        Case(MissReason.PRIVATE_REPOSITORY, "upstream", "HEAD",
             f"/v2/secret/app/manifests/1?ns={s.private}", 404),
        Case(MissReason.TAG_OUTAGE_UNTRUSTED, "upstream", "HEAD",
             f"/v2/gone/app/manifests/1?ns={s.down}", 404),
        Case(MissReason.UNKNOWN_REPOSITORY_OUTAGE, "upstream", "GET",
             f"/v2/gone/other/blobs/{blob}?ns={s.down}", 404),
        Case(MissReason.NOT_HELD, "upstream", "GET", f"/v2/pub/app/blobs/{blob}?ns={s.public}",
             404, headers=((PEER_HEADER, "1"),), from_member=True),
        Case(MissReason.TAGS_OFF, "tags_off", "HEAD",
             f"/v2/pub/app/manifests/1?ns={s.public}", 404),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("reasons")
    with ExitStack() as stack:
        public = stack.enter_context(DistributionRegistry())
        private = stack.enter_context(DistributionRegistry(
            auth=HtpasswdAuth.write(workdir / "htpasswd", {"u": "p"})))
        down = stack.enter_context(DistributionRegistry())
        down.stop()  # the outage: its port now refuses connections
        mirrored = [arg for r in (public, private, down)
                    for arg in ("--mirrored-registries", r.address)]
        nodes = []
        for name, flags in (
                ("upstream", ("--resolve-tags", "upstream-first",
                              "--private-images", "upstream-only",
                              "--private-images-unknown", "deny",
                              "--outage-peer-tags", "encrypted",
                              "--registry-filters", ":filtered$",
                              "--upstream-timeout", "1s", "--upstream-connect-timeout", "500ms",
                              "--mirror-deadline", f"{DEADLINE}s", "--mirror-min-rate", "1000",
                              "--mirror-stall-timeout", "10s",
                              "--mirror-first-byte-timeout", "2s",
                              # Cold public blobs are a miss here, not a designated fetch.
                              "--rollout-fanout", "0")),
                ("tags-off", ("--resolve-tags", "off"))):
            (workdir / name).mkdir()
            node = start_node(f"oci:{workdir / name}", workdir / f"{name}.log",
                              ("--node-name", name, *mirrored, *flags))
            stack.callback(stop, node.proc)
            nodes.append(node)
        rogues = [
            stack.enter_context(Rogue(kind, claiming_summary(keys, epoch=1), DRIP_SIZE,
                                      join=nodes[0].mesh, log=workdir / f"rogue-{kind}.log",
                                      name=f"rogue-{kind}"))
            for kind, keys in (("instant404", [PEERS_FAILED_BLOB]),
                               ("drip", [DEADLINE_BLOB, CLIENT_LEFT_BLOB]))]
        wait_until(lambda: _summaries_held(nodes[0]) == 2, 30,
                   "the node under test to hold both rogues' summaries")
        yield Setup(nodes[0], nodes[1], public.address, private.address, down.address,
                    rogues[0].host)


def _summaries_held(node: RunningNode) -> int:
    members = _status(node)["mesh"]["members"]
    return sum(1 for m in members
               if str(m["name"]).startswith("rogue-") and m["held_epoch"] is not None)


def _status(node: RunningNode) -> Any:
    with urllib.request.urlopen(f"http://{node.metrics}/status", timeout=5) as r:
        return json.loads(r.read())


def _send(node: RunningNode, case: Case, member: str = "") -> int:
    """The status the client got (0 when it left first)."""
    if case.leave_after is not None:
        host, port = node.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(f"{case.method} {case.path} HTTP/1.1\r\nHost: {node.address}\r\n"
                         "\r\n".encode())
            time.sleep(case.leave_after)
        return 0
    if case.from_member:  # a peer's marker is believed only from a member's address
        host, port = node.address.rsplit(":", 1)
        peer = http.client.HTTPConnection(host, int(port), timeout=10,
                                          source_address=(member, 0))
        try:
            peer.request(case.method, case.path, headers=dict(case.headers))
            return int(peer.getresponse().status)
        finally:
            peer.close()
    request = urllib.request.Request(f"http://{node.address}{case.path}", method=case.method,
                                     headers=dict(case.headers))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _reason_lines(node: RunningNode) -> list[dict[str, object]]:
    return [line for line in node.log_lines()
            if line.get("logger") == "meshmirror.access" and "reason" in line]


def test_every_reason_has_a_case_or_a_pointer() -> None:
    placeholder = Setup(RunningNode.__new__(RunningNode), RunningNode.__new__(RunningNode),
                        "a:1", "b:1", "c:1")
    covered = {case.reason for case in _cases(placeholder)}
    assert covered | NOT_ON_REAL_NODES == set(MissReason)
    assert not covered & NOT_ON_REAL_NODES


def test_each_miss_logs_its_reason_counts_it_and_shows_it(setup: Setup) -> None:
    cases = _cases(setup)
    for case in cases:
        node: RunningNode = getattr(setup, case.node)
        before = len(_reason_lines(node))
        assert _send(node, case, setup.member) == case.status, case
        path = case.path.split("?", 1)[0]

        def logged(node: RunningNode = node, before: int = before, path: str = path) -> bool:
            return any(line["path"] == path for line in _reason_lines(node)[before:])

        wait_until(logged, 15, f"the access-log line of {case}")
        line = next(line for line in _reason_lines(node)[before:] if line["path"] == path)
        assert line["reason"] == case.reason.value, (case, line)
        assert line["method"] == case.method
        if case.status:
            assert line["status"] == case.status
        print(json.dumps({"reason": line["reason"], "status": line["status"],
                          "method": line["method"], "path": line["path"]}))

    for name in ("upstream", "tags_off"):
        node = getattr(setup, name)
        metrics = scrape(node.metrics)
        expected = {case.reason for case in cases if case.node == name}
        for reason in MissReason:
            assert metric(metrics, "meshmirror_mirror_misses_total",
                          reason=reason.value) == (1 if reason in expected else 0), reason
        misses = _status(node)["misses"]
        assert {m["reason"] for m in misses["recent"]} == {r.value for r in expected}
        assert {k for k, v in misses["by_reason"].items() if v} == {r.value for r in expected}
    _page_lists(setup.upstream, sorted(c.reason.value for c in cases if c.node == "upstream"))


def _page_lists(node: RunningNode, reasons: list[str]) -> None:
    """The status page, rendered by a real browser, has a recent-miss row per reason."""
    from playwright.sync_api import sync_playwright

    host = node.metrics.rsplit(":", 1)[0]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch_chromium(p, host)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://{node.metrics}/", timeout=15_000)
            page.wait_for_function(
                "reasons => reasons.every(r => document.querySelector("
                "`#misses tr[data-reason=\"${r}\"]`))", arg=reasons, timeout=15_000)
            totals = page.locator("#miss-totals").inner_text()
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "meshmirror-misses.png"),
                            full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert all(f"{reason} 1" in totals for reason in reasons), totals

