"""A small rtnetlink client (NETLINK_ROUTE), standard library only.

Only what :mod:`mpvpn.io.netcfg` needs: set a link's MTU / bring it up, delete a
link, read a link's kind, dump / add / delete addresses, dump / replace / delete routes.

The module-level functions are sans-I/O: they build request bytes
(:func:`message`, :func:`attr` and the ``*_msg`` builders) or parse reply
bytes (:func:`parse_messages`, :func:`parse_attrs`, :func:`parse_addr`,
:func:`parse_route`, :func:`error_of`).  :class:`Rtnl` owns one netlink socket
and does the exchanges.  Every failure is a :class:`NetError` (an
``OSError``): a kernel refusal carries its errno (``[Errno 17] File exists``),
a malformed reply a message saying what was wrong with it.  Nothing here
raises ``IndexError`` or ``struct.error`` on bad input.

Layouts (native byte order, see linux/netlink.h and linux/rtnetlink.h):
nlmsghdr ``IHHII`` (len, type, flags, seq, pid); ifinfomsg ``BxHiII``;
ifaddrmsg ``BBBBI``; rtmsg ``BBBBBBBBI``; attributes ``HH`` (len, type) +
data, each padded to 4 bytes (NLA_ALIGNTO).
"""

from __future__ import annotations

import os
import socket
import struct

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR reply
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 4, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_TABLE = 1, 4, 6, 15
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
IFF_UP = 0x1
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1

HDR = struct.Struct("=IHHII")
IFINFO = struct.Struct("=BxHiII")
IFADDR = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
RTA = struct.Struct("=HH")
U32 = struct.Struct("=I")
RECV_BUF = 65536
TIMEOUT = 10.0  # seconds without any reply from the kernel
ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}


class NetError(OSError):
    """A netlink request failed: refused by the kernel (``errno`` set) or a bad reply."""


def align(n: int) -> int:
    return (n + 3) & ~3


# -- building requests ------------------------------------------------------

def attr(kind: int, data: bytes) -> bytes:
    """One rtattr: length (header + data, unpadded), type, data, zero padding to 4."""
    n = RTA.size + len(data)
    return RTA.pack(n, kind) + data + bytes(align(n) - n)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def message(kind: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """One netlink message: nlmsghdr + ``body`` + zero padding to 4 (not counted in the length)."""
    return HDR.pack(HDR.size + len(body), kind, flags, seq, pid) + body + bytes(align(len(body)) - len(body))


def link_msg(index: int, mtu: int | None = None, up: bool | None = None) -> bytes:
    """RTM_NEWLINK body changing an existing link: ifinfomsg(AF_UNSPEC, index,
    flags/change = IFF_UP when ``up`` is given) + IFLA_MTU when ``mtu`` is given.
    Send with NLM_F_REQUEST|NLM_F_ACK (no CREATE: the link must exist).
    With neither argument it is the body of an RTM_DELLINK."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    body = IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)
    return body + (u32(IFLA_MTU, mtu) if mtu is not None else b"")


def addr_msg(family: int, index: int, prefixlen: int, address: bytes, local: bytes | None = None) -> bytes:
    """RTM_NEWADDR / RTM_DELADDR body: ifaddrmsg(family, prefixlen, flags 0,
    scope universe, index) + IFA_LOCAL (if given) + IFA_ADDRESS.  For IPv4 like
    ``ip addr add``, pass the same bytes as ``local`` and ``address``."""
    body = IFADDR.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    if local is not None:
        body += attr(IFA_LOCAL, local)
    return body + attr(IFA_ADDRESS, address)


def route_msg(family: int, dst: bytes, dst_len: int, oif: int | None, proto: int,
              priority: int = 0, table: int = RT_TABLE_MAIN, delete: bool = False) -> bytes:
    """RTM_NEWROUTE / RTM_DELROUTE body: rtmsg(family, dst_len, table, proto,
    scope, type) + RTA_TABLE + RTA_DST (left out for a default route) + RTA_OIF
    + RTA_PRIORITY (left out when 0: any metric on delete, the kernel's default
    on add: 0 for IPv4, 1024 for IPv6).

    A new route is RTN_UNICAST with scope universe for both families, which is
    what the pyroute2-based netcfg produced (``ip route add X dev Y`` would use
    scope link for IPv4).  A delete says scope "nowhere" and type unspec (as
    ``ip route del`` does), so it matches any scope and type; the protocol
    still has to match."""
    scope, kind = (RT_SCOPE_NOWHERE, 0) if delete else (RT_SCOPE_UNIVERSE, RTN_UNICAST)
    body = RTMSG.pack(family, dst_len, 0, 0, table if table < 256 else 0, proto, scope, kind, 0)
    body += u32(RTA_TABLE, table)
    if dst_len:
        body += attr(RTA_DST, dst)
    if oif is not None:
        body += u32(RTA_OIF, oif)
    if priority:
        body += u32(RTA_PRIORITY, priority)
    return body


def dump_msg(family: int, header: struct.Struct) -> bytes:
    """Body of an RTM_GETADDR (``IFADDR``) / RTM_GETROUTE (``RTMSG``) dump request:
    the header with only its first field, the family, set.  (Without strict
    checking the kernel ignores the rest anyway: filter the results.)"""
    return bytes([family]) + bytes(header.size - 1)


# -- parsing replies --------------------------------------------------------

def parse_messages(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """Split a datagram into (type, flags, seq, pid, payload) tuples."""
    out, off = [], 0
    while off < len(data):
        if len(data) - off < HDR.size:
            raise NetError(f"truncated netlink reply: {len(data) - off} stray byte(s) after {len(out)} message(s)")
        n, kind, flags, seq, pid = HDR.unpack_from(data, off)
        if n < HDR.size or off + n > len(data):
            raise NetError(f"malformed netlink reply: message length {n} with {len(data) - off} byte(s) left")
        out.append((kind, flags, seq, pid, data[off + HDR.size:off + n]))
        off += align(n)
    return out


def parse_attrs(buf: bytes, off: int = 0) -> dict[int, bytes]:
    """rtattrs from ``buf[off:]`` as {type: data}; the nested/byte-order flag
    bits are masked off the type, fewer than 4 trailing bytes are ignored."""
    out = {}
    while len(buf) - off >= RTA.size:
        n, kind = RTA.unpack_from(buf, off)
        if n < RTA.size or off + n > len(buf):
            raise NetError(f"malformed netlink attribute: length {n} with {len(buf) - off} byte(s) left")
        out[kind & 0x3FFF] = buf[off + RTA.size:off + n]
        off += align(n)
    return out


def _header(payload: bytes, header: struct.Struct, what: str) -> tuple:
    if len(payload) < header.size:
        raise NetError(f"truncated {what}: {len(payload)} of {header.size} bytes")
    return header.unpack_from(payload)


def parse_addr(payload: bytes) -> dict:
    """An RTM_NEWADDR payload as {family, prefixlen, flags, scope, index, attrs}."""
    family, prefixlen, flags, scope, index = _header(payload, IFADDR, "ifaddrmsg")
    return dict(family=family, prefixlen=prefixlen, flags=flags, scope=scope, index=index,
                attrs=parse_attrs(payload, IFADDR.size))


def parse_link(payload: bytes) -> dict:
    """An RTM_NEWLINK payload as {family, type, index, flags, attrs, kind}; ``kind``
    is IFLA_LINKINFO's IFLA_INFO_KIND (``"tun"``, ``"veth"``...), None without one."""
    family, kind, index, flags, _ = _header(payload, IFINFO, "ifinfomsg")
    attrs = parse_attrs(payload, IFINFO.size)
    info = parse_attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
    name = info.get(IFLA_INFO_KIND)
    return dict(family=family, type=kind, index=index, flags=flags, attrs=attrs,
                kind=None if name is None else name.split(b"\0", 1)[0].decode("ascii", "replace"))


def parse_route(payload: bytes) -> dict:
    """An RTM_NEWROUTE payload as {family, dst_len, table, protocol, scope, type, attrs};
    ``table`` is RTA_TABLE when present (tables above 255), else rtm_table."""
    family, dst_len, _, _, table, proto, scope, kind, _ = _header(payload, RTMSG, "rtmsg")
    attrs = parse_attrs(payload, RTMSG.size)
    if RTA_TABLE in attrs:
        table = get_u32(attrs, RTA_TABLE)
    return dict(family=family, dst_len=dst_len, table=table, protocol=proto, scope=scope,
                type=kind, attrs=attrs)


def get_u32(attrs: dict, kind: int) -> int | None:
    """A 32-bit attribute's value, None when absent."""
    data = attrs.get(kind)
    if data is None:
        return None
    if len(data) != 4:
        raise NetError(f"malformed netlink attribute {kind}: {len(data)} bytes, expected 4")
    return U32.unpack(data)[0]


def get_ip(family: int, attrs: dict, kind: int) -> str | None:
    """An address attribute as text (inet_ntop), None when absent."""
    data = attrs.get(kind)
    if data is None:
        return None
    if len(data) != ADDR_LEN.get(family):
        raise NetError(f"malformed address attribute {kind}: {len(data)} bytes for family {family}")
    return socket.inet_ntop(family, data)


def error_of(flags: int, payload: bytes) -> NetError | None:
    """The NetError an NLMSG_ERROR payload stands for, None for an ACK (error 0).

    The payload is a negative errno, the request's header (the whole request
    unless NLM_F_CAPPED) and, with NLM_F_ACK_TLVS, attributes of which
    NLMSGERR_ATTR_MSG (extended ACK text) is added to the message."""
    if len(payload) < 4:
        raise NetError(f"truncated netlink error message: {len(payload)} bytes")
    code = -struct.unpack_from("=i", payload)[0]
    if code == 0:
        return None
    text = os.strerror(code)
    if flags & NLM_F_ACK_TLVS and len(payload) >= 4 + HDR.size:
        echoed = HDR.size if flags & NLM_F_CAPPED else HDR.unpack_from(payload, 4)[0]
        try:
            msg = parse_attrs(payload, 4 + align(echoed)).get(NLMSGERR_ATTR_MSG, b"")
        except NetError:
            msg = b""  # the errno alone still says what happened
        msg = msg.split(b"\0", 1)[0].decode("utf-8", "replace")
        if msg:
            text = f"{text} ({msg})"
    return NetError(code, text)


# -- the socket -------------------------------------------------------------

class Rtnl:
    """One NETLINK_ROUTE socket; requests are answered one at a time."""

    def __init__(self):
        self.seq = 0
        self._open()

    def _open(self) -> None:
        """A socket bound to (0, 0): the kernel picks our port id (``self.pid``)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.bind((0, 0))
            for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):  # short errors, with text
                try:
                    sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # older kernel: plain errno
            sock.settimeout(TIMEOUT)
            self.pid = sock.getsockname()[0]
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request (NLM_F_REQUEST is added to ``flags``: NLM_F_ACK and
        CREATE / EXCL / REPLACE as needed) and read until its ACK or error; returns
        the payloads of data messages before it (an RTM_GETLINK's answer)."""
        payloads, _ = self._exchange(kind, flags | NLM_F_REQUEST, body)
        return payloads

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        """An NLM_F_REQUEST|NLM_F_DUMP request, read until NLMSG_DONE; retried (up to
        3 times) while the kernel flags it NLM_F_DUMP_INTR (changed while dumping)."""
        for _ in range(3):
            payloads, intr = self._exchange(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
            if not intr:
                break
        return payloads

    def _exchange(self, kind: int, flags: int, body: bytes) -> tuple[list[bytes], bool]:
        """Messages with another sequence number or port id (left over from an
        earlier request) or not from the kernel are skipped.  After a garbled
        reply, a timeout or a socket error the socket is replaced, so that what
        is left of that exchange (perhaps a dump still running) cannot get in
        the way of the next one."""
        self.seq = self.seq % 0xFFFFFFFF + 1
        try:
            return self._converse(message(kind, flags, self.seq, body))
        except NetError as e:
            if e.errno is None:  # garbled: not the kernel's answer
                self._reset()
            raise
        except socket.timeout:
            self._reset()
            raise NetError(f"no netlink reply from the kernel within {TIMEOUT:g} s") from None
        except OSError as e:  # the socket itself (ENOBUFS, ...)
            self._reset()
            raise NetError(e.errno, f"netlink socket: {e.strerror}") from None

    def _converse(self, request: bytes) -> tuple[list[bytes], bool]:
        out, intr = [], False
        self.sock.send(request)
        while True:
            data, _, mflags, (sender, _) = self.sock.recvmsg(RECV_BUF)
            if mflags & socket.MSG_TRUNC:
                raise NetError(f"netlink reply larger than {RECV_BUF} bytes")
            if sender != 0:
                continue  # not from the kernel
            for rkind, rflags, seq, pid, payload in parse_messages(data):
                if seq != self.seq or pid != self.pid:
                    continue
                intr |= bool(rflags & NLM_F_DUMP_INTR)
                if rkind == NLMSG_ERROR:
                    err = error_of(rflags, payload)
                    if err:
                        raise err
                    return out, intr
                if rkind == NLMSG_DONE:
                    if len(payload) >= 4 and struct.unpack_from("=i", payload)[0] < 0:
                        raise error_of(0, payload[:4])
                    return out, intr
                if rkind != NLMSG_NOOP:
                    out.append(payload)

    def _reset(self) -> None:
        old = self.sock
        try:
            self._open()
        except OSError:
            return  # keep the old one: the next request will say what is wrong
        old.close()
