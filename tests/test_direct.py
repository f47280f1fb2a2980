"""Direct paths between the sites of one hub (issue 16): the messages
(PEER_OFFER / PEER_HS / PEER_END, mpvpn.core.controlmsg), the hub's broker
and a site's peers (mpvpn.core.peerdirect), and three client agents with a
hub in this process (tests/test_hub.py's Hub over tests/fakes.py): traffic
moves off the hub once the direct session is up and back when its path is
cut.  The namespace e2e with NATs is in tests/test_direct_lab.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time

import pytest
from agentlab import WAIT_SCALE
from test_hub import CLIENTS, Hub, expected_routes, host, v4

from mpvpn import cli
from mpvpn.core import noise, peerdirect
from mpvpn.core.controlmsg import MAX_UPLINKS, parse_message
from mpvpn.core.pairing import Uplink

# ------------------------------------------------------------------ messages


def _offer(**kw) -> dict:
    d = {"type": "PEER_OFFER", "name": "site-c", "key": base64.b64encode(bytes(range(32))).decode(),
         "uplinks": [{"name": "lte", "type": "lte", "addr": "10.1.0.3", "port": 7000}],
         "session_id": 77, "initiator": True, "token": base64.b64encode(bytes(32)).decode(),
         "ciphers": ["chacha20-poly1305"], "mode": "duplicate", "pair_unmatched": False}
    d.update(kw)
    return d


def _parse(d: dict, from_client: bool):
    return parse_message(json.dumps(d).encode(), from_client)


def test_peer_messages_are_parsed_strictly_and_an_offer_only_comes_from_the_hub():
    m = _parse(_offer(), from_client=False)
    assert m["key"] == bytes(range(32)) and m["uplinks"][0].addr == "10.1.0.3" and m["initiator"]
    with pytest.raises(Exception, match="wrong direction"):
        _parse(_offer(), from_client=True)
    ups = [{"name": f"u{i}", "type": "lte", "addr": f"10.1.{i}.3", "port": 7000}
           for i in range(MAX_UPLINKS + 1)]
    for bad in (dict(uplinks=ups), dict(key="AAAA"), dict(session_id=0), dict(token=5),
                dict(initiator="yes"), dict(extra=1)):
        with pytest.raises(Exception):
            _parse(_offer(**bad), from_client=False)
    hs = {"type": "PEER_HS", "name": "site-a", "session_id": 5, "step": 1,
          "hs": base64.b64encode(bytes(48)).decode()}
    assert _parse(hs, from_client=True)["hs"] == bytes(48)
    for bad in (dict(step=3), dict(hs=base64.b64encode(bytes(8)).decode()), dict(name="../x")):
        with pytest.raises(Exception):
            _parse({**hs, **bad}, from_client=True)


# ------------------------------------------------------------------ the broker and the peers


def _site(name: str, key: bytes | None, n: int = 1) -> peerdirect.SiteView:
    ups = tuple(Uplink(f"u{i}", "lte", f"10.{i}.0.{ord(name[-1]) % 50}", 7000) for i in range(1, n + 1))
    return peerdirect.SiteView(name, key, ups, ("chacha20-poly1305",), "duplicate", False)


def _wire(out: list) -> list:
    """What the broker/peers send, as the receiving machine parses it."""
    res = []
    for to, msg in out:
        res.append((to, parse_message(json.dumps(msg).encode(), from_client=False)))
    return res


def _keys(*names):
    return {n: noise.generate_keypair() for n in names}


def test_the_hub_offers_pairs_that_talk_and_relays_a_handshake_it_cannot_read():
    keys = _keys("a", "c", "d")
    sites = {n: _site(n, keys[n][1]) for n in keys}
    b = peerdirect.DirectBroker(True, random.Random(1))
    assert b.offers(sites, set(), {1, 2}, 0.0) == []  # nobody talks: nothing offered
    out = _wire(b.offers(sites, {("c", "a"), ("a", "c")}, {1, 2}, 1.0))
    assert [to for to, _m in out] == ["a", "c"]
    (_, oa), (_, oc) = out
    assert oa["name"] == "c" and oc["name"] == "a" and oa["session_id"] == oc["session_id"]
    assert oa["key"] == keys["c"][1] and oc["key"] == keys["a"][1] and oa["initiator"] != oc["initiator"]
    # the same pair is not offered twice while the offer lives
    assert b.offers(sites, {("a", "c")}, set(), 5.0) == []
    pa = peerdirect.DirectPeers("a", keys["a"][0], ("chacha20-poly1305",))
    pc = peerdirect.DirectPeers("c", keys["c"][0], ("chacha20-poly1305",))
    to_hub, ev = pa.on_message(oa, {"c", "d"}, {1}, 1.0)
    assert ev == [] and to_hub[0]["step"] == 1
    m1 = parse_message(json.dumps(to_hub[0]).encode(), from_client=True)
    relayed = _wire(b.on_message("a", m1, 1.0))
    assert relayed[0][0] == "c" and relayed[0][1]["name"] == "a"
    pc.on_message(oc, {"a"}, {2}, 1.0)
    to_hub, ev_c = pc.on_message(relayed[0][1], {"a"}, {2}, 1.0)
    m2 = parse_message(json.dumps(to_hub[0]).encode(), from_client=True)
    (_, r2), = _wire(b.on_message("c", m2, 1.0))
    _, ev_a = pa.on_message(r2, {"c"}, {1}, 1.0)
    ka, kc = ev_a[0].peer.keys, ev_c[0].peer.keys
    assert ka.data_send_key == kc.data_recv_key and ka.data_recv_key == kc.data_send_key
    assert b.status(1.0)[0]["state"] == "keyed"
    # the hub holds the token and both public keys, not a private one: a
    # responder it plays with a key of its own fails against A's first message
    hub_key = noise.generate_keypair()[0]
    fake = noise.Handshake("KKpsk0", False, oc["token"],
                           peerdirect.prologue(oa["session_id"], "a", "c"), s=hub_key, rs=keys["a"][1])
    with pytest.raises(noise.NoiseError):
        fake.read_message(m1["hs"])
    # a step out of order, or for a pair the site is not part of: refused with a reason, counted
    (to, end), = _wire(b.on_message("d", {**m1, "name": "c"}, 2.0))
    assert to == "d" and end["type"] == "PEER_END" and end["reason"] == "no_offer"
    assert b.counters["direct_refused"] == 1


def _keyed_pair(rekey_interval: float = 120.0):
    """A broker and two sites' peers through one full handshake at t=1."""
    keys = _keys("a", "c")
    sites = {n: _site(n, keys[n][1]) for n in keys}
    b = peerdirect.DirectBroker(True, random.Random(3))
    (_, oa), (_, oc) = _wire(b.offers(sites, {("a", "c")}, set(), 1.0))
    pa = peerdirect.DirectPeers("a", keys["a"][0], ("chacha20-poly1305",), rekey_interval)
    pc = peerdirect.DirectPeers("c", keys["c"][0], ("chacha20-poly1305",), rekey_interval)
    pc.on_message(oc, {"a"}, set(), 1.0)
    msgs, _ev = pa.on_message(oa, {"c"}, set(), 1.0)
    return b, pa, pc, msgs


def _through(b, site, msgs, peers, via, now):
    """Messages of ``site`` through the broker to the other side's peers:
    (what that side answers, its events)."""
    out, events = [], []
    for msg in msgs:
        for to, relayed in _wire(b.on_message(site, parse_message(json.dumps(msg).encode(), True), now)):
            o, e = peers[to].on_message(relayed, via[to], set(), now)
            out.append((to, o))
            events += e
    return out, events


def test_a_direct_session_is_rekeyed_through_the_hub_and_the_old_keys_retire():
    b, pa, pc, msgs = _keyed_pair(rekey_interval=30.0)
    peers, via = {"a": pa, "c": pc}, {"a": {"c"}, "c": {"a"}}
    ((_to, answer),), ev_c = _through(b, "a", msgs, peers, via, 1.0)
    _, ev_a = _through(b, "c", answer, peers, via, 1.0)
    k1 = ev_a[0].peer.keys
    assert pa.set_up("c", True, 1.0) and pc.set_up("a", True, 1.0)  # (the agents' sessions came up)
    assert pa.next_deadline() == 31.0  # the initiator rekeys after rekey_interval
    out, ev = pa.handle_timer(31.0)
    assert ev == [] and out[0]["epoch"] == 2 and out[0]["step"] == 1
    ((_to, answer),), ev_c = _through(b, "a", out, peers, via, 31.0)
    assert isinstance(ev_c[0], peerdirect.Rekeyed) and not ev_c[0].sending  # the responder defers
    _, ev_a = _through(b, "c", answer, peers, via, 31.0)
    assert isinstance(ev_a[0], peerdirect.Rekeyed) and ev_a[0].sending and ev_a[0].epoch == 2
    ka, kc = ev_a[0].keys, ev_c[0].keys
    assert ka.data_send_key == kc.data_recv_key and ka.data_send_key != k1.data_send_key
    assert pa.peers["c"].epoch == pc.peers["a"].epoch == 2
    assert b.counters["direct_rekeys"] == 1
    # the previous epoch retires after KEY_OVERLAP
    _out, ev = pc.handle_timer(31.0 + peerdirect.KEY_OVERLAP)
    assert ev == [peerdirect.Retire(pc.peers["a"], 1)]
    # a second rekey right away is refused by the hub (flood bound): the pair ends, both told
    p = pa.peers["c"]
    hs = noise.Handshake("KKpsk0", True, p.token, peerdirect.prologue(p.session_id, "a", "c") + b"\x03",
                         s=pa.static, rs=p.key)
    m = {"type": "PEER_HS", "name": "c", "session_id": p.session_id, "step": 1, "epoch": 3,
         "hs": base64.b64encode(hs.write_message(b"")).decode()}
    ends = _wire(b.on_message("a", parse_message(json.dumps(m).encode(), True), 31.5))
    assert {(to, e["reason"]) for to, e in ends} == {("a", "refused"), ("c", "refused")}


def test_the_hub_bounds_offers_and_backs_off_a_pair_that_failed():
    keys = _keys(*[f"s{i:02d}" for i in range(12)])
    sites = {n: _site(n, k[1]) for n, k in keys.items()}
    sites["nokey"] = _site("nokey", None)
    b = peerdirect.DirectBroker(True, random.Random(2))
    names = sorted(keys)
    talking = {(x, y) for x in names for y in names if x < y} | {("s00", "nokey")}
    out = b.offers(sites, talking, set(), 0.0)
    assert len(out) == 2 * peerdirect.MAX_OFFERS_PER_ROUND
    assert all(m["name"] != "nokey" and to != "nokey" for to, m in out)  # a site without a key: none
    assert b.counters["direct_offers_deferred"] > 0
    assert b.offers(sites, talking, set(), 0.5) == []  # one round per OFFER_INTERVAL
    # the stalled offers end after HS_TIMEOUT, both sides told; the pairs wait RETRY_MIN
    ends = b.handle_timer(peerdirect.HS_TIMEOUT + 0.1)
    assert len(ends) == 2 * peerdirect.MAX_OFFERS_PER_ROUND and all(m["reason"] == "timeout" for _t, m in ends)
    offered = {tuple(sorted((to, m["name"]))) for to, m in out}
    later = b.offers(sites, talking, set(), peerdirect.HS_TIMEOUT + 1.0)
    assert offered.isdisjoint({tuple(sorted((to, m["name"]))) for to, m in later})
    again = b.offers(sites, offered, set(), peerdirect.HS_TIMEOUT + 0.1 + peerdirect.RETRY_MIN + 1)
    assert again  # after the backoff they are offered again


def test_a_site_refuses_offers_it_cannot_take_with_a_reason():
    k = noise.generate_keypair()
    p = peerdirect.DirectPeers("a", k[0], ("chacha20-poly1305",))
    offer = parse_message(json.dumps(_offer()).encode(), from_client=False)
    out, ev = p.on_message(offer, {"site-d"}, set(), 0.0)  # not a site the hub forwards to for us
    assert out[0]["reason"] == "not_via" and ev == [] and not p.peers
    out, _ev = p.on_message(offer, {"site-c"}, {77}, 0.0)  # its session ID is ours
    assert out[0]["reason"] == "session_id"
    off = peerdirect.DirectPeers("a", None, ("chacha20-poly1305",))
    assert off.on_message(offer, {"site-c"}, set(), 0.0)[0][0]["reason"] == "disabled"
    for i in range(peerdirect.MAX_DIRECT):
        o = dict(offer, name=f"s{i}", session_id=100 + i)
        assert p.on_message(o, {f"s{i}"}, set(), 0.0)[0][0]["type"] == "PEER_HS"
    out, _ev = p.on_message(offer, {"site-c"}, set(), 0.0)
    assert out[0]["reason"] == "too_many" and p.counters["direct_refused"] == 3
    # an offer that never gets its answer ends after HS_TIMEOUT (the hub is told)
    out, ev = p.handle_timer(peerdirect.HS_TIMEOUT + 1)
    assert len(ev) == peerdirect.MAX_DIRECT and all(m["reason"] == "timeout" for m in out)


# ------------------------------------------------------------------ three agents and a hub


def _direct_state(h, name: str, other: str):
    for p in h.sites[name][0].status()["direct"]["peers"]:
        if p["name"] == f"site-{other}":
            return p["state"]
    return None


def _hub_path(h) -> str | None:
    """The hub's inference for the pair A-C (``direct.pairs[].path``)."""
    for p in h.b.status()["direct"]["pairs"]:
        if p["sites"] == ["site-a", "site-c"]:
            return p["path"]
    return None


# the agent acts on a subflow's dead verdict within the turn of its loop that
# made it (the verdict's silence and the switch's are read a few ms apart)
TURN_MS = 100.0


def _moved_at_the_verdict(agent, name: str) -> bool:
    """The agent's own account of its last move back to the hub: nothing had
    been heard on the direct session with ``name`` for ``down_quiet`` s, no
    longer than the longest silence its subflows' dead verdicts took
    (``links[].dead_after_ms``; both on the agent's clock) plus TURN_MS."""
    st = agent.status()
    p = [x for x in st["direct"]["peers"] if x["name"] == name][0]
    verdicts = [ln["dead_after_ms"] for ln in st["links"]
                if ln["session_id"] == p["session_id"] and ln["dead_after_ms"] is not None]
    return p["down_quiet"] is not None and bool(verdicts) and \
        p["down_quiet"] * 1000 <= max(verdicts) + TURN_MS


def _addrs(name: str) -> set:
    idx = CLIENTS[name][0]
    return {f"10.{i}.0.{idx}" for i in (1, 2)}


def test_two_sites_move_their_traffic_off_the_hub_and_back_when_the_direct_path_fails(tmp_path, capsys):
    with Hub(tmp_path, direct=True) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        c, hc = h.sites["c"]
        sent = []

        def ping(k: int) -> None:
            p = v4(host("a"), host("c"), b"ping %d" % k)
            sent.append(p)
            ha.tun.inject(p)

        def forwarded() -> int:
            return h.b.status()["counters"]["hub_forwarded"]

        # A talks to C through the hub: the hub offers both a direct path
        for k in range(3):
            ping(k)
        h.until(lambda: len(hc.tun.written) == 3, "the first pings through the hub")
        assert forwarded() == 3
        h.until(lambda: _direct_state(h, "a", "c") == "direct" and _direct_state(h, "c", "a") == "direct",
                "A and C direct")
        assert _direct_state(h, "a", "d") is None  # D talked to nobody: no direct path
        st = a.status()
        via = {v["name"]: v["path"] for v in st["sessions"][0]["via"]}
        assert via == {"site-c": "direct", "site-d": "hub"}
        assert [s["direct"] for s in st["sessions"]] == [False, True]
        # `mpvpn status` in words, on the site and on the hub
        cli._print_status(st)
        cli._print_status(h.b.status())
        out = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
        assert "direct (hub site-b stands by): site-c 172.30.0.3 LANs 192.168.30.0/24" in out
        assert "via hub site-b: site-d 172.30.0.4 LANs 192.168.40.0/24" in out
        assert any(ln.startswith("direct peer site-c: direct (subflow up for ") for ln in out), out
        # (the hub forwarded their first pings a moment ago: it cannot tell them direct yet)
        assert any(ln.startswith("direct pair site-a <-> site-c: keyed, via hub (last forwarded")
                   for ln in out), out
        # from now on the hub forwards nothing between them, both ways
        base = forwarded()
        for k in range(3, 23):
            ping(k)
            hc.tun.inject(v4(host("c"), host("a"), b"pong %d" % k))
            h.run(0.01)
        h.until(lambda: len(hc.tun.written) == 23 and len(ha.tun.written) == 20, "pings direct")
        assert forwarded() == base
        assert sorted(hc.tun.written) == sorted(sent)
        # the hub infers from its own forwarding that the pair went direct
        h.until(lambda: _hub_path(h) == "direct", "the hub's pair says direct")
        # a source C may not use (D's LAN) on the direct session: dropped and counted
        hc.tun.inject(v4(host("d"), host("a"), b"spoof"))
        h.until(lambda: a.status()["direct"]["counters"]["direct_spoofed"] == 1, "spoof counted")
        assert len(ha.tun.written) == 20
        # the direct path is cut (both carriers, both ways); the hub's paths stay
        cut = _addrs("a") | _addrs("c")
        h.net.drop = lambda src, dst, _d: src[0] in cut and dst[0] in cut
        t_cut = a.clock()
        k = 23
        while _direct_state(h, "a", "c") != "via hub" or _direct_state(h, "c", "a") != "via hub":
            ping(k)
            k += 1
            h.run(0.02)
            assert a.clock() - t_cut < 10 * WAIT_SCALE, "the direct path was not declared dead"
        # back through the hub: every ping sent from now on arrives, and the hub forwards them
        base = forwarded()
        n0 = len(sent)
        for j in range(10):
            ping(k + j)
            h.run(0.01)
        h.until(lambda: set(sent[n0:]) <= set(hc.tun.written), "pings back through the hub")
        assert forwarded() >= base + 10
        h.until(lambda: _hub_path(h) == "via hub", "the hub's pair says via hub again")
        # the traffic moved at the dead verdict itself: the agent had heard nothing on the
        # direct session for no longer than its subflows' dead detection took
        assert _moved_at_the_verdict(a, "site-c")
        # the path heals: the subflows open again and the traffic leaves the hub once more
        h.net.drop = None
        h.until(lambda: _direct_state(h, "a", "c") == "direct" and _direct_state(h, "c", "a") == "direct",
                "A and C direct again")
        peers = {p["name"]: p for p in a.status()["direct"]["peers"]}
        assert peers["site-c"]["ups"] == 2 and peers["site-c"]["downs"] == 1
        base, n0 = forwarded(), len(sent)
        for j in range(5):
            ping(1000 + j)
            h.run(0.01)
        h.until(lambda: set(sent[n0:]) <= set(hc.tun.written), "pings direct again")
        assert forwarded() == base
        # the hub passes C's new candidates (as after a NAT reboot) to A: A punches towards them too
        pa = peers["site-c"]
        ds = a.sessions[pa["session_id"]]
        ups = [dict(u.to_json(), candidates=[{"kind": "srflx", "addr": "203.0.113.9", "port": 40000 + i}])
               for i, u in enumerate(ds.peer.uplinks)]
        offer = {"type": "PEER_OFFER", "name": "site-c", "session_id": pa["session_id"],
                 "key": base64.b64encode(c.direct.public_key).decode(), "uplinks": ups,
                 "initiator": pa["initiator"], "token": base64.b64encode(a.direct.peers.peers["site-c"].token).decode(),
                 "ciphers": ["chacha20-poly1305"], "mode": "duplicate", "pair_unmatched": False}
        a.direct.on_message(a.controls[0], parse_message(json.dumps(offer).encode(), False), a.clock())
        assert [u.candidates[0].addr for u in ds.peer.uplinks] == ["203.0.113.9"] * 2
        targets = {t for p in ds.punch.values() for t in p.targets}
        assert {("203.0.113.9", 40000), ("203.0.113.9", 40001)} <= targets
        assert _direct_state(h, "a", "c") == "direct"


def test_without_direct_on_the_hub_nothing_is_offered(tmp_path):
    with Hub(tmp_path, direct=True) as h:
        h.b.direct.set_enabled(False, h.b.clock())
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        for k in range(5):
            h.sites["a"][1].tun.inject(v4(host("a"), host("c"), b"%d" % k))
            h.run(0.3)
        h.run(1.2)
        assert h.b.status()["direct"]["pairs"] == []
        assert h.sites["a"][0].status()["direct"]["peers"] == []
        assert h.b.status()["counters"]["hub_forwarded"] == 5
        time.sleep(0)


def test_a_direct_session_rekeys_under_traffic_without_losing_a_packet(tmp_path):
    with Hub(tmp_path, direct=True, extra="\toption rekey_interval '1'\n") as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        c, hc = h.sites["c"]
        ha.tun.inject(v4(host("a"), host("c"), b"hello"))
        h.until(lambda: _direct_state(h, "a", "c") == "direct" and _direct_state(h, "c", "a") == "direct",
                "A and C direct")
        base = h.b.status()["counters"]["hub_forwarded"]
        sent = []
        k = 0

        def epoch() -> int:
            return {p["name"]: p["epoch"] for p in a.status()["direct"]["peers"]}["site-c"]
        while epoch() < 4:  # three rekeys under a packet every 10 ms
            p = v4(host("a"), host("c"), b"r %d" % k)
            sent.append(p)
            ha.tun.inject(p)
            k += 1
            h.run(0.01)
            assert k < 3000, "no rekey"
        h.until(lambda: set(sent) <= set(hc.tun.written), "every packet across the rekeys")
        assert h.b.status()["counters"]["hub_forwarded"] == base
        assert _direct_state(h, "a", "c") == "direct"
        peers = {p["name"]: p for p in c.status()["direct"]["peers"]}
        assert peers["site-a"]["epoch"] >= 3 and peers["site-a"]["downs"] == 0
        st = c.status()
        direct_sid = peers["site-a"]["session_id"]
        se = [s for s in st["sessions"] if s["session_id"] == direct_sid][0]
        assert se["counters"]["auth_failures"] == 0


def test_a_sites_new_candidates_reach_its_direct_peer_as_an_update_of_the_pair():
    from mpvpn.core.candidates import Candidate

    b, pa, pc, msgs = _keyed_pair()
    peers, via = {"a": pa, "c": pc}, {"a": {"c"}, "c": {"a"}}
    ((_to, answer),), _ev = _through(b, "a", msgs, peers, via, 1.0)
    _through(b, "c", answer, peers, via, 1.0)
    sid = pa.peers["c"].session_id
    old = pa.peers["c"].uplinks
    # C's NAT rebooted: a new public port (its UPDATE to the hub)
    up = old[0]
    moved = Uplink(up.name, up.type, up.addr, up.port,
                   (Candidate("host", up.addr, up.port), Candidate("srflx", "203.0.113.9", 40001)))
    sites = {n: _site(n, pk) for n, pk in (("a", pa.public), ("c", pc.public))}
    sites["c"] = peerdirect.SiteView("c", pc.public, (moved,), ("chacha20-poly1305",), "duplicate", False)
    b.site_moved("c")
    out = _wire(b.offers(sites, set(), {sid}, 2.0))
    assert [(to, m["session_id"]) for to, m in out] == [("a", sid)]  # only the other side, same pair
    to_hub, ev = pa.on_message(out[0][1], {"c"}, {sid}, 2.0)
    assert to_hub == [] and ev == [peerdirect.Moved(pa.peers["c"])]
    assert pa.peers["c"].uplinks == (moved,) and pa.counters["direct_updates"] == 1
    # the same again changes nothing; a changed key on the "update" ends the pair
    assert pa.on_message(out[0][1], {"c"}, {sid}, 2.1) == ([], [])
    forged = dict(out[0][1], key=noise.generate_keypair()[1])
    end, ev = pa.on_message(forged, {"c"}, {sid}, 2.2)
    assert end[0]["reason"] == "refused" and isinstance(ev[0], peerdirect.Ended) and "c" not in pa.peers


def test_a_site_flooding_the_hub_with_handshake_messages_gets_few_answers_and_is_counted():
    b = peerdirect.DirectBroker(True, random.Random(4))
    m = {"type": "PEER_HS", "name": "site-c", "step": 1, "epoch": 1, "hs": bytes(48)}
    answers = [b.on_message("site-a", dict(m, session_id=1000 + i), 5.2) for i in range(50)]
    assert sum(len(x) for x in answers) == peerdirect.MAX_REFUSALS
    assert b.counters["direct_refused"] == 50 and b.counters["direct_refused_quiet"] == 40
    assert len(b.on_message("site-a", dict(m, session_id=7), 6.0)) == 1  # the next second: answered
    assert len(b.on_message("site-d", dict(m, session_id=7), 5.3)) == 1  # other sites are not affected


def test_a_site_the_hub_keeps_off_direct_paths_talks_through_the_hub_and_reload_ends_its_pairs(tmp_path):
    with Hub(tmp_path, direct=True, apart=()) as h:  # (every site has its own `config site`)
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        ha, hc = h.sites["a"][1], h.sites["c"][1]
        ha.tun.inject(v4(host("a"), host("c"), b"1"))
        h.until(lambda: _direct_state(h, "a", "c") == "direct", "A and C direct")
        # the hub's `config site 'site_c'` gets direct 0; SIGHUP
        conf = tmp_path / "b" / "orayboxvpn"
        text = conf.read_text()
        conf.write_text(text.replace("config site 'site_c'\n", "config site 'site_c'\n\toption direct '0'\n"))
        h.b.reload()
        h.until(lambda: _direct_state(h, "a", "c") is None and _direct_state(h, "c", "a") is None,
                "A and C's direct session ended")
        assert h.b.status()["sessions"] and len(h.b.status()["sessions"]) == 3  # (no session restarted)
        base = h.b.status()["counters"]["hub_forwarded"]
        for k in range(4):
            ha.tun.inject(v4(host("a"), host("c"), b"again %d" % k))
            h.run(0.5)
        h.until(lambda: h.b.status()["counters"]["hub_forwarded"] == base + 4, "through the hub")
        assert h.b.status()["direct"]["pairs"] == [] and _direct_state(h, "a", "c") is None
        assert len([p for p in hc.tun.written if p.endswith(b"again 3")]) == 1
        # A and D may still go direct
        ha.tun.inject(v4(host("a"), host("d"), b"d"))
        h.until(lambda: _direct_state(h, "a", "d") == "direct", "A and D direct")


def test_the_hub_never_gives_a_site_the_session_id_of_a_direct_pair():
    from test_control import connect, server_cfg

    from mpvpn.core.registry import ServerSessions

    _c, s, _reg = connect(registry=ServerSessions(server_cfg(), rng=random.Random(1)))
    taken = s.session_id  # what this seed gives the first site
    reg = ServerSessions(server_cfg(), rng=random.Random(1), reserved=lambda: {taken})
    _c, s2, _reg = connect(registry=reg)
    assert s2.session_id is not None and s2.session_id != taken


def test_a_direct_session_follows_the_other_sites_lans_as_the_hub_announces_them(tmp_path):
    with Hub(tmp_path, direct=True) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        c, hc = h.sites["c"]
        ha.tun.inject(v4(host("a"), host("c"), b"1"))
        h.until(lambda: _direct_state(h, "a", "c") == "direct", "A and C direct")
        sid = {p["name"]: p for p in a.status()["direct"]["peers"]}["site-c"]["session_id"]
        # C moves its LAN to 192.168.31.0/24 (an UPDATE to the hub; the hub tells A)
        for ctl in c.controls:
            ctl.conn.send_update(time.monotonic(), lans=["192.168.31.0/24"])
            c._control_pump(ctl, time.monotonic())
        h.until(lambda: a.sessions[sid].routes == ["192.168.31.0/24"], "A's direct session follows")
        assert "192.168.30.0/24" not in h.routes("a") and "192.168.31.0/24" in h.routes("a")
        # C's old LAN is no longer a source A takes on the direct session; the new one is
        hc.tun.inject(v4("192.168.30.2", host("a"), b"old"))
        hc.tun.inject(v4("192.168.31.2", host("a"), b"new"))
        h.until(lambda: any(p.endswith(b"new") for p in ha.tun.written), "the new LAN's packet")
        assert not any(p.endswith(b"old") for p in ha.tun.written)
        assert a.status()["direct"]["counters"]["direct_spoofed"] == 1  # (it came the direct way)
        assert _direct_state(h, "a", "c") == "direct"


# ------------------------------------------------------------------ pinned direct keys


def test_a_site_refuses_an_offer_whose_key_is_not_the_one_it_pinned():
    keys = _keys("a", "c", "hub")
    offer = parse_message(json.dumps(_offer(name="c", key=base64.b64encode(keys["hub"][1]).decode()))
                          .encode(), from_client=False)
    p = peerdirect.DirectPeers("a", keys["a"][0], ("chacha20-poly1305",), pins={"c": keys["c"][1]})
    out, ev = p.on_message(offer, {"c"}, set(), 5.0)
    assert out[0]["type"] == "PEER_END" and out[0]["reason"] == "key_mismatch" and not p.peers
    assert ev == [peerdirect.PinRefused("c", keys["hub"][1], keys["c"][1])]
    assert p.counters["direct_refused_key_mismatch"] == 1
    (pin,) = p.pin_status(7.0)
    assert pin["state"] == "mismatch" and pin["mismatches"] == 1 and pin["last_age"] == 2.0
    assert base64.b64decode(pin["last_key"]) == keys["hub"][1]
    # the pinned key is taken: the handshake starts
    good = dict(offer, key=keys["c"][1])
    out, ev = p.on_message(good, {"c"}, set(), 8.0)
    assert out[0]["type"] == "PEER_HS" and ev == [] and p.pin_status(8.0)[0]["state"] == "matched"
    # pinned only: an unpinned site is refused; a reload's new pins end a peer they refuse
    only = peerdirect.DirectPeers("a", keys["a"][0], ("chacha20-poly1305",), pins={"c": keys["c"][1]},
                                  pinned_only=True)
    out, _ev = only.on_message(dict(good, name="d", session_id=78), {"c", "d"}, set(), 1.0)
    assert out[0]["reason"] == "not_pinned" and not only.peers
    assert p.set_pins({"c": keys["hub"][1]}, False) == [("c", "key_mismatch")]
    assert p.set_pins({"c": keys["c"][1]}, False) == []


def _pin_config(ka: bytes, kc_pub: bytes, kc: bytes) -> dict:
    b = base64.b64encode
    return {"a": f"\toption direct_private_key '{b(ka).decode()}'\n"
                 f"\tlist direct_peer_key 'site-c={b(kc_pub).decode()}'\n",
            "c": f"\toption direct_private_key '{b(kc).decode()}'\n"}


def test_a_hub_that_passes_another_key_for_a_pinned_site_gets_no_direct_path(tmp_path, capsys, caplog,
                                                                              monkeypatch):
    """An active hub hands A a key of its own as C's direct key (to sit in
    the middle): A pinned C's key, refuses the offer, says so, and its
    traffic with C stays through the hub; once the hub passes C's real key,
    A and C go direct."""
    ka, _pa = noise.generate_keypair()
    kc, pc = noise.generate_keypair()
    evil = noise.generate_keypair()[1]
    monkeypatch.setattr(peerdirect, "RETRY_MIN", 0.5)  # (the hub offers the pair again soon)
    with Hub(tmp_path, direct=True, per_site=_pin_config(ka, pc, kc)) as h:
        broker = h.b.direct.broker
        honest = broker.offers
        lying = [True]

        def offers(sites, talking, used, now):
            if lying[0] and "site-c" in sites:  # the hub's view of C's key is its own
                sites = dict(sites, **{"site-c": dataclasses.replace(sites["site-c"], key=evil)})
            return honest(sites, talking, used, now)

        monkeypatch.setattr(broker, "offers", offers)
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        c, hc = h.sites["c"]

        def pin():
            return a.status()["direct"]["pins"][0]

        sent = []
        k = 0
        while pin()["mismatches"] < 2:  # (offered, refused, offered again after the backoff)
            p = v4(host("a"), host("c"), b"via hub %d" % k)
            sent.append(p)
            ha.tun.inject(p)
            k += 1
            h.run(0.05)
            assert k < 400 * WAIT_SCALE, "no offer refused"
        assert pin()["state"] == "mismatch" and base64.b64decode(pin()["last_key"]) == evil
        assert _direct_state(h, "a", "c") is None
        assert a.status()["direct"]["counters"]["direct_refused_key_mismatch"] >= 2
        h.until(lambda: h.b.status()["direct"]["counters"].get("direct_ended_key_mismatch", 0) >= 2,
                "the hub told of both refusals")
        assert any(r.levelname == "ERROR" and "REFUSED" in r.getMessage() for r in caplog.records)
        # every packet went through the hub, none over a direct session
        h.until(lambda: set(sent) <= set(hc.tun.written), "every ping through the hub")
        assert h.b.status()["counters"]["hub_forwarded"] >= len(sent)
        assert all(not s["direct"] for s in c.status()["sessions"])
        cli._print_status(a.status())
        out = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
        assert any(ln.startswith("direct pin site-c: KEY MISMATCH: refused") for ln in out), out
        assert (f"this site's direct key: {base64.b64encode(_pa).decode()} (static: other sites may pin it "
                f"with list direct_peer_key 'site-a={base64.b64encode(_pa).decode()}')") in out
        # the hub passes C's real key: A takes it, and A and C go direct
        lying[0] = False

        def talk_until_direct():
            ha.tun.inject(v4(host("a"), host("c"), b"again"))  # (offers go to pairs that talk)
            h.run(0.05)
            return _direct_state(h, "a", "c") == "direct" and _direct_state(h, "c", "a") == "direct"
        h.until(talk_until_direct, "A and C direct with the pinned key")
        assert pin()["state"] == "matched"
        # a reload that pins another key for C ends the direct session: back through the hub
        conf = tmp_path / "a" / "orayboxvpn"
        conf.write_text(conf.read_text().replace(base64.b64encode(pc).decode(),
                                                 base64.b64encode(evil).decode()))
        a.reload()
        assert _direct_state(h, "a", "c") is None
        base = h.b.status()["counters"]["hub_forwarded"]
        ha.tun.inject(v4(host("a"), host("c"), b"after reload"))
        h.until(lambda: any(p.endswith(b"after reload") for p in hc.tun.written), "through the hub")
        assert h.b.status()["counters"]["hub_forwarded"] == base + 1
