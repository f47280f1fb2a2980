"""NAT traversal end to end (issue 15, e2e tests 1 and 4): two real agents
in the namespace lab, the ``mobile`` carrier (3) of both sites behind
endpoint-independent nftables NAT boxes (tests/netlab/nat.py NatCarriers),
coturn as the STUN server in the lab internet, real conntrack.

Needs root/namespaces/nftables (netlab_ready), coturn's ``turnserver`` and
``conntrack``; each missing one skips with the reason.  Durations are
never asserted: recovery is checked with the agents' own counters (the
session id, the subflow's ups/downs, the uplink's mapping changes)."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from natsites import MOBILE, NatSites, link, punched_up, unavailable_reason, uplink  # noqa: E402
from stats import binomial_interval  # noqa: E402


@pytest.fixture
def nat_sites(make_lab):
    """Factory: (lab, NatCarriers, TwoSites) with mobile behind NATs of
    ``kinds`` and coturn answering STUN on the lab internet (tests/natsites.py)."""
    reason = unavailable_reason()
    if reason:
        sys.stderr.write(f"\nNAT e2e tests skipped: {reason}\n")
        pytest.skip(reason)
    made = []

    def make(extra_base: str = "", kinds=("eim", "eim")):
        ns = NatSites(make_lab(carriers=3), kinds, extra_base)
        made.append(ns)
        return ns.lab, ns.nc, ns.sites

    yield make
    for ns in reversed(made):
        ns.close()


def start_punched(sites) -> int:
    """Start both agents, wait for 3 of 3 subflows with mobile punched; the session id."""
    sites.start(wait=False)
    a = sites.a.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    sites.b.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    return a["session_id"]


def recovered_towards(peer_public: str, port: int = 7100):
    """Status predicate: mobile established, sending to the peer's new NAT
    mapping ``peer_public:port``, our own new mapping learnt (after a NAT reboot)."""
    def recovered(st):
        ln = link(st, "mobile")
        return (ln["state"] == "established" and ln["remote"] == f"{peer_public}:{port}"
                and (uplink(st, "mobile")["public"] or "").endswith(f":{port}"))
    return recovered


@pytest.mark.parametrize("kinds", [("eim", "eim"), (None, "eim")], ids=["both", "server-only"])
def test_mobile_behind_nat_is_punched(nat_sites, kinds):
    """e2e 1: both `mobile` uplinks behind endpoint-independent NATs (and:
    only the server's, the CGNAT case that used to cost the subflow): STUN
    finds each public mapping, the candidates cross the control connection,
    both ends punch, and all 3 subflows come up (mobile `punched`, the
    others `direct`); LAN-to-LAN ping works, also with mobile alone."""
    lab, nc, sites = nat_sites(kinds=kinds)
    mc = nc.carrier(MOBILE)
    sites.start(wait=False)
    a = sites.a.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    b = sites.b.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    for st, public, kind in ((a, mc.a_public, kinds[0]), (b, mc.b_public, kinds[1])):
        up = uplink(st, "mobile")
        assert up["public"] == f"{public}:7000", up  # the EIM box keeps the port
        assert up["nat"] == ("endpoint-independent" if kind else "none"), up
        # (without NAT the first answer ends the round: the second one is late)
        assert set(up["stun"]["drops"]) <= ({"unknown_transaction"} if not kind else set()), up
        for other in ("telecom", "unicom"):
            assert link(st, other)["path"] == "direct" and link(st, other)["relay"] is None
            assert uplink(st, other)["public"] is None  # no way to the STUN servers there
    # each side's mobile subflow talks to the other's public mapping
    assert link(a, "mobile")["remote"] == f"{mc.b_public}:7000"
    assert link(b, "mobile")["remote"] == f"{mc.a_public}:7000"
    assert a["session_id"] == b["session_id"]
    p = lab.ping(lab.ha, "192.168.20.2", count=20, interval=0.02)
    assert p.received == 20, p
    # mobile alone carries the LANs' traffic
    lab.link_down(1)
    lab.link_down(2)
    sites.a.wait(lambda st: sum(ln["state"] == "established" for ln in st["links"]) == 1
                 and link(st, "mobile")["state"] == "established", 30, "only mobile up")
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p
    assert link(sites.a.status(), "mobile")["downs"] == 0


def test_with_loss_on_every_carrier_delivered_loss_is_p_cubed_with_mobile_punched(nat_sites):
    """e2e 1's loss part: 20 % loss on every carrier (the punched mobile one
    included), duplicate mode: a packet is lost only when all three lose it
    (p^3 = 0.8 %), so the punched subflow carries its full share.  NACK
    repair (on by default) off: it would repair the p^3 residue this counts."""
    lab, nc, sites = nat_sites(extra_base="\toption nack '0'\n")
    sites.start(wait=False)
    sites.a.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    sites.b.wait(punched_up, 30, "3 of 3 subflows, mobile punched")
    for c in (1, 2, 3):
        lab.set_loss(c, 20, direction="a2b")  # echo requests cross lossy carriers, replies do not
    n = 3000
    p = lab.ping(lab.ha, "192.168.20.2", count=n, interval=0.004, timeout=2.0)
    lost = p.sent - p.received
    lo, hi = binomial_interval(p.sent, 0.2 ** 3)
    assert p.sent == n and lo <= lost <= hi, (lost, (lo, hi))
    st = sites.b.status()
    mobile = link(st, "mobile")
    assert mobile["path"] == "punched" and mobile["state"] == "established"
    # the punched subflow delivered about 80 % of the requests (as each carrier)
    assert mobile["rx_packets"] >= binomial_interval(n, 0.8)[0], mobile


def test_nat_mapping_expiry_and_reboot_without_a_session_restart(nat_sites):
    """e2e 4, scaled down: NAT UDP timeout 3 s, keepalive_idle 10 s capped
    by nat_keepalive 1.5 s.  Idle for 3 timeouts: mobile never goes down.
    Then both NATs reboot (conntrack flushed, new mappings on port 7100):
    both agents notice (the STUN round that goes with an idle keepalive, or
    the subflow going down), send their new candidates, punch again (an
    established pair rushes: docs/nat.md), and mobile is back on the new
    mappings in the same session."""
    lab, nc, sites = nat_sites("\toption keepalive_idle '10'\n\toption nat_keepalive '1.5'\n")
    mc = nc.carrier(MOBILE)
    for site in (mc.a_site, mc.b_site):
        nc.set_udp_timeout(site, 3)
    sid = start_punched(sites)
    # idle: 3 NAT timeouts with no user traffic (keepalives only)
    time.sleep(9)
    for site in (sites.a, sites.b):
        st = site.status()
        ln = link(st, "mobile")
        assert ln["state"] == "established" and ln["downs"] == 0, ln
        assert st["session_id"] == sid
    for site in (mc.a_site, mc.b_site):  # the mappings are there (held open by keepalives)
        assert any("dport=7000" in e for e in nc.conntrack_udp(site))
    # NAT reboot on both sides: new public port
    for site in (mc.a_site, mc.b_site):
        nc.reboot(site, port=7100)

    a = sites.a.wait(recovered_towards(mc.b_public), 30, "mobile re-punched on the new mappings")
    b = sites.b.wait(recovered_towards(mc.a_public), 30, "mobile re-punched on the new mappings")
    for st in (a, b):
        assert st["session_id"] == sid  # the session lived on
        assert uplink(st, "mobile")["stun"]["changes"] >= 1
        ln = link(st, "mobile")
        assert ln["downs"] + ln["roams"] >= 1  # went down and up, or moved while established
        assert sum(ln["state"] == "established" for ln in st["links"]) == 3
    assert link(b, "mobile")["remote"] == f"{mc.a_public}:7100"  # follows the new mapping
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p


def test_a_nat_reboot_with_a_long_keepalive_is_recovered_before_any_dead_verdict(nat_sites):
    """keepalive_idle = nat_keepalive = 10 s: the dead verdict would need
    (dead_after + 1) x 10 = 40 s of silence (session 5 waited for it: 99 s
    at 25 s).  After both NATs reboot, the first idle keepalive's STUN round
    sees the new mapping and the established pair rushes (docs/nat.md): it
    is back on the new mappings without going down (downs stays 0: no
    verdict came first, however slow the machine)."""
    lab, nc, sites = nat_sites("\toption keepalive_idle '10'\n\toption nat_keepalive '10'\n")
    mc = nc.carrier(MOBILE)
    sid = start_punched(sites)
    time.sleep(2)
    for site in (mc.a_site, mc.b_site):
        nc.reboot(site, port=7100)

    a = sites.a.wait(recovered_towards(mc.b_public), 30, "mobile moved to the new mappings")
    b = sites.b.wait(recovered_towards(mc.a_public), 30, "mobile moved to the new mappings")
    for st in (a, b):
        ln = link(st, "mobile")
        assert st["session_id"] == sid and ln["downs"] == 0 and ln["roams"] >= 1, ln
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p


def test_a_server_behind_nat_without_stun_is_reached_by_punching_anyway(nat_sites):
    """The server's mobile uplink sits behind an EIM NAT and neither site has
    base.stun: nothing tells either end about the NAT, the address the
    server announces for mobile is its private one, and the client's
    CONNECTs to it go nowhere.  After PUNCH_ANYWAY_AFTER the server (the
    responder) punches anyway: its probes reach the client's mobile uplink
    from the NAT's mapping, the client follows their source, and its next
    CONNECT passes the NAT that the probes opened (session 5 never opened
    this pair)."""
    from agentlab import site_config

    from mpvpn.core.noise import genpsk

    lab, nc, sites = nat_sites(kinds=(None, "eim"))
    mc = nc.carrier(MOBILE)
    psk = genpsk()
    for site, role, idx, vnc, lan, ip in ((sites.a, "client", 1, "172.30.0.1", "192.168.10.1", mc.a_ip),
                                          (sites.b, "server", 2, "172.30.0.2", "192.168.20.1", mc.b_ip)):
        text, net = site_config(role, psk, idx, vnc, lan, 3, "")  # no base.stun
        site.write(text.replace(f"option bind_ip '10.{MOBILE}.0.{idx}'", f"option bind_ip '{ip}'"), net)
    sites.start(wait=False)

    def mobile_up(st):
        return sum(ln["state"] == "established" for ln in st["links"]) == 3 and st
    a = sites.a.wait(mobile_up, 30, "3 of 3 subflows, mobile punched anyway")
    b = sites.b.wait(mobile_up, 30, "3 of 3 subflows, mobile punched anyway")
    assert link(a, "mobile")["remote"] == f"{mc.b_public}:7000"  # followed the probes' source
    assert link(b, "mobile")["path"] == "punched" and link(a, "mobile")["path"] == "punched"
    assert uplink(b, "mobile")["public"] is None  # (no STUN: nobody told it)
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p
