"""The status page on the metrics port: what this node knows, for a human or a script.

``GET /status`` answers JSON; ``GET /`` renders the same as a small HTML page. Both
are built from live state at request time (store keys, summary, mesh members and
the peers' summaries this node holds), so an operator can see at a glance whether
a node is in the mesh and which peers it could pull from.
"""

from __future__ import annotations

import html
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from meshmirror import __version__
from meshmirror.mesh.tags import decode_tags
from meshmirror.mesh.wire import WireError
from meshmirror.peering import Peering
from meshmirror.store.base import Store


async def node_status(store: Store, peering: Peering | None) -> dict[str, Any]:
    keys = await store.keys()
    status: dict[str, Any] = {
        "version": __version__,
        "ready": await store.ready(),
        "store": {"keys": len(keys), "tags": sorted(k for k in keys if not k.startswith("sha"))},
    }
    if peering is None:
        status["mesh"] = None
        return status
    summary = peering.publisher.current
    members = []
    for member in peering.mesh.members(include_dead=True):
        try:
            tags = decode_tags(member.meta)
        except WireError:
            tags = {}
        held = peering.directory.held(member.name)
        members.append({
            "name": member.name, "address": f"{member.addr}:{member.port}",
            "state": member.state.name.lower(), "incarnation": member.incarnation,
            "registry": tags.get("http"), "advertised_epoch": tags.get("epoch"),
            "held_epoch": held.epoch if held is not None else None,
            "held_keys": held.count if held is not None else None,
        })
    status["mesh"] = {
        "node": peering.config.node_name,
        "registry": peering.config.http_base,
        "summary": None if summary is None else {"epoch": summary.epoch,
                                                 "keys": summary.count},
        "peer_summaries_share": peering.directory.share(),
        "members": sorted(members, key=lambda m: str(m["name"])),
    }
    return status


def _html(status: dict[str, Any]) -> str:
    esc = html.escape
    mesh = status["mesh"]
    rows = ""
    if mesh is not None:
        for m in mesh["members"]:
            rows += ("<tr>" + "".join(f"<td>{esc(str(m[c]))}</td>" for c in (
                "name", "state", "address", "registry", "advertised_epoch", "held_epoch",
                "held_keys")) + "</tr>")
    head = (f"<h1>meshmirror {esc(status['version'])}</h1>"
            f"<p>ready: {status['ready']} &middot; store keys: {status['store']['keys']}</p>")
    if mesh is None:
        return head + "<p>mesh off: serving the local store only</p>"
    return head + (
        f"<p>node {esc(mesh['node'])} &middot; registry {esc(mesh['registry'])} &middot; "
        f"summary {esc(str(mesh['summary']))} &middot; peers' summaries held "
        f"{mesh['peer_summaries_share']:.0%}</p>"
        "<table border=1 cellpadding=4><tr><th>member</th><th>state</th><th>gossip</th>"
        "<th>registry</th><th>advertised epoch</th><th>held epoch</th><th>keys</th></tr>"
        f"{rows}</table><p><a href='/metrics'>/metrics</a> &middot; "
        "<a href='/status'>/status (JSON)</a></p>")


def status_routes(store: Store, peering: Peering | None) -> list[BaseRoute]:
    # Encoded with "replace": text that is not valid Unicode (a name taken from a
    # command line or a peer) shows as "?" instead of failing the whole page.
    async def as_json(request: Request) -> Response:
        text = json.dumps(await node_status(store, peering), ensure_ascii=False,
                          separators=(",", ":"))
        return Response(text.encode("utf-8", "replace"), media_type="application/json")

    async def as_html(request: Request) -> Response:
        page = _html(await node_status(store, peering))
        return HTMLResponse(f"<!doctype html><title>meshmirror</title>{page}"
                            .encode("utf-8", "replace"))

    return [Route("/status", as_json, methods=["GET", "HEAD"]),
            Route("/", as_html, methods=["GET", "HEAD"])]
