"""A label of this node's own Kubernetes Node object, read once at start.

Why: the zone a node runs in is the Node's ``topology.kubernetes.io/zone``
label, and the downward API cannot give a pod its Node's labels (only its own
and a few node fields). So with ``--zone-from-node-label`` a node reads its
Node object itself, through the API server the pod's service account reaches
(``KUBERNETES_SERVICE_HOST``/``_PORT``, the mounted token and CA); the chart
grants that account ``get`` on nodes only. Read once: a Node's zone does not
change while it runs.

Failure is not fatal: a node that cannot learn its zone runs without one (its
peers are then ranked with no zone preference), and says why in one line.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A Node object lists its images and can reach hundreds of KiB; anything past
# this is not an API server's answer.
MAX_NODE_BYTES = 4 * 1024 * 1024


class NodeLookupError(Exception):
    """The Node could not be read; the message says what to fix."""


def api_from_env(env: dict[str, str] | None = None) -> str:
    """The in-cluster API server's base URL, from the variables the kubelet sets."""
    env = dict(os.environ) if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise NodeLookupError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def node_label(node_name: str, label: str, *, api_url: str | None = None,
               account: Path = SERVICE_ACCOUNT, timeout: float = 5.0) -> str:
    """The value of ``label`` on Node ``node_name`` ("" when the Node has no such label)."""
    api = api_url or api_from_env()
    try:
        token = (account / "token").read_text().strip()
        context = ssl.create_default_context(cafile=str(account / "ca.crt"))
    except (OSError, ssl.SSLError) as err:
        raise NodeLookupError(f"no service account token and CA in {account} ({err}); the "
                              "pod needs automountServiceAccountToken") from err
    request = urllib.request.Request(
        f"{api}/api/v1/nodes/{quote(node_name, safe='')}",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    # No proxy: the API server is the cluster's own, named by address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_NODE_BYTES + 1)
    except urllib.error.HTTPError as err:
        hint = " (the service account needs get on nodes)" if err.code == 403 else ""
        raise NodeLookupError(f"reading Node {node_name}: HTTP {err.code}{hint}") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise NodeLookupError(f"reading Node {node_name} from {api}: {err}") from err
    if len(body) > MAX_NODE_BYTES:
        raise NodeLookupError(f"Node {node_name}: answer larger than {MAX_NODE_BYTES} bytes")
    try:
        labels = json.loads(body)["metadata"].get("labels") or {}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise NodeLookupError(f"Node {node_name}: the answer is not a Node object") from err
    value = labels.get(label, "") if isinstance(labels, dict) else ""
    return value if isinstance(value, str) else ""
