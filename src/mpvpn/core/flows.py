"""Inner-packet classification for the scheduler: flow keys and urgency.

Pure functions over the bytes of one inner IPv4/IPv6 datagram (what the tun
hands us); no state, no I/O, never raises on garbage.

* :func:`classify` returns ``(key, urgent)``: ``key`` identifies the flow
  (the 5-tuple, see :data:`FlowKey`) and ``urgent`` is a bit set of
  :class:`Urgent` reasons (0: an ordinary packet).
* Urgent, after seed 000's stage 3 ("urgent packets go first"): TCP
  SYN/FIN/RST, pure TCP ACKs (no payload), DNS (UDP or TCP port 53),
  ICMP/ICMPv6, DSCP EF (46) and the network-control classes CS6/CS7
  (48/56), and any packet of at most ``small`` bytes.
* Fragments: every fragment of a datagram (first or later) gets the key
  without ports, so the fragments of one datagram stay in one flow.
* Anything that is not a parsable IPv4/IPv6 header gets the key
  :data:`OTHER`.
"""

from __future__ import annotations

import struct
from enum import IntFlag

from mpvpn.core.fastpath import LOOPS as _LOOPS

__all__ = ["Urgent", "classify", "classify_py", "flow_key", "OTHER", "describe", "reasons", "EF", "URGENT_DSCP"]

# FlowKey = (ip version, protocol, src address bytes, dst address bytes, sport, dport)
OTHER = (0, 0, b"", b"", 0, 0)

EF = 46  # Expedited Forwarding (RFC 3246)
URGENT_DSCP = frozenset({EF, 48, 56})  # EF, CS6, CS7

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10
# IPv6 extension headers we walk: hop-by-hop, routing, destination options,
# fragment (special), authentication header (length in 4-byte units).
_EXT_8 = frozenset({0, 43, 60})
_FRAG6 = 44
_AH = 51
_MAX_EXT = 8


class Urgent(IntFlag):
    NONE = 0
    SYN = 0x01  # TCP SYN (connection set-up)
    FIN = 0x02  # TCP FIN
    RST = 0x04  # TCP RST
    ACK = 0x08  # pure TCP ACK (no payload)
    DNS = 0x10  # UDP or TCP port 53
    ICMP = 0x20  # ICMP or ICMPv6
    DSCP = 0x40  # DSCP EF / CS6 / CS7
    SMALL = 0x80  # at most `small` bytes


# plain ints on the per-packet path (IntFlag arithmetic is slow)
_SYN, _FIN, _RST, _ACK, _DNS, _ICMP, _DSCP, _SMALL = (int(u) for u in (
    Urgent.SYN, Urgent.FIN, Urgent.RST, Urgent.ACK, Urgent.DNS, Urgent.ICMP, Urgent.DSCP,
    Urgent.SMALL))


def describe(urgent: int) -> list[str]:
    """Names of the reasons in ``urgent`` (for status and tests)."""
    return list(reasons(urgent))


_REASONS: dict = {}


def reasons(urgent: int) -> tuple:
    """:func:`describe` as a tuple, remembered per value: the scheduler counts
    every urgent packet by reason, and iterating an IntFlag costs ~40 us a
    packet (there are 256 values at most)."""
    r = _REASONS.get(urgent)
    if r is None:
        r = tuple(u.name.lower() for u in Urgent if u and urgent & u)
        if 0 <= urgent < 256:
            _REASONS[urgent] = r
    return r


_V4 = struct.Struct("!BBHHHxB2x4s4s")  # ver/ihl, tos, length, id, flags/frag, proto, src, dst
_PORTS = struct.Struct("!HH")
_TCP_HDR = struct.Struct("!HH8xBB")  # ports, data offset, flags
_v4 = _V4.unpack_from
_ports = _PORTS.unpack_from
_tcp = _TCP_HDR.unpack_from


def classify_py(packet: bytes, small: int = 128) -> tuple[tuple, int]:
    """``(flow key, urgent reasons)`` of one inner IP datagram (the reference;
    :func:`classify` is the C loops' copy of it where built)."""
    n = len(packet)
    if n < 1:
        return OTHER, 0
    urgent = _SMALL if n <= small else 0
    if n >= 20 and packet[0] >> 4 == 4:
        b0, tos, length, _id, frag, proto, src, dst = _v4(packet)
        ihl = (b0 & 0x0F) * 4
        if ihl < 20 or n < ihl:
            return OTHER, urgent
        v = 4
        dscp = tos >> 2
        off = ihl
        end = length if 0 < length < n else n
        fragmented = frag & 0x3FFF != 0  # MF flag + fragment offset
    else:
        v = packet[0] >> 4
        if v == 4:  # shorter than an IPv4 header
            return OTHER, urgent
        if v != 6:
            return OTHER, urgent
        if n < 40:
            return OTHER, urgent
        dscp = ((packet[0] & 0x0F) << 2) | (packet[1] >> 6)
        proto = packet[6]
        src = packet[8:24]
        dst = packet[24:40]
        off = 40
        end = min(n, 40 + int.from_bytes(packet[4:6], "big")) if packet[4:6] != b"\0\0" else n
        fragmented = False
        for _ in range(_MAX_EXT):
            if proto in _EXT_8:
                if off + 2 > end:
                    break
                proto, off = packet[off], off + (packet[off + 1] + 1) * 8
            elif proto == _AH:
                if off + 2 > end:
                    break
                proto, off = packet[off], off + (packet[off + 1] + 2) * 4
            elif proto == _FRAG6:
                if off + 8 > end:
                    break
                fragmented = True
                proto, off = packet[off], off + 8
            else:
                break
    if dscp in URGENT_DSCP:
        urgent |= _DSCP
    if proto == TCP:
        if fragmented or off + 4 > end:
            return (v, proto, src, dst, 0, 0), urgent
        if off + 14 > end:
            sport, dport = _ports(packet, off)
            if sport == 53 or dport == 53:
                urgent |= _DNS
            return (v, proto, src, dst, sport, dport), urgent
        sport, dport, doff, flags = _tcp(packet, off)
        if sport == 53 or dport == 53:
            urgent |= _DNS
        if flags & 0x07:  # FIN, SYN, RST
            if flags & _TCP_SYN:
                urgent |= _SYN
            if flags & _TCP_FIN:
                urgent |= _FIN
            if flags & _TCP_RST:
                urgent |= _RST
        elif flags & _TCP_ACK:
            doff = (doff >> 4) * 4
            if doff >= 20 and off + doff >= end:
                urgent |= _ACK
        return (v, proto, src, dst, sport, dport), urgent
    if proto == ICMP or proto == ICMPV6:
        return (v, proto, src, dst, 0, 0), urgent | _ICMP
    if fragmented or proto != UDP or off + 4 > end:
        return (v, proto, src, dst, 0, 0), urgent
    sport, dport = _ports(packet, off)
    if sport == 53 or dport == 53:
        urgent |= _DNS
    return (v, proto, src, dst, sport, dport), urgent


# The scheduler classifies every user packet: the C loops' copy where built
# (mpvpn.core.fastpath; same results, tests/test_offer_many.py compares them).
classify = classify_py if _LOOPS is None else _LOOPS.classify


def flow_key(packet: bytes) -> tuple:
    """Just the flow key of :func:`classify`."""
    return classify(packet)[0]
