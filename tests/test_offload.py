"""tun offloads (sans I/O): virtio_net_hdr, TSO split, GRO coalesce, checksums.

Packets are built here with struct and checked against a slow reference
checksum written independently of the module."""

import os
import random
import struct

import pytest

from mpvpn.io import offload as o


def ref_sum(data: bytes) -> int:
    """Textbook RFC 1071 sum with end-around carry, folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip4_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 15) * 4
    return ref_sum(pkt[:ihl]) == 0xFFFF


def l4_ok(pkt: bytes, proto: int) -> bool:
    """Transport checksum verifies over pseudo-header + segment."""
    if pkt[0] >> 4 == 4:
        t = (pkt[0] & 15) * 4
        seg = pkt[t:struct.unpack_from("!H", pkt, 2)[0]]
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        seg = pkt[40:40 + struct.unpack_from("!H", pkt, 4)[0]]
        pseudo = pkt[8:40] + struct.pack("!IxxxB", len(seg), proto)
    return ref_sum(pseudo + seg) == 0xFFFF


SRC4, DST4 = bytes([192, 168, 10, 2]), bytes([192, 168, 20, 2])
SRC6, DST6 = bytes.fromhex("fd000000000000000000000000000a02"), bytes.fromhex("fd000000000000000000000000001402")
TS_OPT = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)  # NOP NOP timestamps


def tcp_hdr(seq, flags=o.TCP_ACK, ack=1000, win=501, opts=TS_OPT, sport=40000, dport=5201):
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, (5 + len(opts) // 4) << 4,
                       flags, win, 0, 0) + opts


def ip4(payload_l4: bytes, proto=6, ident=7, ttl=64, src=SRC4, dst=DST4, frag=0x4000):
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload_l4), ident, frag, ttl, proto, 0,
                              src, dst))
    c = 0xFFFF - ref_sum(bytes(h))
    h[10:12] = struct.pack("!H", c)
    return bytes(h) + payload_l4


def ip6(payload_l4: bytes, nh=6, src=SRC6, dst=DST6):
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload_l4), nh, 64, src, dst) + payload_l4


def with_l4_csum(pkt: bytes, proto=6) -> bytes:
    """The packet with a correct transport checksum (reference implementation)."""
    b = bytearray(pkt)
    t = 20 if pkt[0] >> 4 == 4 else 40
    at = t + (16 if proto == 6 else 6)
    b[at:at + 2] = b"\0\0"
    seg = bytes(b[t:])
    if t == 20:
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        pseudo = pkt[8:40] + struct.pack("!IxxxB", len(seg), proto)
    c = 0xFFFF - ref_sum(pseudo + seg)
    b[at:at + 2] = struct.pack("!H", c or 0xFFFF)
    return bytes(b)


def tcp_segment(v, seq, payload, flags=o.TCP_ACK, ident=7, **kw):
    pkt = (ip4 if v == 4 else ip6)(tcp_hdr(seq, flags, **kw) + payload, **({"ident": ident} if v == 4 else {}))
    return with_l4_csum(pkt)


def super_segment(v, seq, payload, gso_size, flags=o.TCP_ACK | o.TCP_PSH, ident=100):
    """What the kernel hands a TSO tun: one big packet, partial checksum
    (the pseudo-header sum over the whole length in the TCP checksum field)."""
    tcp = bytearray(tcp_hdr(seq, flags) + payload)
    if v == 4:
        pkt = bytearray(ip4(bytes(tcp), ident=ident))
        t = 20
        pseudo = ref_sum(SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(tcp)))
        gso = o.GSO_TCPV4
    else:
        pkt = bytearray(ip6(bytes(tcp)))
        t = 40
        pseudo = ref_sum(SRC6 + DST6 + struct.pack("!IxxxB", len(tcp), 6))
        gso = o.GSO_TCPV6
    pkt[t + 16:t + 18] = struct.pack("!H", pseudo)
    hlen = t + len(tcp_hdr(0))
    return o.build_hdr(o.F_NEEDS_CSUM, gso, hlen, gso_size, t, 16) + bytes(pkt)


def join(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


# -- checksums --------------------------------------------------------------------

def test_checksum_matches_the_textbook_sum():
    rnd = random.Random(4)
    for n in list(range(0, 9)) + [1379, 1380, 65000]:
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        assert o.ones_sum(data) % 0xFFFF == ref_sum(data) % 0xFFFF
        c = o.checksum(data)
        assert 0 < c <= 0xFFFF
        assert ref_sum(data + struct.pack("!H", c) if n % 2 == 0 else data + b"\0" + struct.pack("!H", c)) == 0xFFFF
    assert o.checksum(b"\xff\xff") == 0xFFFF and o.checksum(b"") == 0xFFFF


def test_header_round_trip():
    h = o.build_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV4, 52, 1348, 20, 16)
    assert len(h) == o.VNET_HDR_LEN == 10
    assert o.parse_hdr(h + b"x") == (1, 1, 52, 1348, 20, 16)
    with pytest.raises(o.OffloadError):
        o.parse_hdr(b"\0" * 9)


# -- reading: split ----------------------------------------------------------------

@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("size", [1348 * 3, 1348 * 48 + 77, 1])
def test_tso_split_gives_valid_segments(v, size):
    payload = os.urandom(size)
    seq0 = 0xFFFFF000  # wraps
    segs = o.split(super_segment(v, seq0, payload, 1348, flags=o.TCP_ACK | o.TCP_PSH | o.TCP_CWR))
    assert len(segs) == -(-size // 1348)
    got = b""
    for i, s in enumerate(segs):
        assert isinstance(s, bytes)
        t = 20 if v == 4 else 40
        if v == 4:
            assert ip4_ok(s) and struct.unpack_from("!H", s, 2)[0] == len(s)
            assert struct.unpack_from("!H", s, 4)[0] == 100 + i  # ids go up as the kernel's GSO does
        else:
            assert struct.unpack_from("!H", s, 4)[0] == len(s) - 40
        assert l4_ok(s, 6)
        assert struct.unpack_from("!I", s, t + 4)[0] == (seq0 + len(got)) & 0xFFFFFFFF
        flags = s[t + 13]
        assert bool(flags & o.TCP_PSH) == (i == len(segs) - 1)
        assert bool(flags & o.TCP_CWR) == (i == 0)
        hlen = t + 20 + len(TS_OPT)
        assert s[t + 20:hlen] == TS_OPT
        assert len(s) - hlen <= 1348
        got += s[hlen:]
    assert got == payload


def test_split_plain_and_partial_checksum_packets():
    udp = struct.pack("!HHHH", 5000, 53, 8 + 5, 0) + b"hello"
    pkt = ip4(udp, proto=17)
    assert o.split(o.PLAIN_HDR + pkt) == [pkt]
    # NEEDS_CSUM without GSO (TUN_F_CSUM): the field holds the pseudo-header sum
    partial = bytearray(pkt)
    partial[26:28] = struct.pack("!H", ref_sum(SRC4 + DST4 + struct.pack("!BBH", 0, 17, len(udp))))
    (done,) = o.split(o.build_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(partial))
    assert l4_ok(done, 17) and done[:26] == pkt[:26] and done[28:] == pkt[28:]
    with pytest.raises(o.OffloadError):
        o.split(o.build_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 600) + pkt)
    with pytest.raises(o.OffloadError):
        o.split(o.build_hdr(0, 9, 0, 1000, 20, 16) + pkt)  # unknown gso type


def test_uso_split():
    payload = os.urandom(3000)
    udp = bytearray(struct.pack("!HHHH", 5000, 443, 8 + len(payload), 0) + payload)
    pkt = bytearray(ip4(bytes(udp), proto=17, ident=9))
    pkt[26:28] = struct.pack("!H", ref_sum(SRC4 + DST4 + struct.pack("!BBH", 0, 17, len(udp))))
    segs = o.split(o.build_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, 28, 1200, 20, 6) + bytes(pkt))
    assert [len(s) - 28 for s in segs] == [1200, 1200, 600]
    for s in segs:
        assert ip4_ok(s) and l4_ok(s, 17) and struct.unpack_from("!H", s, 24)[0] == len(s) - 20
    assert b"".join(s[28:] for s in segs) == payload


def test_tso_split_refuses_nonsense():
    good = super_segment(4, 1, b"x" * 3000, 1000)
    bad = bytearray(good)
    bad[10 + 9] = 17  # says TCP GSO but carries UDP
    with pytest.raises(o.OffloadError):
        o.split(bytes(bad))
    with pytest.raises(o.OffloadError):
        o.split(good[:10 + 30])  # truncated TCP header
    bad = bytearray(good)
    bad[6:8] = b"\0\0"  # gso_size 0
    with pytest.raises(o.OffloadError):
        o.split(bytes(bad))


# -- writing: coalesce --------------------------------------------------------------

def flow(v, n, mss=1348, seq0=5000, last=None, ident0=300, **kw):
    out, seq = [], seq0
    for i in range(n):
        size = last if (last and i == n - 1) else mss
        out.append(tcp_segment(v, seq, os.urandom(size), ident=ident0 + i, **kw))
        seq += size
    return out


@pytest.mark.parametrize("v", [4, 6])
def test_coalesced_super_segment_splits_back_into_the_originals(v):
    segs = flow(v, 10, last=500)
    segs[-1] = with_l4_csum(bytes(bytearray(segs[-1][:(33 if v == 4 else 53)])
                                  + bytes([segs[-1][33 if v == 4 else 53] | o.TCP_PSH])
                                  + segs[-1][(34 if v == 4 else 54):]))
    if v == 4:
        assert all(ip4_ok(s) for s in segs)
    (frame,) = o.coalesce(segs)
    raw = join(frame)
    flags, gso_type, hdr_len, gso_size, cs, co = o.parse_hdr(raw)
    t = 20 if v == 4 else 40
    assert (flags, gso_type, hdr_len, gso_size, cs, co) == (
        o.F_NEEDS_CSUM, o.GSO_TCPV4 if v == 4 else o.GSO_TCPV6, t + 32, 1348, t, 16)
    big = raw[10:]
    if v == 4:
        assert ip4_ok(big) and struct.unpack_from("!H", big, 2)[0] == len(big)
    # the checksum field holds the pseudo-header sum: completing it gives a valid packet
    done = bytearray(big)
    o.complete_checksum(done, t, 16)
    assert l4_ok(bytes(done), 6)
    # segmenting it as the kernel does gives back exactly what went in
    assert o.split(raw) == segs


def test_coalesce_keeps_flows_and_order_and_refuses_what_cannot_merge():
    a = flow(4, 4, sport=1111)
    b = flow(4, 3, sport=2222, seq0=9)
    udp = ip4(struct.pack("!HHHH", 1, 2, 9, 0) + b"u", proto=17)
    mixed = [a[0], b[0], a[1], udp, b[1], a[2], a[3], b[2]]
    frames = o.coalesce(mixed)
    assert len(frames) == 3
    assert [o.split(join(f)) for f in frames] == [a, b, [udp]]

    def count(pkts):
        return len(o.coalesce(pkts))

    base = flow(4, 3)
    assert count(base) == 1
    assert count([base[0], base[2]]) == 2  # sequence gap
    assert count([base[1], base[0]]) == 2  # out of order
    gap_id = flow(4, 2)
    gap_id[1] = tcp_segment(4, 5000 + 1348, os.urandom(1348), ident=999)
    assert count(gap_id) == 2
    assert count(flow(4, 3, flags=o.TCP_ACK | o.TCP_PSH)) == 3  # PSH ends a super-segment
    assert count(flow(4, 2, flags=o.TCP_ACK | o.TCP_FIN)) == 2
    short_first = [tcp_segment(4, 0, b"x" * 100, ident=1), tcp_segment(4, 100, b"y" * 100, ident=2)]
    assert count(short_first) == 1  # equal sizes merge (gso_size 100)
    grow = [tcp_segment(4, 0, b"x" * 100, ident=1), tcp_segment(4, 100, b"y" * 200, ident=2)]
    assert count(grow) == 2  # a bigger segment after a smaller one cannot
    acks = [tcp_segment(4, 0, b"", ident=i) for i in range(3)]
    assert count(acks) == 3  # no payload: nothing to merge
    diff_ack = flow(4, 2)
    diff_ack[1] = tcp_segment(4, 5000 + 1348, os.urandom(1348), ident=301, ack=2000)
    assert count(diff_ack) == 2
    diff_ttl = [flow(4, 1)[0], with_l4_csum(ip4(tcp_hdr(5000 + 1348) + b"z" * 1348, ident=301, ttl=3))]
    assert count(diff_ttl) == 2
    mf = [with_l4_csum(ip4(tcp_hdr(0) + b"z" * 100, ident=1, frag=0x2000)),
          with_l4_csum(ip4(tcp_hdr(100) + b"z" * 100, ident=2, frag=0x2000))]
    assert count(mf) == 2  # fragments are left alone
    big = flow(4, 60, mss=1400)
    frames = o.coalesce(big)
    assert len(frames) == 2 and all(len(join(f)) - 10 <= 65535 for f in frames)
    assert [p for f in frames for p in o.split(join(f))] == big
    assert o.coalesce([]) == []


def test_single_packets_are_written_as_they_came():
    pkt = flow(4, 1)[0]
    assert o.coalesce([pkt]) == [[o.PLAIN_HDR, pkt]]
    assert o.coalesce([b"\x60"]) == [[o.PLAIN_HDR, b"\x60"]]  # junk is passed on, never raises


# -- the C loops (mpvpn.core.fastpath) against this module's Python ---------------------

from mpvpn.core import fastpath  # noqa: E402

needs_c = pytest.mark.skipif(fastpath.LOOPS is None, reason=f"C loops {fastpath.WHY}: run `make fastpath`")


@needs_c
def test_c_coalesce_writes_exactly_what_python_writes():
    rng = random.Random(7)
    for trial in range(200):
        v = rng.choice([4, 6])
        flows = [flow(v, rng.randint(1, 30), mss=rng.choice([536, 1348, 1388]), seq0=rng.randint(0, 2**32 - 1),
                      last=rng.choice([None, 1, 700]), ident0=rng.randint(0, 65535), sport=40000 + k)
                 for k in range(rng.randint(1, 3))]
        packets = []
        while any(flows):
            f = rng.choice([f for f in flows if f])
            packets.append(f.pop(0))
            r = rng.random()
            if r < 0.05:
                packets.append(tcp_segment(v, 1, b"", flags=o.TCP_ACK))  # pure ACK: never merged
            elif r < 0.08 and len(packets) > 2:
                packets.append(packets[-2])  # out of order
            elif r < 0.10:
                packets.append(os.urandom(rng.randint(0, 80)))  # not even IP
        want = [join(bufs) for bufs in o.coalesce(packets)]
        got = fastpath.LOOPS.coalesce(packets)
        assert got == want, trial
        assert sum(o.frame_packets(f) for f in got) == len(packets)


@needs_c
def test_c_split_matches_python_and_refuses_the_same_frames():
    rng = random.Random(8)
    frames = []
    for v in (4, 6):
        for size in (1, 999, 1000, 3001, 60000):
            frames.append(super_segment(v, rng.randint(0, 2**32 - 1), os.urandom(size), rng.choice([536, 1000, 1448])))
        segs = flow(v, 20, last=333)
        frames += [join(bufs) for bufs in o.coalesce(segs)]  # what we write is what the kernel would hand over
    payload = os.urandom(3000)
    udp = bytearray(struct.pack("!HHHH", 5000, 443, 8 + len(payload), 0) + payload)
    pkt = bytearray(ip4(bytes(udp), proto=17, ident=9))
    frames.append(o.build_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, 28, 1200, 20, 6) + bytes(pkt))
    frames.append(o.build_hdr(o.F_NEEDS_CSUM, 0, 0, 0, 20, 16) + flow(4, 1)[0])  # partial checksum only
    frames.append(o.PLAIN_HDR + b"anything")
    for f in frames:
        assert fastpath.LOOPS.split(f) == o.split_py(f)
    for _ in range(3000):  # mangled frames: both refuse, or both give the same packets
        f = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(len(f), 80))
            f[i] = rng.randrange(256)
        f = bytes(f[:rng.randint(0, len(f))]) if rng.random() < 0.3 else bytes(f)
        try:
            want = o.split_py(f)
        except (o.OffloadError, IndexError, ValueError):
            want = None
        try:
            got = fastpath.LOOPS.split(f)
        except ValueError:
            got = None
        assert got == want
