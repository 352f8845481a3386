"""Pushing an OCI layout into a test registry with skopeo, with or without credentials."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from meshmirror.oci.digest import Digest


def push_layout(layout: Path, tag: str, registry_address: str, repository: str,
                creds: tuple[str, str] | None = None, timeout: float = 120.0) -> Digest:
    """``skopeo copy oci:LAYOUT:TAG docker://ADDRESS/REPO:TAG``; the digest the registry now holds.

    Digests are preserved, so the returned digest is the layout's own manifest
    (or index) digest, as skopeo reports it in its ``--digestfile``.
    """
    with tempfile.TemporaryDirectory(prefix="skopeo-") as tmp:
        digestfile = Path(tmp) / "digest"
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                "--preserve-digests", "--digestfile", str(digestfile)]
        if creds is not None:
            argv += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
        argv += [f"oci:{layout}:{tag}", f"docker://{registry_address}/{repository}:{tag}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy failed: {done.stderr.strip()}")
        return Digest.parse(digestfile.read_text().strip())
