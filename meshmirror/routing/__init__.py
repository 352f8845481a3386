"""Content routing: which peer probably holds a key, answered in microseconds.

The data flow, in the order a key travels:

- ``bloom``      Bloom filters whose bit positions every node computes alike
- ``publisher``  keeps this node's filter in step with its store and versions it
- ``summary``    the summary exchange: byte format, ETag, HTTP endpoint and fetch
- ``directory``  the latest summary of every alive peer, fetched when epochs move
- ``router``     ranks candidate peers for a key by filter match and peer health

Membership (who is alive, which epoch they advertise) comes from `meshmirror.mesh`
through `meshmirror.peering`; nothing here imports the mesh.
"""
