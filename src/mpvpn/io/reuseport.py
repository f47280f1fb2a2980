"""A group of UDP sockets on one address and port, one per worker, with the
kernel choosing each datagram's socket by its SMPU session id
(:mod:`mpvpn.core.shard`; Linux >= 4.5 for SO_ATTACH_REUSEPORT_CBPF).

The kernel numbers a group's sockets in the order they were bound, and
when one closes it moves the last one into its place: whoever owns the
group keeps every socket open for as long as the group is used (a worker
that dies must not take its index with it), and binds them in order here.
"""

from __future__ import annotations

import array
import socket
import struct

from mpvpn.core.shard import reuseport_program
from mpvpn.io import udp

SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h
SOCK_FILTER = struct.Struct("@HBBI")  # struct sock_filter (linux/filter.h): code, jt, jf, k
SOCK_FPROG = struct.Struct("@HP")  # struct sock_fprog: len, then (aligned) the filter's address


def attach_program(sock: socket.socket, n: int) -> None:
    """Attach the session-id program for ``n`` sockets to ``sock``'s group
    (any member will do: the program belongs to the group).  The kernel
    copies the instructions during the call; ``array`` gives their address
    (no ctypes: OpenWrt packages it apart from python3-light)."""
    prog = reuseport_program(n)
    insns = array.array("B", b"".join(SOCK_FILTER.pack(*i) for i in prog))
    fprog = SOCK_FPROG.pack(len(prog), insns.buffer_info()[0])
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as e:
        raise OSError(e.errno, f"cannot steer datagrams to workers by session "
                               f"(SO_ATTACH_REUSEPORT_CBPF, Linux >= 4.5): {e.strerror}") from None


def open_group(bind_ip: str, port: int, n: int, device: str | None = None,
               opener=udp.open_uplink) -> list[socket.socket]:
    """``n`` non-blocking UDP sockets bound to ``bind_ip:port`` (``opener``:
    :func:`mpvpn.io.udp.open_uplink`'s checks and options), in index order,
    with the session-id program attached.  ``port`` 0: the port the first
    one got, for all."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(opener(bind_ip, port, device, reuseport=True))
            port = socks[0].getsockname()[1]
        attach_program(socks[0], n)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
