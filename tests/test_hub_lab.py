"""Site-to-site through the hub with real agents in network namespaces
(issue 16): a hub (router B) with three client sites (A, C, D) on their own
carriers (tests/hublab.py).  With ``base.hub_forward`` on every site's LAN
host pings every other site's LAN host and vNIC, the hub's kernel forwards
none of it (nftables counter in its forward hook), a site leaving takes its
routes away at the others and rejoining brings them back; with it off, the
sites learn nothing and cannot reach each other."""

from __future__ import annotations

import re

from hublab import HubLab

COUNT = 10

# Counts what the hub's kernel forwards from its vNIC back into it (the
# trip site-to-site packets would take without the in-process path).
HUB_NFT = """table inet hubtest {
  chain hubfwd {
    type filter hook forward priority 0; policy accept;
    iifname "mpvpn0" oifname "mpvpn0" counter
  }
}
"""


def kernel_forwarded(lab) -> int:
    out = lab.run(lab.rb, ["nft", "list", "table", "inet", "hubtest"]).stdout
    return int(re.search(r"counter packets (\d+)", out).group(1))


def ping_all(lab, h: HubLab, names) -> dict:
    """Every site's LAN host pings every other site's LAN host; {(src, dst): received}."""
    got = {}
    for src in names:
        for dst in names:
            if src != dst:
                s, d = h.sites[src], h.sites[dst]
                got[(src, dst)] = lab.ping(s.host_ns, d.host_ip, count=COUNT, interval=0.02).received
    return got


def test_three_sites_reach_each_other_through_the_hub_and_follow_a_site_that_leaves(make_lab):
    lab = make_lab(carriers=2)
    with HubLab(lab, "cd", forward=True) as h:
        lab.run(lab.rb, ["nft", "-f", "-"], input=HUB_NFT)
        h.start()
        for name, s in h.sites.items():
            s.agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 20,
                         f"{name}'s routes to the other sites")
        names = list(h.sites)
        assert set(ping_all(lab, h, names).values()) == {COUNT}
        for src in names:  # and each router reaches the others' vNIC addresses
            for dst in names:
                if src != dst:
                    p = lab.ping(h.sites[src].agent.ns, h.sites[dst].vnc, count=COUNT, interval=0.02)
                    assert p.received == COUNT, (src, dst, h.hub.status()["counters"],
                                                 h.sites[src].agent.status()["counters"],
                                                 h.sites[dst].agent.status()["counters"],
                                                 h.hub.log()[-3000:], h.sites[dst].agent.log()[-2000:])
        st = h.hub.status()
        # each site sent COUNT requests to 2 others, answered 2 * COUNT, and the same for vNICs
        per_site = 4 * COUNT * 2
        fwd = {se["peer"]["vnc"]["ip"]: se["forwarded"] for se in st["sessions"]}
        assert {ip: (f["from_packets"], f["to_packets"], f["spoofed"], f["refused"])
                for ip, f in fwd.items()} == {s.vnc: (per_site, per_site, 0, 0) for s in h.sites.values()}
        assert st["counters"]["hub_forwarded"] == per_site * 3
        assert kernel_forwarded(lab) == 0  # all in-process: no trip through the hub's kernel
        sa = h.sites["a"].agent.status()
        assert sorted((v["name"], v["path"]) for v in sa["sessions"][0]["via"]) == \
            sorted((se["name"], "hub") for se in st["sessions"] if se["peer"]["vnc"]["ip"] != "172.30.0.1")

        # D leaves: A and C lose its routes by UPDATE, and do not reach it any more
        h.sites["d"].agent.stop()
        h.hub.wait(lambda s: len(s["sessions"]) == 2, 20, "D's session gone")
        for name in ("a", "c"):
            h.sites[name].agent.wait(lambda s, n=name: s["routes"] == h.expected_routes(n, ["a", "c"]),
                                     20, f"D's routes withdrawn at {name}")
        assert lab.ping(lab.ha, h.sites["d"].host_ip, count=3, interval=0.02).received == 0
        assert set(ping_all(lab, h, ["a", "c"]).values()) == {COUNT}  # the others are untouched

        # D rejoins: everything is back
        h.sites["d"].agent.start()
        h.wait_connected()
        for name, s in h.sites.items():
            s.agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 20,
                         f"{name}'s routes after D rejoined")
        assert set(ping_all(lab, h, names).values()) == {COUNT}
        assert kernel_forwarded(lab) == 0


def test_without_hub_forward_sites_reach_only_the_hub(make_lab):
    lab = make_lab(carriers=2)
    with HubLab(lab, "cd", forward=False) as h:
        lab.run(lab.rb, ["nft", "-f", "-"], input=HUB_NFT)
        h.start()
        for s in h.sites.values():
            st = s.agent.status()
            assert st["routes"] == ["192.168.20.0/24"] and st["sessions"][0]["via"] == []
            assert lab.ping(s.host_ns, "192.168.20.2", count=COUNT, interval=0.02).received == COUNT
        assert set(ping_all(lab, h, list(h.sites)).values()) == {0}
        # A's router routes C's LAN into the vNIC anyway: its agent has no session for it
        lab.run(lab.ra, ["ip", "route", "add", h.sites["c"].lan, "dev", "mpvpn0"])
        assert lab.ping(lab.ha, h.sites["c"].host_ip, count=COUNT, interval=0.02).received == 0
        assert h.sites["a"].agent.status()["counters"]["tun_no_route"] >= COUNT
        st = h.hub.status()
        assert st["hub_forward"] is False and st["counters"]["hub_forwarded"] == 0
        assert kernel_forwarded(lab) == 0
