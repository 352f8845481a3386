"""Debian's headless Chromium through Playwright, kept on this machine."""

from __future__ import annotations

from typing import Any


def launch_chromium(playwright: Any, host: str) -> Any:
    """A Chromium browser that resolves only ``host``.

    Resolver rules keep Chromium's own traffic (sign-in, component updates) from
    leaving the machine: every name but the loopback ones maps to nothing.
    """
    return playwright.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-background-networking",
              "--disable-component-update", "--no-first-run",
              f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {host}"])
