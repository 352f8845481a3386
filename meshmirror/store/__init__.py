"""Where a node's image content lives: the Store interface and its implementations.

`base` holds the interface; `memory` an in-memory store for tests; `ocilayout`
an OCI image-layout directory. The containerd-backed store lives in
`meshmirror.containerd.store` because it is mostly containerd plumbing.
"""

from meshmirror.store.base import BlobInfo, KeyEvent, NotFoundError, Store

__all__ = ["BlobInfo", "KeyEvent", "NotFoundError", "Store"]
