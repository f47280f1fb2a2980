"""NAT lab (tests/netlab/nat.py): STUN through real nftables NATs to a real
coturn in the lab's internet namespace classifies each NAT correctly.

Needs root/namespaces/nftables (netlab_ready fixture) and coturn's
``turnserver``; the conntrack tests also need ``conntrack``.  Each missing
one skips with the reason."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402
import netlab  # noqa: E402
from netlab import nat  # noqa: E402
from mpvpn import stun  # noqa: E402

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
STUN_PORT = 3478

CLIENT = r"""
import json, socket, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from mpvpn import stun
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

PROBE = r"""
import socket, sys, os
sys.path[:0] = [sys.argv[1]]
from mpvpn import stun
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
t = os.urandom(12)
s.sendto(stun.encode(stun.BINDING, stun.REQUEST, t), (sys.argv[2], int(sys.argv[3])))
sys.exit(0 if stun.decode(s.recvfrom(2048)[0]).txid == t else 1)
"""


def test_nat_rules_text():
    assert "masquerade\n" in nat.nat_rules("eim", "up")
    assert "masquerade random" not in nat.nat_rules("eim", "up")
    assert "masquerade random\n" in nat.nat_rules("edm", "up")
    with pytest.raises(ValueError):
        nat.nat_rules("full-cone", "up")


@pytest.fixture
def natlab(netlab_ready):
    reason = coturn.unavailable_reason()
    if reason:
        sys.stderr.write(f"\nNAT lab tests skipped: {reason}\n")
        pytest.skip(reason)
    lab = nat.NatLab(kinds=("eim", "edm"))
    try:
        server = coturn.Coturn(listen=nat.INET_IPS, port=STUN_PORT, relay_ip=nat.INET_IPS[0],
                               relay_ports=(50000, 50099), loopback_peers=False,
                               prefix=lab.prefix_argv(lab.inet))

        def probe():
            return lab.python(lab.inet, PROBE, str(SRC), nat.INET_IPS[0], str(STUN_PORT),
                              check=False, timeout=10).returncode == 0
        server.start(timeout=15, probe=probe)
        lab.coturn = server
        yield lab
    finally:
        srv = getattr(lab, "coturn", None)
        if srv is not None:
            srv.close()
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
    eim, edm = natlab.sites
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
    eim, edm = natlab.sites
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
