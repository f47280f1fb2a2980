"""mpvpn.agent.uplinknat: the STUN edge of one uplink (resolution of
base.stun, the demultiplexer on the shared socket, mapping changes, the
re-check pacing) and the punch glue, with a fake clock and STUN answers
made by the codec (the real server is in tests/test_natlab.py and
tests/test_nat_e2e.py)."""

import socket

import pytest

from mpvpn.agent import receive
from mpvpn.agent.config import HostPort
from mpvpn.agent.uplinknat import MIN_RECHECK_GAP, UplinkNat, resolve_servers
from mpvpn.core import stun, wire

S1, S2 = ("203.0.113.1", 3478), ("203.0.113.2", 3478)
LOCAL = ("10.3.1.2", 7000)


def answer(req: bytes, mapped) -> bytes:
    m = stun.decode(req)
    return stun.encode(stun.BINDING, stun.SUCCESS, m.txid,
                       [(stun.XOR_MAPPED_ADDRESS, stun.encode_address(mapped, xor=True, txid=m.txid))],
                       fingerprint=True)


def no_dns(*a, **k):
    raise AssertionError("numeric servers need no DNS")


def serve(nat, now, mapped_for) -> None:
    """Answer every request the client has queued from ``mapped_for[server]``."""
    for data, dest in nat.take_outgoing():
        reply = answer(data, mapped_for[dest])
        assert nat.takes(reply, dest)
        nat.on_datagram(reply, dest, now)


def test_resolution_keeps_the_family_and_reports_names_that_fail():
    def fake(host, port, fam, typ):
        assert fam == socket.AF_INET and typ == socket.SOCK_DGRAM
        if host == "stun.example.net":
            return [(fam, typ, 17, "", ("192.0.2.9", port)), (fam, typ, 17, "", ("192.0.2.10", port))]
        raise socket.gaierror(-2, "Name or service not known")

    servers = [HostPort("203.0.113.1", 3478), HostPort("2001:db8::1", 3478),
               HostPort("stun.example.net", 3479), HostPort("nope.invalid", 3478),
               HostPort("203.0.113.1", 3478)]
    got, problems = resolve_servers(servers, 4, fake)
    assert got == [("203.0.113.1", 3478), ("192.0.2.9", 3479)]
    assert len(problems) == 1 and "nope.invalid" in problems[0]


def test_two_servers_same_mapping_is_eim_and_candidates_follow():
    nat = UplinkNat([HostPort(*S1), HostPort(*S2)], LOCAL, 0.0, resolve=no_dns)
    assert nat.nat == "unknown" and nat.public_addr is None and nat.candidates() == ()
    serve(nat, 0.01, {S1: ("198.51.100.7", 7000), S2: ("198.51.100.7", 7000)})
    assert nat.nat == "endpoint-independent" and nat.public_addr == ("198.51.100.7", 7000)
    assert nat.behind_nat
    assert [c.kind for c in nat.candidates()] == ["host", "srflx"]
    assert nat.mapping_changed() and not nat.mapping_changed() and nat.changes == 0
    # a forced re-check (SIGHUP) learns a new port: one change
    assert nat.recheck(5.0)
    serve(nat, 5.01, {S1: ("198.51.100.7", 7100), S2: ("198.51.100.7", 7100)})
    assert nat.mapping_changed() and nat.changes == 1
    assert nat.candidates()[1].port == 7100
    # the same mapping again is no change
    nat.recheck(10.0)
    serve(nat, 10.01, {S1: ("198.51.100.7", 7100), S2: ("198.51.100.7", 7100)})
    assert not nat.mapping_changed() and nat.status()["changes"] == 1


def test_no_nat_means_no_candidates():
    nat = UplinkNat([HostPort(*S1), HostPort(*S2)], LOCAL, 0.0, resolve=no_dns)
    serve(nat, 0.01, {S1: LOCAL, S2: LOCAL})
    assert nat.nat == "none" and not nat.behind_nat and nat.candidates() == ()


def test_demultiplexer_gives_stun_only_what_comes_from_a_server_and_looks_like_stun():
    nat = UplinkNat([HostPort(*S1)], LOCAL, 0.0, resolve=no_dns)
    (req, dest), = nat.take_outgoing()
    reply = answer(req, ("198.51.100.7", 7000))
    assert not nat.takes(reply, ("198.51.100.66", 3478))  # not a configured server: SMPU's
    smpu = bytes([wire.VERSION]) + bytes(wire.HEADER_LEN + 20)
    assert not nat.takes(smpu, S1) and nat.not_stun == 1  # from the server, but not STUN
    # through the receive path: the STUN answer never reaches a session
    class Batch:
        def __init__(self, items):
            self.items = list(items)

        def recv(self):
            if not self.items:
                raise BlockingIOError
            return self.items.pop(0)

    class Up:
        name = "mobile"
        rx_datagrams = 0
        relay = None  # (no config relay)

    up = Up()
    up.nat = nat
    up.batch = Batch([([reply], S1), ([smpu], S1)])
    counters = {"malformed": 0, "unknown_session": 0, "wrong_uplink": 0}
    receive.read_uplink(up, {}, counters, lambda pkts: None, 0.01)
    assert nat.public_addr == ("198.51.100.7", 7000)
    assert counters["unknown_session"] == 1  # the SMPU-shaped one went on to SMPU
    assert nat.client.drops == {}


def test_a_down_subflow_rechecks_at_most_every_gap_and_not_during_a_round():
    nat = UplinkNat([HostPort(*S1), HostPort(*S2)], LOCAL, 0.0, resolve=no_dns)
    assert not nat.recheck(0.5, force=False)  # the first round is running
    serve(nat, 0.6, {S1: ("198.51.100.7", 7000), S2: ("198.51.100.7", 7000)})
    assert not nat.recheck(1.0, force=False)  # too soon after the last start
    assert nat.recheck(MIN_RECHECK_GAP + 0.1, force=False)
    assert len(nat.take_outgoing()) == 2


def test_a_refused_recheck_is_asked_when_the_gap_allows_and_sees_the_new_mapping():
    """A NAT reboot right after a round (the agent's first, at start): the
    punched subflow that goes down asks within MIN_RECHECK_GAP, which is
    refused -- the round then starts when the gap has passed, by the
    timers, instead of never (session 6 dropped it: a direct path stayed
    on the old mapping until its session timed out)."""
    nat = UplinkNat([HostPort(*S1), HostPort(*S2)], LOCAL, 0.0, resolve=no_dns)
    serve(nat, 0.1, {S1: ("198.51.100.7", 7000), S2: ("198.51.100.7", 7000)})
    assert nat.mapping_changed() and nat.public_addr == ("198.51.100.7", 7000)
    assert not nat.recheck(1.0, force=False)  # the reboot: too soon after the first round
    assert nat.take_outgoing() == [] and nat.next_deadline() == MIN_RECHECK_GAP
    nat.on_timer(MIN_RECHECK_GAP - 0.01)
    assert nat.take_outgoing() == []
    nat.on_timer(MIN_RECHECK_GAP)
    serve(nat, MIN_RECHECK_GAP + 0.05, {S1: ("198.51.100.7", 7100), S2: ("198.51.100.7", 7100)})
    assert nat.mapping_changed() and nat.public_addr == ("198.51.100.7", 7100) and nat.changes == 1
    assert nat.next_deadline() > MIN_RECHECK_GAP + 60  # nothing more due but the periodic round


def test_a_recheck_asked_during_a_round_runs_after_it():
    nat = UplinkNat([HostPort(*S1)], LOCAL, 0.0, resolve=no_dns)
    out = nat.take_outgoing()  # the first round's request, not answered yet
    assert len(out) == 1
    assert not nat.recheck(MIN_RECHECK_GAP + 1, force=False)  # busy
    assert nat.take_outgoing() == []
    for data, dest in out:
        nat.on_datagram(answer(data, ("198.51.100.7", 7000)), dest, MIN_RECHECK_GAP + 1.5)
    assert not nat.client.busy and nat.next_deadline() == MIN_RECHECK_GAP
    nat.on_timer(MIN_RECHECK_GAP + 1.5)
    assert len(nat.take_outgoing()) == 1  # the asked round


def test_an_ipv6_uplink_asks_ipv6_servers_only():
    nat = UplinkNat([HostPort(*S1), HostPort("2001:db8::1", 3478)], ("2001:db8:3::2", 7000), 0.0,
                    resolve=no_dns)
    assert nat.sources == frozenset({("2001:db8::1", 3478)})
    with pytest.raises(ValueError):
        UplinkNat([], ("not-an-ip", 1), 0.0)


# -- the punch glue: a NAT reboot must not wait for the dead verdict ------------------------

class _Batch:
    """The uplink's BatchSocket as uplinknat uses it: ``send(datagrams, dest)``
    returns how many the socket refused (none here); records what went where."""

    def __init__(self):
        self.sent = []

    def send(self, dgrams, dest):
        self.sent += [(bytes(d), dest) for d in dgrams]
        return 0


def _punched_session(keepalive_idle: float):
    """An established one-subflow session (simnet) seen as the agent's
    DataSession: its plan, the peer's uplink with NAT candidates, our uplink
    with STUN (first round answered: behind NAT)."""
    from types import SimpleNamespace

    from mpvpn.agent import uplinknat
    from mpvpn.core.candidates import Candidate
    from mpvpn.core.smpu import SessionConfig
    from mpvpn.core.subflow import SubflowConfig
    from mpvpn.tools.simnet import SimPair

    pair = SimPair(1, config=SessionConfig(subflow=SubflowConfig(keepalive_idle=keepalive_idle)))
    assert pair.handshake()
    nat = UplinkNat([HostPort(*S1), HostPort(*S2)], LOCAL, pair.now, resolve=no_dns)
    serve(nat, pair.now, {S1: ("198.51.100.7", 7000), S2: ("198.51.100.7", 7000)})
    up = SimpleNamespace(nat=nat, batch=_Batch(), relay=None)
    peer_up = SimpleNamespace(name="mobile", addr="10.3.2.2", port=7000,
                              candidates=(Candidate("host", "10.3.2.2", 7000),
                                          Candidate("srflx", "203.0.113.20", 7000)))
    ds = SimpleNamespace(sess=pair.a, peer=SimpleNamespace(name="b", uplinks=(peer_up,)),
                         plan={1: SimpleNamespace(remote="mobile", type="mobile")},
                         uplink_of={1: up}, punch={}, upgrade=set(), keepalives_seen={},
                         stuck_since={}, punch_anyway={})
    uplinknat.update_punch(ds, pair.now)
    assert ds.punch[1].active and not ds.punch[1].rushing(pair.now)
    return pair, ds, up, peer_up


def test_new_peer_candidates_make_an_established_pair_punch_again_and_ask_stun():
    from dataclasses import replace

    from mpvpn.agent import uplinknat
    from mpvpn.core.candidates import Candidate

    pair, ds, up, peer_up = _punched_session(25.0)
    pair.run(MIN_RECHECK_GAP + 0.5)
    sub = pair.a.subflows[1]
    assert sub.established
    # the peer's NAT rebooted: its UPDATE brings a new srflx port
    peer_up.candidates = (peer_up.candidates[0], replace(peer_up.candidates[1], port=40001))
    assert isinstance(peer_up.candidates[1], Candidate)
    now = pair.now
    uplinknat.update_punch(ds, now)
    p = ds.punch[1]
    assert p.rushing(now) and ("203.0.113.20", 40001) in [t[:2] for t in p.targets]
    assert {d for _, d in up.batch.sent} == {S1, S2}  # our own mapping may have moved too
    # the rush's first probe is due at once and leaves for every target
    assert uplinknat.punch_deadline(ds) == now
    uplinknat.punch_timers(ds, now)
    assert sub.punches == 1 and 1 in ds.upgrade and sub.established


def test_a_long_keepalive_asks_stun_with_each_idle_keepalive_of_a_punched_pair():
    from mpvpn.agent import uplinknat

    for keepalive, expect in ((10.0, True), (0.75, False)):  # window 40 s vs 3 s
        pair, ds, up, _ = _punched_session(keepalive)
        sub = pair.a.subflows[1]
        pair.run(MIN_RECHECK_GAP + 0.5)
        uplinknat.punch_timers(ds, pair.now)  # learns the keepalive count
        sent = sub.probes_sent
        while sub.probes_sent == sent:
            pair.run(0.05)
        before = len(up.batch.sent)
        uplinknat.punch_timers(ds, pair.now)
        asked = {d for _, d in up.batch.sent[before:]}
        assert (asked == {S1, S2}) is expect, keepalive
        uplinknat.punch_timers(ds, pair.now)  # no new keepalive: no new round
        assert len(up.batch.sent) == before + (2 if expect else 0)


def test_a_pair_that_does_not_open_punches_anyway_and_its_responder_probes_the_peer():
    """No base.stun here, no candidates from the peer: nothing says NAT.  A
    responder behind such a NAT is not reachable at the address it
    announced; after PUNCH_ANYWAY_AFTER its punch probes go to the peer's
    uplink, whose subflow follows their source (our unknown public mapping)."""
    from types import SimpleNamespace

    from mpvpn.agent import uplinknat
    from mpvpn.agent.uplinknat import PUNCH_ANYWAY_AFTER
    from mpvpn.tools.simnet import SimPair

    pair = SimPair(1)
    pair.set(1, up=False)  # the initiator's CONNECTs do not arrive: nothing opens
    pair.run(0.5)
    peer_up = SimpleNamespace(name="mobile", addr="10.3.1.1", port=7000, candidates=())
    spec = SimpleNamespace(remote="mobile", type="mobile", remote_addr="10.3.1.1", remote_port=7000)
    ds = SimpleNamespace(sess=pair.b, peer=SimpleNamespace(name="a", uplinks=(peer_up,)), plan={1: spec},
                         uplink_of={1: SimpleNamespace(nat=None, batch=None, relay=None)}, punch={},
                         upgrade=set(), keepalives_seen={}, stuck_since={}, punch_anyway={})
    sub = pair.b.subflows[1]
    t0 = pair.now
    uplinknat.update_punch(ds, t0)
    assert ds.punch == {}  # nothing says NAT
    assert uplinknat.punch_when_stuck(ds, t0) == t0 + PUNCH_ANYWAY_AFTER
    assert uplinknat.punch_when_stuck(ds, t0 + 1.0) == t0 + PUNCH_ANYWAY_AFTER
    assert uplinknat.punch_when_stuck(ds, t0 + PUNCH_ANYWAY_AFTER) is None
    p = ds.punch[1]
    assert ds.punch_anyway == {1: 0} and p.active and p.targets == (("10.3.1.1", 7000),)
    now = t0 + PUNCH_ANYWAY_AFTER
    assert uplinknat.punch_deadline(ds) == now
    uplinknat.punch_timers(ds, now)
    assert sub.punches == 1
    # it never opened before punching: punched, wherever it opened
    pair.set(1, up=True)
    pair.run(2.0)
    assert sub.established and uplinknat.link_path(ds, 1) == "punched"
    assert uplinknat.punch_when_stuck(ds, pair.now) is None and ds.stuck_since == {}
    # a pair that had opened directly, punched after an outage, and came back
    # at the announced address is still direct; moved to a mapping: punched
    ds.punch_anyway[1] = 1
    sub.remote = ("10.3.1.1", 7000)
    assert uplinknat.link_path(ds, 1) == "direct"
    sub.remote = ("203.0.113.103", 7000)
    assert uplinknat.link_path(ds, 1) == "punched"


def test_server_names_are_looked_up_off_the_loop_and_the_first_round_waits_for_them():
    from mpvpn.agent.uplinknat import LOOKUP_WAIT

    asked = []
    nat = UplinkNat([HostPort("stun.example.net", 3479), HostPort(*S2), HostPort("nope.invalid", 3478)],
                    LOCAL, 100.0, lookup=lambda *a: asked.append(a))
    assert [(h, p, f) for h, p, f, _ in asked] == [("stun.example.net", 3479, socket.AF_INET),
                                                     ("nope.invalid", 3478, socket.AF_INET)]
    assert nat.names.looking_up and nat.status()["looking_up"] and nat.take_outgoing() == []
    assert nat.next_deadline() == 100.0 + LOOKUP_WAIT and not nat.recheck(101.0)
    asked[1][3](socket.gaierror(-2, "Name or service not known"))
    asked[0][3]([(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (S1[0], 3479))])
    assert not nat.names.looking_up and "cannot resolve STUN server nope.invalid:3478" in nat.names.problems[0]
    assert nat.next_deadline() <= 101.0
    nat.on_timer(101.0)  # the first round, to every server in the configured order
    assert [d for _, d in nat.take_outgoing()] == [(S1[0], 3479), S2]
    assert nat.sources == {(S1[0], 3479), S2}  # the demultiplexer knows the resolved server


def test_a_hanging_server_lookup_delays_stun_by_lookup_wait_at_most():
    from mpvpn.agent.uplinknat import LOOKUP_WAIT

    asked = []
    nat = UplinkNat([HostPort("stun.example.net", 3478), HostPort(*S2)], LOCAL, 0.0,
                    lookup=lambda *a: asked.append(a))
    nat.on_timer(LOOKUP_WAIT - 0.1)
    assert nat.take_outgoing() == []
    nat.on_timer(LOOKUP_WAIT)
    assert [d for _, d in nat.take_outgoing()] == [S2]  # goes with what it has
    asked[0][3]([(socket.AF_INET, socket.SOCK_DGRAM, 17, "", S1)])  # too late: kept out
    assert nat.sources == {S2}
