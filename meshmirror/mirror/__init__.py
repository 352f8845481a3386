"""The mirror: serve what the local store lacks from peers, verified.

`PeerMirror` is the registry's `Fallback`. It asks the router for candidates,
fetches from them with bounded waits and hedging, verifies every byte against
its digest (holding large blobs in a spool file until they verify), resumes a
broken transfer on the next peer with ``Range``, and answers a miss at once so
containerd goes upstream.
"""
