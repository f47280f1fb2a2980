"""MSS clamping (mpvpn.core.mss): SYNs lowered to what the vNIC carries, checksums
kept right (checked with the reference sum of test_offload), everything else
untouched, malformed input never raises."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from test_offload import ip4, ip6, l4_ok, tcp_hdr, with_l4_csum

from mpvpn.core import mss
from mpvpn.io.offload import TCP_ACK

SYN = 0x02
MSS4, MSS6 = mss.mss_for_mtu(1400)


def mss_opt(value: int) -> bytes:
    return struct.pack("!BBH", 2, 4, value)


def syn(v: int, opts: bytes, flags: int = SYN) -> bytes:
    pad = (-len(opts)) % 4
    opts = opts + b"\0" * pad  # END padding
    return with_l4_csum((ip4 if v == 4 else ip6)(tcp_hdr(0, flags, ack=0, opts=opts)))


def mss_of(pkt: bytes) -> int | None:
    t = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
    end = t + (pkt[t + 12] >> 4) * 4
    i = t + 20
    while i < end:
        if pkt[i] == 0:
            return None
        if pkt[i] == 1:
            i += 1
            continue
        if pkt[i] == 2:
            return struct.unpack("!H", pkt[i + 2:i + 4])[0]
        i += pkt[i + 1]
    return None


def test_mss_for_mtu_leaves_room_for_the_ip_and_tcp_headers():
    assert mss.mss_for_mtu(1400) == (1360, 1340)
    assert mss.mss_for_mtu(1500) == (1460, 1440)


def test_a_syn_s_mss_is_lowered_and_its_checksum_stays_right():
    for v, limit in ((4, MSS4), (6, MSS6)):
        for flags in (SYN, SYN | TCP_ACK):  # the LAN host's SYN, or its SYN-ACK
            pkt = syn(v, mss_opt(1460) + b"\x04\x02" + b"\x01\x01\x08\x0a" + bytes(8), flags)
            out = mss.clamp(pkt, MSS4, MSS6)
            assert out is not None and len(out) == len(pkt)
            assert mss_of(out) == limit
            assert l4_ok(out, 6)
            # nothing else changed
            diff = [i for i in range(len(pkt)) if pkt[i] != out[i]]
            t = 20 if v == 4 else 40
            assert set(diff) <= {t + 16, t + 17, t + 22, t + 23}


def test_an_mss_at_an_odd_offset_is_clamped_with_a_right_checksum():
    # NOP before MSS: the value straddles two 16-bit words of the header
    for v in (4, 6):
        pkt = syn(v, b"\x01" + mss_opt(8960) + b"\x01\x01\x01")
        out = mss.clamp(pkt, MSS4, MSS6)
        assert out is not None and mss_of(out) == (MSS4 if v == 4 else MSS6)
        assert l4_ok(out, 6)


def test_what_needs_no_change_is_returned_as_none():
    assert mss.clamp(syn(4, mss_opt(1200)), MSS4, MSS6) is None  # already small
    assert mss.clamp(syn(4, mss_opt(MSS4)), MSS4, MSS6) is None
    assert mss.clamp(syn(4, mss_opt(1460), flags=TCP_ACK), MSS4, MSS6) is None  # not a SYN
    assert mss.clamp(syn(4, b"\x01\x01\x08\x0a" + bytes(8)), MSS4, MSS6) is None  # no MSS option
    assert mss.clamp(syn(4, b"\x00" + mss_opt(1460)), MSS4, MSS6) is None  # after END
    udp = with_l4_csum(ip4(struct.pack("!HHHH", 1, 2, 8 + 20, 0) + bytes(20), proto=17), proto=17)
    assert mss.clamp(udp, MSS4, MSS6) is None
    # a later fragment: its bytes at the TCP offset are payload
    frag = bytearray(syn(4, mss_opt(1460)))
    frag[6:8] = struct.pack("!H", 185)
    assert mss.clamp(bytes(frag), MSS4, MSS6) is None
    # IPv6 with an extension header (hop-by-hop) is left alone
    hbh = ip6(bytes([6, 0, 0, 0, 0, 0, 0, 0]) + tcp_hdr(0, SYN, opts=mss_opt(1460)), nh=0)
    assert mss.clamp(hbh, MSS4, MSS6) is None


def test_a_bad_checksum_stays_bad():
    pkt = bytearray(syn(4, mss_opt(1460)))
    pkt[36] ^= 0x55  # corrupt the checksum
    out = mss.clamp(bytes(pkt), MSS4, MSS6)
    assert out is not None and mss_of(out) == MSS4
    assert not l4_ok(out, 6)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"\x01", b"\x04\x02", b"\x01\x01\x08\x0a" + bytes(8), b"\x03\x03\x07"]),
                max_size=5),
       st.integers(0, 4), st.integers(0, 0xFFFF), st.sampled_from([4, 6]))
def test_any_option_layout_gets_a_right_checksum(pre, at, value, v):
    """The MSS option anywhere among other options (any alignment): the
    result's checksum verifies and the value is min(value, limit)."""
    opts = pre[:at] + [mss_opt(value)] + pre[at:]
    raw = b"".join(opts)
    if len(raw) > 40:
        return
    pkt = syn(v, raw)
    limit = MSS4 if v == 4 else MSS6
    out = mss.clamp(pkt, MSS4, MSS6)
    if value <= limit:
        assert out is None
    else:
        assert out is not None and mss_of(out) == limit and l4_ok(out, 6)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_malformed_input_never_raises(data):
    out = mss.clamp(data, MSS4, MSS6)
    assert out is None or len(out) == len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=20, max_size=60), st.sampled_from([4, 6]))
def test_random_tcp_headers_never_raise(tail, v):
    pkt = (ip4 if v == 4 else ip6)(bytes([0, 1, 0, 2]) + bytes(8) + bytes([0xF0, SYN]) + tail)
    out = mss.clamp(pkt, MSS4, MSS6)
    assert out is None or len(out) == len(pkt)
