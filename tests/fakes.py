"""In-memory stand-ins for the agent's kernel objects, so that whole agents
run in one test process without root (the model: wireguard-go's
``tun/tuntest`` and ``conn/bindtest``, h11's ``tests/helpers.py``).

* :class:`MemoryNet`: the network between sites.  UDP datagrams go from an
  endpoint to the endpoint bound at their destination address, or vanish
  (as UDP does: nobody there, or ``drop`` said so).  Control "TCP"
  connections are connected AF_UNIX stream pairs handed to the listener
  bound at the destination (a kernel object, but no root and no network).
* :class:`MemoryHost`: one site's :class:`mpvpn.io.hostio.HostIO` over a
  MemoryNet: its addresses, a :class:`mpvpn.io.tun.MemoryTun` vNIC and a
  :class:`MemoryNetConfig`.  No ubusd.

Each object is readable through ``fileno()`` (a pipe with a byte in it while
something is queued), so the agent's selector loop runs unchanged.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from collections import deque

from mpvpn.io.tun import MemoryTun
from mpvpn.io.udp import GSO_MAX_SEGMENTS, UplinkUnavailable


def _key(addr) -> tuple:
    """(ip, port) of a sockaddr (IPv6 ones have 4 fields)."""
    return str(ipaddress.ip_address(addr[0])), addr[1]


class _Readable:
    """A pipe that is readable while ``n`` things are queued."""

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._flagged = False

    def fileno(self) -> int:
        return self._r

    def flag(self, on: bool) -> None:
        if on and not self._flagged:
            os.write(self._w, b"x")
        elif not on and self._flagged:
            try:
                os.read(self._r, 1)
            except BlockingIOError:
                pass
        self._flagged = on

    def close_pipe(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


class MemoryUDP(_Readable):
    """A bound UDP socket and its :class:`mpvpn.io.udp.BatchSocket` in one.

    ``recv()`` behaves as BatchSocket.recv on a socket with UDP_GRO: one call
    returns the consecutive datagrams of one source that are all of one size
    (the last may be shorter), at most GSO_MAX_SEGMENTS, as the kernel's
    udp_gro_receive() coalesces a flow (net/ipv4/udp_offload.c), or a single
    one; BlockingIOError when nothing is queued."""

    def __init__(self, net: "MemoryNet", addr: tuple, gro: bool = True):
        super().__init__()
        self.net, self.addr, self.gro = net, addr, gro
        self.queue: deque = deque()  # (datagram, source, when queued)
        self.sent = self.received = 0
        self._on_stamp = None

    def stamp(self, on_stamp) -> None:
        """As BatchSocket.stamp: ``on_stamp(seconds the datagrams waited, how many)``
        at each receive (the kernel's SO_TIMESTAMPNS: here, when put)."""
        self._on_stamp = on_stamp

    def send(self, datagrams: list, addr) -> int:
        for d in datagrams:
            self.sent += 1
            self.net.deliver(self.addr, _key(addr), bytes(d))
        return 0

    def recv(self):
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "nothing queued")
        first, src, when = self.queue.popleft()
        out = [first]
        if self.gro:
            while (self.queue and len(out) < GSO_MAX_SEGMENTS and self.queue[0][1] == src
                   and len(self.queue[0][0]) <= len(first) and len(out[-1]) == len(first)):
                out.append(self.queue.popleft()[0])
        self.flag(bool(self.queue))
        self.received += len(out)
        if self._on_stamp is not None:
            self._on_stamp(time.monotonic() - when, len(out))
        return out, src

    def put(self, datagram: bytes, source: tuple) -> None:
        self.queue.append((datagram, source, time.monotonic()))
        self.flag(True)

    def close(self) -> None:
        self.net.udp.pop(self.addr, None)
        self.close_pipe()


class MemoryListener(_Readable):
    """A listening control socket: ``accept()`` -> (socket, peer address)."""

    def __init__(self, net: "MemoryNet", host: "MemoryHost", addr: tuple):
        super().__init__()
        self.net, self.host, self.addr = net, host, addr
        self.pending: deque = deque()

    def accept(self):
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "no connection")
        conn = self.pending.popleft()
        self.flag(bool(self.pending))
        return conn

    def close(self) -> None:
        self.net.listeners.remove(self)
        self.close_pipe()


class MemoryNet:
    """The network between MemoryHosts.  ``drop(src, dst, datagram)``
    returning True loses a datagram (None: lose nothing)."""

    def __init__(self, drop=None):
        self.udp: dict[tuple, MemoryUDP] = {}
        self.listeners: list[MemoryListener] = []
        self.drop = drop
        self.dropped = 0
        self._next_port = 40000

    def deliver(self, src: tuple, dst: tuple, datagram: bytes) -> None:
        if self.drop is not None and self.drop(src, dst, datagram):
            self.dropped += 1
            return
        ep = self.udp.get(dst)
        if ep is not None:
            ep.put(datagram, src)

    def listener_for(self, addr: tuple) -> MemoryListener | None:
        for lst in self.listeners:
            host, port = lst.addr
            if port == addr[1] and (host == addr[0] or
                                    (ipaddress.ip_address(host).is_unspecified and addr[0] in lst.host.addresses)):
                return lst
        return None

    def port(self) -> int:
        self._next_port += 1
        return self._next_port


class MemoryNetConfig:
    """mpvpn.io.netcfg.NetConfig's methods over a dict: links, their address and
    MTU, and our routes.  As the real one, ``add_route`` replaces a route to
    the same destination and ``del_route`` says whether there was one;
    ``configure`` of a missing link fails with ENODEV (netcfg._need_index)."""

    def __init__(self, host: "MemoryHost"):
        self.host = host
        self.routes: dict[str, str] = {}  # CIDR -> ifname

    def close(self) -> None:
        pass

    def index(self, ifname: str) -> int | None:
        names = sorted(self.host.links)
        return names.index(ifname) + 1 if ifname in self.host.links else None

    def _need(self, ifname: str) -> None:
        if ifname not in self.host.links:
            raise OSError(errno.ENODEV, f"no interface {ifname!r}")

    def configure(self, ifname: str, address: str, mtu: int) -> None:
        self._need(ifname)
        self.host.links[ifname].update(address=address, mtu=mtu, up=True)

    def add_route(self, dst: str, ifname: str, metric: int = 0) -> None:
        self._need(ifname)
        self.routes[str(ipaddress.ip_network(dst, strict=False))] = ifname

    def del_route(self, dst: str, ifname: str) -> bool:
        key = str(ipaddress.ip_network(dst, strict=False))
        if self.routes.get(key) != ifname:
            return False
        del self.routes[key]
        return True

    def our_routes(self) -> list[tuple[str, int]]:
        return [(dst, self.index(ifn) or 0) for dst, ifn in sorted(self.routes.items())]

    def flush_ours(self, ifname: str | None = None) -> int:
        gone = [d for d, ifn in self.routes.items() if ifname is None or ifn == ifname]
        for d in gone:
            del self.routes[d]
        return len(gone)

    def link_kind(self, ifname: str) -> str | None:
        link = self.host.links.get(ifname)
        return None if link is None else link["kind"]

    def delete_link(self, ifname: str) -> bool:
        return self.host.links.pop(ifname, None) is not None


class MemoryHost:
    """One site's kernel objects (mpvpn.io.hostio.HostIO's interface) on ``net``:
    ``addresses`` are the IPs configured on it (uplinks bind only to those,
    as udp.open_uplink fails with EADDRNOTAVAIL otherwise)."""

    def __init__(self, net: MemoryNet, addresses):
        self.net = net
        self.addresses = {str(ipaddress.ip_address(a)) for a in addresses}
        self.links: dict[str, dict] = {}
        self.tun: MemoryTun | None = None
        self.netcfg = MemoryNetConfig(self)
        self.uplinks: dict[tuple, MemoryUDP] = {}
        self.rcvbufs: dict[tuple, int | None] = {}  # (ip, port) -> the receive buffer asked for

    def open_tun(self, name: str) -> MemoryTun:
        self.tun = MemoryTun(name)
        self.links[name] = {"kind": "tun", "address": None, "mtu": None, "up": False}
        close = self.tun.close

        def closed(name=name, close=close):  # a non-persistent tun goes with its fd
            self.links.pop(name, None)
            close()
        self.tun.close = closed
        return self.tun

    def netconfig(self) -> MemoryNetConfig:
        return self.netcfg

    def open_uplink(self, addr: str, port: int, device: str | None, rcvbuf: int | None = None):
        """(mpvpn.io.hostio.HostIO.open_uplink) ``rcvbuf`` is recorded in ``rcvbufs``."""
        ip = str(ipaddress.ip_address(addr))
        if ip not in self.addresses:
            raise UplinkUnavailable(errno.EADDRNOTAVAIL, f"address {ip} is not configured on this host")
        if (ip, port) in self.net.udp:
            raise OSError(errno.EADDRINUSE, f"{ip}:{port} is already in use (another agent running?)")
        ep = MemoryUDP(self.net, (ip, port))
        self.net.udp[(ip, port)] = ep
        self.uplinks[(ip, port)] = ep
        self.rcvbufs[(ip, port)] = rcvbuf
        return ep, ep

    def listen(self, host: str, port: int, backlog: int = 64) -> MemoryListener:
        addr = (str(ipaddress.ip_address(host)), port)
        if any(lst.addr == addr for lst in self.net.listeners):
            raise OSError(errno.EADDRINUSE, "Address already in use")
        lst = MemoryListener(self.net, self, addr)
        self.net.listeners.append(lst)
        return lst

    def accepted(self, sock) -> None:
        sock.setblocking(False)

    def resolve(self, host: str, port: int) -> tuple:
        return socket.AF_INET, (str(ipaddress.ip_address(host)), port)

    def connect(self, family: int, sockaddr) -> tuple:
        """A connected stream pair; the far end waits at the listener (if
        none: ECONNREFUSED from connect, as a closed TCP port answers RST)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        lst = self.net.listener_for(_key(sockaddr))
        if lst is None:
            theirs.close()
            return ours, errno.ECONNREFUSED
        src = (sorted(self.addresses)[0] if self.addresses else "192.0.2.1", self.net.port())
        lst.pending.append((theirs, src))
        lst.flag(True)
        return ours, errno.EINPROGRESS

    def find_ubus(self) -> None:
        return None
