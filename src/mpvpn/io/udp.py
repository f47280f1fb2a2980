"""UDP sockets, one per local uplink, bound to the uplink's address (and to
its device, so a subflow really leaves through its own carrier even when the
router has several default routes).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
import time

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # linux/udp.h: send one buffer as many equal datagrams (GSO)
UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams of one flow
BUFFER = 4 << 20  # SO_SNDBUF, and SO_RCVBUF when none is configured (the kernel caps both at *mem_max)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # as root: beyond net.core.rmem_max
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # stay under the 64 KiB IP datagram limit
_CMSG_SPACE = socket.CMSG_SPACE(4)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # == SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq") if struct.calcsize("@l") == 8 else struct.Struct("@ll")
_CMSG_SPACE_STAMPED = _CMSG_SPACE + socket.CMSG_SPACE(_TIMESPEC.size)
_ORDER = sys.byteorder  # cmsg values are host-order integers


class UplinkUnavailable(OSError):
    """The uplink's address is not (yet) configured here: retry later."""


def rcvbuf_from_env(environ=os.environ) -> int | None:
    """SO_RCVBUF in bytes from ``MPVPN_UDP_RCVBUF`` (a bench knob), or None."""
    v = environ.get("MPVPN_UDP_RCVBUF", "")
    return int(v) if v.isdigit() and int(v) > 0 else None


def set_rcvbuf(s: socket.socket, size: int, force: bool = True) -> None:
    """SO_RCVBUF = ``size`` bytes (the kernel accounts twice that);
    ``force``: also beyond net.core.rmem_max where allowed (SO_RCVBUFFORCE,
    root): the configured queue, not whatever the host's sysctl caps it at."""
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE if force else socket.SO_RCVBUF, size)
    except OSError:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


def open_uplink(bind_ip: str, port: int, device: str | None = None,
                buffer: int = BUFFER, reuseport: bool = False, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking UDP socket bound to ``bind_ip:port`` (and ``device``);
    ``reuseport``: one of a group of sockets on that address and port
    (SO_REUSEPORT; :mod:`mpvpn.io.reuseport`); ``rcvbuf``: its receive
    buffer in bytes, applied as given (``base.rx_buffer``; ``MPVPN_UDP_RCVBUF``
    overrides it); None: ``buffer``, capped by the kernel at rmem_max.  When
    this agent is the bottleneck, bulk TCP keeps it full and every other
    packet waits behind it.

    Raises :class:`UplinkUnavailable` when the address is absent (a DHCP or
    PPPoE uplink that is not up yet) and ``OSError`` with a clear message
    for anything else.
    """
    ip = ipaddress.ip_address(bind_ip)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        asked = rcvbuf_from_env() or rcvbuf
        set_rcvbuf(s, asked or buffer, force=asked is not None)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        except OSError:
            pass
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15), 1)
        if device:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode() + b"\0")
            except OSError as e:
                raise OSError(e.errno, f"cannot bind to device {device!r}: {e.strerror}") from None
        try:
            # Coalesced receive (GRO): one recvmsg may return many datagrams
            # of one subflow; see recv_batch.  Older kernels: plain receive.
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass
        try:
            s.bind((str(ip), port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UplinkUnavailable(e.errno, f"address {ip} is not configured on this host") from None
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"{ip}:{port} is already in use (another agent running?)") from None
            raise OSError(e.errno, f"cannot bind {ip}:{port}: {e.strerror}") from None
        return s
    except BaseException:
        s.close()
        raise


def sockaddr(addr: str, port: int) -> tuple:
    """The sendto() address for ``addr:port`` (IPv4 or IPv6)."""
    ip = ipaddress.ip_address(addr)
    return (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)


class BatchSocket:
    """Send/receive many datagrams per system call where the kernel allows.

    ``send(datagrams, addr)``: consecutive datagrams of equal size (the last of
    a run may be shorter) go out in one ``sendmsg`` with UDP_SEGMENT (UDP GSO,
    Linux >= 4.18); the kernel or the NIC cuts them into datagrams identical
    to sending them one by one.  Falls back to one ``sendto`` each if the
    kernel refuses.  ``recv()``: one ``recvmsg``, split by the UDP_GRO segment
    size if the kernel coalesced several datagrams.
    """

    __slots__ = ("sock", "gso", "tx_calls", "rx_calls", "_on_stamp", "_cmsg_space")

    def __init__(self, sock: socket.socket, gso: bool = True):
        self.sock = sock
        self.gso = gso
        self.tx_calls = 0
        self.rx_calls = 0
        self._on_stamp = None
        self._cmsg_space = _CMSG_SPACE

    def stamp(self, on_stamp) -> None:
        """Ask the kernel for receive timestamps (SO_TIMESTAMPNS): each
        ``recv`` then calls ``on_stamp(seconds the datagrams waited in the
        socket, how many)`` (mpvpn.agent.latency; a debugging aid)."""
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._on_stamp = on_stamp
        self._cmsg_space = _CMSG_SPACE_STAMPED

    def send(self, datagrams: list, addr) -> int:
        """Send all; returns how many could not be sent (counted by the caller)."""
        sock = self.sock
        failed = 0
        i, n = 0, len(datagrams)
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            if self.gso:
                limit = min(n, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // size))
                while j < limit and len(datagrams[j]) == size:
                    j += 1
                if j < limit and len(datagrams[j]) < size:
                    j += 1  # a shorter last segment is allowed
            try:
                self.tx_calls += 1
                if j - i == 1:
                    sock.sendto(datagrams[i], addr)
                else:
                    sock.sendmsg([b"".join(datagrams[i:j])],
                                 [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, _ORDER))], 0, addr)
            except (BlockingIOError, InterruptedError):
                failed += j - i
            except OSError as e:
                if j - i > 1 and e.errno in (errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO):
                    self.gso = False  # this kernel/path cannot: one by one from now on
                    continue
                failed += j - i
            i = j
        return failed

    def recv(self) -> tuple[list, object]:
        """One receive: (datagrams, source address); raises BlockingIOError when empty."""
        data, anc, _flags, addr = self.sock.recvmsg(65535, self._cmsg_space)
        self.rx_calls += 1
        out = stamp = None
        if anc:
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    # an int in host byte order (big-endian on MIPS routers)
                    seg = int.from_bytes(value[:4], _ORDER) if len(value) >= 4 else 0
                    if 0 < seg < len(data):
                        out = [data[k:k + seg] for k in range(0, len(data), seg)]
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(value)
                    stamp = sec + nsec * 1e-9
        if out is None:
            out = [data]
        if stamp is not None and self._on_stamp is not None:
            self._on_stamp(time.time() - stamp, len(out))
        return out, addr
