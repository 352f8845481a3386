"""meshmirror: a stateless, cluster-local OCI registry mirror over a SWIM gossip mesh."""

__version__ = "0.1.0"
