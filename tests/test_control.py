"""The master control connection (mpvpn.core.control), driven in memory.

Client and server machines are joined by piping ``data_to_send()`` of one
into ``receive_data()`` of the other, on a fake clock (h11's tests/helpers
style).  No sockets, no threads, no sleeps.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpvpn.core import noise, seal, wire
from mpvpn.core.admission import (BUSY_LEN, HandshakeGuard, HandshakeStamps, RateLimiter,
                                  stamp_first_message)
from mpvpn.core.controlconn import (TRANSITIONS, ClientConnection, ControlConfig, Ev, Role,
                                    ServerConnection, State)
from mpvpn.core.controlevents import (ConnectionClosed, HandshakeComplete, KeysActivated,
                                      KeysRetired, KeysRotated, PeerUpdated, ProtocolError,
                                      SessionEstablished, SessionFreed)
from mpvpn.core.controlmsg import (MAX_MESSAGE, PREAUTH_MAX_FRAME, FrameDecoder, Vnc,
                                   decode_message, encode_frame, info_json)
from mpvpn.core.pairing import Uplink, mirror
from mpvpn.core.peercheck import peer_problem
from mpvpn.core.reconnect import ClientReconnect
from mpvpn.core.registry import ServerSessions

PSK = bytes(range(32))
OTHER_PSK = bytes(range(1, 33))


# --- helpers --------------------------------------------------------------------------------


def client_cfg(i: int = 1, **kw) -> ControlConfig:
    ups = (Uplink("wan1", "telecom", f"120.22.{i}.2", 7000),
           Uplink("wan2", "unicom", f"220.36.{i}.46", 7000),
           Uplink("wan3", "mobile", f"61.120.{i}.230", 7000))
    cfg = ControlConfig(psk=PSK, name=f"site{i}", uplinks=ups,
                        vnc=Vnc(f"10.99.0.{i + 1}", "255.255.255.0", "02:00:00:00:00:%02x" % i),
                        lans=(f"192.168.{i}.0/24",))
    return replace(cfg, **kw)


def server_cfg(**kw) -> ControlConfig:
    ups = (Uplink("t", "telecom", "120.61.20.12", 7000),
           Uplink("u", "unicom", "180.22.154.31", 7000),
           Uplink("m", "mobile", "61.35.11.10", 7000))
    cfg = ControlConfig(psk=PSK, name="hub", uplinks=ups, vnc=Vnc("10.99.0.1", "255.255.255.0"),
                        lans=("10.10.0.0/16",), control_port=7001)
    return replace(cfg, **kw)


def step(src, dst, now) -> bool:
    data = src.data_to_send()
    if data:
        dst.receive_data(data, now)
    return bool(data)


def pump(a, b, now, rounds: int = 50) -> None:
    for _ in range(rounds):
        x = step(a, b, now)
        y = step(b, a, now)
        if not (x or y):
            return
    raise AssertionError("pump did not settle")


def evs(conn):
    return conn.events()


def only(events, cls):
    return [e for e in events if isinstance(e, cls)]


def connect(ccfg=None, scfg=None, now=0.0, registry=None, addr=("198.51.100.7", 40000),
            stamps=None):
    """A client/server pair driven to quiescence; returns (client, server, registry)."""
    scfg = scfg or server_cfg()
    reg = registry if registry is not None else ServerSessions(scfg, rng=random.Random(1))
    s = reg.accept(addr, now)
    c = ClientConnection(ccfg or client_cfg(), now, stamps)
    pump(c, s, now)
    return c, s, reg


def run_clock(conns, start, end, dt=0.5, pairs=()):
    """Advance a fake clock, firing due timers and piping bytes between pairs."""
    t = start
    while t < end:
        t = min(end, t + dt)
        for c in conns:
            tm = c.get_timer()
            if tm is not None and tm <= t:
                c.handle_timer(t)
        for a, b in pairs:
            pump(a, b, t)
    return t


class DataPlane:
    """Stands in for the SMPU data plane: keeps keys per epoch as the events
    say, seals/opens 'datagrams' with ChaCha20-Poly1305."""

    def __init__(self):
        self.send_keys, self.recv_keys = {}, {}
        self.send_epoch = None
        self.seq = 0

    def on(self, events):
        for e in events:
            if isinstance(e, SessionEstablished):
                self.send_keys[e.epoch], self.recv_keys[e.epoch] = e.keys.send, e.keys.recv
                self.send_epoch = e.epoch
            elif isinstance(e, KeysRotated):
                self.send_keys[e.epoch], self.recv_keys[e.epoch] = e.keys.send, e.keys.recv
                if e.sending:
                    self.send_epoch = e.epoch
            elif isinstance(e, KeysActivated):
                self.send_epoch = e.epoch
            elif isinstance(e, KeysRetired):
                self.send_keys.pop(e.epoch, None)
                self.recv_keys.pop(e.epoch, None)
        return events

    def seal(self, data: bytes):
        self.seq += 1
        nonce = self.seq.to_bytes(12, "big")
        return (self.send_epoch, nonce,
                ChaCha20Poly1305(self.send_keys[self.send_epoch]).encrypt(nonce, data, b""))

    def open(self, dgram):
        epoch, nonce, ct = dgram
        key = self.recv_keys.get(epoch)
        if key is None:
            return None
        try:
            return ChaCha20Poly1305(key).decrypt(nonce, ct, b"")
        except Exception:
            return None


# --- framing -------------------------------------------------------------------------------


def test_frames_split_and_joined_arbitrarily():
    bodies = [b"a", b"bc" * 100, bytes(range(256)) * 3, b"z"]
    stream = b"".join(encode_frame(x) for x in bodies)
    for chunk in (1, 2, 3, 7, 100, len(stream)):
        d = FrameDecoder()
        got = []
        for i in range(0, len(stream), chunk):
            d.feed(stream[i:i + chunk])
            while (f := d.next_frame()) is not None:
                got.append(f)
        assert got == bodies and d.error is None and d.buffered == 0


def test_frame_limits():
    d = FrameDecoder(max_frame=10)
    d.feed(encode_frame(b"x" * 11))
    assert d.next_frame() is None and d.error == "oversized" and d.buffered == 0
    d = FrameDecoder()
    d.feed(b"\x00\x00rest")
    assert d.next_frame() is None and d.error == "malformed"
    with pytest.raises(ValueError):
        encode_frame(b"")
    with pytest.raises(ValueError):
        encode_frame(b"x" * 65536)


# --- success --------------------------------------------------------------------------------


def test_success_both_sides_agree():
    c, s, reg = connect()
    ce, se = evs(c), evs(s)
    assert [type(e) for e in ce] == [HandshakeComplete, SessionEstablished]
    assert [type(e) for e in se] == [HandshakeComplete, SessionEstablished]
    a, b = ce[1], se[1]
    assert a.session_id == b.session_id != 0 and a.session_id in reg
    assert a.epoch == b.epoch == 1 and a.version == b.version == 2
    assert a.keys.send == b.keys.recv and a.keys.recv == b.keys.send and a.keys.send != a.keys.recv
    assert len(a.keys.send) == 32
    assert a.peer.name == "hub" and b.peer.name == "site1"
    assert b.peer.vnc.mac == "02:00:00:00:00:01" and b.peer.lans == ("192.168.1.0/24",)
    assert a.plan == mirror(b.plan)
    assert {(p.local, p.remote) for p in a.plan} == {("wan1", "t"), ("wan2", "u"), ("wan3", "m")}
    assert c.server_addresses == [("120.61.20.12", 7001), ("180.22.154.31", 7001),
                                  ("61.35.11.10", 7001)]
    assert c.state is s.state is State.ESTABLISHED
    assert "secret" not in repr(a) and repr(a.keys) == "DataKeys(epoch=1)"


def test_keepalives_keep_an_idle_connection_up():
    c, s, reg = connect()
    evs(c), evs(s)
    t = run_clock([c, s], 0.0, 300.0, dt=1.0, pairs=[(c, s)])
    assert c.state is s.state is State.ESTABLISHED
    assert not only(evs(c) + evs(s), ConnectionClosed)
    assert t == 300.0


def test_bye_frees_the_session():
    c, s, reg = connect()
    sid = c.session_id
    c.close("shutdown", "router rebooting")
    pump(c, s, 1.0)
    closed = only(evs(s), ConnectionClosed)[0]
    assert closed.reason == "bye" and closed.by_peer and "router rebooting" in closed.text
    assert reg.events() == [SessionFreed(sid, "site1", "bye")] and sid not in reg


def test_kkpsk0_with_static_keys():
    cpriv, cpub = noise.generate_keypair()
    spriv, spub = noise.generate_keypair()
    c, s, reg = connect(client_cfg(pattern="KKpsk0", static_key=cpriv, remote_static=spub),
                        server_cfg(pattern="KKpsk0", static_key=spriv, remote_static=cpub))
    assert c.state is State.ESTABLISHED and s.state is State.ESTABLISHED
    # A client with some other static key is refused before any reply.
    opriv, _ = noise.generate_keypair()
    c2, s2, _ = connect(client_cfg(2, pattern="KKpsk0", static_key=opriv, remote_static=spub),
                        server_cfg(pattern="KKpsk0", static_key=spriv, remote_static=cpub),
                        registry=reg)
    assert s2.close_reason == "bad_psk" and c2.state is State.HANDSHAKE
    # Without the PSK the server does not even reach KK's two DH operations
    # in message 1: the MAC fails first.
    c3 = ClientConnection(client_cfg(3, psk=OTHER_PSK, pattern="KKpsk0", static_key=opriv,
                                     remote_static=spub), 0.0)
    s3 = reg.accept(("198.51.100.7", 3), 0.0)
    ops = noise.x25519_operations()
    s3.receive_data(c3.data_to_send(), 0.0)
    assert s3.close_reason == "bad_psk" and noise.x25519_operations() == ops


# --- authentication and version ---------------------------------------------------------------


def test_wrong_psk_no_reply_no_state_client_sees_auth():
    reg = ServerSessions(server_cfg(), rng=random.Random(1))
    s = reg.accept(("198.51.100.7", 1), 0.0)
    c = ClientConnection(client_cfg(psk=OTHER_PSK), 0.0)
    s.receive_data(c.data_to_send(), 0.0)
    assert s.data_to_send() == b""  # nothing at all is sent to an unauthenticated peer
    assert s.closed and s.close_reason == "bad_psk"
    assert s._send_cs is None and s._session is None and s.session_id is None
    assert len(reg) == 0 and reg.counters["bad_psk"] == 1
    assert [type(e) for e in evs(s)] == [ConnectionClosed]
    # The server's edge closes the socket; the client reads EOF.
    c.receive_data(b"", 0.1)
    ce = evs(c)
    assert ce[0] == ProtocolError("auth", ce[0].text, by_peer=True)
    assert ce[1].reason == "auth" and c.closed and c.counters["auth"] == 1


def test_forged_server_reply_is_auth_on_client():
    # Someone without the PSK (a rogue server, a middlebox) answers msg1.
    c = ClientConnection(client_cfg(), 0.0)
    c.data_to_send()
    c.receive_data(encode_frame(bytes(range(64))), 0.1)
    assert c.close_reason == "auth" and c.counters["bad_psk"] == 1
    assert only(evs(c), ProtocolError)[0].code == "auth" and c.data_to_send() == b""


@pytest.mark.parametrize("cv,sv,ok", [((2,), (1,), False), ((1, 2), (1,), True),
                                       ((1, 2, 3), (2, 3), True)])
def test_version_negotiation(cv, sv, ok):
    c, s, reg = connect(client_cfg(versions=cv), server_cfg(versions=sv))
    if ok:
        assert c.version == s.version == max(set(cv) & set(sv))
        assert c.state is State.ESTABLISHED
        return
    ce, se = evs(c), evs(s)
    assert only(ce, ProtocolError)[0].code == "version" and only(ce, ProtocolError)[0].by_peer
    assert only(ce, ConnectionClosed)[0].reason == "version"
    assert only(se, ConnectionClosed)[0].reason == "version"
    assert reg.counters["bad_version"] == 1 and len(reg) == 0 and s.session_id is None


def test_handshake_timeout_counts_and_allocates_nothing():
    reg = ServerSessions(server_cfg())
    s = reg.accept(("198.51.100.9", 1), 0.0)
    s.receive_data(b"\x00", 1.0)  # half a length prefix, then silence
    assert s.get_timer() == 10.0
    s.handle_timer(10.0)
    assert s.close_reason == "timeout" and reg.counters["timeout"] == 1 and len(reg) == 0


def _first_frames(cfg=None, stamps=None):
    """A client's first two frames (message 1, stamp) and the client."""
    c = ClientConnection(cfg or client_cfg(), 0.0, stamps)
    return c.data_to_send(), c


def test_replayed_first_message_is_dropped_before_any_x25519():
    msg1, c = _first_frames()
    reg = ServerSessions(server_cfg(), rng=random.Random(1))
    s1 = reg.accept(("198.51.100.7", 1), 0.0)
    s1.receive_data(msg1, 0.0)
    pump(c, s1, 0.0)
    assert s1.state is State.ESTABLISHED and reg.counters["replay"] == 0
    # An eavesdropper replays the captured first frames 3,000 times, from
    # its own address and from the client's: no answer, no X25519 at all.
    ops = noise.x25519_operations()
    for i in range(3000):
        s = reg.accept(("203.0.113.66" if i % 2 else "198.51.100.7", 1000 + i), 1.0 + i * 0.001)
        s.receive_data(msg1, 1.0 + i * 0.001)
        assert s.data_to_send() == b"" and s.close_reason == "replay"
    assert noise.x25519_operations() == ops
    assert reg.counters["replay"] == 3000 and len(reg) == 1 and reg.pending == 0
    # the client's next attempt carries a newer counter and gets through
    stamps = HandshakeStamps()
    for _ in range(2):
        c2, s2, _ = connect(client_cfg(), registry=reg, now=5.0, stamps=stamps)
        assert c2.state is s2.state is State.ESTABLISHED
    # its own old message (counter 1 of that sender) is now stale too
    old, _ = _first_frames(stamps=HandshakeStamps(stamps.sender))
    s = reg.accept(("198.51.100.7", 9), 6.0)
    s.receive_data(old, 6.0)
    assert s.close_reason == "replay" and s.data_to_send() == b""


def test_the_stamp_is_bound_to_its_message_and_to_the_key():
    reg = ServerSessions(server_cfg(), rng=random.Random(1))
    a, _ = _first_frames()
    b, _ = _first_frames()
    n = 2 + len(a) - 2 - 34  # where the stamp frame starts
    assert a[n:n + 2] == (32).to_bytes(2, "big")
    for forged in (a[:n] + b[n:],  # b's stamp after a's message
                   a[:n] + a[n:n + 2] + a[n + 2:n + 10] + (7).to_bytes(8, "big") + a[n + 18:],
                   a[:-1] + bytes([a[-1] ^ 1])):
        s = reg.accept(("198.51.100.7", 1), 0.0)
        s.receive_data(forged, 0.0)
        assert s.close_reason == "bad_psk" and s.data_to_send() == b""
    # a first message without its stamp waits for it, then times out unanswered
    s = reg.accept(("198.51.100.7", 2), 0.0)
    s.receive_data(a[:n], 0.0)
    assert s.state is State.HANDSHAKE and s.data_to_send() == b""
    s.handle_timer(10.0)
    assert s.close_reason == "no_stamp" and s.data_to_send() == b""
    assert "older release" in s.close_text  # what an old (control v1) client looks like


def test_clients_sharing_a_psk_have_their_own_counters():
    reg = ServerSessions(server_cfg(), rng=random.Random(1))
    a, b = HandshakeStamps(), HandshakeStamps()
    for _ in range(5):
        a.next()
    for i, st in enumerate((a, b, a, b)):
        c, s, _ = connect(client_cfg(1 + i % 2), registry=reg, stamps=st,
                          addr=("198.51.100.7", 100 + i))
        assert c.state is s.state is State.ESTABLISHED
    assert reg.counters["replay"] == 0


def test_junk_from_the_clients_own_address_never_delays_it():
    """20 junk connections per second from the client's (NATed) address:
    garbage, silent ones held open, wrong keys.  The genuine client, from the
    same address, gets through at its first attempt every time."""
    reg = ServerSessions(server_cfg(), rng=random.Random(3))
    rnd = random.Random(7)
    src = "203.0.113.5"
    open_junk = []
    stamps = HandshakeStamps()
    t, port, tries = 0.0, 1, 0
    while t < 120.0:
        for _ in range(2):  # 2 per 0.1 s
            port += 1
            j = reg.accept((src, port), t)
            kind = port % 4
            if kind == 0:
                j.receive_data(rnd.randbytes(rnd.randrange(1, 300)), t)
            elif kind == 1:
                j.receive_data(encode_frame(rnd.randbytes(64)) + encode_frame(rnd.randbytes(32)), t)
            elif kind == 2:
                junk_client = ClientConnection(client_cfg(7, psk=OTHER_PSK), t)
                j.receive_data(junk_client.data_to_send(), t)
            else:
                open_junk.append(j)  # says nothing, holds the connection
            assert j.data_to_send() == b""  # junk never gets a byte back
        if int(t * 10) % 5 == 0:  # a genuine reconnect every 0.5 s
            tries += 1
            port += 1
            c, s, _ = connect(client_cfg(), registry=reg, now=t, addr=(src, port), stamps=stamps)
            assert c.state is s.state is State.ESTABLISHED, (t, s.close_reason)
            s.close("closed")
        for j in list(open_junk):
            if j.get_timer() is not None and j.get_timer() <= t:
                j.handle_timer(t)
            if j.closed:
                open_junk.remove(j)
        reg.handle_timer(t)
        t = round(t + 0.1, 6)
    assert tries == 240 and reg.counters["sessions_opened"] == 240
    assert reg.counters["bad_psk"] > 1000 and reg.counters["evicted"] > 0
    # the junk's failures put its source on the short leash
    assert reg.pending <= reg.penalty_pending


def test_busy_server_says_so_to_a_genuine_client_only():
    guard = HandshakeGuard(rate=1.0, burst=2)
    reg = ServerSessions(server_cfg(), rng=random.Random(1), guard=guard)
    for i in range(2):
        c, s, _ = connect(client_cfg(1 + i), registry=reg, addr=("198.51.100.7", 1 + i))
        assert c.state is State.ESTABLISHED
    c = ClientConnection(client_cfg(3), 0.0)
    ops = noise.x25519_operations()  # (the client made its ephemeral key)
    s = reg.accept(("198.51.100.7", 3), 0.0)
    s.receive_data(c.data_to_send(), 0.0)
    out = s.data_to_send()
    assert len(out) == 2 + BUSY_LEN and s.close_reason == "busy"
    assert noise.x25519_operations() == ops  # BUSY costs no X25519
    c.receive_data(out, 0.0)
    closed = only(evs(c), ConnectionClosed)[0]
    assert closed.reason == "busy" and closed.by_peer and 0.9 <= closed.retry_after <= 1.0
    assert c.retry_after == closed.retry_after and c.counters["busy"] == 1
    # a wrong key gets silence even when the server is busy
    w = ClientConnection(client_cfg(4, psk=OTHER_PSK), 0.0)
    s = reg.accept(("198.51.100.7", 4), 0.0)
    s.receive_data(w.data_to_send(), 0.0)
    assert s.data_to_send() == b"" and s.close_reason == "bad_psk"
    w.receive_data(b"", 0.1)
    assert w.close_reason == "auth"
    # a BUSY forged by someone without the key is not believed
    f = ClientConnection(client_cfg(5), 0.0)
    f.data_to_send()
    f.receive_data(out, 0.0)  # someone else's BUSY: its MAC answers another message
    assert f.close_reason == "auth" and f.retry_after is None
    # after the delay it asked for, the client gets in
    c, s, _ = connect(client_cfg(3), registry=reg, now=closed.retry_after)
    assert c.state is State.ESTABLISHED


def test_reconnect_retries_busy_soon_and_a_wrong_key_late():
    rc = ClientReconnect([("a", 1), ("b", 2)], 0.0, rng=random.Random(1))
    assert rc.handle_timer(0.0) == ("a", 1)
    d = rc.failed(0.0, "busy", retry_after=0.4)
    assert 0.4 <= d <= 0.4 * 1.3 and rc.failures == 0 and rc.busy == 1
    assert rc.handle_timer(d) == ("a", 1)  # the same server again
    assert 0.05 <= rc.failed(d, "busy", retry_after=0.0) <= 0.05 * 1.3
    assert rc.failed(1.0, "busy", retry_after=30.0) <= 2.0 * 1.3  # clamped: soon, whatever it says
    rc.handle_timer(10.0)
    assert rc.failed(10.0, "auth") <= 1.0  # one silent close: retried on the ordinary backoff
    rc.handle_timer(11.0)
    assert rc.failed(11.0, "auth") >= 60.0 * 0.7  # again: a wrong key keeps the long wait
    assert [w.split()[0] for _t, w in rc.history] == ["connect", "busy", "connect", "busy", "busy",
                                                      "connect", "failed", "connect", "failed"]


def test_preauth_oversized_and_malformed_first_frames():
    reg = ServerSessions(server_cfg(), limiter=None)
    s = reg.accept(("198.51.100.1", 1), 0.0)
    s.receive_data((PREAUTH_MAX_FRAME + 1).to_bytes(2, "big"), 0.0)
    assert s.close_reason == "oversized" and s.data_to_send() == b""
    s = reg.accept(("198.51.100.1", 1), 0.0)
    s.receive_data(encode_frame(b"short"), 0.0)
    assert s.close_reason == "malformed" and s.data_to_send() == b""
    assert reg.counters["oversized"] == reg.counters["malformed"] == 1


def test_rate_limit_per_source():
    rl = RateLimiter(rate=1.0, burst=3, max_entries=4)
    assert [rl.allow(("192.0.2.1", 5), 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("192.0.2.2", 0.0)  # another source has its own bucket
    assert not rl.allow(("192.0.2.1", 6), 0.5)
    assert rl.allow(("192.0.2.1", 7), 1.0)  # refilled by one token
    # IPv6 is keyed per /64; v4-mapped addresses as IPv4.
    assert rl.key(("2001:db8:1:2::5", 1, 0, 0)) == rl.key("2001:db8:1:2:ffff::1")
    assert rl.key("::ffff:192.0.2.1") == "192.0.2.1"
    for i in range(20):
        rl.allow(f"198.51.100.{i}", 2.0)
    assert len(rl) == 4 and rl.evictions > 0  # bounded table
    assert not rl.exhausted("192.0.2.99", 2.0)
    rl2 = RateLimiter(rate=1.0, burst=2)
    rl2.allow("192.0.2.1", 0.0)
    assert not rl2.exhausted("192.0.2.1", 0.0)
    rl2.allow("192.0.2.1", 0.0)
    assert rl2.exhausted("192.0.2.1", 0.0) and rl2.exhausted("192.0.2.1", 0.5)
    assert not rl2.exhausted("192.0.2.1", 1.0)  # peeking spends nothing


def test_preauth_connections_are_bounded_per_source_and_failures_shorten_the_leash():
    reg = ServerSessions(server_cfg(), limiter=RateLimiter(rate=0.1, burst=2),
                         max_pending=8, max_pending_per_source=4, penalty_pending=2)
    held = [reg.accept(("203.0.113.5", p), 0.0) for p in range(6)]
    # nothing is refused; the oldest silent ones make room
    assert [h.closed for h in held] == [True, True, False, False, False, False]
    assert reg.pending == 4 and reg.counters["evicted"] == 2
    assert only(evs(held[0]), ConnectionClosed)[0].reason == "evicted"
    others = [reg.accept((f"198.51.100.{i}", 1), 0.0) for i in range(6)]
    assert reg.pending == 8 and sum(h.closed for h in held + others) == 4  # global cap
    # two failures spend the source's budget: it now gets two pending slots
    for p in (10, 11):
        reg.accept(("192.0.2.9", p), 1.0).receive_data(encode_frame(b"x" * 64) + encode_frame(b"y" * 32), 1.0)
    three = [reg.accept(("192.0.2.9", 20 + p), 1.0) for p in range(3)]
    assert [h.closed for h in three] == [True, False, False]
    # a genuine client from that address still gets in (its MAC is good)
    c, s, _ = connect(client_cfg(), registry=reg, now=1.0, addr=("192.0.2.9", 30))
    assert c.state is s.state is State.ESTABLISHED


# --- validation ----------------------------------------------------------------------------------


def test_lan_overlap_is_reported_on_both_sides():
    c, s, reg = connect(client_cfg(lans=("10.10.5.0/24",)))
    ce, se = evs(c), evs(s)
    pe_c, pe_s = only(ce, ProtocolError)[0], only(se, ProtocolError)[0]
    assert pe_s.code == pe_c.code == "overlap"
    assert not pe_s.by_peer and pe_c.by_peer and pe_c.text == pe_s.text
    assert "10.10.5.0/24" in pe_c.text and "10.10.0.0/16" in pe_c.text
    assert only(ce, ConnectionClosed)[0].reason == "overlap" and len(reg) == 0
    assert reg.counters["overlap"] == 1


def test_client_detects_a_bad_server_and_tells_it():
    # The server announces a default route; the client does not allow it.
    c, s, reg = connect(client_cfg(), server_cfg(lans=("0.0.0.0/0",)))
    ce, se = evs(c), evs(s)
    assert only(ce, ProtocolError)[0].code == "route" and not only(ce, ProtocolError)[0].by_peer
    assert only(se, ProtocolError)[0].code == "route" and only(se, ProtocolError)[0].by_peer
    assert c.closed and s.closed and len(reg) == 0 and reg.counters["sessions_freed"] == 1
    # Allowed by option, it works.
    c, s, reg = connect(client_cfg(allow_peer_default_route=True), server_cfg(lans=("0.0.0.0/0",)))
    assert c.state is State.ESTABLISHED and c.peer.lans == ("0.0.0.0/0",)


@pytest.mark.parametrize("ccfg,code,needle", [
    (dict(vnc=Vnc("10.98.0.2", "255.255.255.0")), "vnic", "not in our vNIC subnet"),
    (dict(vnc=Vnc("10.99.0.1", "255.255.255.0")), "vnic", "equals ours"),
    (dict(vnc=Vnc("10.99.0.2", "255.255.0.0")), "vnic", "not in our vNIC subnet"),
    (dict(lans=("10.99.0.0/25",)), None, None),  # caught locally (own vNIC subnet)
    (dict(lans=("120.61.20.0/24",)), "overlap", "uplink address"),
    (dict(lans=("192.168.0.0/16", "192.168.3.0/24")), None, None),  # caught locally
])
def test_peer_validation_codes(ccfg, code, needle):
    if code is None:
        with pytest.raises(ValueError):
            client_cfg(**ccfg).local_info()
        return
    c, s, reg = connect(client_cfg(**ccfg))
    pe = only(evs(s), ProtocolError)[0]
    assert pe.code == code and needle in pe.text
    assert only(evs(c), ProtocolError)[0].code == code


def test_check_peer_directly():
    local = server_cfg().local_info()
    peer = client_cfg().local_info()
    assert peer_problem(local, peer) is None
    bad = replace(peer, lans=("10.99.0.0/25",))
    assert peer_problem(local, bad)[0] == "overlap"
    bad = replace(peer, lans=("::/0",))
    assert peer_problem(local, bad)[0] == "route"
    assert peer_problem(local, bad, allow_default_route=True) is None
    v6l = replace(local, vnc=Vnc("fd00::1", "64"))
    v6p = replace(peer, vnc=Vnc("fd00::2", "64"))
    assert peer_problem(v6l, v6p) is None
    assert peer_problem(v6l, replace(v6p, vnc=Vnc("fd00::", "64")))[0] == "vnic"
    assert peer_problem(v6l, replace(v6p, lans=("fd00::/48",)))[0] == "overlap"


def test_network_and_broadcast_vnic_addresses_are_refused():
    for ip in ("10.99.0.0", "10.99.0.255"):
        with pytest.raises(ValueError):
            client_cfg(vnc=Vnc(ip, "255.255.255.0")).local_info()


def test_cross_session_conflicts_and_busy():
    reg = ServerSessions(server_cfg(), rng=random.Random(3), max_sessions=2)
    c1, s1, _ = connect(client_cfg(1), registry=reg)
    c2, s2, _ = connect(client_cfg(2, lans=("192.168.1.128/25",)), registry=reg)
    assert only(evs(c2), ProtocolError)[0].code == "overlap"
    c3, s3, _ = connect(client_cfg(3, vnc=Vnc("10.99.0.2", "255.255.255.0")), registry=reg)
    assert only(evs(c3), ProtocolError)[0].code == "vnic"
    c4, s4, _ = connect(client_cfg(4), registry=reg)
    c5, s5, _ = connect(client_cfg(5), registry=reg)
    assert c4.state is State.ESTABLISHED and only(evs(c5), ProtocolError)[0].code == "busy"
    assert len(reg) == 2 and c1.state is State.ESTABLISHED


# --- reconnect -------------------------------------------------------------------------------------


def test_reconnect_policy_backoff_rotation_and_learned_addresses():
    rc = ClientReconnect([("203.0.113.1", 7001), ("203.0.113.2", 7001)], 0.0,
                         base=1.0, cap=8.0, jitter=0.0, rng=random.Random(7))
    assert rc.get_timer() == 0.0 and rc.handle_timer(0.0) == ("203.0.113.1", 7001)
    assert rc.get_timer() is None  # connecting
    seen, delays, t = [], [], 0.0
    for _ in range(8):
        d = rc.failed(t, "refused")
        delays.append(d)
        t += d
        seen.append(rc.handle_timer(t))
    assert delays == [1, 1, 2, 2, 4, 4, 8, 8]  # doubling per full round, capped
    assert seen[:4] == [("203.0.113.2", 7001), ("203.0.113.1", 7001)] * 2
    # After a success: back to base, and the server's uplinks join the rotation.
    rc.established(t, [("120.61.20.12", 7001), ("203.0.113.2", 7001)])
    assert rc.addresses[-1] == ("120.61.20.12", 7001) and len(rc.addresses) == 3
    assert rc.failed(t, "eof") == 1.0
    assert rc.handle_timer(t + 1.0) == rc.addresses[(rc.addresses.index(seen[-1]) + 1) % 3]
    assert rc.failed(t, "version") == 8.0  # configuration failures wait the cap
    assert rc.failed(t, "auth") < 8.0  # one silent close is retried soon (it may be junk's doing)
    assert rc.failed(t, "auth") == 8.0  # a second in a row: a wrong key
    # Jitter only ever shortens the delay, and is reproducible with a seeded RNG.
    a = ClientReconnect([("h", 1)], rng=random.Random(5), jitter=0.5)
    b = ClientReconnect([("h", 1)], rng=random.Random(5), jitter=0.5)
    da = [a.failed(0.0) for _ in range(6)]
    assert da == [b.failed(0.0) for _ in range(6)]
    assert all(0.5 * m <= d <= m for d, m in zip(da, [1, 2, 4, 8, 16, 32]))


def test_reconnect_with_same_name_replaces_old_session():
    reg = ServerSessions(server_cfg(), rng=random.Random(9))
    c1, s1, _ = connect(registry=reg)
    old = c1.session_id
    evs(c1), evs(s1)
    # The client lost its TCP path (no FIN reached the server) and reconnects
    # through another uplink, driven by ClientReconnect.
    rc = ClientReconnect([("203.0.113.1", 7001)], 0.0, rng=random.Random(1))
    rc.handle_timer(0.0)
    rc.established(0.0, c1.server_addresses)
    c1.receive_data(b"", 5.0)  # the client's side sees the loss
    assert only(evs(c1), ConnectionClosed)[0].reason == "eof"
    delay = rc.failed(5.0, "eof")
    addr = rc.handle_timer(5.0 + delay)
    assert addr == ("120.61.20.12", 7001)  # the next address: a learned server uplink
    c2, s2, _ = connect(registry=reg, now=5.0 + delay, addr=("61.120.1.230", 5000))
    assert c2.state is State.ESTABLISHED and c2.session_id != old
    freed = reg.events()
    assert freed == [SessionFreed(old, "site1", "replaced")] and freed[0].conn is s1
    assert old not in reg and len(reg) == 1
    assert s1.closed and s1.close_reason == "replaced"
    assert b"" != s1.data_to_send()  # BYE for the stale connection, if anyone still reads it


# --- rekey ----------------------------------------------------------------------------------------


def test_rekey_under_traffic_no_packet_lost():
    c, s, reg = connect()
    dc, ds = DataPlane(), DataPlane()
    dc.on(evs(c)), ds.on(evs(s))
    delivered = lost = 0

    def traffic(n=5):
        nonlocal delivered, lost
        for _ in range(n):
            for a, b in ((dc, ds), (ds, dc)):
                if b.open(a.seal(b"payload")) == b"payload":
                    delivered += 1
                else:
                    lost += 1

    traffic()
    old_hh = c._hh
    old_send = noise.CipherState(c._send_cs._k, c._send_cs.n)  # the client's control send key
    assert c.rekey(1.0)
    # Drive the three REKEY steps one TCP direction at a time, with
    # datagrams flying in between (UDP may overtake TCP).
    for src, dst in ((c, s), (s, c), (c, s)):
        step(src, dst, 1.0)
        dc.on(evs(c)), ds.on(evs(s))
        traffic()
    assert c.epoch == s.epoch == c.send_epoch == s.send_epoch == 2
    assert dc.send_epoch == ds.send_epoch == 2 and set(dc.recv_keys) == {1, 2}
    assert dc.send_keys[2] == ds.recv_keys[2] and dc.send_keys[2] != dc.send_keys[1]
    assert lost == 0 and delivered == 40
    # The control channel moved to the rekey's keys: a frame sealed with the
    # session's original control key is now refused.
    assert c._hh == s._hh != old_hh
    s.receive_data(encode_frame(old_send.encrypt_with_ad(b"", b'{"type":"KEEPALIVE","n":9}')),
                   1.5)
    assert s.closed and s.counters["decrypt"] == 1


def test_rekey_overlap_then_retire():
    c, s, reg = connect()
    dc, ds = DataPlane(), DataPlane()
    dc.on(evs(c)), ds.on(evs(s))
    c.rekey(1.0)
    pump(c, s, 1.0)
    dc.on(evs(c)), ds.on(evs(s))
    # A straggler sealed with epoch 1 still opens during the overlap...
    straggler = (1, (999).to_bytes(12, "big"),
                 ChaCha20Poly1305(ds.send_keys[1]).encrypt((999).to_bytes(12, "big"), b"old", b""))
    assert dc.open(straggler) == b"old"
    # ...and is refused once the overlap (10 s) is over and the keys dropped.
    run_clock([c, s], 1.0, 12.0, pairs=[(c, s)])
    dc.on(evs(c)), ds.on(evs(s))
    assert set(dc.recv_keys) == {2} == set(ds.recv_keys)
    assert dc.open(straggler) is None
    for _ in range(3):  # and again: the chain of rekeys keeps both sides in step
        c.rekey(20.0)
        pump(c, s, 20.0)
    assert c.epoch == s.epoch == 5 and not c.closed and not s.closed
    run_clock([c, s], 20.0, 200.0, dt=5.0, pairs=[(c, s)])
    assert not c.closed and not s.closed and c.epoch == s.epoch


def test_rekey_on_timer_and_on_packet_count():
    c, s, reg = connect(client_cfg(rekey_interval=120.0, rekey_packets=1000), server_cfg())
    dc, ds = DataPlane(), DataPlane()
    dc.on(evs(c)), ds.on(evs(s))
    run_clock([c, s], 0.0, 125.0, dt=1.0, pairs=[(c, s)])
    assert c.epoch == s.epoch == 2 and c.counters["rekey_started"] == 1
    assert s.counters["rekey_started"] == 0  # the client drives; the server is the backstop
    assert not c.note_sealed(2, 999, 126.0) and c.epoch == 2
    assert not c.note_sealed(1, 5000, 126.0) and c.epoch == 2  # an old epoch's count
    assert c.note_sealed(2, 1000, 126.0)
    assert not c.note_sealed(2, 1001, 126.0)  # one rekey at a time
    pump(c, s, 126.0)
    assert c.epoch == s.epoch == 3 and c.counters["rekey_volume"] == 1
    dc.on(evs(c)), ds.on(evs(s))
    assert dc.send_keys[3] == ds.recv_keys[3]


def _sealers_follow(conn, sealer, events):
    """What the agent does with a connection's key events (docs/control.md)."""
    for e in events:
        if isinstance(e, KeysRotated):
            sealer.rotate(e.keys.send, e.keys.recv, e.epoch, defer_send=not e.sending)
        elif isinstance(e, KeysActivated):
            sealer.confirm_send()
        elif isinstance(e, KeysRetired) and sealer.prev_epoch == e.epoch:
            sealer.drop_previous()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_volume_rekeys_counted_by_the_sealers_lose_nothing(batch):
    """Both sides seal with real Sealers and report their counts after each
    batch: every budget of 500 packets ends in a rekey, started by whichever
    side used its key up, and every packet opens on the other side."""
    c, s, reg = connect(client_cfg(rekey_interval=1e6, rekey_packets=500),
                        server_cfg(rekey_interval=1e6, rekey_packets=500))
    est_c, est_s = only(evs(c), SessionEstablished)[0], only(evs(s), SessionEstablished)[0]
    sc = seal.Sealer(est_c.keys.send, est_c.keys.recv, 1)
    ss = seal.Sealer(est_s.keys.send, est_s.keys.recv, 1)
    seq = {c: 0, s: 0}
    opened = 0
    most = 0
    t = 1.0
    for i in range(6000 // batch):
        for conn, me, peer in ((c, sc, ss), (s, ss, sc)):
            if conn is s and i % 2:  # the client sends twice as much as the server
                continue
            first = seq[conn] + 1
            encrypt, epoch = me.reserve_data(first, batch)
            sealed = []
            for k in range(batch):
                hdr = wire.HEADER.pack(wire.VERSION, wire.DATA, 0, wire.F_SEALED, 7, 3, epoch, 0,
                                       first + k)
                sealed.append(hdr + encrypt(b"\x00" * 4 + hdr[12:], b"abc", hdr))
            seq[conn] += batch
            most = max(most, me.sealed)
            conn.note_sealed(me.send_epoch, me.sealed, t)
            for d in sealed:
                opened += peer.open(d) == b"abc"
        pump(c, s, t)
        _sealers_follow(c, sc, evs(c))
        _sealers_follow(s, ss, evs(s))
        t += 0.01
    assert opened == sum(seq.values()) and sc.bad_tag == ss.bad_tag == sc.unknown_epoch == 0
    # a rekey renews both directions' keys, so the busier side sets the pace
    rekeys = c.counters["rekey_volume"] + s.counters["rekey_volume"]
    assert rekeys >= max(seq.values()) // (500 + 2 * batch) and c.epoch == s.epoch == 1 + rekeys
    assert most < 500 + 2 * batch + 64  # no key sealed much past its budget


def test_rekey_collision_is_resolved_deterministically():
    c, s, reg = connect()
    dc, ds = DataPlane(), DataPlane()
    dc.on(evs(c)), ds.on(evs(s))
    assert c.rekey(5.0) and s.rekey(5.0)
    a, b = c.data_to_send(), s.data_to_send()  # both REKEYs cross on the wire
    s.receive_data(a, 5.0)
    c.receive_data(b, 5.0)
    pump(c, s, 5.0)
    assert c.epoch == s.epoch == 2 and not c.closed and not s.closed
    assert c.counters["rekey_collision"] == s.counters["rekey_collision"] == 1
    dc.on(evs(c)), ds.on(evs(s))
    assert dc.send_keys[2] == ds.recv_keys[2] and ds.send_keys[2] == dc.recv_keys[2]
    assert dc.send_epoch == ds.send_epoch == 2


def test_unanswered_rekey_times_out():
    c, s, reg = connect()
    c.rekey(1.0)
    c.data_to_send()  # lost in a black hole (TCP stuck)
    run_clock([c], 1.0, 40.0)
    assert c.closed and c.close_reason == "timeout"


# --- UPDATE --------------------------------------------------------------------------------------


def test_update_after_an_address_change_replans():
    c, s, reg = connect()
    evs(c), evs(s)
    before = {p.local: p.member for p in c.plan}
    new_ups = (Uplink("wan1", "telecom", "120.22.1.99", 7000),) + c.local.uplinks[1:]
    c.send_update(10.0, uplinks=new_ups)
    pump(c, s, 10.0)
    su, cu = only(evs(s), PeerUpdated)[0], only(evs(c), PeerUpdated)[0]
    assert su.origin == cu.origin == "peer"
    assert len(cu.diff.changed) == 1 and len(cu.diff.kept) == 2
    old, new = cu.diff.changed[0]
    assert old.member == new.member == before["wan1"] and new.local_addr == "120.22.1.99"
    assert su.diff.changed[0][1].remote_addr == "120.22.1.99"
    assert c.plan == mirror(s.plan)
    # A server-side change: a new uplink of a carrier the client has.
    s.send_update(11.0, uplinks=s.local.uplinks + (Uplink("t2", "telecom", "120.61.20.13", 7000),))
    pump(c, s, 11.0)
    su, cu = only(evs(s), PeerUpdated)[0], only(evs(c), PeerUpdated)[0]
    assert su.origin == "local" and not su.diff.added  # the client has only one telecom uplink
    # The client adds a second telecom uplink: it pairs with t2.
    c.send_update(12.0, uplinks=c.local.uplinks + (Uplink("wan4", "telecom", "120.22.1.4", 7000),))
    pump(c, s, 12.0)
    cu = only(evs(c), PeerUpdated)[0]
    assert [(p.local, p.remote, p.member) for p in cu.diff.added] == [("wan4", "t2", 4)]
    assert c.plan == mirror(s.plan) and len(c.plan) == 4


def test_crossing_updates_still_agree():
    c, s, reg = connect()
    evs(c), evs(s)
    c.send_update(1.0, uplinks=c.local.uplinks[:2])  # the client lost its mobile uplink
    s.send_update(1.0, uplinks=s.local.uplinks + (Uplink("u2", "unicom", "180.22.154.32", 7000),))
    a, b = c.data_to_send(), s.data_to_send()
    s.receive_data(a, 1.0)
    c.receive_data(b, 1.0)
    pump(c, s, 1.0)
    assert not c.closed and not s.closed
    assert c.plan == mirror(s.plan) and {p.local for p in c.plan} == {"wan1", "wan2"}


def test_update_with_overlapping_lan_is_refused():
    c, s, reg = connect()
    evs(c), evs(s)
    c.send_update(1.0, lans=("10.10.1.0/24",))
    pump(c, s, 1.0)
    assert only(evs(c), ProtocolError)[0].code == "overlap" and c.closed and s.closed
    assert reg.events()[0].reason == "overlap"


# --- many clients ---------------------------------------------------------------------------------


def test_twenty_clients_and_misbehaving_ones():
    reg = ServerSessions(server_cfg(), rng=random.Random(42), limiter=None)
    clients, servers = [], []
    for i in range(1, 21):
        servers.append(reg.accept((f"198.51.100.{i}", 40000), 0.0))
        clients.append(ClientConnection(client_cfg(i), 0.0))
    garbage = reg.accept(("203.0.113.9", 1), 0.0)
    oversized = reg.accept(("203.0.113.10", 1), 0.0)
    rng = random.Random(0)
    # Interleave everyone, one small chunk at a time.
    for rnd in range(40):
        garbage.receive_data(bytes(rng.getrandbits(8) for _ in range(37)), 0.0)
        oversized.receive_data(b"\xff\xff" + b"A" * 100, 0.0)
        for c, s in zip(clients, servers):
            step(c, s, 0.0)
            step(s, c, 0.0)
    assert all(c.state is State.ESTABLISHED for c in clients)
    assert len(reg) == 20 and len({c.session_id for c in clients}) == 20
    assert garbage.closed and garbage.close_reason in ("malformed", "oversized", "bad_psk")
    assert oversized.close_reason == "oversized" and garbage.data_to_send() == b""
    # An authenticated client that then sends garbage loses only its own session.
    bad_c = ClientConnection(client_cfg(21), 0.0)
    bad_s = reg.accept(("198.51.100.21", 1), 0.0)
    pump(bad_c, bad_s, 0.0)
    assert bad_c.state is State.ESTABLISHED and len(reg) == 21
    bad_s.receive_data(encode_frame(bad_c._send_cs.encrypt_with_ad(b"", b"{not json")), 1.0)
    assert bad_s.close_reason == "invalid" and bad_s.counters["malformed"] == 1
    pump(bad_c, bad_s, 1.0)
    assert only(evs(bad_c), ProtocolError)[0].code == "invalid"
    assert [e.reason for e in reg.events()] == ["invalid"] and len(reg) == 20
    # Everyone else carries on.
    run_clock([*clients, *servers], 1.0, 60.0, dt=1.0, pairs=list(zip(clients, servers)))
    assert all(c.state is State.ESTABLISHED for c in clients) and len(reg) == 20
    assert reg.counters["malformed"] + reg.counters["oversized"] + reg.counters["bad_psk"] >= 3


def test_silent_session_expires_and_is_reported():
    reg = ServerSessions(server_cfg(), rng=random.Random(5), session_timeout=90.0)
    c, s, _ = connect(registry=reg)
    sid = c.session_id
    evs(s)
    # The client vanishes.  The control connection dies after the keepalive
    # timeout; the session is detached, then expired.
    t = run_clock([s, reg], 0.0, 31.0)
    assert s.close_reason == "timeout" and sid in reg and reg.get(sid).conn is None
    assert reg.get_timer() == pytest.approx(90.0)
    run_clock([reg], t, 89.0)
    assert sid in reg
    run_clock([reg], 89.0, 91.0)
    assert reg.events() == [SessionFreed(sid, "site1", "expired")] and len(reg) == 0
    # With data-plane activity a detached session lives on.
    c, s, _ = connect(registry=reg, now=100.0)
    sid = c.session_id
    s.receive_data(b"", 101.0)
    assert reg.get(sid).conn is None
    for t in range(110, 400, 30):
        assert reg.touch(sid, float(t))
        reg.handle_timer(float(t))
    assert sid in reg


# --- hostile input -------------------------------------------------------------------------------


def test_tampered_frame_is_rejected_and_counted():
    c, s, reg = connect()
    c.send_update(1.0, lans=("192.168.77.0/24",))
    data = bytearray(c.data_to_send())
    data[10] ^= 1
    s.receive_data(bytes(data), 1.0)
    assert s.close_reason == "auth" and s.counters["decrypt"] == 1
    pump(c, s, 1.0)
    assert only(evs(c), ProtocolError)[-1].code == "auth"


def test_oversized_frame_after_handshake():
    c, s, reg = connect()
    s.receive_data((20000).to_bytes(2, "big") + b"\x00" * 100, 1.0)
    assert s.closed and s.counters["oversized"] == 1 and reg.counters["oversized"] == 1
    pump(c, s, 1.0)
    pe = only(evs(c), ProtocolError)[0]
    assert pe.code == "invalid" and pe.by_peer and "longer than" in pe.text
    assert [e.reason for e in reg.events()] == ["invalid"]


def test_learned_addresses_without_control_port():
    c, s, reg = connect(scfg=server_cfg(control_port=None))
    assert c.server_addresses[0] == ("120.61.20.12", None)
    rc = ClientReconnect([("203.0.113.1", 7001)])
    rc.handle_timer(0.0)
    rc.established(0.0, c.server_addresses)
    assert ("61.35.11.10", 7001) in rc.addresses and len(rc.addresses) == 4


def _good_messages():
    ups = [{"name": "wan1", "type": "telecom", "addr": "120.22.1.2", "port": 7000}]
    return [
        {"type": "KEEPALIVE", "n": 1},
        {"type": "UPDATE", "seq": 1, "uplinks": ups},
        {"type": "BYE", "reason": "shutdown", "text": "bye"},
        {"type": "REKEY", "step": 3, "epoch": 2},
        {"type": "HELLO", "name": "x", "uplinks": ups, "vnc": {"ip": "10.0.0.2", "netmask": "24"},
         "lans": ["192.168.9.0/24"], "mode": "duplicate", "options": {"pair_unmatched": True}},
    ]


@pytest.mark.parametrize("bad", [
    b"[]", b"{}", b'{"type":"NOPE"}', b'{"type":"KEEPALIVE","n":true}',
    b'{"type":"KEEPALIVE","n":1,"n":2}', b'{"type":"KEEPALIVE","n":NaN}',
    b'{"type":"KEEPALIVE","n":1,"extra":0}', b"[" * 20000, b'{"type":"KEEPALIVE","n":1e400}',
    b"\xff\xfe", b'{"type":"UPDATE","seq":1}', b'{"type":"WELCOME"}',
    json.dumps({"type": "UPDATE", "seq": 1, "lans": ["10.0.0.1/8"]}).encode(),
    json.dumps({"type": "UPDATE", "seq": 1, "uplinks": [
        {"name": f"w{i}", "type": "t", "addr": f"1.1.1.{i}", "port": 1} for i in range(17)]}).encode(),
    json.dumps({"type": "UPDATE", "seq": 1, "uplinks": [
        {"name": "w", "type": "BAD TYPE", "addr": "1.1.1.1", "port": 1}]}).encode(),
    json.dumps({"type": "UPDATE", "seq": 1, "uplinks": [
        {"name": "w", "type": "t", "addr": "fe80::1%eth0", "port": 1}]}).encode(),
    json.dumps({"type": "BYE", "reason": "x", "text": "y" * 257}).encode(),
    b" " * (MAX_MESSAGE + 1),
])
def test_decode_message_rejects(bad):
    msg, why, text = decode_message(bad, from_client=True)
    assert msg is None and why in ("malformed", "invalid", "oversized") and text


def test_decode_message_accepts_good_ones():
    for m in _good_messages():
        got, why, _ = decode_message(json.dumps(m).encode(), from_client=True)
        assert why is None and got["type"] == m["type"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(16, 70000))
def test_fuzz_frame_decoder(chunks, limit):
    d = FrameDecoder(max_frame=min(limit, 65535))
    for ch in chunks:
        d.feed(ch)
        while d.next_frame() is not None:
            pass
    assert d.error in (None, "malformed", "oversized")
    assert d.buffered <= 2 + d.max_frame + 300


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=700), min_size=1, max_size=6))
def test_fuzz_server_preauth(chunks):
    reg = ServerSessions(server_cfg(), limiter=None)
    s = reg.accept(("203.0.113.1", 1), 0.0)
    for ch in chunks:
        s.receive_data(ch, 0.0)
    s.handle_timer(100.0)
    assert s.closed and len(reg) == 0 and s.data_to_send() == b""
    assert sum(reg.counters[k] for k in ("bad_psk", "malformed", "oversized", "timeout",
                                         "eof", "no_stamp")) == 1


def _mutations():
    good = [json.dumps(m).encode() for m in _good_messages()]
    return st.one_of(
        st.binary(max_size=400),
        st.sampled_from(good).flatmap(lambda g: st.integers(0, len(g)).map(lambda n: g[:n])),
        st.sampled_from(good).flatmap(lambda g: st.tuples(st.just(g), st.integers(0, len(g) - 1),
                                                          st.integers(0, 255))).map(
            lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch,
                                                                           max_size=4),
                     max_leaves=20).map(lambda o: json.dumps(o).encode()),
        st.just(b"x" * (MAX_MESSAGE + 1)),
    )


_PAIR = {}


def _fresh_pair():
    # One handshake per example is cheap, but reuse the configs.
    c = ClientConnection(_PAIR.setdefault("cc", client_cfg()), 0.0)
    reg = ServerSessions(_PAIR.setdefault("sc", server_cfg()), limiter=None)
    s = reg.accept(("203.0.113.1", 1), 0.0)
    pump(c, s, 0.0)
    evs(c), evs(s)
    return c, s, reg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutations(), min_size=1, max_size=4), st.booleans())
def test_fuzz_post_handshake_messages(payloads, to_client):
    c, s, reg = _fresh_pair()
    src, dst = (s, c) if to_client else (c, s)
    bad = 0
    for p in payloads:
        if dst.closed:
            break
        before = sum(dst.counters.values())
        state_before = dst.state
        dst.receive_data(encode_frame(src._send_cs.encrypt_with_ad(b"", p)), 0.0)
        msg, why, _ = decode_message(p, from_client=not to_client)
        if msg is None:
            bad += 1
            # every bad input is counted and ends the connection with a reason
            assert dst.closed and sum(dst.counters.values()) == before + 1
            assert dst.close_reason in ("invalid", "auth")
        elif dst.closed:
            assert dst.close_reason is not None and state_before is State.ESTABLISHED
    for e in dst.events():
        assert isinstance(e, (ProtocolError, ConnectionClosed, PeerUpdated, KeysRotated,
                              KeysActivated))


@pytest.mark.parametrize("client, server, chosen", [
    (("aes-256-gcm", "chacha20-poly1305"), ("aes-256-gcm", "chacha20-poly1305"), "aes-256-gcm"),
    (("chacha20-poly1305", "aes-256-gcm"), ("aes-256-gcm", "chacha20-poly1305"), "chacha20-poly1305"),
    (("aes-256-gcm", "chacha20-poly1305"), ("chacha20-poly1305", "aes-256-gcm"), "chacha20-poly1305"),
    (("chacha20-poly1305",), ("aes-256-gcm", "chacha20-poly1305"), "chacha20-poly1305"),
])
def test_data_cipher_negotiation(client, server, chosen):
    """AES-GCM only when both sides prefer it (both CPUs have AES instructions);
    ChaCha20-Poly1305 otherwise, which every peer has."""
    c, s, _reg = connect(client_cfg(ciphers=client), server_cfg(ciphers=server))
    ec = only(evs(c), SessionEstablished)[0]
    es = only(evs(s), SessionEstablished)[0]
    assert ec.cipher == es.cipher == chosen == c.cipher == s.cipher


def test_a_server_choosing_a_cipher_we_did_not_offer_is_refused():
    c = ClientConnection(client_cfg(ciphers=("chacha20-poly1305",)), 0.0)
    real = seal.choose_cipher
    seal.choose_cipher = lambda server, client: "aes-256-gcm"  # a broken server
    try:
        s = ServerConnection(server_cfg(), 0.0)
        pump(c, s, 0.0)
    finally:
        seal.choose_cipher = real
    assert c.state is State.CLOSED and c.close_reason == "invalid"
    assert "cipher" in c.close_text or any("cipher" in e.text for e in only(evs(c), ProtocolError))


def test_ciphers_must_be_known_locally():
    with pytest.raises(ValueError):
        client_cfg(ciphers=("rot13",)).local_info()


def test_a_hub_accepts_each_sites_own_key_and_says_which_site_it_was():
    k_b, k_c = bytes(range(2, 34)), bytes(range(3, 35))
    scfg = server_cfg(psk=None, site_psks=(("branch_b", k_b), ("branch_c", k_c)))
    reg = ServerSessions(scfg, rng=random.Random(1))
    c1, s1, _ = connect(client_cfg(1, psk=k_c), scfg, registry=reg)
    c2, s2, _ = connect(client_cfg(2, psk=k_b), scfg, registry=reg, addr=("198.51.100.8", 40000))
    assert c1.state is s1.state is c2.state is s2.state is State.ESTABLISHED
    assert (s1.site, s2.site) == ("branch_c", "branch_b")
    # rekeys run under the key the site authenticated with
    run_clock([c1, s1], 0.0, 125.0, dt=1.0, pairs=[(c1, s1)])
    assert c1.epoch == s1.epoch == 2 and s1.counters["rekey_auth"] == 0
    # the shared key is not accepted when the hub has none; an unknown key is refused
    for psk in (PSK, OTHER_PSK):
        c, s, _ = connect(client_cfg(3, psk=psk), scfg, registry=reg, addr=("198.51.100.9", 40000))
        assert s.state is State.CLOSED and s.close_reason == "bad_psk" and s.site is None
        assert c.state is not State.ESTABLISHED
    # with a shared key as well, it authenticates as "no site"
    both = server_cfg(site_psks=(("branch_b", k_b),))
    c, s, _ = connect(client_cfg(4), both)
    assert s.state is State.ESTABLISHED and s.site is None
    with pytest.raises(ValueError):
        server_cfg(psk=None).local_info()  # no key at all
    with pytest.raises(ValueError):
        server_cfg(site_psks=(("x", b"short"),)).local_info()


# --- identity on the hub (issue 16) ---------------------------------------------------------------

K_B, K_C = bytes(range(2, 34)), bytes(range(3, 35))


def _hub(**kw):
    scfg = server_cfg(psk=None, site_psks=(("branch_b", K_B), ("branch_c", K_C)), **kw)
    return scfg, ServerSessions(scfg, rng=random.Random(1))


def _refused(c, s, code):
    """Refused with ``code``, shown on both sides with the same text."""
    cerr, serr = only(evs(c), ProtocolError), only(evs(s), ProtocolError)
    assert [e.code for e in cerr] == [code] and cerr[0].by_peer
    assert [e.code for e in serr] == [code] and not serr[0].by_peer
    assert cerr[0].text == serr[0].text
    assert c.closed and s.closed and (s.session is None or s.session.conn is None)
    return cerr[0].text


def test_another_sites_key_can_never_displace_a_session():
    scfg, reg = _hub()
    b, sb, _ = connect(client_cfg(1, psk=K_B), scfg, registry=reg)
    sid = b.session_id
    assert b.state is State.ESTABLISHED and sb.session.identity == ("site", "branch_b")
    evs(b), evs(sb), reg.events()
    # Site C, with its own valid key, claims B's name and vNIC address (the
    # hostile test of issue 16 took B's session over 25 times in a minute).
    for i in range(25):
        c, s, _ = connect(client_cfg(2, psk=K_C, name="site1", vnc=b.config.vnc), scfg,
                          registry=reg, now=float(i), addr=("198.51.100.8", 40000 + i))
        assert "vNIC address 10.99.0.2" in _refused(c, s, "vnic")
    # its own vNIC, but B's name; or B's LAN
    c, s, _ = connect(client_cfg(2, psk=K_C, name="site1"), scfg, registry=reg)
    assert "site1" in _refused(c, s, "name")
    c, s, _ = connect(client_cfg(2, psk=K_C, lans=("192.168.1.0/25",)), scfg, registry=reg)
    assert "192.168.1.0/25" in _refused(c, s, "overlap")
    # nothing of B changed
    assert reg.events() == [] and list(reg.sessions) == [sid] and reg.get(sid).conn is sb
    assert b.state is sb.state is State.ESTABLISHED and evs(b) == [] and evs(sb) == []
    assert reg.counters["claim_refused"] == 27
    assert reg.status()["sessions"][sid]["identity"] == "site key branch_b"


def test_the_same_key_replaces_its_own_session_whatever_it_claims():
    scfg, reg = _hub()
    b, sb, _ = connect(client_cfg(1, psk=K_B), scfg, registry=reg)
    c, sc, _ = connect(client_cfg(2, psk=K_C), scfg, registry=reg)
    old = b.session_id
    reg.events()
    # B restarts with another hostname and vNIC address: still B
    b2, sb2, _ = connect(client_cfg(3, psk=K_B), scfg, registry=reg, now=1.0)
    assert b2.state is State.ESTABLISHED
    assert reg.events() == [SessionFreed(old, "site1", "replaced")]
    assert sb.close_reason == "replaced" and sc.state is State.ESTABLISHED and len(reg) == 2
    # a restarted B may take its old addresses back; C may not take B's new ones
    b3, sb3, _ = connect(client_cfg(1, psk=K_B), scfg, registry=reg, now=2.0)
    assert b3.state is State.ESTABLISHED and sb2.close_reason == "replaced"
    c2, sc2, _ = connect(client_cfg(1, psk=K_C), scfg, registry=reg, now=3.0)
    _refused(c2, sc2, "vnic")
    assert c.state is State.ESTABLISHED  # C's first connection is untouched as well


def test_an_update_cannot_claim_another_sites_lan():
    scfg, reg = _hub()
    b, sb, _ = connect(client_cfg(1, psk=K_B), scfg, registry=reg)
    c, sc, _ = connect(client_cfg(2, psk=K_C), scfg, registry=reg)
    evs(c), evs(sc)
    c.send_update(1.0, lans=["192.168.1.0/24"])
    pump(c, sc, 1.0)
    assert "192.168.1.0/24" in _refused(c, sc, "overlap")
    assert b.state is sb.state is State.ESTABLISHED and reg.get(b.session_id).peer.lans == (
        "192.168.1.0/24",)
    # its own LANs may change (its own session does not collide with itself)
    b.send_update(2.0, lans=["192.168.1.0/24", "192.168.7.0/24"])
    pump(b, sb, 2.0)
    assert only(evs(b), PeerUpdated) and reg.get(b.session_id).peer.lans[-1] == "192.168.7.0/24"


def test_with_one_shared_key_collisions_are_refused_not_replaced():
    reg = ServerSessions(server_cfg(), rng=random.Random(4))
    a, sa, _ = connect(client_cfg(1, name="OpenWrt"), registry=reg)
    sid = a.session_id
    reg.events()
    # a second router that kept OpenWrt's default hostname
    b, sb, _ = connect(client_cfg(2, name="OpenWrt"), registry=reg, now=1.0)
    assert "OpenWrt" in _refused(b, sb, "name")
    # another name, but the first one's vNIC address
    b, sb, _ = connect(client_cfg(2, vnc=a.config.vnc), registry=reg, now=2.0)
    _refused(b, sb, "vnic")
    assert reg.events() == [] and list(reg.sessions) == [sid] and sa.state is State.ESTABLISHED
    # the same name and address again is the same site restarting: it replaces
    a2, sa2, _ = connect(client_cfg(1, name="OpenWrt"), registry=reg, now=3.0)
    assert a2.state is State.ESTABLISHED and reg.events() == [SessionFreed(sid, "OpenWrt",
                                                                           "replaced")]


def test_the_hub_decides_what_each_site_may_claim():
    scfg, reg = _hub(site_claims=(("branch_b", "10.99.0.2", ("192.168.1.0/24",)),
                                  ("branch_c", None, ())))
    b, sb, _ = connect(client_cfg(1, psk=K_B), scfg, registry=reg)
    sid = b.session_id
    assert b.state is State.ESTABLISHED
    reg.events()
    # B (restarted, or compromised) with another vNIC address: refused, and
    # its existing session is not replaced
    b2, sb2, _ = connect(client_cfg(2, psk=K_B, lans=("192.168.1.0/24",)), scfg, registry=reg)
    assert "must use vNIC address 10.99.0.2" in _refused(b2, sb2, "vnic")
    assert reg.events() == [] and reg.get(sid).conn is sb and sb.state is State.ESTABLISHED
    # a LAN outside its allowed subnets, in an UPDATE: refused with "lan"
    evs(b), evs(sb)
    b.send_update(1.0, lans=["192.168.1.0/25"])  # inside: fine
    pump(b, sb, 1.0)
    assert only(evs(b), PeerUpdated)
    b.send_update(2.0, lans=["192.168.9.0/24"])
    pump(b, sb, 2.0)
    assert "192.168.9.0/24" in _refused(b, sb, "lan")
    # C may announce no LAN at all, any vNIC address
    c, sc, _ = connect(client_cfg(3, psk=K_C), scfg, registry=reg)
    _refused(c, sc, "lan")
    c, sc, _ = connect(client_cfg(3, psk=K_C, lans=()), scfg, registry=reg)
    assert c.state is State.ESTABLISHED
    with pytest.raises(ValueError):
        server_cfg(site_psks=(("x", K_B),), site_claims=(("x", "10.99.0.300", None),)).local_info()


def test_a_name_refusal_waits_like_a_configuration_error():
    rc = ClientReconnect([("203.0.113.1", 7001)], 0.0, cap=60.0, jitter=0.0)
    rc.handle_timer(0.0)
    assert rc.failed(0.0, "name") == 60.0


# --- the transition table ---------------------------------------------------------------------


def _pair_in_hello():
    """Client and server both in HELLO: the server answered message 1, the
    client sent HELLO, which the server has not read."""
    reg = ServerSessions(server_cfg(), rng=random.Random(1))
    s = reg.accept(("198.51.100.7", 40000), 0.0)
    c = ClientConnection(client_cfg(), 0.0)
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)
    c.data_to_send()  # the HELLO, dropped
    assert c.state is State.HELLO and s.state is State.HELLO
    return c, s


def _message(t: str, to_client: bool) -> dict:
    info = info_json(client_cfg(5).local_info() if not to_client else server_cfg().local_info())
    return {
        "HELLO": dict(type="HELLO", **info),
        "WELCOME": dict(type="WELCOME", session_id=7, plan=[],
                        keepalive={"interval": 10, "timeout": 30}, **info),
        "UPDATE": ({"type": "UPDATE", "ack": 0, "plan": []} if to_client
                   else {"type": "UPDATE", "seq": 1, "lans": []}),
        "KEEPALIVE": {"type": "KEEPALIVE", "n": 1},
        "KEEPALIVE_ACK": {"type": "KEEPALIVE_ACK", "n": 1},
        "REKEY": {"type": "REKEY", "step": 3, "epoch": 2},
        "BYE": {"type": "BYE", "reason": "x"},
        "ERROR": {"type": "ERROR", "code": "x"},
    }[t]


@pytest.mark.parametrize("state", [State.HELLO, State.ESTABLISHED])
@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_the_transition_table_decides_which_messages_a_state_takes(role, state):
    """Every message type a role can receive, in each state with a channel:
    refused as unexpected exactly when TRANSITIONS has no entry for it."""
    to_client = role is Role.CLIENT
    types = [t for t in ("HELLO", "WELCOME", "UPDATE", "KEEPALIVE", "KEEPALIVE_ACK", "REKEY",
                         "BYE", "ERROR") if t != ("HELLO" if to_client else "WELCOME")]
    for t in types:
        if state is State.HELLO:
            c, s = _pair_in_hello()
            sender_cs = (s._send_cs if to_client
                         else noise.CipherState(c._send_cs._k))  # the HELLO was dropped
        else:
            c, s, _reg = connect()
            sender_cs = s._send_cs if to_client else c._send_cs
        dst = c if to_client else s
        evs(dst)
        assert dst.state is state
        body = json.dumps(_message(t, to_client)).encode()
        dst.receive_data(encode_frame(sender_cs.encrypt_with_ad(b"", body)), 1.0)
        texts = [e.text for e in evs(dst) if isinstance(e, ProtocolError) and not e.by_peer]
        refused = f"unexpected {t} in state {state.value}" in texts
        allowed = Ev(t) in TRANSITIONS[role][state]
        assert refused is not allowed, (t, texts)
        if refused:
            assert dst.closed and dst.close_reason == "invalid" and dst.counters["unexpected"] == 1
        elif t in ("BYE", "ERROR"):
            assert dst.closed and TRANSITIONS[role][state][Ev(t)] is State.CLOSED
        elif t in ("KEEPALIVE", "KEEPALIVE_ACK"):
            assert dst.state is TRANSITIONS[role][state][Ev(t)]


def test_registry_reconfigure_checks_the_new_config_and_serves_later_clients_with_it():
    reg = ServerSessions(server_cfg())
    old = reg.config
    with pytest.raises(ValueError, match="overlap"):
        reg.reconfigure(replace(server_cfg(), lans=("192.168.1.0/24",) * 2))
    assert reg.config is old
    new = replace(server_cfg(), lans=("192.168.77.0/24",))
    reg.reconfigure(new)
    assert reg.config is new
    # a client that connects now is told the new LANs (the agent used to set
    # .config alone; new connections kept announcing the old LANs)
    assert list(reg.accept("192.0.2.9", 0.0).local.lans) == ["192.168.77.0/24"]


def test_freshness_records_survive_a_restart_of_the_server():
    """A first message answered before a restart is a replay after it: the
    records go out (``records``) and back in (``restore``); a damaged entry is
    skipped, the greater counter wins."""
    psk = noise.load_psk(noise.genpsk())
    stamps = HandshakeStamps()
    msg1 = b"m" * 48
    sender, n = stamps.next()
    stamp = stamp_first_message(psk, msg1, sender, n)
    before = HandshakeGuard()
    assert before.admit([("s", psk)], msg1, stamp, 0.0).verdict == "ok"
    assert before.changes == 1
    after = HandshakeGuard()
    junk = [("s", b"short", 3), (None, sender, 0), ("s", sender, "7"), 42, ("s",)]
    assert after.restore(junk + before.records() + [("s", sender, n - 1 if n > 1 else n)]) == 2
    assert after.admit([("s", psk)], msg1, stamp, 0.0).verdict == "replay"
    fresh = stamp_first_message(psk, msg1, *stamps.next())
    assert after.admit([("s", psk)], msg1, fresh, 0.0).verdict == "ok"


def test_the_records_file_round_trips_and_refuses_what_is_not_one(tmp_path):
    from mpvpn.io import stampstore

    recs = [("site-a", bytes(range(8)), 5), (None, bytes(8), 2 ** 64 - 1)]
    path = tmp_path / stampstore.FILENAME
    assert stampstore.load(path) == []  # none yet
    stampstore.save(path, recs)
    assert stampstore.load(path) == recs
    assert path.stat().st_mode & 0o077 == 0  # the records are the server's business
    assert [p.name for p in tmp_path.iterdir()] == [stampstore.FILENAME]  # no temporary left
    for bad in (b"{", b"[]", b'{"version": 2, "records": []}', b"\xff"):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            stampstore.load(path)


def test_session_ids_never_take_the_stun_magic_cookie():
    """SMPU's session id sits where STUN has its magic cookie (bytes 4..7)
    and STUN shares the uplink sockets (docs/nat.md): a generator that draws
    the cookie (then 0, then an id in use) must skip them all."""
    from mpvpn.core.controlconn import STUN_MAGIC_COOKIE, random_session_id
    from mpvpn.core.stun import MAGIC_COOKIE

    assert STUN_MAGIC_COOKIE == MAGIC_COOKIE

    class Draws:
        def __init__(self, values):
            self.values = list(values)

        def getrandbits(self, n):
            assert n == 32
            return self.values.pop(0)

    assert random_session_id(Draws([MAGIC_COOKIE, 0, 7, 8]), {7}) == 8
    assert random_session_id(Draws([MAGIC_COOKIE, MAGIC_COOKIE, 5]), ()) == 5


# --- candidates (issue 15, docs/control.md) ---------------------------------------

def _cand_update(cands):
    return json.dumps({"type": "UPDATE", "seq": 1, "uplinks": [
        {"name": "mobile", "type": "mobile", "addr": "10.200.0.2", "port": 7000,
         "candidates": cands}]}).encode()


def test_candidates_parse_into_the_uplink_and_round_trip():
    from mpvpn.core.candidates import Candidate

    cands = [{"kind": "host", "addr": "10.200.0.2", "port": 7000},
             {"kind": "srflx", "addr": "203.0.113.10", "port": 7000},
             {"kind": "relay", "addr": "2001:db8::7", "port": 49152}]
    got, why, _ = decode_message(_cand_update(cands), from_client=True)
    assert why is None
    up = got["uplinks"][0]
    assert up.candidates == (Candidate("host", "10.200.0.2", 7000), Candidate("srflx", "203.0.113.10", 7000),
                             Candidate("relay", "2001:db8::7", 49152))
    assert up.to_json()["candidates"] == cands
    assert "candidates" not in Uplink("a", "t", "10.0.0.1", 1).to_json()  # peers before issue 15


@pytest.mark.parametrize("cands, word", [
    ([{"kind": "srflx", "addr": f"203.0.113.{i}", "port": 1} for i in range(5)], "at most 4"),
    ([{"kind": "srflx", "addr": "203.0.113.1", "port": 1}] * 2, "share one address"),
    ([{"kind": "host", "addr": "203.0.113.1", "port": 1},
      {"kind": "srflx", "addr": "203.0.113.1", "port": 1}], "share one address"),
    ([{"kind": "prflx", "addr": "203.0.113.1", "port": 1}], "kind"),
    ([{"kind": "srflx", "addr": "203.0.113.1", "port": 0}], "port"),
    ([{"kind": "srflx", "addr": "203.0.113.1", "port": 65536}], "port"),
    ([{"kind": "srflx", "addr": "0.0.0.0", "port": 1}], "unicast"),
    ([{"kind": "srflx", "addr": "239.1.1.1", "port": 1}], "unicast"),
    ([{"kind": "srflx", "addr": "fe80::1%eth0", "port": 1}], "plain IP"),
    ([{"kind": "srflx", "addr": "x" * 100, "port": 1}], "at most 45"),
    ([{"kind": "srflx", "addr": "203.0.113.1", "port": 1, "extra": 1}], "unknown field"),
    ([{"kind": "srflx", "addr": "203.0.113.1"}], "missing field"),
    ({"kind": "srflx"}, "list"),
    (["203.0.113.1:1"], "object"),
])
def test_candidates_bounds(cands, word):
    msg, why, text = decode_message(_cand_update(cands), from_client=True)
    assert msg is None and why == "invalid" and word in text, text
