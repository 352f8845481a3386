"""Membership: a port of HashiCorp memberlist (SWIM + Lifeguard), wire-compatible with it.

The mesh carries who is alive and each member's metadata (Serf tags); it knows
nothing of content, summaries or registries.

One file per protocol concern, as memberlist does it:

- ``config``     every tunable, with memberlist's LAN defaults, in one place
- ``messages``   the protocol's messages as small immutable values
- ``wire``       msgpack codec: message types, compound, CRC, label framing
- ``compress``   LZW compression exactly as Go's compress/lzw produces it
- ``keyring``    AES-GCM keys and packet encryption (serf -encrypt compatible)
- ``state``      the sans-IO SWIM state machine (probe, suspect, dead, push-pull)
- ``suspicion``  Lifeguard's shrinking suspicion timeout
- ``awareness``  Lifeguard's local-health multiplier
- ``queue``      the transmit-limited broadcast queue
- ``events``     effects and membership events the core emits
- ``tags``       Serf's tag encoding of node metadata
- ``transport``  the asyncio UDP/TCP adapter, on its own thread and event loop
- ``metrics``    a Prometheus collector read at scrape time
- ``simulator``  the same core on a virtual clock and a lossy network
- ``__main__``   ``python -m meshmirror.mesh``: one bare node printing events as JSON
"""
