"""Network namespaces a test creates, and a way into them without leaving this machine.

A namespace starts with nothing but its own loopback: no route off the machine,
so a test whose code under test might (wrongly) dial a link-local or an outside
address runs it in one and nothing can leave. Namespaces joined by a veth pair
reach each other's addresses and nothing else; those addresses are only ever
dialled from inside a namespace (from the root namespace they would route off
the machine).

``with ns.inside():`` moves the calling thread (only it: a network namespace is
per thread) into the namespace; sockets it creates meanwhile, and processes it
starts, belong to the namespace for their whole life. Every namespace is deleted
by ``close``, which tests call in a ``finally`` (or through the context manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator
from types import TracebackType

_CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*argv: str) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class NetNamespace:
    """``with NetNamespace("proxy") as ns:`` a fresh namespace with loopback up."""

    def __init__(self, role: str) -> None:
        self.name = f"mm-{role[:6]}-{os.getpid()}-{next(_counter)}"
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """The calling thread in this namespace for the block; back where it was after."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL, check=False)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def link(a: NetNamespace, a_address: str, b: NetNamespace, b_address: str) -> None:
    """A veth pair between two namespaces, ``a_address``/``b_address`` in CIDR form
    (``10.203.0.1/30``); the pair goes when either namespace is deleted."""
    n = next(_counter)
    left, right = f"mmv{os.getpid() % 10000}a{n}", f"mmv{os.getpid() % 10000}b{n}"
    _ip("link", "add", left, "netns", a.name, "type", "veth", "peer", "name", right,
        "netns", b.name)
    for ns, device, address in ((a, left, a_address), (b, right, b_address)):
        _ip("-n", ns.name, "addr", "add", address, "dev", device)
        _ip("-n", ns.name, "link", "set", device, "up")
