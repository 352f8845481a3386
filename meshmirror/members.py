"""``meshmirror members``: the mesh as one node sees it, like ``serf members``.

Reads the node's ``/status`` on its metrics port, so it works against any running
node (a pod, a demo node) without joining the mesh itself.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

_TIMEOUT_SECONDS = 5.0
_COLUMNS = ("name", "address", "state", "registry", "summary")


def fetch_status(addr: str, timeout: float = _TIMEOUT_SECONDS) -> dict[str, Any]:
    """The node's ``/status`` JSON; OSError (with a one-line message) when unreachable."""
    url = f"http://{addr}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.URLError as err:
        raise OSError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from err
    except (TimeoutError, ValueError) as err:
        raise OSError(f"cannot read {url}: {err}") from err
    if not isinstance(data, dict):
        raise OSError(f"{url} did not answer a JSON object")
    return data


def _summary(member: dict[str, Any]) -> str:
    if member.get("self"):
        return "self"
    if member.get("advertised_epoch") is None:
        return "-"
    current = member.get("summary_current")
    return "-" if current is None else "current" if current else "stale"


def table(members: list[dict[str, Any]]) -> str:
    """Aligned columns, one member a line, as ``serf members`` prints them."""
    rows = [("Node", "Address", "Status", "Registry", "Summary")]
    rows += [(str(m["name"]), str(m["address"]), str(m["state"]), str(m["registry"] or "-"),
              _summary(m)) for m in members]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def members_command(addr: str, output_format: str) -> int:
    """Print the members the node at ``addr`` (its metrics port) sees; 1 if it cannot be asked."""
    try:
        status = fetch_status(addr)
    except OSError as err:
        print(f"meshmirror members: {err}", file=sys.stderr)
        return 1
    mesh = status.get("mesh")
    members: list[dict[str, Any]] = mesh["members"] if isinstance(mesh, dict) else []
    if output_format == "json":
        print(json.dumps(members, indent=2))
    elif mesh is None:
        print("mesh off: this node serves its local store only")
    else:
        print(table(members))
    return 0
