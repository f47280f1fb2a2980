"""mpvpn.agent.uplinkrelay: the TURN edge of one uplink (resolution of
``config relay``, the demultiplexer on the socket it shares with STUN and
SMPU, wrapping in the send path) and its glue, with a fake clock and the
fake relay of tests/test_relaypath.py (the real coturn is in
tests/test_coturn.py and tests/test_relay_e2e.py)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from test_relaypath import FakeRelay

from mpvpn.agent import receive, send
from mpvpn.agent.config import HostPort, RelayConf
from mpvpn.agent.uplinknat import UplinkNat
from mpvpn.agent.uplinkrelay import UplinkRelay, link_relay, relay_peers, resolve_relays
from mpvpn.core import candidates, stun, turn
from mpvpn.core.candidates import Candidate

SRV = ("203.0.113.1", 3478)
LOCAL = ("10.3.1.2", 7000)
PEER_RELAYED = ("203.0.113.1", 50123)


def conf(addr, port=3478):
    return RelayConf("r", HostPort(addr, port), "alice", "secret")


def no_dns(*a, **k):
    raise AssertionError("numeric relays need no DNS")


class Batch:
    """BatchSocket stand-in: recv() from a list, send() recorded."""

    def __init__(self, items=()):
        self.items = list(items)
        self.sent = []

    def recv(self):
        if not self.items:
            raise BlockingIOError
        return self.items.pop(0)

    def send(self, dgrams, dest):
        self.sent += [(bytes(d), dest) for d in dgrams]
        return 0


def ready_relay(relay_server=None):
    """An UplinkRelay allocated on a FakeRelay with PEER_RELAYED installed."""
    fake = relay_server or FakeRelay(SRV)
    r = UplinkRelay([conf(*SRV)], LOCAL, resolve=no_dns)
    assert r.want("test", 0.0) and not r.want("again", 0.0)
    r.set_peers([PEER_RELAYED], 0.0)
    for _ in range(10):
        out = r.path.take_outgoing()
        if not out:
            break
        for data, dest in out:
            reply = fake.handle(data)
            if reply is not None:
                assert r.takes(dest) and r.wants(reply)
                assert r.unwrap([reply], dest, 0.0) == []
    assert r.carries(PEER_RELAYED)
    return r, fake


def test_resolution_keeps_order_and_family_and_reports_names_that_fail():
    def fake(host, port, fam, typ):
        assert fam == socket.AF_INET
        if host == "turn.example.net":
            return [(fam, typ, 17, "", ("192.0.2.9", port))]
        raise socket.gaierror(-2, "Name or service not known")

    relays = [conf("turn.example.net", 3479), conf("2001:db8::7"), conf("nope.invalid"), conf("203.0.113.7")]
    got, problems = resolve_relays(relays, 4, fake)
    assert [r.address for r in got] == [("192.0.2.9", 3479), ("203.0.113.7", 3478)]
    assert len(problems) == 1 and "cannot resolve relay nope.invalid:3478" in problems[0]


def test_candidate_status_and_no_password():
    r = UplinkRelay([conf(*SRV)], LOCAL, resolve=no_dns)
    assert r.candidate() is None and r.next_deadline() is None and not r.started
    r, fake = ready_relay()
    assert r.candidate() == Candidate(candidates.RELAY, *fake.relayed)
    st = r.status(1.0)
    assert st["state"] == "ready" and st["relay"] == "203.0.113.1:3478" and st["why"] == "test"
    assert "secret" not in repr(st)


def test_without_relays_it_never_starts():
    r = UplinkRelay([], LOCAL, resolve=no_dns)
    assert not r.want("x", 0.0) and not r.started


def test_relay_peers_are_the_relay_candidates_only():
    pu = SimpleNamespace(addr="10.3.2.2", port=7000, candidates=(
        Candidate("host", "10.3.2.2", 7000), Candidate("srflx", "203.0.113.203", 4000),
        Candidate("relay", *PEER_RELAYED)))
    assert relay_peers(pu, lambda a, p: (a, p)) == [PEER_RELAYED]


def test_receive_path_demultiplexes_relay_stun_and_smpu_on_one_server_address():
    """The relay is also the STUN server: its Binding answer goes to STUN,
    its ChannelData is unwrapped and goes to SMPU with the peer's relayed
    address as the source (no session here: counted as unknown_session),
    junk from it is a counted relay drop."""
    r, fake = ready_relay()
    nat = UplinkNat([HostPort(*SRV)], LOCAL, 0.0, resolve=no_dns)
    (req, _), = nat.take_outgoing()
    m = stun.decode(req)
    binding = stun.encode(stun.BINDING, stun.SUCCESS, m.txid, [
        (stun.XOR_MAPPED_ADDRESS, stun.encode_address(("198.51.100.7", 7000), xor=True, txid=m.txid))],
        fingerprint=True)
    smpu = bytes(40)
    relayed = fake.from_peer(PEER_RELAYED, smpu)
    up = SimpleNamespace(name="mobile", rx_datagrams=0, nat=nat, relay=r,
                         batch=Batch([([binding], SRV), ([relayed], SRV), ([b"junk"], SRV)]))
    counters = {"malformed": 0, "unknown_session": 0, "wrong_uplink": 0}
    receive.read_uplink(up, {}, counters, lambda pkts: None, 0.1)
    assert nat.public_addr == ("198.51.100.7", 7000) and nat.client.drops == {}
    assert counters["unknown_session"] == 1
    assert r.path.counters["received"] == 1
    assert sum(r.status(0.2)["drops"].values()) == 1


def test_send_path_wraps_what_goes_to_a_relayed_peer():
    r, fake = ready_relay()
    batch = Batch()
    up = SimpleNamespace(batch=batch, relay=r, tx_errors=0)
    sub = SimpleNamespace(remote=PEER_RELAYED, established=True)
    sess = SimpleNamespace(datagrams_by_member=lambda: {1: [b"sealed-1", b"sealed-2"]},
                           subflows={1: sub})
    ds = SimpleNamespace(sess=sess, uplink_of={1: up}, punch={}, plan={}, upgrade=set())
    send.flush(ds, {"send_errors": 0}, 1.0)
    assert [d for d, dest in batch.sent] == [turn.encode_channel_data(turn.CHANNEL_MIN, b"sealed-1"),
                                           turn.encode_channel_data(turn.CHANNEL_MIN, b"sealed-2")]
    assert {dest for _, dest in batch.sent} == {SRV}
    assert link_relay(ds, 1) == "203.0.113.1:3478"
    # a subflow to anyone else goes directly
    sub.remote = ("10.3.2.2", 7000)
    batch.sent.clear()
    send.flush(ds, {"send_errors": 0}, 1.0)
    assert batch.sent == [(b"sealed-1", ("10.3.2.2", 7000)), (b"sealed-2", ("10.3.2.2", 7000))]
    assert link_relay(ds, 1) is None


def test_an_upgrade_flush_also_tries_the_direct_candidates_once():
    """While relayed, a flush marked for upgrade (a probe) goes through the
    relay as always and also straight to the peer's direct candidates; the
    mark is used up."""
    from mpvpn.core.candidates import Punch

    r, fake = ready_relay()
    batch = Batch()
    up = SimpleNamespace(batch=batch, relay=r, tx_errors=0)
    sub = SimpleNamespace(remote=PEER_RELAYED, established=True)
    sess = SimpleNamespace(datagrams_by_member=lambda: {1: [b"probe"]}, subflows={1: sub})
    punch = Punch(initiator=True)
    srflx = ("203.0.113.203", 7000)
    punch.update([("10.3.2.2", 7000), srflx, PEER_RELAYED], True, 0.0)
    ds = SimpleNamespace(sess=sess, uplink_of={1: up}, punch={1: punch}, plan={}, upgrade={1})
    send.flush(ds, {"send_errors": 0}, 1.0)
    assert batch.sent == [(turn.encode_channel_data(turn.CHANNEL_MIN, b"probe"), SRV),
                          (b"probe", ("10.3.2.2", 7000)), (b"probe", srflx)]
    assert ds.upgrade == set()
    batch.sent.clear()
    send.flush(ds, {"send_errors": 0}, 1.1)
    assert batch.sent == [(turn.encode_channel_data(turn.CHANNEL_MIN, b"probe"), SRV)]


def test_relay_names_are_looked_up_off_the_loop_and_keep_the_configured_order():
    """With ``lookup`` (the agent's Resolver) the constructor only asks; the
    list is made when the answers come (on the loop's thread), in the
    configured order, and relaying waits for them (up to LOOKUP_WAIT)."""
    from mpvpn.agent.uplinkrelay import LOOKUP_WAIT

    asked = []

    def lookup(host, port, family, done):
        asked.append((host, port, family, done))

    relays = [conf("turn.example.net", 3479), conf("2001:db8::7"), conf("nope.invalid"), conf("203.0.113.7")]
    r = UplinkRelay(relays, LOCAL, lookup=lookup, now=100.0)
    assert [(h, p, f) for h, p, f, _ in asked] == [("turn.example.net", 3479, socket.AF_INET),
                                                     ("nope.invalid", 3478, socket.AF_INET)]
    assert r.names.looking_up and r.status(100.0)["looking_up"]
    assert r.sources == {("203.0.113.7", 3478)}  # numeric ones are there at once
    assert r.start_deadline(104.0) == 100.0 + LOOKUP_WAIT and not r.want("down 4 s", 104.0)
    asked[1][3](socket.gaierror(-2, "Name or service not known"))
    assert r.names.looking_up and r.names.problems and "cannot resolve relay nope.invalid:3478" in r.names.problems[0]
    asked[0][3]([(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.9", 3479))])
    assert not r.names.looking_up and r.start_deadline(104.0) == 104.0
    assert [x["address"] for x in r.status(104.0)["relays"]] == ["192.0.2.9:3479", "203.0.113.7:3478"]
    assert r.want("down 4 s", 104.0) and r.start_deadline(104.0) is None  # started: no deadline


def test_a_hanging_lookup_delays_relaying_by_lookup_wait_at_most():
    from mpvpn.agent.uplinkrelay import LOOKUP_WAIT

    asked = []
    r = UplinkRelay([conf("turn.example.net"), conf(*SRV)], LOCAL, lookup=lambda *a: asked.append(a), now=0.0)
    assert not r.want("down", LOOKUP_WAIT - 0.1)
    assert r.want("down", LOOKUP_WAIT)  # goes with what it has
    asked[0][3]([(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.9", 3478))])  # too late: kept out
    assert r.sources == {SRV} and r.started


def test_no_resolvable_relay_means_no_deadline_for_the_loop():
    """A subflow that stays down with nothing to relay through must not leave
    the agent a deadline in the past (its loop would spin)."""
    asked = []
    r = UplinkRelay([conf("nope.invalid")], LOCAL, lookup=lambda *a: asked.append(a), now=0.0)
    asked[0][3](socket.gaierror(-2, "Name or service not known"))
    assert r.start_deadline(4.0) is None and not r.want("down", 50.0)
