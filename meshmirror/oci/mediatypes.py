"""Media types meshmirror must recognise, in both OCI and Docker v2 spellings.

containerd, Distribution and skopeo still exchange Docker schema2 manifests
alongside OCI ones, and a mirror that only knew one family would 404 on half the
images in a cluster. Schema1 is deliberately absent: it is deprecated, unsigned
by digest in the same way, and containerd 1.6 only converts it on pull.
"""

from __future__ import annotations

from typing import Final

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Content of the `oci-layout` file every image-layout directory carries.
OCI_LAYOUT_VERSION: Final = "1.0.0"

MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

# The Accept header containerd 1.6's resolver sends on a manifest HEAD/GET, in
# its order; a registry that negotiates on Accept must serve all four.
CONTAINERD_ACCEPT: Final = ", ".join(
    (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*")
)


def _base(media_type: str) -> str:
    """Drop parameters (``; charset=...``) and case so header values compare equal."""
    return media_type.split(";", 1)[0].strip().lower()


def is_manifest(media_type: str | None) -> bool:
    """A single-platform image manifest (OCI or Docker schema2)."""
    return media_type is not None and _base(media_type) in MANIFEST_TYPES


def is_index(media_type: str | None) -> bool:
    """A multi-platform index (OCI index or Docker manifest list)."""
    return media_type is not None and _base(media_type) in INDEX_TYPES


def is_manifest_like(media_type: str | None) -> bool:
    """Anything served from /manifests/ rather than /blobs/."""
    return is_manifest(media_type) or is_index(media_type)
