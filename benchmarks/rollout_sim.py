"""Rollout, simulated: N nodes pull one new image at once through owners and fan-out trees.

The real-process benchmark (`bench_rollout`) runs a handful of containerd
nodes; this model answers what the machine cannot run: 100, 1,000 and 5,000
nodes pulling a 1 GB image at the same moment. It uses `routing.owner`'s real
trees (the same function the nodes call), so what it measures is the shape
those trees give, under a fluid model of the network:

- every node has its own NIC, full duplex, ``bandwidth`` (1 Gbit/s by default)
  times a factor drawn uniformly from 0.8-1.2, and a one-way latency drawn from
  0.2-1 ms to the cluster's switch; the upstream is ``upstream_rtt`` away and
  serves each connection as fast as the node can take it (the case where a
  mirror matters least: a slower upstream only favours the mirror);
- each tree edge (parent -> reader, one blob or one stripe) opens once the
  parent has its first byte plus the round trip between them, and moves at an
  equal share of the parent's upload and the reader's download, never ahead of
  the bytes the parent has (readers follow the download, cut-through);
- every blob of the image is asked for at once (containerd fetches layers
  concurrently), and a node has the image when it has every blob.

"alone" is one node of nominal bandwidth pulling the image from the upstream
with nothing else going on; "per-blob" is one tree per blob (what the wire does
for smaller blobs, or from an upstream that ignores ``Range``), "striped" what
it does for blobs of at least F * 16 MiB: F stripes with rotated trees (see
`routing.owner`, `mirror.rollout.TreeSource`), asked for once the node has
learnt the blob's size from its first answer through stripe 0's tree. Upstream
bytes count every
byte the roots fetched, plus, in the "disagreement" column, what a second
owner fetches while some nodes have not yet seen one member join.
Equal sharing does not hand one edge's unused share to another, so the model
errs on the slow side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from benchmarks.results import (
    BenchRun,
    Section,
    Table,
    Target,
    cluster_sizes,
    load_since,
    utc_now,
)
from meshmirror.routing.owner import (
    DEFAULT_FANOUT,
    MIN_STRIPE,
    FanoutTree,
    stripe_count,
    stripe_range,
    tree_depth,
)

GB = 1_000_000_000
MB = 1_000_000
# A typical large image: a few big layers and a tail of small ones, 1 GB in all.
LAYERS_MB = (420, 260, 150, 80, 45, 25, 12, 5, 2, 1)
NOMINAL = 125 * MB  # 1 Gbit/s
UPSTREAM_RTT = 0.02
UPSTREAM = -1

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass
class Edges:
    """One row per (blob or stripe, reader): who sends, who receives, how much, when."""

    parent: Ints  # node index, or UPSTREAM
    child: Ints
    size: Floats
    feed: Ints  # the edge that brings the parent these bytes, or -1 for an upstream edge
    opens: Floats  # when its first byte can flow


@dataclass
class Outcome:
    nodes: int
    mode: str
    last_s: float
    median_s: float
    upstream_bytes: float
    image_bytes: float
    max_readers: int  # the most readers a node served at once, over all blobs and stripes
    max_tree_readers: int  # the most readers of one blob or stripe on one node
    depth: int
    disagreement_upstream: float = 0.0


def layer_sizes(image_bytes: float) -> list[int]:
    total = sum(LAYERS_MB)
    return [max(1, int(image_bytes * mb / total)) for mb in LAYERS_MB]


def _digest(i: int) -> str:
    return f"sha256:{i:064x}"


def build_edges(sizes: list[int], members: list[str], fanout: int, striped: bool,
                latency: Floats, min_stripe: int) -> tuple[Edges, int]:
    index = {name: i for i, name in enumerate(members)}
    parent: list[int] = []
    child: list[int] = []
    size: list[float] = []
    feed: list[int] = []
    opens: list[float] = []
    max_tree_readers = 0
    for b, blob_size in enumerate(sizes):
        stripes = stripe_count(blob_size, fanout, min_stripe) if striped else 1
        # When each node learns the blob's size: its first answer through stripe 0's tree.
        # As on the wire, it asks for the other stripes only then.
        sized: dict[int, float] = {}
        for s in range(stripes):
            lo, hi = stripe_range(blob_size, stripes, s)
            tree = FanoutTree(_digest(b), members, fanout, s)
            edge_of: dict[int, int] = {}
            for position, name in enumerate(tree.order):  # parents before children
                node = index[name]
                up = None if position == 0 else index[tree.order[(position - 1) // fanout]]
                edge_of[node] = len(parent)
                parent.append(UPSTREAM if up is None else up)
                child.append(node)
                size.append(float(hi - lo))
                asked = sized.get(node, 0.0)
                if up is None:
                    feed.append(-1)
                    opens.append(asked + UPSTREAM_RTT + latency[node])
                else:
                    feed.append(edge_of[up])
                    opens.append(max(opens[edge_of[up]], asked)
                                 + 2 * (latency[up] + latency[node]))
                if s == 0:
                    sized[node] = opens[-1]
            max_tree_readers = max(max_tree_readers, min(fanout, len(members) - 1))
    edges = Edges(np.array(parent, dtype=np.int64), np.array(child, dtype=np.int64),
                  np.array(size), np.array(feed, dtype=np.int64), np.array(opens))
    return edges, max_tree_readers


def simulate(edges: Edges, bandwidth: Floats, dt: float) -> tuple[Floats, int]:
    """When each node has all its edges' bytes, and the most readers a node served at once."""
    n = len(bandwidth)
    got = np.zeros(len(edges.size))
    done_at = np.full(len(edges.size), np.inf)
    from_peer = edges.parent >= 0
    peer_parent = np.where(from_peer, edges.parent, 0)
    feed = np.where(edges.feed >= 0, edges.feed, 0)
    t = 0.0
    max_readers = 0
    while np.isinf(done_at).any():
        t += dt
        active = (edges.opens <= t) & np.isinf(done_at)
        out = np.bincount(peer_parent[active & from_peer], minlength=n)
        max_readers = max(max_readers, int(out.max(initial=0)))
        into = np.bincount(edges.child[active], minlength=n)
        up_share = np.where(from_peer, bandwidth[peer_parent] / np.maximum(out[peer_parent], 1),
                            np.inf)
        down_share = bandwidth[edges.child] / np.maximum(into[edges.child], 1)
        rate = np.minimum(up_share, down_share)
        ahead = np.where(from_peer, got[feed], edges.size)  # the parent's bytes, last step
        step = np.where(active, rate * dt, 0.0)
        got = np.minimum(np.minimum(got + step, edges.size), ahead)
        finished = np.isinf(done_at) & (got >= edges.size)
        done_at[finished] = t
        if t > 3600:
            raise RuntimeError("simulation did not converge within an hour of virtual time")
    node_done = np.zeros(n)
    np.maximum.at(node_done, edges.child, done_at)
    return node_done, max_readers


def disagreement_bytes(sizes: list[int], members: list[str], fanout: int, striped: bool,
                       min_stripe: int) -> float:
    """Extra upstream bytes while some nodes have not seen the last member join: every
    blob or stripe whose root differs between the two views is fetched twice."""
    without = members[:-1]
    extra = 0.0
    for b, blob_size in enumerate(sizes):
        stripes = stripe_count(blob_size, fanout, min_stripe) if striped else 1
        for s in range(stripes):
            lo, hi = stripe_range(blob_size, stripes, s)
            if (FanoutTree(_digest(b), members, fanout, s).owner
                    != FanoutTree(_digest(b), without, fanout, s).owner):
                extra += hi - lo
    return extra


def run(nodes: int, mode: str, image_bytes: float, fanout: int, seed: int,
        dt: float, min_stripe: int = MIN_STRIPE) -> Outcome:
    rng = np.random.default_rng(seed)
    sizes = layer_sizes(image_bytes)
    if mode == "alone":
        bandwidth = np.array([float(NOMINAL)])
        latency = np.array([0.0005])
        members = ["alone"]
    else:
        bandwidth = NOMINAL * rng.uniform(0.8, 1.2, nodes)
        latency = rng.uniform(0.0002, 0.001, nodes)
        members = [f"node-{i}" for i in range(nodes)]
    striped = mode == "striped"
    edges, tree_readers = build_edges(sizes, members, fanout, striped, latency, min_stripe)
    node_done, max_readers = simulate(edges, bandwidth, dt)
    upstream = float(edges.size[edges.parent == UPSTREAM].sum())
    extra = (disagreement_bytes(sizes, members, fanout, striped, min_stripe)
             if mode != "alone" else 0.0)
    return Outcome(len(members), mode, float(node_done.max()), float(np.median(node_done)),
                   upstream, float(sum(sizes)), max_readers, tree_readers,
                   tree_depth(len(members), fanout), upstream + extra)


def table(alone: Outcome, outcomes: list[Outcome]) -> Table:
    rows = [[f"{o.nodes:,}", o.mode, f"{o.last_s:.1f}", f"{o.median_s:.1f}",
             f"{o.last_s / alone.last_s:.2f}x", f"{o.upstream_bytes / o.image_bytes:.3f}x",
             f"{o.disagreement_upstream / o.image_bytes:.3f}x", str(o.depth),
             str(o.max_tree_readers), str(o.max_readers)] for o in outcomes]
    return Table(["nodes", "mode", "last node (s)", "median node (s)", "last / alone",
                  "upstream / image", "with disagreement", "depth",
                  "readers per blob/stripe (max)", "readers at once (max)"], rows)


def targets(alone: Outcome, outcomes: list[Outcome]) -> list[Target]:
    found = [o for o in outcomes if o.mode == "striped" and o.nodes == 1000]
    if not found:
        return []
    o = found[0]
    return [Target("rollout sim: last of 1,000 / one node alone", "<=", 2.0,
                   o.last_s / alone.last_s),
            Target("rollout sim: upstream bytes / image (1,000 nodes)", "<=", 1.05,
                   o.upstream_bytes / o.image_bytes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=cluster_sizes(least=2), default="100,1000,5000")
    parser.add_argument("--modes", default="per-blob,striped")
    parser.add_argument("--image-mb", type=float, default=1000.0)
    parser.add_argument("--fanout", type=int, default=DEFAULT_FANOUT)
    parser.add_argument("--dt", type=float, default=0.02, help="virtual seconds per step")
    parser.add_argument("--seed", type=int, default=1)
    bench = BenchRun(parser, argv)
    args = bench.args
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or not set(modes) <= {"per-blob", "striped"}:
        parser.error("--modes is per-blob and/or striped")
    started = time.process_time()
    image = args.image_mb * MB
    alone = run(1, "alone", image, args.fanout, args.seed, args.dt)
    print(json.dumps(asdict(alone)), flush=True)
    outcomes = []
    for n in args.sizes:
        for mode in modes:
            outcome = run(n, mode, image, args.fanout, args.seed, args.dt)
            outcomes.append(outcome)
            print(json.dumps(asdict(outcome)), flush=True)
    cpu = time.process_time() - started
    command = "python benchmarks/rollout_sim.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    section = Section(
        name="rollout_sim", title="Rollout, simulated",
        command=command.strip(), date=utc_now(), load=load_since(bench.load_before),
        setup=(f"A {image / MB:,.0f} MB image in {len(LAYERS_MB)} layers, F = {args.fanout}, "
               f"1 Gbit/s NICs x U(0.8, 1.2), 0.2-1 ms one way, upstream {UPSTREAM_RTT * 1000:g} "
               f"ms away; one node alone takes {alone.last_s:.1f} s. Fluid model, step "
               f"{args.dt:g} virtual s, seed {args.seed}; {cpu:.0f} s of CPU. Times are "
               "virtual, so the load does not change them."),
        tables=[table(alone, outcomes)],
        notes=["Without a mirror every node pulls the whole image: upstream / image = N.",
               "'per-blob': one tree per blob (the wire's way below F x 16 MiB, or when the "
               "upstream ignores Range); inner nodes upload F copies, so the largest layer "
               "moves at 1/F of a NIC below the root.",
               "'striped': the wire's way for blobs of at least F x 16 MiB: F stripes on "
               "rotated trees, asked for once stripe 0's first answer gave the size; every "
               "node uploads about what it downloads.",
               "'with disagreement': upstream bytes while some nodes have not yet seen the "
               "newest member: the blobs or stripes whose root differs between the two views "
               "are fetched by both roots.",
               "'readers at once' counts every blob's and stripe's readers of a node together: "
               "the model caps readers per tree (F), not per node, and shares a node's NIC "
               "among all of them; the real nodes cap readers per node (--rollout-fanout, a "
               "stripe's reader counting 1/F) and send the excess to another member."],
        targets=targets(alone, outcomes))
    bench.publish(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
