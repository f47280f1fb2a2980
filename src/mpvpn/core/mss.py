"""TCP MSS clamping for packets entering the tunnel (sans-I/O, pure bytes).

A LAN host opens TCP connections with the MSS of its own link (1460 on
Ethernet), but the vNIC carries at most ``mtu`` bytes per packet.  Without
clamping the first full-size segments are dropped at the vNIC and the
connection waits for ICMP "fragmentation needed" (path-MTU discovery) --
one lost round of segments per new destination, and a stalled connection
where ICMP is filtered.  So the agent lowers the MSS option of every TCP SYN
it reads from its vNIC (the LAN host's SYN, and its SYN-ACK answering a
remote host) to what fits: ``mtu - 40`` for IPv4 and ``mtu - 60`` for IPv6,
as OpenWrt's firewall does with ``mtu_fix`` (nftables ``tcp option maxseg
size set rt mtu``).  Both sites clamp, so both directions of the
connection fit.

The checksum is updated incrementally (RFC 1624), so a segment that arrived
with a bad checksum keeps a bad one.  Anything that is not a well-formed
first-fragment TCP SYN with an MSS option above the limit is returned
unchanged (``None``); this never raises on malformed input.
"""

from __future__ import annotations

__all__ = ["mss_for_mtu", "clamp"]

_TCP = 6
_SYN = 0x02
_OPT_END, _OPT_NOP, _OPT_MSS = 0, 1, 2


def mss_for_mtu(mtu: int) -> tuple[int, int]:
    """(IPv4, IPv6) MSS that fits an ``mtu``-byte packet (no IP or TCP options)."""
    return mtu - 40, mtu - 60


def _tcp_offset(p) -> int:
    """Offset of the TCP header of an unfragmented (or first-fragment) TCP
    packet, or -1."""
    n = len(p)
    if n < 40:
        return -1
    v = p[0] >> 4
    if v == 4:
        ihl = (p[0] & 0x0F) * 4
        if ihl < 20 or p[9] != _TCP or (p[6] & 0x1F or p[7]):  # not TCP, or a later fragment
            return -1
        return ihl if n >= ihl + 20 else -1
    if v == 6:
        if p[6] != _TCP or n < 60:  # extension headers: left alone
            return -1
        return 40
    return -1


def _sum16(b, start: int, end: int) -> int:
    """One's complement sum of the 16-bit words of b[start:end] (even length)."""
    s = 0
    for i in range(start, end, 2):
        s += (b[i] << 8) | b[i + 1]
    return s


def clamp(packet, mss4: int, mss6: int) -> bytes | None:
    """``packet`` with its SYN's MSS option lowered to ``mss4`` / ``mss6``
    (by IP version), or None if it needs no change."""
    t = _tcp_offset(packet)
    if t < 0 or not packet[t + 13] & _SYN:
        return None
    limit = mss4 if packet[0] >> 4 == 4 else mss6
    doff = (packet[t + 12] >> 4) * 4
    end = t + doff
    if doff <= 20 or end > len(packet):
        return None
    i = t + 20
    while i < end:
        kind = packet[i]
        if kind == _OPT_END:
            return None
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            return None
        ln = packet[i + 1]
        if ln < 2 or i + ln > end:
            return None
        if kind == _OPT_MSS:
            if ln != 4:
                return None
            old = (packet[i + 2] << 8) | packet[i + 3]
            if old <= limit:
                return None
            out = bytearray(packet)
            # the 16-bit words (aligned to the TCP header) the value touches
            lo = t + ((i + 2 - t) & ~1)
            hi = t + ((i + 4 - t + 1) & ~1)
            before = _sum16(out, lo, hi)
            out[i + 2] = limit >> 8
            out[i + 3] = limit & 0xFF
            after = _sum16(out, lo, hi)
            # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')
            hc = (out[t + 16] << 8) | out[t + 17]
            # ('before' and 'after' may exceed 16 bits: several words, folded)
            s = (~hc & 0xFFFF) + _fold(~_fold(before) & 0xFFFF) + _fold(after)
            s = _fold(s)
            new = ~s & 0xFFFF
            out[t + 16] = new >> 8
            out[t + 17] = new & 0xFF
            return bytes(out)
        i += ln
    return None


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s
