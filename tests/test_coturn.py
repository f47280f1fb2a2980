"""The sans-I/O STUN and TURN clients against the real coturn, on loopback.

Each test starts its own ``turnserver`` (config written by tests/coturn.py:
``lt-cred-mech``, one user, a realm, ``no-tls``/``no-dtls``/``no-cli``, a
relay port range on 127.0.0.1 and ``allow-loopback-peers``, since coturn
refuses loopback peers by default) and drives the client through a thin UDP
edge.  Skipped, with the reason, when coturn is not installed.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402

from mpvpn.core import stun, turn  # noqa: E402

_reason = coturn.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


@pytest.fixture
def server():
    with coturn.Coturn(listen=("127.0.0.1", "127.0.0.2")) as s:
        yield s


@pytest.fixture
def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


def test_binding_learns_mapping_and_other_address(server, sock):
    local = sock.getsockname()
    c = stun.BindingClient([server.address], local=local, software="mpvpn-test")
    c.start(time.monotonic())
    assert coturn.drive(c, sock, lambda: c.result is not None, timeout=10)
    r = c.result
    assert r.public == local                       # loopback: no NAT in between
    assert r.nat == stun.NAT_NONE
    # coturn with two listening IPs answers with RFC 5780 OTHER-ADDRESS
    assert r.other_address is not None and r.other_address[0] == "127.0.0.2"
    assert c.drops == {}


def test_binding_via_other_address_without_local(server, sock):
    """Without the local address the client needs two mappings: the second
    comes from OTHER-ADDRESS (other IP, same port); equal mappings = EIM."""
    c = stun.BindingClient([server.address], local=None)
    c.start(time.monotonic())
    assert coturn.drive(c, sock, lambda: c.result is not None, timeout=10)
    r = c.result
    assert len(r.mappings) == 2
    assert r.mappings[1][0] == ("127.0.0.2", server.port)
    assert r.nat == stun.NAT_EIM


def _peer_socket():
    p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    p.bind(("127.0.0.1", 0))
    p.settimeout(5)
    return p


def test_allocate_permission_channel_roundtrip_refresh_release(server, sock):
    c = turn.TurnClient(server.address, "alice", "secret", lifetime=600, software="mpvpn-test")
    events = []
    skew = [0.0]

    def clock():
        return time.monotonic() + skew[0]

    def pump(pred, timeout=10):
        def until():
            events.extend(c.take_events())
            return pred()
        return coturn.drive(c, sock, until, timeout, clock=clock)

    c.start(clock())
    assert pump(lambda: any(isinstance(e, (turn.Allocated, turn.Failed)) for e in events))
    alloc = next(e for e in events if isinstance(e, turn.Allocated))
    assert alloc.relayed[0] == "127.0.0.1"
    assert server.relay_ports[0] <= alloc.relayed[1] <= server.relay_ports[1]
    assert alloc.mapped == sock.getsockname()
    assert 0 < alloc.lifetime <= 600
    assert c.realm == "mpvpn.test"

    peer = _peer_socket()
    try:
        c.add_peer(peer.getsockname(), clock())
        assert pump(lambda: any(isinstance(e, turn.PeerReady) and e.channel for e in events))
        assert [e.channel for e in events if isinstance(e, turn.PeerReady)] == [None, 0x4000]

        # our (already sealed) datagram goes through the relay as ChannelData
        assert c.send(peer.getsockname(), b"sealed-smpu-datagram", clock())
        for data, dest in c.take_outgoing():
            sock.sendto(data, dest)
        data, src = peer.recvfrom(2048)
        assert data == b"sealed-smpu-datagram"
        assert src == alloc.relayed                    # the peer sees the relay
        # the peer's reply comes back as ChannelData on channel 0x4000
        peer.sendto(b"reply", src)
        assert pump(lambda: any(isinstance(e, turn.Data) for e in events))
        got = [e for e in events if isinstance(e, turn.Data)]
        assert got == [turn.Data(peer.getsockname(), b"reply")]
        assert c.counters["sent_channel"] == 1 and c.counters["recv_channel"] == 1

        # Refresh: the client's clock jumps 550 s ahead (coturn's own clock
        # does not): the allocation refresh (due at 540 s) and the channel
        # refresh (due 240 s after binding) go out and coturn accepts both.
        skew[0] = 550.0
        n = c.counters["refreshes"]
        expires = c.expires_at
        assert pump(lambda: c.counters["refreshes"] > n and c.expires_at > expires
                    and c.in_flight == 0)
        assert c.state == "allocated" and c.lifetime == alloc.lifetime
        assert c.peer_state(peer.getsockname()) == {"permission": True, "channel": 0x4000}
        assert c.send(peer.getsockname(), b"after-refresh", clock())
        for data, dest in c.take_outgoing():
            sock.sendto(data, dest)
        assert peer.recvfrom(2048)[0] == b"after-refresh"

        # release: Refresh(LIFETIME=0).  coturn drops the allocation on its
        # next 1-second timer tick; after that the relay forwards nothing.
        c.close(clock())
        assert pump(lambda: any(isinstance(e, turn.Closed) for e in events))
        assert next(e for e in events if isinstance(e, turn.Closed)).reason == "released"
        sock.settimeout(0.3)
        for _ in range(20):
            time.sleep(0.25)
            peer.sendto(b"after-release", src)
            try:
                sock.recvfrom(2048)
            except socket.timeout:
                break
        else:
            pytest.fail("the relay still forwards after the release")
    finally:
        peer.close()
    assert c.drops == {}


def test_send_indication_without_channels(server, sock):
    c = turn.TurnClient(server.address, "alice", "secret", use_channels=False)
    events = []

    def pump(pred, timeout=10):
        def until():
            events.extend(c.take_events())
            return pred()
        return coturn.drive(c, sock, until, timeout)

    peer = _peer_socket()
    try:
        c.add_peer(peer.getsockname(), time.monotonic())   # before the allocation
        c.start(time.monotonic())
        assert pump(lambda: any(isinstance(e, turn.PeerReady) for e in events))
        assert c.send(peer.getsockname(), b"x" * 1200, time.monotonic())
        for data, dest in c.take_outgoing():
            sock.sendto(data, dest)
        data, src = peer.recvfrom(2048)
        assert data == b"x" * 1200
        peer.sendto(b"back", src)
        assert pump(lambda: any(isinstance(e, turn.Data) for e in events))
        assert c.counters["sent_indication"] == 1 and c.counters["recv_indication"] == 1
    finally:
        peer.close()


def test_wrong_password_gives_clear_reason(server, sock):
    c = turn.TurnClient(server.address, "alice", "not-the-password")
    c.start(time.monotonic())
    assert coturn.drive(c, sock, lambda: c.state == "failed", timeout=10)
    ev = c.take_events()
    assert isinstance(ev[-1], turn.Failed) and ev[-1].code == 401
    assert "wrong username or password" in ev[-1].reason


def test_quota_gives_clear_reason(sock):
    with coturn.Coturn(extra=["user-quota=1"]) as server:
        first = turn.TurnClient(server.address, "alice", "secret")
        first.start(time.monotonic())
        assert coturn.drive(first, sock, lambda: first.state != "allocating", timeout=10)
        assert first.state == "allocated"
        s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s2.bind(("127.0.0.1", 0))
        try:
            second = turn.TurnClient(server.address, "alice", "secret")
            second.start(time.monotonic())
            assert coturn.drive(second, s2, lambda: second.state != "allocating", timeout=10)
        finally:
            s2.close()
        assert second.state == "failed"
        assert second.failure.code == 486
        assert "quota" in second.failure.reason


def test_stale_nonce_is_renewed(sock):
    """coturn's stale-nonce=N makes a nonce expire after N seconds; the next
    request gets 438 and the client retries with the new nonce."""
    with coturn.Coturn(extra=["stale-nonce=1"]) as server:
        c = turn.TurnClient(server.address, "alice", "secret")
        c.start(time.monotonic())
        assert coturn.drive(c, sock, lambda: c.state != "allocating", timeout=10)
        assert c.state == "allocated"
        c.take_events()
        time.sleep(2.2)
        peer = _peer_socket()
        try:
            c.add_peer(peer.getsockname(), time.monotonic())
            events = []

            def until():
                events.extend(c.take_events())
                return any(isinstance(e, (turn.PeerReady, turn.PeerFailed, turn.Failed))
                           for e in events)
            assert coturn.drive(c, sock, until, timeout=10)
        finally:
            peer.close()
        assert isinstance(events[0], turn.PeerReady), events
        assert c.counters["stale_nonce"] >= 1


def test_binding_over_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s6.bind(("::1", 0))
    except OSError as e:
        s6.close()
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        with coturn.Coturn(listen=("::1",), probe_family=socket.AF_INET6) as server:
            c = stun.BindingClient([server.address], local=s6.getsockname())
            c.start(time.monotonic())
            assert coturn.drive(c, s6, lambda: c.result is not None, timeout=10)
            assert c.result.public == ("::1", s6.getsockname()[1])
            assert c.result.nat == stun.NAT_NONE
            # the TURN allocation over IPv6 gives an IPv6 relayed address
            t = turn.TurnClient(server.address, "alice", "secret")
            t.start(time.monotonic())
            assert coturn.drive(t, s6, lambda: t.state != "allocating", timeout=10)
            assert t.state == "allocated", t.failure
            assert t.relayed[0] == "::1"
    finally:
        s6.close()


# ---- RelayPath (core/relaypath.py): one uplink's relay use ------------------

def _drive_paths(socks_paths, until, timeout):
    """Run several (socket, RelayPath) pairs until ``until()``."""
    import select as _select

    end = time.monotonic() + timeout
    while True:
        for s, p in socks_paths:
            for data, dest in p.take_outgoing():
                s.sendto(data, dest)
        if until():
            return True
        now = time.monotonic()
        if now >= end:
            return False
        dls = [d for d in (p.next_deadline() for _, p in socks_paths) if d is not None]
        wait = max(0.0, min([end] + dls) - now)
        r, _, _ = _select.select([s for s, _ in socks_paths], [], [], min(wait, 0.2))
        now = time.monotonic()
        for s, p in socks_paths:
            if s in r:
                data, src = s.recvfrom(65535)
                assert p.owns(src)
                p.on_datagram(data, src, now)
            dl = p.next_deadline()
            if dl is not None and now >= dl:
                p.on_timer(now)


def test_relay_paths_relay_to_relay_through_coturn(server):
    """Both uplinks allocate (each through its own NAT, in the field) and
    send to the other's relayed address: the sealed datagram goes uplink A
    -> relay -> (relayed A -> relayed B) -> uplink B and back.  A's first
    configured relay does not answer: after RelayPath's 5.5 s allocate
    timeout it moves to the second (coturn)."""
    from mpvpn.core import relaypath

    dead = ("127.0.0.1", coturn.free_udp_port("127.0.0.1"))
    good = turn.Relay(server.address, "alice", "secret")
    a = relaypath.RelayPath(turn.RelayList([turn.Relay(dead, "alice", "secret"), good]))
    b = relaypath.RelayPath(turn.RelayList([good]))
    sa = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sa.bind(("127.0.0.1", 0))
    sb.bind(("127.0.0.1", 0))
    ev = {id(a): [], id(b): []}
    pairs = [(sa, a), (sb, b)]

    def collect():
        for _, p in pairs:
            ev[id(p)].extend(p.take_events())

    try:
        t0 = time.monotonic()
        a.start(t0)
        b.start(t0)
        assert _drive_paths(pairs, lambda: (collect(), a.state == b.state == "ready")[1], 20), \
            (a.status(time.monotonic()), b.status(time.monotonic()))
        lost = [e for e in ev[id(a)] if isinstance(e, relaypath.RelayLost)]
        assert len(lost) == 1 and lost[0].relay == dead and "no answer" in lost[0].reason
        assert a.relay == good and a.relayed != b.relayed
        a.set_peers([b.relayed], time.monotonic())
        b.set_peers([a.relayed], time.monotonic())
        assert _drive_paths(pairs, lambda: (collect(), a.peer_ready(b.relayed) and b.peer_ready(a.relayed))[1], 10)
        got = {id(a): [], id(b): []}

        def received():
            collect()
            for _, p in pairs:
                got[id(p)] += [e for e in ev[id(p)] if isinstance(e, relaypath.Received)]
                ev[id(p)] = [e for e in ev[id(p)] if not isinstance(e, relaypath.Received)]
            return len(got[id(a)]) >= 3 and len(got[id(b)]) >= 3

        for i in range(3):
            assert a.send(b.relayed, b"sealed-a-%d" % i, time.monotonic())
            assert b.send(a.relayed, b"sealed-b-%d" % i, time.monotonic())
        assert _drive_paths(pairs, received, 10)
        assert got[id(b)] == [relaypath.Received(a.relayed, b"sealed-a-%d" % i) for i in range(3)]
        assert got[id(a)] == [relaypath.Received(b.relayed, b"sealed-b-%d" % i) for i in range(3)]
        for _, p in pairs:
            assert p.status(time.monotonic())["drops"] == {}
        now = time.monotonic()
        a.stop(now)
        b.stop(now)
        assert _drive_paths(pairs, lambda: not a.owns(server.address) and not b.owns(server.address), 10)
    finally:
        sa.close()
        sb.close()
