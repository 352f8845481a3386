"""``/status``: what this node knows, as JSON with one type per field (docs/status.md).

Built from live state at request time: store keys, this node's summary, every mesh
member with the summary epoch it advertises against the one this node holds, the
mirror's recent activity and the registry's recent misses. Epochs are the summary
publisher's millisecond clock, so a page can turn them into ages. Member names arrive
from the network as arbitrary bytes (decoded with surrogateescape); `printable` makes
them valid Unicode for JSON and HTML.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from meshmirror import __version__
from meshmirror.flags import decimal
from meshmirror.mesh.tags import decode_tags
from meshmirror.mesh.wire import WireError
from meshmirror.peering import TAG_EPOCH, TAG_HTTP, Peering
from meshmirror.status.activity import MirrorActivity, RecentMisses
from meshmirror.store.base import Store

STATES = ("alive", "suspect", "dead", "left")
KEY_MISMATCH_WINDOW_SECONDS = 300.0
"""Undecryptable gossip this recent warns: a mismatched key keeps sending, a stray
packet from a node since rekeyed stops."""


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN`` instead of lone surrogates."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _int_or_none(text: str | None) -> int | None:
    return decimal(text)


def _members(peering: Peering) -> list[dict[str, Any]]:
    members = []
    for member in peering.mesh.members(include_dead=True):
        try:
            tags = decode_tags(member.meta)
        except WireError:
            tags = {}
        advertised = _int_or_none(tags.get(TAG_EPOCH))
        held = peering.directory.held(member.name)
        is_self = member.name == peering.config.node_name
        held_epoch = held.epoch if held is not None else None
        registry = tags.get(TAG_HTTP)
        members.append({
            "name": printable(member.name),
            "address": f"{member.addr}:{member.port}",
            "state": member.state.name.lower(),
            "incarnation": int(member.incarnation),
            "registry": printable(registry) if registry is not None else None,
            "self": is_self,
            "advertised_epoch": advertised,
            "held_epoch": held_epoch,
            "held_keys": held.count if held is not None else None,
            "summary_current": None if is_self or advertised is None
            else held_epoch == advertised,
        })
    return sorted(members, key=lambda m: str(m["name"]))


def _activity(activity: MirrorActivity | None) -> dict[str, Any] | None:
    if activity is None:
        return None
    activity.sample()
    return {
        "hits": activity.hits,
        "misses": activity.misses,
        "hit_ratio": activity.hit_ratio,
        "peer_bytes": activity.peer_bytes,
        "last_success_unix_seconds": activity.last_success_unix_seconds,
        "recent_requests": [{
            "finished_unix_seconds": r.finished_unix_seconds,
            "registry": printable(r.registry), "kind": r.kind, "path": printable(r.path),
            "result": r.result, "peer": printable(r.peer) if r.peer is not None else None,
            "size_bytes": r.size_bytes, "duration_seconds": r.duration_seconds,
        } for r in reversed(activity.recent)],
        "history_interval_seconds": activity.interval,
        "history": [{"unix_seconds": s.unix_seconds, "hits": s.hits, "misses": s.misses,
                     "peer_bytes": s.peer_bytes} for s in activity.history],
    }


def _misses(misses: RecentMisses | None) -> dict[str, Any] | None:
    if misses is None:
        return None
    return {
        "by_reason": {reason.value: count for reason, count in misses.by_reason.items()},
        "recent": [{
            "unix_seconds": m.unix_seconds, "reason": m.reason.value, "status": m.status,
            "handler": m.handler, "method": printable(m.method), "path": printable(m.path),
            "registry": printable(m.registry) if m.registry is not None else None,
        } for m in reversed(misses.recent)],
    }


async def node_status(store: Store, peering: Peering | None,
                      activity: MirrorActivity | None = None,
                      misses: RecentMisses | None = None,
                      conditions: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    keys = await store.keys()
    status: dict[str, Any] = {
        "version": __version__,
        "now_unix_seconds": time.time(),
        "ready": await store.ready(),
        "store": {"keys": len(keys),
                  "tags": sorted(printable(k) for k in keys if not k.startswith("sha256:"))},
        "mesh": None,
        "mirror": _activity(activity),
        "misses": _misses(misses),
        # Startup warnings that keep pulls from the mirror (containerd's config), with fixes.
        "conditions": [dict(c) for c in conditions],
    }
    if peering is None:
        return status
    summary = peering.publisher.current
    members = _members(peering)
    status["mesh"] = {
        "node": printable(peering.config.node_name),
        "registry": peering.config.http_base,
        "summary": None if summary is None else {"epoch": int(summary.epoch),
                                                 "keys": int(summary.count)},
        "peer_summaries_share": float(peering.directory.share()),
        "members_by_state": {s: sum(1 for m in members if m["state"] == s) for s in STATES},
        "members": members,
        "undecryptable": _undecryptable(peering),
    }
    return status


def _undecryptable(peering: Peering) -> dict[str, Any]:
    by_source, age = peering.mesh.undecryptable()
    warning = None
    if age is not None and age <= KEY_MISMATCH_WINDOW_SECONDS:
        warning = (f"gossip key mismatch: {sum(by_source.values())} packets or streams from "
                   f"{', '.join(sorted(by_source))} could not be decrypted, the latest "
                   f"{age:.0f} s ago; those nodes hold another gossip key (or none), so "
                   "the mesh is split (docs/faq.md#gossip-key)")
    return {"by_source": by_source, "seconds_since_last": age, "warning": warning}
