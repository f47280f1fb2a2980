"""RelayPath (src/mpvpn/core/relaypath.py): one uplink's relay use, with a
fake clock and fake relay servers that answer the real TurnClient's
requests the way coturn does (ns_turn_server.c: 401 with REALM+NONCE first,
MESSAGE-INTEGRITY on every authenticated answer, ChannelData for bound
channels).  tests/test_coturn.py runs the same path against the real coturn."""

from __future__ import annotations

import struct

import pytest

from mpvpn.core import relaypath, stun, turn
from mpvpn.core.relaypath import NoRelay, PeerReady, Received, RelayLost, RelayPath, RelayUp

R1, R2 = ("192.0.2.1", 3478), ("192.0.2.2", 3478)
PEER = ("198.51.100.9", 50001)          # the peer uplink's relayed address
REALM = "example.org"


class FakeRelay:
    """A TURN server at ``addr``: long-term credentials (alice/secret),
    UDP allocations, permissions, channels, refresh, release.  ``mode``:
    "ok", "dead" (never answers), or an error code for Allocate."""

    def __init__(self, addr, mode="ok", user="alice", password="secret"):
        self.addr, self.mode = addr, mode
        self.key = stun.long_term_key(user, REALM, password)
        self.relayed = (addr[0], 49152)
        self.channels: dict[int, tuple] = {}
        self.permissions: set[str] = set()
        self.allocated = False
        self.released = False
        self.to_peer: list[tuple] = []          # (peer, payload) the relay forwarded
        self.requests: list[int] = []

    def handle(self, data):
        """Answer one datagram from the client; returns the reply or None."""
        if self.mode == "dead":
            return None
        if turn.is_channel_data(data):
            ch, payload = turn.decode_channel_data(data)
            self.to_peer.append((self.channels[ch], payload))
            return None
        m = stun.decode(data)
        if m.cls == stun.INDICATION:
            peer = stun.decode_address(m.get(stun.XOR_PEER_ADDRESS), xor=True, txid=m.txid)
            self.to_peer.append((peer, m.get(stun.DATA_ATTR)))
            return None
        self.requests.append(m.method)
        if not m.has(stun.MESSAGE_INTEGRITY):
            return self._err(m, 401, realm=True)
        assert m.check_integrity(self.key)
        if m.method == stun.ALLOCATE:
            if isinstance(self.mode, int):
                return self._err(m, self.mode)
            self.allocated = True
            return self._ok(m, [
                (stun.XOR_RELAYED_ADDRESS, stun.encode_address(self.relayed, xor=True, txid=m.txid)),
                (stun.XOR_MAPPED_ADDRESS, stun.encode_address(("203.0.113.5", 40000), xor=True, txid=m.txid)),
                (stun.LIFETIME, struct.pack("!I", 600))])
        if m.method == stun.REFRESH:
            lifetime = struct.unpack("!I", m.get(stun.LIFETIME))[0]
            if lifetime == 0:
                self.released = True
            return self._ok(m, [(stun.LIFETIME, struct.pack("!I", lifetime))])
        peer = stun.decode_address(m.get(stun.XOR_PEER_ADDRESS), xor=True, txid=m.txid)
        self.permissions.add(peer[0])
        if m.method == stun.CHANNEL_BIND:
            ch = struct.unpack("!H", m.get(stun.CHANNEL_NUMBER)[:2])[0]
            self.channels[ch] = peer
        return self._ok(m, [])

    def from_peer(self, peer, payload):
        """What the relay sends to the client when ``peer`` sends to the relayed address."""
        for ch, p in self.channels.items():
            if p == peer:
                return turn.encode_channel_data(ch, payload)
        return None

    def _ok(self, m, attrs):
        return stun.encode(m.method, stun.SUCCESS, m.txid, attrs, integrity=self.key, fingerprint=True)

    def _err(self, m, code, realm=False):
        attrs = [(stun.ERROR_CODE, stun.encode_error_code(code, "x"))]
        if realm:
            attrs += [(stun.REALM, REALM.encode()), (stun.NONCE, b"n1")]
        return stun.encode(m.method, stun.ERROR, m.txid, attrs,
                           integrity=None if realm else self.key, fingerprint=True)


class Net:
    """Delivers the path's datagrams to the fake relays and their answers back."""

    def __init__(self, path, *relays):
        self.path = path
        self.relays = {r.addr: r for r in relays}
        self.now = 0.0
        self.events = []

    def pump(self):
        for _ in range(50):
            out = self.path.take_outgoing()
            if not out:
                break
            for data, dest in out:
                reply = self.relays[dest].handle(data)
                if reply is not None:
                    self.path.on_datagram(reply, dest, self.now)
        self.events += self.path.take_events()

    def advance(self, until):
        """Run timers up to ``until`` (fake clock)."""
        while True:
            self.pump()
            dl = self.path.next_deadline()
            if dl is None or dl > until:
                self.now = until
                return
            self.now = max(self.now, dl)
            self.path.on_timer(self.now)


def make(*modes, retry_after=60.0):
    relays = [FakeRelay(addr, mode) for addr, mode in zip((R1, R2), modes)]
    path = RelayPath(turn.RelayList([turn.Relay(r.addr, "alice", "secret") for r in relays],
                                    retry_after=retry_after))
    return path, Net(path, *relays), relays


def test_allocates_installs_the_peer_and_carries_payloads_both_ways():
    path, net, (r1,) = make("ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.pump()
    assert net.events == [RelayUp(R1, r1.relayed, ("203.0.113.5", 40000)),
                          PeerReady(PEER, None),                 # permission (Send indications)
                          PeerReady(PEER, turn.CHANNEL_MIN)]     # then the channel
    assert path.state == "ready" and path.peer_ready(PEER) and path.relayed == r1.relayed
    assert PEER[0] in r1.permissions and r1.channels == {turn.CHANNEL_MIN: PEER}
    assert path.owns(R1) and not path.owns(PEER) and not path.owns(("192.0.2.1", 3479))
    sealed = b"\x01sealed-smpu-datagram"
    assert path.send(PEER, sealed, 1.0)
    out = path.take_outgoing()
    assert out == [(struct.pack("!HH", turn.CHANNEL_MIN, len(sealed)) + sealed, R1)]  # 4 bytes overhead
    r1.handle(out[0][0])
    assert r1.to_peer == [(PEER, sealed)]
    path.on_datagram(r1.from_peer(PEER, b"reply"), R1, 1.1)
    assert path.take_events() == [Received(PEER, b"reply")]
    st = path.status(1.2)
    assert st["relay"] == "192.0.2.1:3478" and st["relayed"] == "192.0.2.1:49152"
    assert st["sent"] == 1 and st["received"] == 1 and st["drops"] == {}
    assert "secret" not in repr(st)


def test_refreshes_keep_the_allocation_and_channel():
    path, net, (r1,) = make("ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.advance(2000.0)
    assert path.state == "ready" and r1.requests.count(stun.REFRESH) >= 3
    assert r1.requests.count(stun.CHANNEL_BIND) >= 8        # every 240 s
    assert [e for e in net.events if isinstance(e, RelayLost)] == []


def test_an_unreachable_first_relay_gives_way_to_the_second():
    path, net, (r1, r2) = make("dead", "ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.advance(5.4)
    assert path.state == "allocating" and path.relay.address == R1
    net.advance(6.0)
    lost = [e for e in net.events if isinstance(e, RelayLost)]
    assert lost == [RelayLost(R1, "allocation failed: no answer from relay 192.0.2.1:3478 after 5.5 s")]
    assert path.state == "ready" and path.relay.address == R2
    assert RelayUp(R2, r2.relayed, ("203.0.113.5", 40000)) in net.events
    assert r2.channels == {turn.CHANNEL_MIN: PEER}
    st = path.status(net.now)
    assert st["relays"][0]["failed"] and "no answer" in st["relays"][0]["reason"]
    assert st["switches"] == 1


@pytest.mark.parametrize("code, words", [(486, "allocation quota reached"),
                                         (508, "insufficient capacity")])
def test_turn_errors_move_on_at_once_with_words(code, words):
    path, net, (r1, r2) = make(code, "ok")
    path.start(0.0)
    net.pump()
    (lost,) = [e for e in net.events if isinstance(e, RelayLost)]
    assert lost.relay == R1 and words in lost.reason and str(code) in lost.reason
    assert path.state == "ready" and path.relay.address == R2
    assert path.last_error == lost.reason


def test_path_dead_moves_to_the_next_relay_without_releasing_the_dead_one():
    path, net, (r1, r2) = make("ok", "ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.pump()
    r1.mode = "dead"
    path.path_dead("subflow through the relay stopped answering", 10.0)
    net.now = 10.0
    net.pump()
    assert path.relay.address == R2 and path.state == "ready"
    assert RelayLost(R1, "subflow through the relay stopped answering") in net.events
    assert r2.channels == {turn.CHANNEL_MIN: PEER}          # the peer set up on the new relay
    assert not path.owns(R1)                                # nothing more from the dead one
    assert path.send(PEER, b"x", 10.1)
    assert [d for _, d in path.take_outgoing()] and not r1.released


def test_all_relays_failed_waits_then_retries_in_order():
    path, net, (r1, r2) = make(486, 508, retry_after=60.0)
    path.start(0.0)
    net.pump()
    (no,) = [e for e in net.events if isinstance(e, NoRelay)]
    assert path.state == "waiting" and no.retry_at == 60.0
    assert "every relay failed; last: " in no.reason and "508" in no.reason
    assert not path.send(PEER, b"x", 1.0) and path.drops == {"send_no_relay": 1}
    assert path.next_deadline() == 60.0
    r1.mode = "ok"
    net.advance(60.0)
    assert path.state == "ready" and path.relay.address == R1


def test_no_relay_configured():
    path = RelayPath(turn.RelayList([]))
    path.start(0.0)
    assert path.take_events() == [NoRelay("no relay configured", None)]
    assert path.next_deadline() is None and path.state == "waiting"


def test_stop_releases_the_allocation():
    path, net, (r1,) = make("ok")
    path.start(0.0)
    net.pump()
    path.stop(5.0)
    assert path.owns(R1)                     # the release is still being driven
    net.pump()
    assert r1.released and not path.owns(R1) and path.next_deadline() is None
    assert path.state == "stopped" and not path.send(PEER, b"x", 6.0)


def test_stop_of_an_unanswered_release_ends_after_its_timeout():
    path, net, (r1,) = make("ok")
    path.start(0.0)
    net.pump()
    r1.mode = "dead"
    path.stop(5.0)
    net.advance(100.0)
    assert not path.owns(R1) and path.next_deadline() is None


def test_junk_and_strangers_are_counted_drops():
    path, net, (r1,) = make("ok")
    path.set_peers([PEER, ("not-an-ip", 1), ("198.51.100.9",)], 0.0)
    path.start(0.0)
    net.pump()
    net.events.clear()
    for junk in (b"", b"\x00" * 3, b"\x40\x00\x00\x10abc", b"\x4f\xff\x00\x00", b"\x00\x01\x00\x00" + b"\x00" * 16,
                 bytes(range(256)) * 300):
        path.on_datagram(junk, R1, 1.0)
    path.on_datagram(r1.from_peer(PEER, b"ok"), ("192.0.2.66", 3478), 1.0)
    assert path.take_events() == []
    d = path.status(1.0)["drops"]
    assert d["bad_peer"] == 2 and d["not_a_relay"] == 1
    assert sum(d.values()) == 2 + 1 + 6
    assert path.state == "ready"


def test_peers_are_bounded():
    path, net, _ = make("ok")
    path.set_peers([("198.51.100.1", p) for p in range(1, 20)], 0.0)
    assert path.drops == {"too_many_peers": 19 - relaypath.MAX_PEERS}


@pytest.mark.parametrize("seed", range(3))
def test_random_datagrams_from_the_relay_never_raise(seed):
    import random

    rng = random.Random(seed)
    path, net, (r1,) = make("ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.pump()
    good = r1.from_peer(PEER, b"payload")
    n = 0
    for i in range(2000):
        data = bytearray(good if i % 2 else bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))))
        if data:
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.on_datagram(bytes(data), R1, 1.0)
        n += 1
    received = sum(1 for e in path.take_events() if isinstance(e, Received))
    drops = sum(path.status(1.0)["drops"].values())
    assert received + drops == n              # every datagram: delivered or a counted drop
    assert path.state == "ready"


def test_suspect_keeps_a_relay_that_answers_and_leaves_one_that_does_not():
    path, net, (r1, r2) = make("ok", "ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.pump()
    refreshes = r1.requests.count(stun.REFRESH)
    path.suspect("subflow 1 went down", 10.0)
    net.now = 10.0
    net.advance(20.0)
    assert r1.requests.count(stun.REFRESH) == refreshes + 1      # checked at once
    assert path.relay.address == R1 and path.state == "ready"     # it answered: kept
    assert [e for e in net.events if isinstance(e, RelayLost)] == []
    r1.mode = "dead"
    path.suspect("subflow 1 went down again", 30.0)
    net.now = 30.0
    net.advance(35.4)
    assert path.relay.address == R1                               # still within 5.5 s
    net.advance(36.0)
    (lost,) = [e for e in net.events if isinstance(e, RelayLost)]
    assert lost == RelayLost(R1, "subflow 1 went down again; relay 192.0.2.1:3478 did not "
                                 "answer a refresh in 5.5 s")
    assert path.relay.address == R2 and path.state == "ready"


def test_wants_separates_turn_from_a_stun_client_on_the_same_server():
    """A relay that is also a configured STUN server: its Binding answers
    belong to the STUN client, everything of the TURN client's to the path."""
    path, net, (r1,) = make("ok")
    path.set_peers([PEER], 0.0)
    path.start(0.0)
    net.pump()
    binding_answer = stun.encode(stun.BINDING, stun.SUCCESS, b"\x01" * 12, [], fingerprint=True)
    assert not path.wants(binding_answer)
    assert path.wants(r1.from_peer(PEER, b"x"))                   # ChannelData
    assert path.wants(b"junk that is neither")                    # junk: counted by the path
    data_ind = stun.encode(stun.DATA, stun.INDICATION, b"\x02" * 12, [], fingerprint=True)
    assert path.wants(data_ind)
    path.suspect("check", 5.0)                                    # a refresh in flight
    (req, _), = path.take_outgoing()
    answer = stun.encode(stun.REFRESH, stun.SUCCESS, stun.decode(req).txid, [], fingerprint=True)
    assert path.wants(answer)
