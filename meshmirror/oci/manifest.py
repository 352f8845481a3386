"""Parse manifests and indexes just far enough to walk them to their children.

Manifests reach meshmirror from local stores and, in mirror mode, from peers, so
parsing treats its input as hostile: the size is bounded before decoding, every
field is type-checked, and every failure is a :class:`ManifestError` (a
``ValueError``) with a one-line reason, never a ``KeyError`` or ``TypeError``
leaking from deep inside. Only what walking needs is modelled; unknown fields are
ignored as the specs require.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshmirror.oci import mediatypes as mt
from meshmirror.oci.digest import Digest, DigestError

# Distribution refuses manifests over 4 MiB; so do we, before decoding a byte.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


class ManifestError(ValueError):
    """Bytes that are not a manifest or index meshmirror can walk."""


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest or an index; ``manifests`` is empty for the former,
    ``config``/``layers`` for the latter."""

    media_type: str
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    manifests: tuple[Descriptor, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def is_index(self) -> bool:
        return mt.is_index(self.media_type)

    def children(self) -> tuple[Descriptor, ...]:
        """What a pull fetches next: an index's manifests, or a manifest's config and layers."""
        if self.is_index:
            return self.manifests
        assert self.config is not None  # guaranteed by parse_manifest for manifest types
        return (self.config, *self.layers)


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    return dict(value)


def _platform(value: Any, where: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: platform must be an object")
    os_, arch, variant = value.get("os"), value.get("architecture"), value.get("variant")
    if not isinstance(os_, str) or not isinstance(arch, str):
        raise ManifestError(f"{where}: platform needs string os and architecture")
    if variant is not None and not isinstance(variant, str):
        raise ManifestError(f"{where}: platform variant must be a string")
    return Platform(os_, arch, variant or None)


def parse_descriptor(value: Any, where: str = "descriptor") -> Descriptor:
    """Validate one descriptor object (mediaType, digest, size, annotations, platform)."""
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: must be an object")
    media_type, digest_text, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where}: mediaType must be a non-empty string")
    if not isinstance(digest_text, str):
        raise ManifestError(f"{where}: digest must be a string")
    try:
        digest = Digest.parse(digest_text)
    except DigestError as err:
        raise ManifestError(f"{where}: {err}") from err
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"{where}: size must be a non-negative integer")
    return Descriptor(media_type, digest, size,
                      _str_map(value.get("annotations"), where),
                      _platform(value.get("platform"), where))


def _decode(data: bytes, max_size: int) -> dict[str, Any]:
    if len(data) > max_size:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {max_size} byte limit")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"manifest is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ManifestError("manifest JSON is nested too deeply") from err
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be a JSON object")
    return doc


def detect_media_type(doc: Mapping[str, Any]) -> str:
    """The document's own mediaType, or (when absent, as older OCI writers allow) its shape."""
    declared = doc.get("mediaType")
    if declared is not None:
        if not isinstance(declared, str):
            raise ManifestError("mediaType must be a string")
        if not mt.is_manifest_like(declared):
            raise ManifestError(f"unsupported manifest media type {declared[:100]!r}")
        return declared.split(";", 1)[0].strip().lower()
    if "manifests" in doc:
        return mt.OCI_INDEX
    if "config" in doc and "layers" in doc:
        return mt.OCI_MANIFEST
    raise ManifestError("cannot tell the manifest type: no mediaType, manifests or config/layers")


def parse_manifest(data: bytes, media_type: str | None = None, *,
                   max_size: int = MAX_MANIFEST_SIZE) -> Manifest:
    """Parse a manifest or index; ``media_type`` is what a descriptor or header claimed.

    A claimed type that contradicts the document's own ``mediaType`` is an error:
    the OCI spec requires them to agree, and a mismatch is how a confused or
    hostile source would make a client walk the wrong structure.
    """
    doc = _decode(data, max_size)
    version = doc.get("schemaVersion")
    if version == 1 and not isinstance(version, bool):
        raise ManifestError("schema1 manifests are not supported")
    if version != 2 or isinstance(version, bool):
        raise ManifestError("schemaVersion must be 2")
    if media_type is not None:
        claimed = media_type.split(";", 1)[0].strip().lower()
        if not mt.is_manifest_like(claimed):
            raise ManifestError(f"{media_type[:100]!r} is not a manifest media type")
        if "mediaType" in doc:
            kind = detect_media_type(doc)
            if kind != claimed:
                raise ManifestError(f"document says {kind!r} but was served as {claimed!r}")
        else:
            kind = claimed
    else:
        kind = detect_media_type(doc)
    annotations = _str_map(doc.get("annotations"), "manifest")
    if mt.is_index(kind):
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index: manifests must be a list")
        return Manifest(kind, manifests=tuple(parse_descriptor(e, f"index.manifests[{i}]")
                                              for i, e in enumerate(entries)),
                        annotations=annotations)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError("manifest: layers must be a list")
    return Manifest(kind, config=parse_descriptor(doc.get("config"), "manifest.config"),
                    layers=tuple(parse_descriptor(e, f"manifest.layers[{i}]")
                                 for i, e in enumerate(layers)),
                    annotations=annotations)
