"""NAT lab (tests/netlab/nat.py): STUN through real nftables NATs to a real
coturn in the lab's internet namespace classifies each NAT correctly.

Needs root/namespaces/nftables (netlab_ready fixture) and coturn's
``turnserver``; the conntrack tests also need ``conntrack``.  Each missing
one skips with the reason."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402
import netlab  # noqa: E402
from natsites import PROBE  # noqa: E402
from netlab import nat  # noqa: E402

from mpvpn.core import stun, turn  # noqa: E402

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
STUN_PORT = 3478

CLIENT = r"""
import json, socket, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from mpvpn.core import stun
import coturn
servers = [tuple(s) for s in json.loads(sys.argv[3])]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[4], int(sys.argv[5])))
c = stun.BindingClient(servers, local=s.getsockname())
c.start(time.monotonic())
coturn.drive(c, s, lambda: c.result is not None, timeout=20)
r = c.result
print(json.dumps({"local": list(s.getsockname()), "nat": r and r.nat,
                  "public": r and r.public, "mappings": r and [list(map(list, m)) for m in r.mappings],
                  "error": r and r.error, "drops": c.drops}))
"""



def test_nat_rules_text():
    assert "masquerade\n" in nat.nat_rules("eim", "up")
    assert "masquerade random" not in nat.nat_rules("eim", "up")
    assert "masquerade random\n" in nat.nat_rules("edm", "up")
    for kind in nat.NAT_KINDS:     # unsolicited traffic from outside is dropped (fw4-like)
        rules = nat.nat_rules(kind, "up")
        assert rules.count('iifname "up" drop') == 2 and "hook input" in rules and "hook forward" in rules
    with pytest.raises(ValueError):
        nat.nat_rules("full-cone", "up")


@pytest.fixture
def natlab(netlab_ready):
    reason = coturn.unavailable_reason()
    if reason:
        sys.stderr.write(f"\nNAT lab tests skipped: {reason}\n")
        pytest.skip(reason)
    lab = nat.NatLab(kinds=("eim", "edm", "eim"))
    server = None
    try:
        server = coturn.Coturn(listen=nat.INET_IPS, port=STUN_PORT, relay_ip=nat.INET_IPS[0],
                               relay_ports=(50000, 50099), loopback_peers=False,
                               prefix=lab.prefix_argv(lab.inet))

        def probe():
            return lab.python(lab.inet, PROBE, str(SRC), nat.INET_IPS[0], str(STUN_PORT),
                              check=False, timeout=10).returncode == 0
        server.start(timeout=15, probe=probe)
        yield lab
    finally:
        if server is not None:
            server.close()
        lab.close()
    assert not [n for n in netlab.list_lab_namespaces() if n.startswith(lab.prefix + "-")]
    assert not (netlab.MARKER_DIR / f"{lab.prefix}.json").exists()


def binding(lab, ns, local_ip, servers, port=0):
    cp = lab.python(ns, CLIENT, str(SRC), str(TESTS), json.dumps(servers), local_ip, str(port),
                    timeout=60)
    return json.loads(cp.stdout.strip().splitlines()[-1])


TWO_SERVERS = [[nat.INET_IPS[0], STUN_PORT], [nat.INET_IPS[1], STUN_PORT]]
ONE_SERVER = [[nat.INET_IPS[0], STUN_PORT]]     # second mapping via RFC 5780 OTHER-ADDRESS


@pytest.mark.parametrize("servers", [TWO_SERVERS, ONE_SERVER], ids=["two-servers", "other-address"])
def test_stun_classifies_each_nat(natlab, servers):
    eim, edm, _ = natlab.sites
    r = binding(natlab, eim.router, eim.router_ip, servers)
    assert r["nat"] == stun.NAT_EIM, r
    assert r["public"][0] == eim.public_ip
    assert r["public"][1] == r["local"][1]            # plain masquerade kept the port
    assert r["drops"] == {}

    r = binding(natlab, edm.router, edm.router_ip, servers)
    assert r["nat"] == stun.NAT_EDM, r
    ports = {m[1][1] for m in r["mappings"]}
    assert len(r["mappings"]) == 2 and len(ports) == 2
    assert {m[1][0] for m in r["mappings"]} == {edm.public_ip}

    # the NAT box itself has a public address: no NAT
    r = binding(natlab, eim.nat, eim.public_ip, servers)
    assert r["nat"] == stun.NAT_NONE and r["public"] == r["local"]


def test_conntrack_flush_and_udp_timeout(natlab):
    if not netlab._which("conntrack"):
        pytest.skip("`conntrack` missing (Debian package conntrack)")
    eim, edm, _ = natlab.sites
    natlab.set_udp_timeout(edm, 7, 9)
    assert natlab.udp_timeout(edm) == (7, 9)
    assert natlab.udp_timeout(eim) != (7, 9)          # per NAT box (per namespace)
    r = binding(natlab, edm.router, edm.router_ip, TWO_SERVERS, port=41000)
    entries = natlab.conntrack_udp(edm)
    assert len([e for e in entries if "sport=41000" in e]) == 2, entries
    natlab.flush_conntrack(edm)
    assert natlab.conntrack_udp(edm) == []
    # after the "NAT reboot" the same socket gets fresh mappings
    r2 = binding(natlab, edm.router, edm.router_ip, TWO_SERVERS, port=41000)
    assert r2["nat"] == stun.NAT_EDM and r["nat"] == stun.NAT_EDM
    assert len(natlab.conntrack_udp(edm)) == 2


def test_names_follow_netlab_convention(netlab_ready):
    with nat.NatLab(kinds=("eim",)) as lab:
        assert all(netlab.NAME_RE.match(ns) for ns in lab.namespaces)
        assert set(lab.namespaces) <= set(netlab.list_lab_namespaces())
        info = json.loads((netlab.MARKER_DIR / f"{lab.prefix}.json").read_text())
        assert info["pid"] == os.getpid() and set(info["namespaces"]) == set(lab.namespaces)
        assert "masquerade" in lab.nat_ruleset(lab.sites[0])
        assert lab.run(lab.sites[0].router, ["ping", "-c1", "-W2", nat.INET_IPS[0]],
                       check=False).returncode == 0
    assert not [n for n in netlab.list_lab_namespaces() if n.startswith(lab.prefix + "-")]


def _udp(lab, site):
    s = lab.socket(site.router)
    s.bind((site.router_ip, 0))
    return s


def _srflx(sock):
    c = stun.BindingClient([tuple(x) for x in TWO_SERVERS], local=sock.getsockname())
    c.start(time.monotonic())
    assert coturn.drive(c, sock, lambda: c.result is not None, timeout=20)
    return c.result


def _punch(x, x_to, y, y_to, rounds=5):
    """Both ends send to each other's candidate at the same time (as the
    agent will); returns what each received, with the source."""
    got = {id(x): [], id(y): []}
    for s in (x, y):
        s.setblocking(False)
    for i in range(rounds):
        x.sendto(b"punch-x%d" % i, x_to)
        y.sendto(b"punch-y%d" % i, y_to)
        time.sleep(0.05)
        for s in (x, y):
            while True:
                try:
                    got[id(s)].append(s.recvfrom(2048))
                except BlockingIOError:
                    break
    return got[id(x)], got[id(y)]


def test_punching_and_relay_through_the_nats(natlab):
    """What the agent's NAT traversal will rely on, shown with bare sockets:
    two endpoint-independent NATs can be punched with simultaneous sends; an
    endpoint-dependent NAT cannot (its port towards the peer is not the one
    STUN saw; Linux conntrack filters by address and port), so that pair
    needs the relay, which works through both NATs."""
    eim, edm, eim2 = natlab.sites
    a, b, c = _udp(natlab, eim), _udp(natlab, eim2), _udp(natlab, edm)
    try:
        ra, rb, rc = _srflx(a), _srflx(b), _srflx(c)
        assert (ra.nat, rb.nat, rc.nat) == (stun.NAT_EIM, stun.NAT_EIM, stun.NAT_EDM)

        got_a, got_b = _punch(a, rb.public, b, ra.public)
        assert got_a and {src for _, src in got_a} == {rb.public}
        assert got_b and {src for _, src in got_b} == {ra.public}

        # EIM <-> EDM: c's NAT picks a fresh random port towards a (not the
        # one in rc.public), so neither side gets through.  (A false failure
        # needs the random port to repeat: p ~ 1/64511 per run.)
        got_a, got_c = _punch(a, rc.public, c, ra.public)
        assert got_a == [] and got_c == []

        # The relay: c allocates on coturn through its symmetric NAT, installs
        # a permission + channel for a's public candidate; a sends first to
        # the relayed address (opens its own NAT), then both ways work.
        for s in (a, c):
            s.setblocking(True)
        tc = turn.TurnClient((nat.INET_IPS[0], STUN_PORT), "alice", "secret")
        events = []

        def pump(pred, timeout=15):
            def until():
                events.extend(tc.take_events())
                return pred()
            return coturn.drive(tc, c, until, timeout)

        tc.start(time.monotonic())
        assert pump(lambda: tc.state != "allocating"), tc.status()
        assert tc.state == "allocated", tc.status()
        relayed = tc.relayed
        assert relayed[0] == nat.INET_IPS[0]
        assert tc.mapped[0] == edm.public_ip
        tc.add_peer(ra.public, time.monotonic())
        assert pump(lambda: tc.peer_state(ra.public)["channel"] is not None)
        a.sendto(b"hello-from-a", relayed)
        assert pump(lambda: any(isinstance(e, turn.Data) for e in events))
        assert [e for e in events if isinstance(e, turn.Data)] == [turn.Data(ra.public, b"hello-from-a")]
        assert tc.send(ra.public, b"sealed-from-c", time.monotonic())
        for data, dest in tc.take_outgoing():
            c.sendto(data, dest)
        a.settimeout(5)
        assert a.recvfrom(2048) == (b"sealed-from-c", relayed)
        tc.close(time.monotonic())
        assert pump(lambda: tc.state == "closed")
        assert tc.drops == {}
    finally:
        for s in (a, b, c):
            s.close()


# ---- carriers of a netlab.Lab behind NAT boxes (NatCarriers) -------------

def _recv(sock, timeout=1.0):
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(2048)
    except (TimeoutError, OSError):
        return None


def _bound(nc, ns, ip, port=0, device=None):
    s = nc.socket(ns)
    if device:      # as the agent does (io/udp.py open_uplink)
        s.setsockopt(socket.SOL_SOCKET, 25, device.encode() + b"\0")
    s.bind((ip, port))
    return s


def test_lab_carrier_behind_nat(make_lab):
    """Carrier 2 of a plain Lab: site A behind an EIM NAT, site B public;
    carrier 3: both sides behind EDM NATs.  A datagram from A's NATed uplink
    reaches B's uplink with the NAT's public address as source (port kept
    by EIM), the reply comes back; unsolicited inbound is dropped (fw4 wan
    zone); the lab's link_down/set_loss still act on the rebuilt carrier;
    carrier 1 is untouched."""
    lab = make_lab(carriers=3)
    with nat.NatCarriers(lab, {2: ("eim", None), 3: ("edm", "edm")}) as nc:
        c2, c3 = nc.carrier(2), nc.carrier(3)
        assert c2.a_public == c2.a_site.public_ip and c2.b_public == c2.b_ip
        assert all(netlab.NAME_RE.match(ns) for ns in nc.namespaces)
        assert set(lab.leftovers()) == set(lab.namespaces)    # own prefix: the Lab never sees the boxes
        # carrier 1 as before
        assert lab.reachable("ra", lab.carrier(1).b_ip)
        a = _bound(nc, lab.ra, c2.a_ip, device="c2")
        b = _bound(nc, lab.rb, c2.b_ip, device="c2")
        try:
            a_port = a.getsockname()[1]
            a.sendto(b"out", (c2.b_public, b.getsockname()[1]))
            got = _recv(b)
            assert got == (b"out", (c2.a_public, a_port))      # EIM keeps the port
            b.sendto(b"back", got[1])
            assert _recv(a) == (b"back", (c2.b_ip, b.getsockname()[1]))
            # unsolicited: to a port with no mapping, and to the mapped port
            # from a source the mapping was not made for (port-dependent filter)
            b.sendto(b"nobody-asked", (c2.a_public, a_port + 1))
            b2 = _bound(nc, lab.rb, c2.b_ip, device="c2")
            b2.sendto(b"other-port", (c2.a_public, a_port))
            assert _recv(a, 0.5) is None
            b2.close()
            # the lab's impairments still work on the rebuilt carrier
            lab.link_down(2)
            a.sendto(b"while-down", (c2.b_public, b.getsockname()[1]))
            assert _recv(b, 0.5) is None
            lab.link_up(2)
            lab.set_loss(2, 100, "a2b")
            a.sendto(b"lossy", (c2.b_public, b.getsockname()[1]))
            assert _recv(b, 0.5) is None
            lab.set_loss(2, 0)
            a.sendto(b"again", (c2.b_public, b.getsockname()[1]))
            assert _recv(b) == (b"again", (c2.a_public, a_port))
        finally:
            a.close()
            b.close()
        # EDM on both ends: neither can reach the other's public address
        # (no mapping on the receiving NAT), both reach the internet
        x = _bound(nc, lab.ra, c3.a_ip, device="c3")
        y = _bound(nc, lab.rb, c3.b_ip, device="c3")
        srv = nc.socket(nc.inet)
        srv.bind((nat.INET_IPS[0], 0))
        try:
            for s, peer in ((x, c3.b_public), (y, c3.a_public)):
                s.sendto(b"to-peer", (peer, 40000))
                s.sendto(b"to-server", srv.getsockname())
            seen = {_recv(srv)[1][0], _recv(srv)[1][0]}
            assert seen == {c3.a_public, c3.b_public}
            assert _recv(x, 0.3) is None and _recv(y, 0.3) is None
            if netlab._which("conntrack"):      # one mapping per destination
                assert len(nc.conntrack_udp(c3.a_site)) == 2
        finally:
            for s in (x, y, srv):
                s.close()
        prefix = nc.prefix
    assert not [n for n in netlab.list_lab_namespaces() if n.startswith(prefix + "-")]
    assert not (netlab.MARKER_DIR / f"{prefix}.json").exists()
    assert lab.reachable("ra", lab.carrier(1).b_ip)


def test_nat_carriers_refuses_what_it_cannot_build(make_lab):
    lab = make_lab(carriers=2, delays={1: 0})
    with pytest.raises(ValueError, match="shim"):
        nat.NatCarriers(lab, {1: ("eim", None)})
    with pytest.raises(ValueError, match="either side"):
        nat.NatCarriers(lab, {2: (None, None)})
    with pytest.raises(ValueError, match="NAT kinds"):
        nat.NatCarriers(lab, {2: ("cone", None)})
