"""UDP sockets, one per local uplink, bound to the uplink's address (and to
its device, so a subflow really leaves through its own carrier even when the
router has several default routes).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
BUFFER = 4 << 20


class UplinkUnavailable(OSError):
    """The uplink's address is not (yet) configured here: retry later."""


def open_uplink(bind_ip: str, port: int, device: str | None = None,
                buffer: int = BUFFER) -> socket.socket:
    """A non-blocking UDP socket bound to ``bind_ip:port`` (and ``device``).

    Raises :class:`UplinkUnavailable` when the address is absent (a DHCP or
    PPPoE uplink that is not up yet) and ``OSError`` with a clear message
    for anything else.
    """
    ip = ipaddress.ip_address(bind_ip)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, buffer)
            except OSError:
                pass
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if device:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode() + b"\0")
            except OSError as e:
                raise OSError(e.errno, f"cannot bind to device {device!r}: {e.strerror}") from None
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
