"""Parsing ``/v2/...`` request paths into what they ask for.

Repository names contain slashes, so a path is split from the right: the last
segment is the reference, the one before it the kind (``manifests`` or
``blobs``), everything else the name. That is unambiguous even for a repository
with a component called ``manifests``. Every part is validated here, before any
store is consulted, so nothing malformed reaches a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from meshmirror.oci.digest import Digest, DigestError
from meshmirror.oci.reference import (
    InvalidNameError,
    InvalidTagError,
    is_digest_reference,
    validate_repository,
    validate_tag,
)
from meshmirror.registry.errors import RegistryError

_PATH_LENGTH_MAX = 2048


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True, slots=True)
class V2Path:
    """A parsed request: exactly one of ``tag`` and ``digest`` is set unless kind is BASE."""

    kind: Kind
    repository: str = ""
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def parse_v2_path(path: str) -> V2Path:
    """Parse a path starting with ``/v2``; RegistryError (4xx) for anything else."""
    if path in ("/v2", "/v2/"):
        return V2Path(Kind.BASE)
    if len(path) > _PATH_LENGTH_MAX:
        raise RegistryError("NOT_FOUND", "path too long")
    if not path.startswith("/v2/"):
        raise RegistryError("NOT_FOUND")
    parts = path[len("/v2/"):].rsplit("/", 2)
    if len(parts) != 3 or parts[1] not in ("manifests", "blobs"):
        raise RegistryError("NOT_FOUND", "only manifests and blobs are served",
                            {"path": path[:200]})
    name, kind, ref = parts
    try:
        validate_repository(name)
    except InvalidNameError as err:
        raise RegistryError("NAME_INVALID", str(err), {"name": name[:200]}) from err
    if kind == "manifests" and not is_digest_reference(ref):
        try:
            return V2Path(Kind.MANIFEST, name, tag=validate_tag(ref))
        except InvalidTagError as err:
            raise RegistryError("TAG_INVALID", str(err), {"tag": ref[:200]}) from err
    try:
        digest = Digest.parse(ref)
    except DigestError as err:
        raise RegistryError("DIGEST_INVALID", str(err), {"digest": ref[:200]}) from err
    return V2Path(Kind.MANIFEST if kind == "manifests" else Kind.BLOB, name, digest=digest)
