"""The mirror: serve what the local store lacks from peers, verified.

`PeerMirror` is the registry's `Fallback`. It asks the router for candidates,
fetches from them with bounded waits and hedging, verifies every byte against
its digest (holding blobs in a cache file until they verify, one fetch per blob
per node however many requests want it), resumes a
broken transfer on the next peer with ``Range``, and answers a miss at once so
containerd goes upstream.

- `peer_mirror`: `PeerMirror`, what to fetch and how to hold it until verified;
- `fetch`: `BlobFetch`, one blob across peers (verify, resume with Range, stream);
- `client`: `PeerClient`, every request to a peer (bounds, in-flight, blame, body threads);
- `hedging`: the generic race behind hedged requests;
- `flight`, `cache`: one fetch per blob per node, held in a bounded on-disk cache;
- `body`: reading bodies on threads.
"""
