"""meshmirror.upstream stays below the mirror: it imports none of the layers that use it."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("meshmirror.mirror", "meshmirror.peering", "meshmirror.node", "meshmirror.cli",
             "meshmirror.mesh", "meshmirror.registry", "meshmirror.routing")


def test_imports_nothing_of_the_mirror_or_node() -> None:
    code = ("import json, sys, meshmirror.upstream; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('meshmirror'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    loaded = json.loads(done.stdout)
    assert [m for m in loaded if m.startswith(FORBIDDEN)] == []
