"""TURN client (src/mpvpn/core/turn.py) with a fake clock and hand-made server
answers.  The answers follow RFC 8656 / coturn's behaviour (ns_turn_server.c:
401 with REALM+NONCE first, MESSAGE-INTEGRITY on authenticated responses,
438 with a fresh NONCE); tests/test_coturn.py checks the same paths against
the real coturn."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import stun, turn

SRV = ("192.0.2.10", 3478)
RELAYED = ("192.0.2.10", 49152)
MAPPED = ("203.0.113.5", 40000)
PEER = ("198.51.100.7", 5000)
REALM, USER, PW = "example.org", "alice", "secret"
KEY = stun.long_term_key(USER, REALM, PW)


class FakeServer:
    """Answers the client's requests the way coturn does."""

    def __init__(self, nonce=b"nonce-1"):
        self.nonce = nonce
        self.seen = []

    def parse(self, data):
        m = stun.decode(data)
        self.seen.append(m)
        return m

    def error(self, req, code, *, realm=True, nonce=None, integrity=False):
        attrs = [(stun.ERROR_CODE, stun.encode_error_code(code, "x"))]
        if realm:
            attrs += [(stun.REALM, REALM.encode()), (stun.NONCE, nonce or self.nonce)]
        return stun.encode(req.method, stun.ERROR, req.txid, attrs,
                           integrity=KEY if integrity else None, fingerprint=True)

    def ok(self, req, attrs=(), key=KEY):
        return stun.encode(req.method, stun.SUCCESS, req.txid, list(attrs), integrity=key,
                           fingerprint=True)

    def alloc_ok(self, req, lifetime=600, key=KEY):
        return self.ok(req, [
            (stun.XOR_RELAYED_ADDRESS, stun.encode_address(RELAYED, xor=True, txid=req.txid)),
            (stun.XOR_MAPPED_ADDRESS, stun.encode_address(MAPPED, xor=True, txid=req.txid)),
            (stun.LIFETIME, struct.pack("!I", lifetime))], key=key)


def one(c):
    out = c.take_outgoing()
    assert len(out) == 1 and out[0][1] == SRV, out
    return out[0][0]


def allocated(now=0.0, lifetime=600, **kw):
    c = turn.TurnClient(SRV, USER, PW, **kw)
    s = FakeServer()
    c.start(now)
    r1 = s.parse(one(c))
    c.on_datagram(s.error(r1, 401), SRV, now)
    r2 = s.parse(one(c))
    c.on_datagram(s.alloc_ok(r2, lifetime), SRV, now)
    return c, s


def test_allocate_long_term_credentials():
    c = turn.TurnClient(SRV, USER, PW, lifetime=900, software="mpvpn")
    s = FakeServer()
    c.start(0.0)
    r1 = s.parse(one(c))
    assert (r1.method, r1.cls) == (stun.ALLOCATE, stun.REQUEST)
    assert r1.get(stun.REQUESTED_TRANSPORT) == b"\x11\x00\x00\x00"
    assert r1.get(stun.LIFETIME) == struct.pack("!I", 900)
    assert not r1.has(stun.MESSAGE_INTEGRITY) and not r1.has(stun.USERNAME)
    assert r1.check_fingerprint() is True
    c.on_datagram(s.error(r1, 401), SRV, 0.05)
    r2 = s.parse(one(c))
    assert r2.txid != r1.txid
    assert r2.get(stun.USERNAME) == b"alice" and r2.get(stun.REALM) == b"example.org"
    assert r2.get(stun.NONCE) == b"nonce-1"
    assert r2.check_integrity(KEY) and r2.check_fingerprint() is True
    assert r2.get(stun.REQUESTED_TRANSPORT) == r1.get(stun.REQUESTED_TRANSPORT)
    c.on_datagram(s.alloc_ok(r2, 900), SRV, 0.1)
    assert c.take_events() == [turn.Allocated(RELAYED, MAPPED, 900)]
    assert c.state == "allocated" and c.realm == REALM
    # refresh due at max(lifetime/2, lifetime-60) = 840 s after the answer
    assert c.next_deadline() == pytest.approx(840.1)
    assert c.expires_at == pytest.approx(900.1)


def test_success_without_valid_integrity_is_dropped():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    r2 = s.parse(one(c))
    c.on_datagram(s.alloc_ok(r2, key=None), SRV, 0.1)
    c.on_datagram(s.alloc_ok(r2, key=b"wrong"), SRV, 0.1)
    assert c.drops == {"bad_integrity": 2} and c.state == "allocating"
    c.on_datagram(s.alloc_ok(r2), SRV, 0.2)
    assert c.state == "allocated"


@pytest.mark.parametrize("code,words", [
    (486, "allocation quota reached"),
    (508, "insufficient capacity"),
    (403, "forbids"),
    (437, "allocation mismatch"),
    (440, "address family"),
    (442, "UDP relaying"),
    (300, "redirects"),
    (599, "refused the request"),
])
def test_allocate_errors_give_clear_reasons(code, words):
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    c.on_datagram(s.error(s.parse(one(c)), code, realm=False, integrity=True), SRV, 0.1)
    ev = c.take_events()
    assert ev == [c.failure] and c.state == "failed"
    assert c.failure.code == code and words in c.failure.reason
    assert c.failure.reason.startswith("allocation failed: ")
    assert c.next_deadline() is None and c.take_outgoing() == []


def test_wrong_password_401_twice():
    c = turn.TurnClient(SRV, USER, "wrong")
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    r2 = s.parse(one(c))
    assert not r2.check_integrity(KEY)
    c.on_datagram(s.error(r2, 401), SRV, 0.1)
    assert c.failure.code == 401 and "wrong username or password" in c.failure.reason


def test_401_without_realm_or_nonce():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401, realm=False), SRV, 0.0)
    assert "without REALM/NONCE" in c.failure.reason


def test_stale_nonce_retries_with_the_new_nonce_then_gives_up():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    r = s.parse(one(c))
    for i in range(turn.MAX_438_RETRIES):
        c.on_datagram(s.error(r, 438, nonce=b"nonce-%d" % (i + 2)), SRV, 0.1)
        r = s.parse(one(c))
        assert r.get(stun.NONCE) == b"nonce-%d" % (i + 2) and r.check_integrity(KEY)
    c.on_datagram(s.error(r, 438, nonce=b"again"), SRV, 0.2)
    assert c.failure.code == 438 and c.counters["stale_nonce"] == turn.MAX_438_RETRIES


def test_stale_nonce_then_success():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    c.on_datagram(s.error(s.parse(one(c)), 438, nonce=b"fresh"), SRV, 0.1)
    r = s.parse(one(c))
    assert r.get(stun.NONCE) == b"fresh"
    c.on_datagram(s.alloc_ok(r), SRV, 0.2)
    assert c.state == "allocated"


def test_no_answer_fails_after_rfc_timeout():
    c = turn.TurnClient(SRV, USER, PW)
    c.start(0.0)
    sends = []
    while c.state == "allocating":
        sends += [t for t in [c.next_deadline()]]
        c.on_timer(c.next_deadline())
        c.take_outgoing()
    assert c.failure.code is None and "no answer from relay 192.0.2.10:3478 after 39.5 s" \
        in c.failure.reason
    assert sends[-1] == 39.5


def test_refresh_schedule_and_expiry():
    c, s = allocated(lifetime=600)
    c.take_events()
    assert c.next_deadline() == 540.0
    c.on_timer(540.0)
    r = s.parse(one(c))
    assert r.method == stun.REFRESH and r.get(stun.LIFETIME) == struct.pack("!I", 600)
    assert r.check_integrity(KEY)
    c.on_datagram(s.ok(r, [(stun.LIFETIME, struct.pack("!I", 600))]), SRV, 540.2)
    assert c.counters["refreshes"] == 1 and c.expires_at == pytest.approx(1140.2)
    # now nothing answers: the refresh is retried until the allocation expires
    t = c.next_deadline()
    while c.state == "allocated":
        c.on_timer(t)
        c.take_outgoing()
        t = c.next_deadline()
    assert c.failure.reason.startswith(("refresh failed", "allocation expired"))
    assert c.take_events()[-1] == c.failure


def test_refresh_437_means_the_allocation_is_gone():
    c, s = allocated()
    c.on_timer(540.0)
    r = s.parse(one(c))
    c.on_datagram(s.error(r, 437, realm=False, integrity=True), SRV, 540.1)
    assert c.state == "failed" and "refresh failed" in c.failure.reason


def test_permission_channel_and_refresh():
    c, s = allocated()
    c.take_events()
    c.add_peer(PEER, 1.0)
    r = s.parse(one(c))
    assert r.method == stun.CREATE_PERMISSION and r.check_integrity(KEY)
    assert stun.decode_address(r.get(stun.XOR_PEER_ADDRESS), xor=True, txid=r.txid) == PEER
    assert not c.send(PEER, b"early", 1.0) and c.drops == {"send_not_ready": 1}
    c.on_datagram(s.ok(r), SRV, 1.1)
    assert c.take_events() == [turn.PeerReady(PEER, None)]
    # usable at once through Send indications, while the channel is being bound
    assert c.send(PEER, b"via-indication", 1.1)
    out = c.take_outgoing()
    bind = s.parse(out[0][0])
    ind = stun.decode(out[1][0])
    assert (ind.method, ind.cls) == (stun.SEND, stun.INDICATION)
    assert ind.get(stun.DATA_ATTR) == b"via-indication"
    assert stun.decode_address(ind.get(stun.XOR_PEER_ADDRESS), xor=True, txid=ind.txid) == PEER
    assert bind.method == stun.CHANNEL_BIND
    assert bind.get(stun.CHANNEL_NUMBER) == b"\x40\x00\x00\x00"
    c.on_datagram(s.ok(bind), SRV, 1.2)
    assert c.take_events() == [turn.PeerReady(PEER, 0x4000)]
    assert c.send(PEER, b"abcde", 1.3)
    assert c.take_outgoing() == [(b"\x40\x00\x00\x05abcde", SRV)]
    # the channel (and with it the permission) is refreshed 240 s later
    assert c.next_deadline() == pytest.approx(241.2)
    c.on_timer(241.2)
    again = s.parse(one(c))
    assert again.method == stun.CHANNEL_BIND and again.get(stun.CHANNEL_NUMBER) == b"\x40\x00\x00\x00"
    c.on_datagram(s.ok(again), SRV, 241.3)
    assert c.take_events() == []              # not "ready" again
    assert c.peer_state(PEER) == {"permission": True, "channel": 0x4000}


def test_peer_errors_and_peers_added_before_allocation():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.add_peer(PEER, 0.0)
    c.add_peer(("198.51.100.8", 1), 0.0)
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    c.on_datagram(s.alloc_ok(s.parse(one(c))), SRV, 0.1)
    reqs = [s.parse(d) for d, _ in c.take_outgoing()]
    assert [r.method for r in reqs] == [stun.CREATE_PERMISSION] * 2
    c.on_datagram(s.error(reqs[0], 403, realm=False, integrity=True), SRV, 0.2)
    c.on_datagram(s.error(reqs[1], 437, realm=False, integrity=True), SRV, 0.2)
    ev = c.take_events()
    assert isinstance(ev[0], turn.Allocated)
    assert ev[1] == turn.PeerFailed(PEER, turn.describe_error(403, "x"))
    assert isinstance(ev[2], turn.Failed) and "allocation lost" in ev[2].reason


def test_incoming_channel_data_and_data_indications():
    c, s = allocated()
    c.add_peer(PEER, 1.0)
    c.on_datagram(s.ok(s.parse(one(c))), SRV, 1.0)
    c.on_datagram(s.ok(s.parse(one(c))), SRV, 1.0)
    c.take_events()
    c.on_datagram(b"\x40\x00\x00\x03abc\x00", SRV, 2.0)          # padded
    c.on_datagram(b"\x40\x00\x00\x03abc", SRV, 2.0)              # unpadded
    txid = bytes(range(12))
    ind = stun.encode(stun.DATA, stun.INDICATION, txid, [
        (stun.XOR_PEER_ADDRESS, stun.encode_address(PEER, xor=True, txid=txid)),
        (stun.DATA_ATTR, b"xyz")])
    c.on_datagram(ind, SRV, 2.0)
    assert c.take_events() == [turn.Data(PEER, b"abc")] * 2 + [turn.Data(PEER, b"xyz")]
    # bad input: every kind counted
    other = stun.encode(stun.DATA, stun.INDICATION, txid, [
        (stun.XOR_PEER_ADDRESS, stun.encode_address(("198.51.100.99", 1), xor=True, txid=txid)),
        (stun.DATA_ATTR, b"xyz")])
    c.on_datagram(other, SRV, 2.0)                                 # no permission for it
    c.on_datagram(b"\x40\x01\x00\x01a", SRV, 2.0)                  # unbound channel
    c.on_datagram(b"\x40\x00\x00\x09abc", SRV, 2.0)                # length past the end
    c.on_datagram(b"\x40\x00\x00\x01a" + bytes(4), SRV, 2.0)       # > 3 bytes after
    c.on_datagram(b"\x40\x00\x00\x03abc", ("192.0.2.99", 3478), 2.0)
    c.on_datagram(b"\x00" * 30, SRV, 2.0)
    c.on_datagram(bytes(70000), SRV, 2.0)
    assert c.take_events() == []
    assert c.drops == {"unknown_peer": 1, "unknown_channel": 1, "malformed_channel_data": 2,
                       "wrong_source": 1, "malformed": 1, "oversized": 1}


def test_responses_must_match_transaction_and_method():
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    r1 = s.parse(one(c))
    fake = stun.encode(stun.ALLOCATE, stun.ERROR, bytes(12), [(stun.ERROR_CODE, stun.encode_error_code(486))])
    c.on_datagram(fake, SRV, 0.0)
    wrong_method = stun.encode(stun.REFRESH, stun.ERROR, r1.txid,
                               [(stun.ERROR_CODE, stun.encode_error_code(486))])
    c.on_datagram(wrong_method, SRV, 0.0)
    c.on_datagram(s.error(r1, 486), ("192.0.2.11", 3478), 0.0)
    assert c.drops == {"unknown_transaction": 2, "wrong_source": 1} and c.state == "allocating"


def test_release_sends_lifetime_zero():
    c, s = allocated()
    c.close(10.0)
    r = s.parse(one(c))
    assert r.method == stun.REFRESH and r.get(stun.LIFETIME) == b"\x00\x00\x00\x00"
    assert r.check_integrity(KEY)
    c.on_datagram(s.ok(r, [(stun.LIFETIME, b"\x00\x00\x00\x00")]), SRV, 10.1)
    assert c.take_events()[-1] == turn.Closed("released") and c.state == "closed"
    assert not c.send(PEER, b"x", 11.0)


def test_release_unanswered_still_closes():
    c, s = allocated()
    c.close(10.0)
    while c.state == "closing":
        c.on_timer(c.next_deadline())
    assert c.state == "closed" and "not answered" in c.take_events()[-1].reason


def test_channel_data_framing():
    assert turn.encode_channel_data(0x4FFF, b"abcde", pad=True) == b"\x4f\xff\x00\x05abcde\x00\x00\x00"
    assert turn.decode_channel_data(b"\x4f\xff\x00\x05abcde\x00\x00\x00") == (0x4FFF, b"abcde")
    for bad in (0x3FFF, 0x5000):
        with pytest.raises(ValueError):
            turn.encode_channel_data(bad, b"")
    with pytest.raises(stun.StunError):
        turn.decode_channel_data(b"\x50\x00\x00\x00")
    assert not turn.is_channel_data(stun.encode(stun.BINDING, stun.REQUEST, bytes(12)))


@settings(max_examples=300, deadline=None)
@given(ch=st.integers(0x4000, 0x4FFF), payload=st.binary(max_size=300), pad=st.booleans())
def test_channel_data_roundtrip(ch, payload, pad):
    assert turn.decode_channel_data(turn.encode_channel_data(ch, payload, pad=pad)) == (ch, payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=20))
def test_client_never_raises_on_garbage(datagrams):
    c, s = allocated()
    c.add_peer(PEER, 1.0)
    c.take_events()
    for d in datagrams:
        c.on_datagram(d, SRV, 2.0)
    assert sum(c.drops.values()) + len(c.take_events()) == len(datagrams)


def test_relay_list_tries_next_and_retries_later():
    a = turn.Relay(("192.0.2.1", 3478), "u", "p")
    b = turn.Relay(("192.0.2.2", 3478), "u", "hunter2")
    rl = turn.RelayList([a, b], retry_after=60)
    assert rl.pick(0.0) is a
    rl.failed(a, "no answer", 10.0)
    assert rl.pick(10.0) is b
    rl.failed(b, "486 quota", 20.0)
    assert rl.pick(20.0) is None and rl.next_retry() == 70.0
    assert rl.pick(70.0) is a                       # the first is tried again first
    assert [s["reason"] for s in rl.status(30.0)] == ["no answer", "486 quota"]
    rl.succeeded(a)
    assert rl.status(30.0)[0] == {"address": "192.0.2.1:3478", "failed": False, "reason": None}
    with pytest.raises(ValueError):
        rl.failed(turn.Relay(("192.0.2.3", 1), "u", "p"), "x", 0.0)
    assert "hunter2" not in repr(b) and "hunter2" not in str(rl.status(0.0))


def test_ipv6_relay_asks_for_an_ipv6_relayed_address():
    c = turn.TurnClient(("2001:db8::10", 3478), USER, PW)
    c.start(0.0)
    r = stun.decode(c.take_outgoing()[0][0])
    assert r.get(stun.REQUESTED_ADDRESS_FAMILY) == b"\x02\x00\x00\x00"
    c4 = turn.TurnClient(SRV, USER, PW)
    c4.start(0.0)
    assert not stun.decode(one(c4)).has(stun.REQUESTED_ADDRESS_FAMILY)   # IPv4 is the default
    with pytest.raises(ValueError):
        turn.TurnClient(SRV, USER, PW, relay_family=5)


def test_error_reason_from_the_relay_is_made_printable():
    c = turn.TurnClient(SRV, USER, PW)
    c.start(0.0)
    r = stun.decode(one(c))
    value = struct.pack("!HBB", 0, 5, 8) + b"No \x1b[31mcapacity\x00\x00"
    c.on_datagram(stun.encode(stun.ALLOCATE, stun.ERROR, r.txid, [(stun.ERROR_CODE, value)]),
                  SRV, 0.1)
    assert c.failure.reason == ("allocation failed: relay has insufficient capacity "
                                "(508 No [31mcapacity)")


def test_unprotected_errors_to_authenticated_requests_are_discarded():
    """RFC 8489 9.2.5: a 486/508/437 without a valid MESSAGE-INTEGRITY is
    dropped (a forger cannot end the allocation); 401/438 cannot carry one."""
    c = turn.TurnClient(SRV, USER, PW)
    s = FakeServer()
    c.start(0.0)
    c.on_datagram(s.error(s.parse(one(c)), 401), SRV, 0.0)
    r = s.parse(one(c))
    c.on_datagram(s.error(r, 486, realm=False), SRV, 0.1)
    c.on_datagram(s.error(r, 508, realm=False), SRV, 0.1)
    assert c.drops == {"bad_integrity": 2} and c.state == "allocating"
    c.on_timer(0.5)
    assert stun.decode(one(c)).txid == r.txid          # retransmission goes on
    c.on_datagram(s.error(r, 486, realm=False, integrity=True), SRV, 0.6)
    assert c.failure.code == 486
