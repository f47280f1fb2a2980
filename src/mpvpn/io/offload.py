"""tun offloads, sans I/O: the ``virtio_net_hdr`` that prefixes every packet
on a tun opened with ``IFF_VNET_HDR``, TCP segmentation of the super-segments
the kernel hands us (TSO), and coalescing of in-order TCP segments into one
super-segment for the kernel to take in one write (GRO).

Everything between two agents stays one inner packet of at most the vNIC MTU
per sequence number (sealing, duplicate copies, reordering and loss work as
without offloads); offloads only change how many packets cross the tun per
system call:

* :func:`split` turns what one read returned (header + packet, possibly a
  TCP super-segment of up to 64 KiB) into plain, valid IP packets: each
  segment gets its own IP total length, id and header checksum, TCP sequence
  number and flags, and a *complete* TCP checksum, so the packets are valid
  whatever the peer does with them.  A non-GSO packet the kernel left with
  a partial checksum (``NEEDS_CSUM``) is completed the same way.
* :func:`coalesce` groups consecutive segments of one TCP flow (contiguous
  sequence numbers, same addresses, ports, ack, window, options, IP fields,
  consecutive IPv4 ids, equal payload size but for the last) into one
  super-segment written with ``gso_type`` TCPV4/TCPV6, ``gso_size`` the
  segment payload and ``NEEDS_CSUM``: the TCP checksum field holds the
  pseudo-header sum and the kernel (or the LAN NIC) completes it, so no
  checksum over payload is computed here.  The kernel cuts it back into
  exactly the original segments when it forwards them (see the tests).
  Anything else is written as it came, behind an all-zero header.

The header layout is ``include/uapi/linux/virtio_net.h`` (legacy header,
10 bytes, in host byte order on a tun without TUNSETVNETLE/BE); the approach
is that of wireguard-go's ``tun/offload_linux.go``.
"""

from __future__ import annotations

import struct

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
PLAIN_HDR = bytes(VNET_HDR_LEN)

MAX_SUPER = 65535  # an IPv4 total length / IPv6 payload length
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
_PROTO_TCP = 6
_PROTO_UDP = 17


class OffloadError(ValueError):
    """A frame from the kernel that cannot be turned into packets (dropped, counted)."""


# -- checksums --------------------------------------------------------------------

def ones_sum(data) -> int:
    """RFC 1071 one's-complement sum of ``data`` as 16-bit big-endian words
    (an odd last byte padded with zero), reduced to 0..65534 (0 stands for
    both 0x0000 and 0xFFFF): 2^16 = 1 (mod 2^16 - 1), so the value of the
    whole byte string modulo 65535 is the sum of its words."""
    x = int.from_bytes(data, "big")
    if len(data) & 1:
        x <<= 8
    return x % 0xFFFF


def checksum(data, initial: int = 0) -> int:
    """The Internet checksum field value over ``data`` plus ``initial`` (a
    one's-complement partial sum, e.g. the pseudo-header's).  Never 0, so it
    is also a valid UDP checksum."""
    return 0xFFFF - (ones_sum(data) + initial) % 0xFFFF


def pseudo_sum(pkt, l4_len: int, proto: int = _PROTO_TCP) -> int:
    """One's-complement sum of the IPv4/IPv6 pseudo-header of ``pkt``."""
    if pkt[0] >> 4 == 4:
        return (ones_sum(pkt[12:20]) + proto + l4_len) % 0xFFFF
    return (ones_sum(pkt[8:40]) + proto + (l4_len >> 16) + (l4_len & 0xFFFF)) % 0xFFFF


def ip4_header_checksum(hdr) -> int:
    """Checksum of an IPv4 header whose checksum field (bytes 10-11) is zero."""
    return checksum(hdr)


def complete_checksum(pkt: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum (``NEEDS_CSUM``): the field at
    ``start + offset`` holds the pseudo-header sum; sum from ``start`` to the
    end and store the result."""
    at = start + offset
    if start < 0 or at + 2 > len(pkt):
        raise OffloadError("checksum offsets outside the packet")
    c = checksum(memoryview(pkt)[start:])
    pkt[at] = c >> 8
    pkt[at + 1] = c & 0xFF


# -- the header -------------------------------------------------------------------

def parse_hdr(frame) -> tuple:
    """``(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)``."""
    if len(frame) < VNET_HDR_LEN:
        raise OffloadError("frame shorter than a virtio_net_hdr")
    return VNET_HDR.unpack_from(frame)


def build_hdr(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
              csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# -- reading: one frame -> plain packets --------------------------------------------

def split(frame) -> list:
    """The plain IP packets in one frame read from a vnet-hdr tun (the C
    loops of :mod:`mpvpn.core.fastpath` where built; same result)."""
    if _C is not None and frame.__class__ is bytes:
        try:
            return _C.split(frame)
        except ValueError as e:
            raise OffloadError(str(e)) from None
    return split_py(frame)


def split_py(frame) -> list:
    """:func:`split` in Python: the reference."""
    flags, gso_type, _hdr_len, gso_size, cstart, coff = parse_hdr(frame)
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [frame[VNET_HDR_LEN:]]
        pkt = bytearray(memoryview(frame)[VNET_HDR_LEN:])
        complete_checksum(pkt, cstart, coff)
        return [bytes(pkt)]
    if gso in (GSO_TCPV4, GSO_TCPV6):
        return tso_split(memoryview(frame)[VNET_HDR_LEN:], gso_size, cstart)
    if gso == GSO_UDP_L4:
        return uso_split(memoryview(frame)[VNET_HDR_LEN:], gso_size, cstart)
    raise OffloadError(f"unsupported gso_type {gso_type}")


def _l4_offset(pkt, csum_start: int, proto: int) -> int:
    if len(pkt) < 20:
        raise OffloadError("truncated IP header")
    v = pkt[0] >> 4
    if v == 4:
        ihl = (pkt[0] & 15) * 4
        if ihl < 20 or pkt[9] != proto or csum_start != ihl:
            raise OffloadError("not a plain IPv4 segment of the expected protocol")
        return ihl
    if v == 6:
        if csum_start < 40 or (csum_start == 40 and pkt[6] != proto):
            raise OffloadError("not an IPv6 segment of the expected protocol")
        return csum_start
    raise OffloadError("not IP")


def _template(pkt, hlen: int, csum_at: int) -> tuple:
    """The headers every segment starts from: ``(v4, header with the
    transport checksum and the IPv4 header checksum zeroed, first IPv4 id,
    one's-complement sum of the addresses)``."""
    v4 = pkt[0] >> 4 == 4
    head = bytearray(pkt[:hlen])
    head[csum_at] = head[csum_at + 1] = 0
    ident0 = 0
    if v4:
        ident0 = int.from_bytes(head[4:6], "big")
        head[10] = head[11] = 0
        addr_sum = ones_sum(head[12:20])
    else:
        addr_sum = ones_sum(head[8:40])
    return v4, head, ident0, addr_sum


def tso_split(pkt, gso_size: int, csum_start: int) -> list:
    """Cut a TCP super-segment into segments of ``gso_size`` payload bytes."""
    t = _l4_offset(pkt, csum_start, _PROTO_TCP)
    if t + 20 > len(pkt):
        raise OffloadError("truncated TCP header")
    hlen = t + (pkt[t + 12] >> 4) * 4
    total = len(pkt)
    if hlen > total or hlen < t + 20 or gso_size == 0:
        raise OffloadError("bad TCP header length or gso_size")
    v4, head, ident0, addr_sum = _template(pkt, hlen, t + 16)
    seq0 = int.from_bytes(head[t + 4:t + 8], "big")
    flags0 = head[t + 13]
    out = []
    pos = hlen
    i = 0
    while pos < total:
        end = min(pos + gso_size, total)
        n = end - pos
        last = end == total
        h = bytearray(head)
        h[t + 4:t + 8] = ((seq0 + pos - hlen) & 0xFFFFFFFF).to_bytes(4, "big")
        fl = flags0
        if not last:
            fl &= ~(TCP_FIN | TCP_PSH)
        if i:
            fl &= ~TCP_CWR
        h[t + 13] = fl
        if v4:
            h[2:4] = (hlen + n).to_bytes(2, "big")
            h[4:6] = ((ident0 + i) & 0xFFFF).to_bytes(2, "big")
            c = checksum(memoryview(h)[:t])
            h[10] = c >> 8
            h[11] = c & 0xFF
        else:
            h[4:6] = (hlen - 40 + n).to_bytes(2, "big")
        l4 = hlen - t + n
        seg = h + pkt[pos:end]
        c = checksum(memoryview(seg)[t:], addr_sum + _PROTO_TCP + (l4 >> 16) + (l4 & 0xFFFF))
        seg[t + 16] = c >> 8
        seg[t + 17] = c & 0xFF
        out.append(bytes(seg))
        pos = end
        i += 1
    return out


def uso_split(pkt, gso_size: int, csum_start: int) -> list:
    """Cut a UDP super-datagram (USO, ``GSO_UDP_L4``) into datagrams of ``gso_size`` payload bytes."""
    t = _l4_offset(pkt, csum_start, _PROTO_UDP)
    hlen = t + 8
    total = len(pkt)
    if hlen > total or gso_size == 0:
        raise OffloadError("bad UDP header or gso_size")
    v4, head, ident0, addr_sum = _template(pkt, hlen, t + 6)
    out = []
    pos, i = hlen, 0
    while pos < total:
        end = min(pos + gso_size, total)
        n = end - pos
        h = bytearray(head)
        h[t + 4:t + 6] = (8 + n).to_bytes(2, "big")
        if v4:
            h[2:4] = (hlen + n).to_bytes(2, "big")
            h[4:6] = ((ident0 + i) & 0xFFFF).to_bytes(2, "big")
            c = checksum(memoryview(h)[:t])
            h[10], h[11] = c >> 8, c & 0xFF
        else:
            h[4:6] = (hlen - 40 + n).to_bytes(2, "big")
        seg = h + pkt[pos:end]
        c = checksum(memoryview(seg)[t:], addr_sum + _PROTO_UDP + 8 + n)
        seg[t + 6], seg[t + 7] = c >> 8, c & 0xFF
        out.append(bytes(seg))
        pos = end
        i += 1
    return out


# -- writing: in-order TCP segments -> super-segments --------------------------------

def _tcp_candidate(p):
    """``(flow key, tcp offset, header length)`` if ``p`` may join a
    super-segment (plain TCP carrying data, flags ACK or ACK|PSH, no IP
    options/fragments/extension headers), else None."""
    n = len(p)
    if n < 40:
        return None
    b0 = p[0]
    if b0 == 0x45:
        if p[9] != _PROTO_TCP or p[6] & 0xBF or p[7]:  # MF or fragment offset
            return None
        t = 20
    elif b0 >> 4 == 6:
        if p[6] != _PROTO_TCP or n < 60:
            return None
        t = 40
    else:
        return None
    fl = p[t + 13]
    if fl != TCP_ACK and fl != TCP_ACK | TCP_PSH:
        return None
    hlen = t + (p[t + 12] >> 4) * 4
    if hlen >= n or hlen < t + 20:
        return None
    return hlen, t


class _Group:
    __slots__ = ("first", "t", "hlen", "gso", "parts", "next_seq", "next_id", "closed", "size", "last",
                 "limit", "same")

    def __init__(self, p, t, hlen):
        self.first = p
        self.t = t
        self.hlen = hlen
        self.gso = len(p) - hlen
        self.parts = [p]
        self.size = len(p)
        self.limit = MAX_SUPER + (t == 40) * 40
        self.next_seq = (int.from_bytes(p[t + 4:t + 8], "big") + self.gso) & 0xFFFFFFFF
        self.next_id = (int.from_bytes(p[4:6], "big") + 1) & 0xFFFF if t == 20 else None
        self.closed = bool(p[t + 13] & TCP_PSH)
        self.last = p
        # what every later segment must repeat: IPv4 version..TOS, flags..protocol,
        # addresses and ports; IPv6 everything but the payload length; TCP ack and
        # data offset, window, urgent pointer and options
        if t == 20:
            self.same = (p[:2], p[6:10], p[12:24], p[28:33], p[34:36], p[38:hlen])
        else:
            self.same = (p[:4], p[6:44], p[48:53], p[54:56], p[58:hlen])

    def add(self, p) -> bool:
        """Append ``p`` if it continues this super-segment."""
        if self.closed:
            return False
        hlen = self.hlen
        n = len(p) - hlen
        if n <= 0 or n > self.gso or self.size + n > self.limit:
            return False
        if self.t == 20:
            if ((p[:2], p[6:10], p[12:24], p[28:33], p[34:36], p[38:hlen]) != self.same
                    or int.from_bytes(p[24:28], "big") != self.next_seq
                    or int.from_bytes(p[4:6], "big") != self.next_id):
                return False
            self.next_id = (self.next_id + 1) & 0xFFFF
        elif ((p[:4], p[6:44], p[48:53], p[54:56], p[58:hlen]) != self.same
              or int.from_bytes(p[44:48], "big") != self.next_seq):
            return False
        self.parts.append(p)
        self.size += n
        self.next_seq = (self.next_seq + n) & 0xFFFFFFFF
        self.last = p
        if n < self.gso or p[self.t + 13] & TCP_PSH:
            self.closed = True
        return True

    def frame(self) -> list:
        """The buffers of one tun write: header, (rewritten) first packet, the others' payloads."""
        parts = self.parts
        if len(parts) == 1:
            return [PLAIN_HDR, self.first]
        t, hlen = self.t, self.hlen
        h = bytearray(self.first[:hlen])
        total = self.size
        l4 = total - t
        if t == 20:
            h[2:4] = total.to_bytes(2, "big")
            h[10] = h[11] = 0
            c = checksum(memoryview(h)[:20])
            h[10], h[11] = c >> 8, c & 0xFF
            gso_type = GSO_TCPV4
            ps = (ones_sum(h[12:20]) + _PROTO_TCP + l4) % 0xFFFF
        else:
            h[4:6] = (total - 40).to_bytes(2, "big")
            gso_type = GSO_TCPV6
            ps = (ones_sum(h[8:40]) + _PROTO_TCP + (l4 >> 16) + (l4 & 0xFFFF)) % 0xFFFF
        h[t + 13] = self.last[t + 13]  # PSH of the last segment
        h[t + 16], h[t + 17] = ps >> 8, ps & 0xFF  # pseudo-header sum: the kernel completes it
        out = [VNET_HDR.pack(F_NEEDS_CSUM, gso_type, hlen, self.gso, t, 16), bytes(h),
               memoryview(self.first)[hlen:]]
        for p in parts[1:]:
            out.append(memoryview(p)[hlen:])
        return out


def coalesce(packets) -> list:
    """Tun writes for ``packets`` (in delivery order): a list of buffer lists,
    one per write (for ``os.writev``).  Segments of one TCP flow are merged
    where :class:`_Group` allows; the relative order of each flow's packets
    is kept (different flows may interleave differently)."""
    groups = []
    open_by_flow = {}
    g = None  # the group the previous packet went to: tried first (one bulk flow is the common case)
    for p in packets:
        c = _tcp_candidate(p)
        if c is None:
            groups.append(p)
            continue
        if g is not None and g.add(p):
            continue
        hlen, t = c
        key = p[12:24] if t == 20 else p[8:44]  # addresses and ports
        g = open_by_flow.get(key)
        if g is not None and g.add(p):
            continue
        g = _Group(p, t, hlen)
        open_by_flow[key] = g
        groups.append(g)
    return [[PLAIN_HDR, g] if g.__class__ is not _Group else g.frame() for g in groups]


def frame_packets(frame) -> int:
    """How many packets one tun write of :func:`coalesce_frames` carries."""
    flags, gso_type, hdr_len, gso_size, _cs, _co = parse_hdr(frame)
    if gso_type == GSO_NONE or not gso_size:
        return 1
    return -(-(len(frame) - VNET_HDR_LEN - hdr_len) // gso_size)


def coalesce_frames(packets: list) -> list:
    """:func:`coalesce` as whole frames, one ``bytes`` per tun write (the C
    loops of :mod:`mpvpn.core.fastpath` where built; byte for byte the same)."""
    if _C is not None:
        return _C.coalesce(packets)
    return [b"".join(bufs) for bufs in coalesce(packets)]


from mpvpn.core.fastpath import LOOPS as _C  # noqa: E402  (None: pure Python)
