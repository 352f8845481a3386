"""``python -m meshmirror.mesh``: one bare mesh node printing membership events as JSON lines.

The multi-process tests and benchmarks run twenty of these to measure
convergence and failure detection on real sockets, without the registry.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from meshmirror.addresses import parse_host_port
from meshmirror.mesh import wire
from meshmirror.mesh.config import MeshConfig
from meshmirror.mesh.events import MemberJoined, MemberLeft, MemberUpdated, NodeInfo, UserMessage
from meshmirror.mesh.keyring import Keyring
from meshmirror.mesh.tags import decode_tags, encode_tags
from meshmirror.mesh.transport import MembershipEvent, MeshError, MeshNode


def _event_json(event: MembershipEvent, node: MeshNode) -> dict[str, Any]:
    def info(n: NodeInfo) -> dict[str, Any]:
        try:
            tags: dict[str, str] | None = decode_tags(n.meta)
        except wire.WireError:
            tags = None
        return {"node": n.name, "addr": n.addr, "port": n.port, "incarnation": n.incarnation,
                "state": n.state.name.lower(), "tags": tags}

    base: dict[str, Any] = {"time": time.time(), "self": node.name}
    if isinstance(event, MemberJoined):
        return {**base, "event": "join", **info(event.node)}
    if isinstance(event, MemberUpdated):
        return {**base, "event": "update", **info(event.node)}
    if isinstance(event, MemberLeft):
        return {**base, "event": "dead" if event.dead else "leave", **info(event.node)}
    if isinstance(event, UserMessage):
        return {**base, "event": "user", "source": event.source,
                "payload": event.payload.decode("utf-8", "replace")}
    return {**base, "event": "join_result", "contacted": event.contacted,
            "errors": list(event.errors)}


def _parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"tag must be KEY=VALUE, got {text!r}")
    return key, value


def _runner_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshmirror.mesh",
        description="one mesh node that prints membership events as JSON lines")
    parser.add_argument("--bind", required=True, metavar="HOST:PORT")
    parser.add_argument("--advertise", default=None, metavar="HOST[:PORT]")
    parser.add_argument("--name", default=socket.gethostname())
    parser.add_argument("--join", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--join-dns", default=None, metavar="NAME[:PORT]")
    parser.add_argument("--gossip-key-file", default=None, metavar="FILE")
    parser.add_argument("--tag", action="append", default=[], type=_parse_tag,
                        metavar="KEY=VALUE")
    parser.add_argument("--probe-interval", type=float, default=None)
    parser.add_argument("--probe-timeout", type=float, default=None)
    parser.add_argument("--gossip-interval", type=float, default=None)
    parser.add_argument("--suspicion-mult", type=int, default=None)
    parser.add_argument("--push-pull-interval", type=float, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one node until SIGTERM/SIGINT (leave) or SIGKILL (crash)."""
    args = _runner_args(argv)
    config = MeshConfig()
    overrides = {k: getattr(args, k) for k in ("probe_interval", "probe_timeout",
                                               "gossip_interval", "suspicion_mult",
                                               "push_pull_interval")
                 if getattr(args, k) is not None}
    try:
        config = replace(config, **overrides)
        bind = parse_host_port(args.bind)
        advertise = parse_host_port(args.advertise, default_port=0) if args.advertise else None
        joins = [parse_host_port(j) for j in args.join]
        keyring = Keyring.from_base64_file(args.gossip_key_file) if args.gossip_key_file else None
        meta = encode_tags(dict(args.tag)) if args.tag else b""
    except ValueError as err:
        print(f"mesh: {err}", file=sys.stderr)
        return 2
    node = MeshNode(config, name=args.name, bind=bind, advertise=advertise, meta=meta,
                    keyring=keyring, join=joins, join_dns=args.join_dns)
    out_lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    node.add_listener(lambda ev: emit(_event_json(ev, node)))
    try:
        node.start()
    except MeshError as err:
        print(str(err), file=sys.stderr)
        return 1
    emit({"time": time.time(), "event": "ready", "self": args.name, "addr": node.address[0],
          "port": node.address[1], "incarnation": node.incarnation})
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def commands() -> None:
        # "members" on stdin prints the current member list, for tests to poll.
        for line in sys.stdin:
            if line.strip() == "members":
                emit({"time": time.time(), "event": "members", "self": args.name,
                      "members": [{"node": m.name, "state": m.state.name.lower(),
                                   "incarnation": m.incarnation}
                                  for m in node.members(include_dead=True)]})

    threading.Thread(target=commands, daemon=True).start()
    done.wait()
    node.stop(leave=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
