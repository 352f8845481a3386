"""Reading the node's zone label from its Kubernetes Node, against an HTTPS server of
the test's own that answers as the API server does."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshmirror.kubenode import NodeLookupError, api_from_env, node_label
from meshmirror.node import with_node_zone
from meshmirror.runconfig import NodeConfig, PeeringConfig
from tests.support.ports import loopback_host
from tests.support.scripted_http import Reply, Request, Responder, ScriptedHTTPServer
from tests.support.tls import make_server_cert

ZONE_LABEL = "topology.kubernetes.io/zone"
TOKEN = "sa-token-123"


def node_object(labels: dict[str, str]) -> bytes:
    return json.dumps({"kind": "Node", "apiVersion": "v1",
                       "metadata": {"name": "node-1", "labels": labels},
                       "status": {"images": [{"names": ["x"] * 50}] * 100}}).encode()


def api_server(node: bytes) -> Responder:
    def respond(request: Request) -> Reply:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return Reply(401)
        if request.path != "/api/v1/nodes/node-1":
            return Reply(403)
        return Reply(200, (("Content-Type", "application/json"),), node)
    return respond


@pytest.fixture
def account(tmp_path: Path) -> Iterator[tuple[Path, str, ssl.SSLContext]]:
    """A service account directory (token, CA) and the API server's TLS context."""
    host = loopback_host()
    cert = make_server_cert(tmp_path, host)
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "ca.crt").write_bytes(cert.cert.read_bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    yield directory, host, context


def test_the_zone_label_is_read_from_the_nodes_own_node_object(
        account: tuple[Path, str, ssl.SSLContext]) -> None:
    directory, host, context = account
    node = node_object({ZONE_LABEL: "eu-west-1a", "kubernetes.io/os": "linux"})
    with ScriptedHTTPServer(api_server(node), host=host, tls=context) as server:
        assert node_label("node-1", ZONE_LABEL, api_url=server.url, account=directory) == \
            "eu-west-1a"
        assert node_label("node-1", "no/such-label", api_url=server.url,
                          account=directory) == ""
        with pytest.raises(NodeLookupError, match="get on nodes"):
            node_label("node-2", ZONE_LABEL, api_url=server.url, account=directory)


def test_a_node_that_cannot_read_its_zone_runs_without_one(
        account: tuple[Path, str, ssl.SSLContext], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory, host, context = account
    config = NodeConfig(peering=PeeringConfig(http_base="http://127.0.0.1:5000",
                                              node_name="node-1", zone_label=ZONE_LABEL))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert with_node_zone(config) == config  # not in a pod: no zone, no failure
    with pytest.raises(NodeLookupError, match="KUBERNETES_SERVICE_HOST"):
        api_from_env({})
    assert api_from_env({"KUBERNETES_SERVICE_HOST": "fd00::1",
                         "KUBERNETES_SERVICE_PORT": "443"}) == "https://[fd00::1]:443"
    with pytest.raises(NodeLookupError, match="automountServiceAccountToken"):
        node_label("node-1", ZONE_LABEL, api_url="https://127.0.0.1:1", account=tmp_path)
    with (ScriptedHTTPServer(api_server(b"not json"), host=host, tls=context) as server,
          pytest.raises(NodeLookupError, match="not a Node object")):
        node_label("node-1", ZONE_LABEL, api_url=server.url, account=directory)


def test_the_looked_up_zone_lands_in_the_peering_config(
        account: tuple[Path, str, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> None:
    directory, host, context = account
    node = node_object({ZONE_LABEL: "zone-b"})
    with ScriptedHTTPServer(api_server(node), host=host, tls=context) as server:
        port = server.url.rsplit(":", 1)[1]
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)

        def lookup(name: str, label: str) -> str:  # the API from the environment, as in a pod
            return node_label(name, label, account=directory)

        config = NodeConfig(peering=PeeringConfig(http_base="http://127.0.0.1:5000",
                                                  node_name="node-1", zone_label=ZONE_LABEL))
        resolved = with_node_zone(config, lookup).peering
        assert resolved is not None and resolved.zone == "zone-b"
        given = NodeConfig(peering=PeeringConfig(http_base="http://127.0.0.1:5000",
                                                 node_name="node-1", zone="zone-a",
                                                 zone_label=ZONE_LABEL))
        assert with_node_zone(given, lookup) == given  # --zone wins; nothing is asked
        assert len(server.requests) == 1
