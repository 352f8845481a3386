"""A real forward proxy (Debian's tinyproxy) in the foreground with its own config.

Its log gets a ``Request (file descriptor N): GET http://HOST:PORT/... HTTP/1.1``
line per proxied request (``CONNECT HOST:PORT`` for tunnels), so a test can prove
traffic went through it, or that none did. Started by the caller's thread, so a
thread inside a network namespace starts it there (see ``tests.support.netns``).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.processes import spawn, stop, wait_until

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+)")


class Tinyproxy:
    """``with Tinyproxy(host, port, allow="10.0.0.0/8") as proxy:`` on ``proxy.url``."""

    def __init__(self, host: str, port: int, *, allow: str,
                 connect_ports: tuple[int, ...] = (443,)) -> None:
        self.host = host
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="tinyproxy-"))
        self.log = self.dir / "tinyproxy.log"
        self.config = self.dir / "tinyproxy.conf"
        self.config.write_text(
            f"Port {port}\nListen {host}\nTimeout 30\nMaxClients 50\n"
            f"Allow {allow}\nLogFile \"{self.log}\"\nLogLevel Info\n"
            "DisableViaHeader Yes\n"
            + "".join(f"ConnectPort {p}\n" for p in connect_ports))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy took, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]

    def _listening(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"tinyproxy exited {self._proc.returncode}: "
                               f"{self.log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self) -> Tinyproxy:
        self._proc = spawn(["tinyproxy", "-d", "-c", str(self.config)], self.dir / "stdout.log")
        try:
            wait_until(self._listening, 10, f"tinyproxy on {self.host}:{self.port}")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
