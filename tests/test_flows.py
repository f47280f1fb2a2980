"""Inner-packet classification: flow keys and urgent packets."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core.flows import OTHER, Urgent, classify, describe, flow_key

A4, B4 = bytes([10, 0, 0, 1]), bytes([10, 9, 0, 2])
A6 = bytes.fromhex("20010db8000000000000000000000001")
B6 = bytes.fromhex("20010db8000000000000000000000002")


def ipv4(proto, l4, src=A4, dst=B4, dscp=0, frag=0):
    total = 20 + len(l4)
    return (bytes([0x45, dscp << 2]) + struct.pack("!HHH", total, 1, frag)
            + bytes([64, proto]) + b"\0\0" + src + dst + l4)


def ipv6(nh, l4, src=A6, dst=B6, dscp=0, ext=b""):
    tc = dscp << 2
    first = struct.pack("!I", (6 << 28) | (tc << 20))
    return first + struct.pack("!HBB", len(ext) + len(l4), nh, 64) + src + dst + ext + l4


def tcp(sport, dport, flags, payload=b"", doff=5):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 2, doff << 4, flags, 65535, 0, 0)
    return hdr + bytes((doff - 5) * 4) + payload


def udp(sport, dport, payload=b""):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
BIG = bytes(400)  # payload that makes a packet not "small"


def test_tcp_five_tuple_and_an_ordinary_data_segment():
    p = ipv4(6, tcp(40000, 443, ACK | PSH, BIG))
    key, urgent = classify(p)
    assert key == (4, 6, A4, B4, 40000, 443)
    assert urgent == 0
    assert flow_key(p) == key
    # the reverse direction is another flow
    assert classify(ipv4(6, tcp(443, 40000, ACK, BIG), src=B4, dst=A4))[0] != key


def test_tcp_control_segments_are_urgent():
    assert classify(ipv4(6, tcp(1, 2, SYN)))[1] & Urgent.SYN
    assert classify(ipv4(6, tcp(1, 2, SYN | ACK)))[1] & Urgent.SYN
    assert classify(ipv4(6, tcp(1, 2, FIN | ACK, BIG)))[1] & Urgent.FIN
    assert classify(ipv4(6, tcp(1, 2, RST)))[1] & Urgent.RST
    # a pure ACK (no payload, even with options) is urgent; with data it is not
    assert classify(ipv4(6, tcp(1, 2, ACK, doff=8)), small=0)[1] == Urgent.ACK
    assert classify(ipv4(6, tcp(1, 2, ACK, BIG)))[1] == 0
    # SYN-ACK is not counted as a pure ACK
    assert not classify(ipv4(6, tcp(1, 2, SYN | ACK)), small=0)[1] & Urgent.ACK


def test_dns_icmp_dscp_and_small_packets_are_urgent():
    assert classify(ipv4(17, udp(5353, 53, BIG)))[1] == Urgent.DNS
    assert classify(ipv4(17, udp(53, 5353, BIG)))[1] == Urgent.DNS
    assert classify(ipv4(6, tcp(53, 1000, ACK | PSH, BIG)))[1] & Urgent.DNS
    key, urg = classify(ipv4(1, bytes(8) + BIG))
    assert urg & Urgent.ICMP and key == (4, 1, A4, B4, 0, 0)
    assert classify(ipv6(58, bytes(8) + BIG))[1] & Urgent.ICMP
    assert classify(ipv4(17, udp(1, 2, BIG), dscp=46))[1] == Urgent.DSCP  # EF
    assert classify(ipv6(17, udp(1, 2, BIG), dscp=46))[1] == Urgent.DSCP
    assert classify(ipv4(17, udp(1, 2, BIG), dscp=48))[1] == Urgent.DSCP  # CS6
    assert classify(ipv4(17, udp(1, 2, BIG), dscp=10))[1] == 0  # AF11: ordinary
    small = ipv4(17, udp(1, 2, bytes(50)))
    assert classify(small)[1] == Urgent.SMALL
    assert classify(small, small=0)[1] == 0
    assert describe(Urgent.SYN | Urgent.SMALL) == ["syn", "small"]


def test_ipv6_extension_headers_are_walked():
    hop = bytes([43, 0]) + bytes(6)  # hop-by-hop, next: routing
    routing = bytes([6, 0]) + bytes(6)  # routing, next: TCP
    p = ipv6(0, tcp(1234, 80, SYN), ext=hop + routing)
    key, urg = classify(p)
    assert key == (6, 6, A6, B6, 1234, 80) and urg & Urgent.SYN


def test_fragments_of_one_datagram_share_a_flow():
    first = ipv4(17, udp(1000, 2000, BIG), frag=0x2000)  # MF set, offset 0
    later = ipv4(17, BIG, frag=0x0010)  # offset 128, no UDP header
    assert classify(first)[0] == classify(later)[0] == (4, 17, A4, B4, 0, 0)
    frag6 = bytes([17, 0, 0, 0]) + bytes(4)
    assert classify(ipv6(44, udp(1, 2, BIG), ext=frag6))[0] == (6, 17, A6, B6, 0, 0)


def test_garbage_gets_the_other_key():
    assert classify(b"") == (OTHER, 0)
    assert classify(b"\x45" + bytes(10))[0] == OTHER  # truncated IPv4
    assert classify(b"\x60" + bytes(30))[0] == OTHER  # truncated IPv6
    assert classify(bytes(300))[0] == OTHER  # version 0
    # a header length pointing past the end
    assert classify(bytes([0x4F]) + bytes(30))[0] == OTHER


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 2000))
def test_classify_never_raises(data, small):
    key, urg = classify(data, small)
    assert isinstance(key, tuple) and len(key) == 6
    assert isinstance(urg, int) and 0 <= urg < 256


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 6]), st.integers(0, 65535), st.integers(0, 65535),
       st.integers(0, 255), st.binary(max_size=64))
def test_same_five_tuple_same_key_whatever_the_payload(v, sport, dport, flags, payload):
    mk = ipv4 if v == 4 else ipv6
    a = classify(mk(6, tcp(sport, dport, flags, payload)))[0]
    b = classify(mk(6, tcp(sport, dport, flags ^ PSH, payload + b"x")))[0]
    assert a == b == (v, 6, A4 if v == 4 else A6, B4 if v == 4 else B6, sport, dport)
