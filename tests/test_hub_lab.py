"""Site-to-site through the hub with real agents in network namespaces
(issue 16): a hub (router B) with three client sites (A, C, D) on their own
carriers (tests/hublab.py).  With ``base.hub_forward`` on every site's LAN
host pings every other site's LAN host and vNIC, the hub's kernel forwards
none of it (nftables counter in its forward hook), a site leaving takes its
routes away at the others and rejoining brings them back; with it off, the
sites learn nothing and cannot reach each other."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

from hublab import HubLab

from mpvpn.core.noise import genpsk

COUNT = 10
# ping waits for every reply up to a deadline (-w; without it, ping gives up
# two RTTs after its last probe, and a reply the loaded machine delays counts
# as lost although the tunnel delivered it)
WAIT_ALL = ("-w", "20")

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


def ping_all(lab, h: HubLab, names, expect: bool = True) -> dict:
    """Every site's LAN host pings every other site's LAN host; {(src, dst): received}."""
    got = {}
    for src in names:
        for dst in names:
            if src != dst:
                s, d = h.sites[src], h.sites[dst]
                got[(src, dst)] = lab.ping(s.host_ns, d.host_ip, count=COUNT, interval=0.02,
                                          extra=WAIT_ALL if expect else ()).received
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
                    p = lab.ping(h.sites[src].agent.ns, h.sites[dst].vnc, count=COUNT, interval=0.02,
                                 extra=WAIT_ALL)
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
            assert lab.ping(s.host_ns, "192.168.20.2", count=COUNT, interval=0.02,
                            extra=WAIT_ALL).received == COUNT
        assert set(ping_all(lab, h, list(h.sites), expect=False).values()) == {0}
        # A's router routes C's LAN into the vNIC anyway: its agent has no session for it
        lab.run(lab.ra, ["ip", "route", "add", h.sites["c"].lan, "dev", "mpvpn0"])
        assert lab.ping(lab.ha, h.sites["c"].host_ip, count=COUNT, interval=0.02).received == 0
        assert h.sites["a"].agent.status()["counters"]["tun_no_route"] >= COUNT
        st = h.hub.status()
        assert st["hub_forward"] is False and st["counters"]["hub_forwarded"] == 0
        assert kernel_forwarded(lab) == 0


JUNK_UDP = r"""
import os, random, socket, sys, time
targets = [(a, 7000) for a in sys.argv[1:]]
rng = random.Random(16)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
sent = 0
while not sys.stdin.closed:
    for t in targets:
        n = rng.choice((1, 7, 19, 20, 21, 60, 200, 1400))
        head = bytes([rng.choice((1, 2, 255)), rng.randrange(256)])
        try:
            s.sendto(head + os.urandom(n), t)
            sent += 1
        except OSError:
            pass
    if sent % 10 == 0:  # about 1000 datagrams/s: junk, not a flood the CPU cannot read
        time.sleep(0.01)
        import select
        if select.select([sys.stdin], [], [], 0)[0]:
            break
print(sent, flush=True)
"""

# IPv4/UDP with a forged source address (IP_HDRINCL), from a LAN host into its
# router and on through its tunnel: the hub must drop it.
SPOOFER = r"""
import socket, struct, sys, time
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
payload = struct.pack("!HHHH", 4000, 4000, 8 + 4, 0) + b"junk"
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                  socket.inet_aton(src), socket.inet_aton(dst))
for _ in range(count):
    s.sendto(hdr + payload, (dst, 0))
    time.sleep(0.005)
"""


def test_twenty_sites_one_restarting_one_sending_junk_and_nobody_else_loses_a_packet(make_lab):
    """1 hub, 20 client sites with 2 carriers each: numbered UDP streams
    between random pairs of 18 sites run while a 19th restarts in a loop
    and a 20th sends junk at the hub's uplinks and forged sources through
    its tunnel.  Every stream packet arrives exactly once (counted at the
    receiver after a quiet period: a packet the loaded machine delays is not
    lost), nobody else's session is touched, the junk and forgeries are
    counted."""
    import random
    import subprocess

    from agentlab import Stream

    lab = make_lab(carriers=2)
    letters = "cdefghijklmnopqrstu"  # with A: 20 client sites
    with HubLab(lab, letters, forward=True) as h:
        h.start()
        for name, s in h.sites.items():
            s.agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 60,
                         f"{name}'s routes to the 19 others")
        junk_site, restarting = h.sites["t"], h.sites["u"]
        others = [n for n in h.sites if n not in ("t", "u")]
        before = {se["peer"]["vnc"]["ip"]: se["session_id"] for se in h.hub.status()["sessions"]}

        rng = random.Random(16)
        pairs = [tuple(rng.sample(others, 2)) for _ in range(12)]
        streams = [Stream(lab, h.sites[a].host_ns, h.sites[b].host_ns, h.sites[b].host_ip, 6000 + i,
                          rate=50, quiet=3).start() for i, (a, b) in enumerate(pairs)]
        junk = lab.python_popen(junk_site.agent.ns, JUNK_UDP, "10.1.0.2", "10.2.0.2",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert junk.stdout.readline().strip() == "ready"
        spoof = lab.python_popen(junk_site.host_ns, SPOOFER, h.sites["c"].host_ip, h.sites["d"].host_ip, "200")
        restarts = 0
        try:
            for _ in range(3):  # the restart loop, while everything else runs
                restarting.agent.stop()
                restarting.agent.start()
                restarting.agent.wait_connected(lab.n, timeout=30)
                restarts += 1
        finally:
            junk.stdin.close()
            junk_sent = int(junk.stdout.readline() or 0)
            spoof.wait(30)
            for st in streams:
                st.src.stdin.close()
            counts = []
            for st in streams:
                sent = int(st.src.stdout.readline())
                got, dups, _last = map(int, st.sink.communicate(timeout=60)[0].split())
                counts.append((sent, got, dups))
        assert all(sent > 0 and got == sent and dups == 0 for sent, got, dups in counts), \
            list(zip(pairs, counts))
        assert restarts == 3 and junk_sent > 0
        st = h.hub.wait(lambda s: len(s["sessions"]) == 20, 30, "the restarted site back")
        after = {se["peer"]["vnc"]["ip"]: se["session_id"] for se in st["sessions"]}
        for n in others + ["t"]:  # nobody else's session was touched
            assert after[h.sites[n].vnc] == before[h.sites[n].vnc], n
        assert after[restarting.vnc] != before[restarting.vnc]
        c = st["counters"]
        assert c["malformed"] + c["unknown_session"] > 0  # the junk, counted
        assert c["hub_spoofed"] == 200
        fwd = {se["peer"]["vnc"]["ip"]: se["forwarded"] for se in st["sessions"]}
        assert fwd[junk_site.vnc]["spoofed"] == 200 and fwd[h.sites["d"].vnc]["spoofed"] == 0
        for name, s in h.sites.items():
            s.agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 30, f"{name}'s routes")


STORM = Path(__file__).resolve().parent.parent / "bench" / "hubstorm.py"


def test_a_crowd_of_sites_stays_connected_through_a_handshake_storm(make_lab, tmp_path):
    """Sites made as agents sharing one namespace (netlab add_crowd) connect
    like any site; a storm of junk first messages and of genuine handshakes
    with other sites' keys (bench/hubstorm.py: the real client machine over
    TCP) costs the established sessions nothing: every ping from A's LAN to
    the hub's LAN arrives, and no session of A or the crowd is replaced."""
    lab = make_lab(carriers=2)
    keys = [(f"s{k}", genpsk(), f"172.30.0.{150 + k}") for k in range(5)]
    sections = "".join(f"\nconfig site 's{k}'\n\toption psk '{psk}'\n" for k, (_n, psk, _v) in enumerate(keys))
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps(keys))
    with HubLab(lab, "", forward=True, crowd=4, hub_sections=sections) as h:
        h.start()
        before = {se["peer"]["vnc"]["ip"]: se["session_id"] for se in h.hub.status()["sessions"]}
        assert set(before) == {h.sites[n].vnc for n in ("a", "x0", "x1", "x2", "x3")}
        for name in ("x0", "x3"):  # a crowd site is routed at the hub like any other
            assert h.sites[name].lan in h.hub.status()["routes"]
        got = {}
        pinger = threading.Thread(target=lambda: got.update(ping=lab.ping(
            lab.ha, lab.hb_ip, count=400, interval=0.01, extra=("-w", "60"))))
        pinger.start()
        storms = {}
        source = h.sites["x0"].agent  # the crowd's namespace, its first member's address
        src_ip = lab.run(source.ns, ["ip", "-4", "-o", "addr", "show", "dev", "y1"]).stdout.split()[3]
        for kind in ("junk", "genuine"):
            cp = lab.run(source.ns, [sys.executable, str(STORM), kind, "--server", f"{lab.carrier(1).b_ip}:7000",
                                     "--keys", str(keyfile), "--seconds", "2", "--inflight", "8",
                                     "--source", src_ip.split("/")[0]], timeout=120)
            storms[kind] = json.loads(cp.stdout.strip().splitlines()[-1])
        pinger.join()
        ping = got["ping"]
        assert ping.sent == 400 and ping.received == 400, ping.output
        st = h.hub.status()
        assert storms["junk"]["counts"].get("closed_by_hub", 0) > 0
        assert storms["junk"]["counts"].get("answered", 0) == 0  # junk gets no word
        closed = st["control"]["closed_by_reason"]  # junk fails its MAC, or waits too long and is evicted
        assert closed.get("bad_psk", 0) > 0
        assert closed.get("bad_psk", 0) + closed.get("evicted", 0) >= storms["junk"]["counts"]["closed_by_hub"]
        assert storms["genuine"]["counts"].get("ok", 0) > 0
        after = {se["peer"]["vnc"]["ip"]: se["session_id"] for se in st["sessions"]
                 if se["peer"]["vnc"]["ip"] in before}
        assert after == before  # nobody was replaced or dropped
