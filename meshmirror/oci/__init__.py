"""The OCI data model: digests, references, media types and manifest walking.

Pure functions and immutable values only, so every other layer (store, registry,
mirror) can share one definition of what a valid name or digest is.
"""
