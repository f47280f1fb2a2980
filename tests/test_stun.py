"""STUN codec and Binding client (src/mpvpn/core/stun.py), with a fake clock.

The RFC 5769 / RFC 8489 appendix B vectors are the RFCs' published bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import stun

PW = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 2.1: request with short-term credentials, fingerprint
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf")
# RFC 5769 2.2: IPv4 response, mapped 192.0.2.1:32853
RFC5769_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96")
# RFC 5769 2.3: IPv6 response, mapped [2001:db8:1234:5678:11:2233:4455:6677]:32853
RFC5769_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c")
# RFC 5769 2.4: long-term credentials (username "マトリックス", password TheMatrIX)
RFC5769_LT = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b393534643 64f4c33346f4c39465354767936347341".replace(" ", "")
    + "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666")
# RFC 8489 B.1: MESSAGE-INTEGRITY-SHA256, USERHASH, PASSWORD-ALGORITHM SHA-256
RFC8489_B1 = bytes.fromhex(
    "000100902112a44278ad3433c6ad72c029da412e"
    "001e00204a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
    "001500296f624d61744a6f733241414143662f2f3439396b393534643"
    "64f4c33346f4c394653547679363473410000 00".replace(" ", "")
    + "0014000b6578616d706c652e6f726700"
    "001d000400020000"
    "001c0020b5c7bf005b6c52a21c51c5e892f81924136296cb927c43149309278cc6518e65")
USER_LT = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"


# --------------------------------------------------------------------------
# RFC vectors


def test_rfc5769_request_integrity_and_fingerprint():
    m = stun.decode(RFC5769_REQUEST)
    assert (m.method, m.cls) == (stun.BINDING, stun.REQUEST)
    assert m.get(stun.USERNAME) == b"evtj:h6vY"       # 0x20 padding ignored
    assert m.get(stun.SOFTWARE) == b"STUN test client"
    assert m.check_integrity(PW)
    assert not m.check_integrity(PW + b"x")
    assert m.check_fingerprint() is True


@pytest.mark.parametrize("raw,addr", [
    (RFC5769_V4, ("192.0.2.1", 32853)),
    (RFC5769_V6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
])
def test_rfc5769_responses(raw, addr):
    m = stun.decode(raw)
    assert (m.method, m.cls) == (stun.BINDING, stun.SUCCESS)
    assert stun.decode_address(m.get(stun.XOR_MAPPED_ADDRESS), xor=True, txid=m.txid) == addr
    assert stun.decode_text(m.get(stun.SOFTWARE), 763, "SOFTWARE") == "test vector"
    assert m.check_integrity(PW) and m.check_fingerprint() is True


def test_rfc5769_long_term_credentials_and_exact_encoding():
    m = stun.decode(RFC5769_LT)
    key = stun.long_term_key(USER_LT, "example.org", "TheMatrIX")
    assert m.check_integrity(key)
    # Our encoder, fed the same attributes and key, produces the RFC's bytes.
    attrs = [(t, v) for t, v in m.attrs if t != stun.MESSAGE_INTEGRITY]
    assert stun.encode(m.method, m.cls, m.txid, attrs, integrity=key) == RFC5769_LT


def test_rfc8489_b1_message_integrity_sha256():
    m = stun.decode(RFC8489_B1)
    assert m.get(stun.NONCE) == b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
    key = stun.long_term_key(USER_LT, "example.org", "TheMatrIX", "sha256")
    assert m.check_integrity_sha256(key)
    assert not m.check_integrity_sha256(stun.long_term_key(USER_LT, "example.org", "TheMatrIX"))
    attrs = [(t, v) for t, v in m.attrs if t != stun.MESSAGE_INTEGRITY_SHA256]
    assert stun.encode(m.method, m.cls, m.txid, attrs, integrity_sha256=key) == RFC8489_B1


@pytest.mark.parametrize("raw", [RFC5769_REQUEST, RFC5769_V4, RFC5769_V6])
def test_every_single_bit_flip_is_caught(raw):
    """Flipping any bit after the header breaks integrity or fingerprint (or
    the message no longer parses)."""
    for i in range(stun.HEADER_LEN, len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= bit
            try:
                m = stun.decode(bytes(bad))
            except stun.StunError:
                continue
            assert not (m.check_integrity(PW) and m.check_fingerprint()), (i, bit)


def test_attributes_after_integrity_are_ignored_but_fingerprint_kept():
    txid = bytes(12)
    raw = stun.encode(stun.BINDING, stun.REQUEST, txid, [(stun.SOFTWARE, b"a")], integrity=b"k")
    # append a foreign attribute after MESSAGE-INTEGRITY by hand
    extra = struct.pack("!HH", stun.USERNAME, 4) + b"evil"
    raw2 = raw[:2] + struct.pack("!H", len(raw) - 20 + len(extra)) + raw[4:] + extra
    m = stun.decode(raw2)
    assert m.get(stun.USERNAME) is None
    assert m.check_integrity(b"k")


# --------------------------------------------------------------------------
# strict parsing


def _hdr(length, mtype=0x0101, cookie=stun.MAGIC_COOKIE):
    return struct.pack("!HHI", mtype, length, cookie) + bytes(12)


@pytest.mark.parametrize("raw,why", [
    (b"", "short"),
    (_hdr(0)[:19], "short"),
    (_hdr(0, mtype=0xC101), "top two bits"),
    (_hdr(0, cookie=0x2112A443), "magic cookie"),
    (_hdr(2) + b"ab", "multiple of 4"),
    (_hdr(8), "does not match"),
    (_hdr(4) + struct.pack("!HH", 0x8022, 8), "runs past"),
    (_hdr(8) + struct.pack("!HH", 0x8022, 5) + b"abcd", "runs past"),
    (_hdr(16) + struct.pack("!HHI", stun.FINGERPRINT, 4, 0) + struct.pack("!HHI", 0x8022, 4, 0),
     "after FINGERPRINT"),
    (_hdr(8) + struct.pack("!HHI", stun.FINGERPRINT, 2, 0), "FINGERPRINT is not 4"),
    (_hdr(4 * 129) + struct.pack("!HH", 0x8022, 0) * 129, "more than 128"),
])
def test_malformed_messages_raise_stun_error(raw, why):
    with pytest.raises(stun.StunError, match=why):
        stun.decode(raw)


def test_oversized_is_refused_before_parsing():
    raw = stun.encode(stun.BINDING, stun.SUCCESS, bytes(12), [(stun.SOFTWARE, b"x" * 2000)])
    with pytest.raises(stun.StunError, match="oversized"):
        stun.decode(raw, max_len=1500)


@pytest.mark.parametrize("value,why", [
    (b"\x00\x01\x00", "shorter"),
    (b"\x00\x01\x00\x01\x01\x02\x03", "not 8"),
    (b"\x00\x02\x00\x01" + bytes(15), "not 20"),
    (b"\x00\x03\x00\x01" + bytes(4), "family"),
])
def test_bad_address_values(value, why):
    with pytest.raises(stun.StunError, match=why):
        stun.decode_address(value, xor=True, txid=bytes(12))


def test_error_code_bounds():
    assert stun.decode_error_code(stun.encode_error_code(438, "Stale Nonce")) == (438, "Stale Nonce")
    for bad in (b"\x00\x00\x02\x00", b"\x00\x00\x04\x64", b"\x00\x00\x07\x00", b"\x00\x00"):
        with pytest.raises(stun.StunError):
            stun.decode_error_code(bad)
    with pytest.raises(stun.StunError, match="too long"):
        stun.decode_error_code(b"\x00\x00\x04\x00" + b"x" * 764)


# --------------------------------------------------------------------------
# hypothesis: round trips and fuzz

attr_values = st.lists(st.tuples(st.integers(0, 0xFFFF).filter(
    lambda t: t not in (stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT)),
    st.binary(max_size=64)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(method=st.integers(0, 0xFFF), cls=st.sampled_from([0, 1, 2, 3]),
       txid=st.binary(min_size=12, max_size=12), attrs=attr_values,
       key=st.none() | st.binary(min_size=1, max_size=32), fp=st.booleans())
def test_roundtrip(method, cls, txid, attrs, key, fp):
    raw = stun.encode(method, cls, txid, attrs, integrity=key, fingerprint=fp)
    assert stun.looks_like_stun(raw)
    m = stun.decode(raw)
    assert (m.method, m.cls, m.txid) == (method, cls, txid)
    body = [(t, v) for t, v in m.attrs if t not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)]
    assert body == attrs
    if key is not None:
        assert m.check_integrity(key)
    assert m.check_fingerprint() is (True if fp else None)


@settings(max_examples=200, deadline=None)
@given(ip=st.ip_addresses(), port=st.integers(0, 65535), xor=st.booleans(),
       txid=st.binary(min_size=12, max_size=12))
def test_address_roundtrip(ip, port, xor, txid):
    v = stun.encode_address((str(ip), port), xor=xor, txid=txid)
    assert stun.decode_address(v, xor=xor, txid=txid) == (str(ip), port)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_stun_error(data):
    try:
        stun.decode(data)
    except stun.StunError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_messages_only_raise_stun_error(data):
    raw = bytearray(data.draw(st.sampled_from([RFC5769_REQUEST, RFC5769_V4, RFC5769_V6,
                                               RFC5769_LT, RFC8489_B1])))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        m = stun.decode(bytes(raw[:cut]))
        m.check_integrity(PW)
        m.check_fingerprint()
        for t, v in m.attrs:
            if t in (stun.XOR_MAPPED_ADDRESS, stun.MAPPED_ADDRESS):
                stun.decode_address(v, xor=t == stun.XOR_MAPPED_ADDRESS, txid=m.txid)
    except stun.StunError:
        pass


# --------------------------------------------------------------------------
# retransmission (RFC 8489 6.2.1)


def test_retransmit_schedule_defaults():
    r = stun.Retransmit(100.0)
    assert r.send_times() == [100.0, 100.5, 101.5, 103.5, 107.5, 115.5, 131.5]
    assert r.timeout_at == 139.5
    sends, t = [], 100.0
    while True:
        what = r.due(t)
        if what == "send":
            sends.append(t)
        elif what == "timeout":
            break
        t = r.next_deadline()
    assert sends == r.send_times() and t == 139.5


def test_retransmit_late_caller_gets_no_burst():
    r = stun.Retransmit(0.0)
    assert r.due(0.0) == "send"
    assert r.due(10.0) == "send"       # 3 sends were due; one goes out
    assert r.due(10.0) == "send"
    assert r.sent == 3


# --------------------------------------------------------------------------
# Binding client

S1, S2 = ("198.51.100.1", 3478), ("198.51.100.2", 3478)
LOCAL = ("10.1.0.1", 40000)


class Clock:
    def __init__(self, t=1000.0):
        self.t = t


def _answer(req: bytes, mapped, *, other=None, xor=True, fp=True, txid=None):
    m = stun.decode(req)
    tid = txid or m.txid
    attrs = []
    if xor:
        attrs.append((stun.XOR_MAPPED_ADDRESS, stun.encode_address(mapped, xor=True, txid=tid)))
    else:
        attrs.append((stun.MAPPED_ADDRESS, stun.encode_address(mapped, xor=False)))
    if other:
        attrs.append((stun.OTHER_ADDRESS, stun.encode_address(other, xor=False)))
    return stun.encode(stun.BINDING, stun.SUCCESS, tid, attrs, fingerprint=fp)


def _sent(c):
    return {dest: data for data, dest in c.take_outgoing()}


def test_binding_request_shape_and_retransmissions():
    c = stun.BindingClient([S1], LOCAL, software="mpvpn")
    c.start(0.0)
    times = []
    t = 0.0
    while True:
        out = c.take_outgoing()
        for data, dest in out:
            assert dest == S1
            m = stun.decode(data)
            assert (m.method, m.cls) == (stun.BINDING, stun.REQUEST)
            assert m.check_fingerprint() is True and m.get(stun.SOFTWARE) == b"mpvpn"
            times.append(t)
        if c.result is not None:
            break
        t = c.next_deadline()
        c.on_timer(t)
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert c.result.at == 39.5 and c.result.public is None
    assert c.result.nat == stun.NAT_UNKNOWN and "no answer from 198.51.100.1:3478" in c.result.error
    assert c.timeouts == 1
    # periodic re-check
    assert c.next_deadline() == 39.5 + 300.0


def test_retransmissions_reuse_the_same_transaction():
    c = stun.BindingClient([S1], LOCAL)
    c.start(0.0)
    first = c.take_outgoing()[0][0]
    c.on_timer(0.5)
    again = c.take_outgoing()[0][0]
    assert first == again


@pytest.mark.parametrize("mapped1,mapped2,nat", [
    (LOCAL, LOCAL, stun.NAT_NONE),
    (("203.0.113.5", 40000), ("203.0.113.5", 40000), stun.NAT_EIM),
    (("203.0.113.5", 40000), ("203.0.113.5", 51234), stun.NAT_EDM),
])
def test_classification_from_two_servers(mapped1, mapped2, nat):
    c = stun.BindingClient([S1, S2], LOCAL)
    c.start(0.0)
    sent = _sent(c)
    assert set(sent) == {S1, S2}
    c.on_datagram(_answer(sent[S1], mapped1), S1, 0.02)
    if nat != stun.NAT_NONE:
        assert c.result is None
        c.on_datagram(_answer(sent[S2], mapped2, xor=False), S2, 0.03)
    assert c.result.nat == nat and c.result.public == mapped1
    assert c.take_events() == [c.result]
    assert not c.busy and c.drops == {}
    assert c.status()["nat"] == nat


def test_classification_through_other_address():
    c = stun.BindingClient([S1], None)
    c.start(0.0)
    req = _sent(c)[S1]
    c.on_datagram(_answer(req, ("203.0.113.5", 40000), other=("198.51.100.9", 3479)), S1, 0.01)
    out = _sent(c)
    assert list(out) == [("198.51.100.9", 3478)]        # RFC 5780 test II: other IP, same port
    # the answer must come from where the request went, not from S1
    reply = _answer(out[("198.51.100.9", 3478)], ("203.0.113.5", 40001))
    c.on_datagram(reply, S1, 0.02)
    assert c.drops == {"wrong_source": 1} and c.result is None
    c.on_datagram(reply, ("198.51.100.9", 3478), 0.02)
    assert c.result.nat == stun.NAT_EDM
    assert c.result.other_address == ("198.51.100.9", 3479)


def test_one_mapping_only_is_unknown_with_reason():
    c = stun.BindingClient([S1], ("10.1.0.1", 40000))
    c.start(0.0)
    c.on_datagram(_answer(_sent(c)[S1], ("203.0.113.5", 40000)), S1, 0.01)
    assert c.result.nat == stun.NAT_UNKNOWN and c.result.public == ("203.0.113.5", 40000)
    assert "second server" in c.result.error


def test_second_server_timing_out_gives_unknown_after_its_timeout():
    c = stun.BindingClient([S1, S2], LOCAL)
    c.start(0.0)
    c.on_datagram(_answer(_sent(c)[S1], ("203.0.113.5", 40000)), S1, 0.01)
    while c.result is None:
        c.on_timer(c.next_deadline())
    assert c.result.at == 39.5 and c.result.nat == stun.NAT_UNKNOWN
    assert "no answer from 198.51.100.2:3478" in c.result.error


def test_recheck_runs_a_new_round_with_new_transactions():
    c = stun.BindingClient([S1, S2], LOCAL, recheck_interval=60)
    c.start(0.0)
    sent = _sent(c)
    c.on_datagram(_answer(sent[S1], ("203.0.113.5", 1)), S1, 0.1)
    c.on_datagram(_answer(sent[S2], ("203.0.113.5", 1)), S2, 0.1)
    assert c.next_deadline() == 60.1
    c.on_timer(60.1)
    again = _sent(c)
    assert set(again) == {S1, S2} and again[S1] != sent[S1] and c.rounds == 2
    # an answer to the old round's transaction is now unknown
    c.on_datagram(_answer(sent[S1], ("203.0.113.5", 1)), S1, 60.2)
    assert c.drops == {"unknown_transaction": 1}
    # a hotplug/SIGHUP re-check starts at once
    c.recheck(61.0)
    assert set(_sent(c)) == {S1, S2} and c.rounds == 3


def test_bad_answers_are_counted_drops():
    c = stun.BindingClient([S1, S2], LOCAL)
    c.start(0.0)
    sent = _sent(c)
    good = _answer(sent[S1], ("203.0.113.5", 1))
    c.on_datagram(_answer(sent[S1], ("203.0.113.5", 1), txid=bytes(12)), S1, 0.1)
    c.on_datagram(good, ("198.51.100.1", 3479), 0.1)         # right IP, wrong port
    c.on_datagram(good, ("198.51.100.3", 3478), 0.1)
    c.on_datagram(good[:-1], S1, 0.1)
    c.on_datagram(good + bytes(2000), S1, 0.1)
    bad_fp = bytearray(good)
    bad_fp[-1] ^= 1
    c.on_datagram(bytes(bad_fp), S1, 0.1)
    c.on_datagram(sent[S1], S1, 0.1)                          # a request, reflected
    m = stun.decode(sent[S1])
    no_addr = stun.encode(stun.BINDING, stun.SUCCESS, m.txid, [])
    c.on_datagram(no_addr, S1, 0.1)
    c.on_datagram(good, "not an address", 0.1)
    assert c.drops == {"unknown_transaction": 1, "wrong_source": 3, "malformed": 2,
                       "oversized": 1, "bad_fingerprint": 1, "not_a_binding_response": 1}
    assert c.result is None and c.busy
    c.on_datagram(good, S1, 0.2)                               # the real one still counts
    assert c.result is None and c.busy                         # waiting for S2
    c.on_datagram(_answer(sent[S2], ("203.0.113.5", 1)), S2, 0.3)
    assert c.result.nat == stun.NAT_EIM and len(c.result.mappings) == 2


def test_error_response_ends_that_servers_part():
    c = stun.BindingClient([S1], LOCAL)
    c.start(0.0)
    m = stun.decode(_sent(c)[S1])
    err = stun.encode(stun.BINDING, stun.ERROR, m.txid,
                      [(stun.ERROR_CODE, stun.encode_error_code(400, "Bad Request"))])
    c.on_datagram(err, S1, 0.1)
    assert c.result.public is None and "answered 400 Bad Request" in c.result.error


def test_no_servers():
    c = stun.BindingClient([], LOCAL)
    c.start(5.0)
    assert c.result.error == "no STUN servers configured" and c.take_outgoing() == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_client_never_raises_on_garbage(datagrams):
    c = stun.BindingClient([S1], LOCAL)
    c.start(0.0)
    for d in datagrams:
        c.on_datagram(d, S1, 0.1)
    assert sum(c.drops.values()) == len(datagrams)

