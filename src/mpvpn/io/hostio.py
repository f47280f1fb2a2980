"""The agent's kernel objects behind one small interface: the tun vNIC,
routes and addresses (netlink), the uplinks' UDP sockets, the control TCP
sockets and whether ubusd is there.

:class:`HostIO` is the real one (Linux and OpenWrt).  Tests give the agent
an in-memory one instead (tests/fakes.py: ``MemoryHost``), so that its data
path and control wiring run without root; anything an I/O object hands back
only needs ``fileno()`` for the agent's selector plus the methods named here.
"""

from __future__ import annotations

import ipaddress
import socket

from mpvpn.io import ubus as ubusmod
from mpvpn.io.udp import BatchSocket, open_uplink


class HostIO:
    """Kernel objects of this host.  ``tun_factory(name)`` makes the vNIC
    (default :class:`mpvpn.io.tun.LinuxTun`), ``net_factory()`` the netlink
    configurator (default :class:`mpvpn.io.netcfg.NetConfig`)."""

    def __init__(self, tun_factory=None, net_factory=None):
        if tun_factory is None:
            from mpvpn.io.tun import LinuxTun as tun_factory
        if net_factory is None:
            from mpvpn.io.netcfg import NetConfig as net_factory
        self.tun_factory = tun_factory
        self.net_factory = net_factory

    def open_tun(self, name: str, queues: int = 1):
        """The vNIC: ``name``, ``fileno()``, ``read_packets()``, ``write_packets()``, ``close()``;
        ``queues`` > 1: also ``take_queue()`` (mpvpn.agent.workers)."""
        return self.tun_factory(name, queues=queues) if queues > 1 else self.tun_factory(name)

    def netconfig(self):
        """Addresses, routes and links (mpvpn.io.netcfg.NetConfig's methods)."""
        return self.net_factory()

    def open_uplink(self, addr: str, port: int, device: str | None, rcvbuf: int | None = None):
        """(socket for the selector, its BatchSocket); ``rcvbuf``: its receive
        buffer in bytes (None: the kernel's cap); raises :class:`mpvpn.io.udp.UplinkUnavailable` while
        ``addr`` is absent, OSError otherwise."""
        sock = open_uplink(addr, port, device, rcvbuf=rcvbuf)
        return sock, BatchSocket(sock)

    def listen(self, host: str, port: int, backlog: int = 64):
        """A non-blocking listening control socket; OSError with what went wrong."""
        fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            raise
        s.listen(backlog)
        s.setblocking(False)
        return s

    def accepted(self, sock) -> None:
        """Set up a control socket ``listen()``'s socket accepted."""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def resolve(self, host: str, port: int) -> tuple:
        """(address family, socket address) of a server; OSError if it does not resolve."""
        fam, _, _, _, sa = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return fam, sa

    def connect(self, family: int, sockaddr) -> tuple:
        """(non-blocking socket, errno of connect_ex: 0 or EINPROGRESS when under way)."""
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s, s.connect_ex(sockaddr)

    def find_ubus(self) -> str | None:
        """ubusd's socket on this host, or None (a plain Linux host)."""
        return ubusmod.find_socket()
