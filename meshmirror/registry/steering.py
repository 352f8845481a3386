"""Per-source accept queues: the registry port as a group of listening sockets, with the
kernel choosing each new connection's socket from its source address.

A connect storm from one pod cost the node 20-35 µs of CPU per connection, most of it
in the kernel's accept and close (issue 23): accepting faster cannot help, the node has
to accept fewer of them. One listen backlog for everyone cannot tell the storm from
containerd. So the port is ``QUEUES`` sockets bound with SO_REUSEPORT to one address,
and a classic BPF program (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5+) picks the socket:

- queue 0 for sources that are the node's own addresses (what it listens on and
  advertises, and loopback): containerd on the node dials the node's address, so its
  connections never share a queue with a pod;
- queues 1..QUEUES-1 for every other source, by a hash of its address.

The server (`meshmirror.registry.server`) then accepts from each hashed queue at a
bounded rate; a queue out of tokens is not read, its backlog fills, and the kernel
drops that queue's further SYNs: the storm's retransmits are the attacker's cost, and
the node does no work for them. docs/security.md says what a pod whose address hashes
into an attacker's queue sees.

The program reads the IP header through SKF_NET_OFF (a reuseport program's packet data
starts past the TCP header). A dual-stack IPv6 socket also gets IPv4 packets, so the
version nibble decides which header it is.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from meshmirror.addresses import bind_socket
from meshmirror.registry.serveroptions import BACKLOG

__all__ = ["QUEUES", "Listeners", "bind_listener", "bind_listeners", "own_addresses",
           "source_queue", "steering_program"]

QUEUES: Final = 16
"""Listening sockets per steered port: queue 0 for the node's own addresses, and 15
hashed queues, so an honest source shares an attacker's queue with odds of 1 in 15."""

_SO_ATTACH_REUSEPORT_CBPF: Final = 51
_SKF_NET_OFF: Final = -0x100000
# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_ALU_AND_K, _ALU_RSH_K, _ALU_MUL_K = 0x54, 0x74, 0x24
_ALU_MOD_K, _ALU_ADD_K, _ALU_XOR_X = 0x94, 0x04, 0xAC
_JMP_JEQ_K, _JMP_JA = 0x15, 0x05
_TAX, _RET_K, _RET_A = 0x07, 0x06, 0x16
# IPv4: source at 12; IPv6: source at 8, 16 bytes.
_V4_SOURCE, _V6_SOURCE = 12, 8

_LOOPBACK: Final = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listeners:
    """The listening sockets of one port; ``sockets[0]`` is the reserved queue when
    ``steered``, else the only socket."""

    sockets: Sequence[socket.socket]
    steered: bool

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def own_addresses(hosts: Iterable[str]) -> tuple[Address, ...]:
    """The IP literals among ``hosts`` (flags' hosts: names and wildcards are skipped),
    with loopback, IPv4-mapped ones as IPv4: the sources queue 0 is for."""
    found: list[Address] = list(_LOOPBACK)
    for host in hosts:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_unspecified and address not in found:
            found.append(address)
    return tuple(found)


# An instruction whose jumps name labels, resolved by `_assemble`.
_Op = tuple[int, str | None, str | None, int]


def _mix(queues: int) -> list[_Op | str]:
    """A (the source's word) mixed into 1..queues-1 and returned: murmur3's finaliser,
    so nearby addresses (a pod subnet) spread over the queues."""
    return [(_TAX, None, None, 0), (_ALU_RSH_K, None, None, 16), (_ALU_XOR_X, None, None, 0),
            (_ALU_MUL_K, None, None, 0x45D9F3B), (_TAX, None, None, 0),
            (_ALU_RSH_K, None, None, 16), (_ALU_XOR_X, None, None, 0),
            (_ALU_MOD_K, None, None, queues - 1), (_ALU_ADD_K, None, None, 1),
            (_RET_A, None, None, 0)]


def source_queue(source: Address, own: Sequence[Address], queues: int = QUEUES) -> int:
    """The queue `steering_program` picks for ``source``, computed here: for tests, and
    for an operator asking which sources share a queue."""
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    if source in own:
        return 0
    if source.version == 4:
        word = int(source)
    else:
        words = struct.unpack("!4I", source.packed)
        word = words[2] ^ words[3]
    word ^= word >> 16
    word = (word * 0x45D9F3B) & 0xFFFFFFFF
    word ^= word >> 16
    return word % (queues - 1) + 1


def _assemble(ops: list[_Op | str]) -> bytes:
    labels: dict[str, int] = {}
    index = 0
    for op in ops:
        if isinstance(op, str):
            labels[op] = index
        else:
            index += 1
    code: list[bytes] = []
    index = 0
    for op in ops:
        if isinstance(op, str):
            continue
        opcode, true, false, k = op
        jt = labels[true] - index - 1 if true else 0
        jf = labels[false] - index - 1 if false else 0
        if opcode == _JMP_JA:
            k, jt = jt, 0
        code.append(struct.pack("HBBI", opcode, jt, jf, k & 0xFFFFFFFF))
        index += 1
    return b"".join(code)


def steering_program(own: Sequence[Address], queues: int = QUEUES) -> bytes:
    """The classic BPF program, as struct sock_filter's: 0 for a source in ``own``, else
    a hash of the source into 1..queues-1."""
    # A conditional jump reaches at most 255 instructions ahead, so every jump here is
    # short: a match is followed by its own "return 0", and the one long way (past the
    # IPv4 part) is an unconditional jump, whose offset is 32 bits. (One shared
    # "return 0" at the end put it out of reach with 30 IPv6 or some 240 IPv4 own
    # addresses, and the node failed to start.)
    net = _SKF_NET_OFF
    ret_own = (_RET_K, None, None, 0)
    ops: list[_Op | str] = [(_LD_B_ABS, None, None, net), (_ALU_AND_K, None, None, 0xF0),
                            (_JMP_JEQ_K, None, "v4", 0x60), (_JMP_JA, "v6", None, 0), "v4",
                            (_LD_W_ABS, None, None, net + _V4_SOURCE)]
    for n, address in enumerate(a for a in own if a.version == 4):
        after = f"v4-{n + 1}"
        ops += [(_JMP_JEQ_K, None, after, int(address)), ret_own, after]
    ops += [*_mix(queues), "v6"]
    for n, address6 in enumerate(a for a in own if a.version == 6):
        words = struct.unpack("!4I", address6.packed)
        after = f"v6-{n + 1}"
        for w, word in enumerate(words):
            ops += [(_LD_W_ABS, None, None, net + _V6_SOURCE + 4 * w),
                    (_JMP_JEQ_K, None, after, word)]
        ops += [ret_own, after]
    ops += [(_LD_W_ABS, None, None, net + _V6_SOURCE + 8), (_TAX, None, None, 0),
            (_LD_W_ABS, None, None, net + _V6_SOURCE + 12), (_ALU_XOR_X, None, None, 0),
            *_mix(queues)]
    return _assemble(ops)


def _attach(sock: socket.socket, program: bytes) -> None:
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)


def bind_listener(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on host:port; OSError (e.g. address in use) if it cannot be.

    Port-only listens on IPv6 and IPv4 alike (`meshmirror.addresses.bind_socket`)."""
    sock = bind_socket(host, port)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(host: str, port: int, backlog: int, own: Sequence[Address],
                   source_backlog: int, queues: int = QUEUES) -> tuple[Listeners, str | None]:
    """The port's listeners, listening and non-blocking, and why they are not steered
    (None when they are). OSError (address in use) if the port cannot be had at all.

    Whether the port is free is asked first with a plain socket, which every other
    socket on it conflicts with: a socket that has SO_REUSEPORT could otherwise join a
    group some other process of this user already holds. Port 0 is bound by the first
    socket of the group (the kernel never shares a port it picks), the rest to the port
    it got."""
    probe = bind_socket(host, port)
    if port == 0:
        probe.close()
    sockets: list[socket.socket] = []
    try:
        if port:
            probe.close()  # free: the group binds it now
        for index in range(queues):
            sock = bind_socket(host, port, reuse_port=True)
            sockets.append(sock)
            port = sock.getsockname()[1]
            if index == 0:
                _attach(sock, steering_program(own, queues))
        for index, sock in enumerate(sockets):
            sock.listen(backlog if index == 0 else min(backlog, source_backlog))
            sock.setblocking(False)
        return Listeners(sockets, True), None
    except OSError as err:
        for sock in sockets:
            sock.close()
        reason = errno.errorcode.get(err.errno or 0) or str(err)
    return Listeners([bind_listener(host, port, backlog)], False), reason
