"""Direct site-to-site paths through real NATs (issue 16): a hub on the lab
internet and two sites, each behind its own endpoint-independent nftables
NAT (tests/netlab/nat.py NatLab), STUN from a real coturn, three real
agents.  A pings C's vNIC: the first packets go through the hub, then the
hub offers the pair a direct path, the sites punch through both NATs and
the hub's forwarded counter stops growing; when A's NAT box drops
everything between the two NATs (the direct path cut, the hub's paths
kept), the traffic goes back through the hub within the dead-detection
time and the pings go on.

Needs root/namespaces/nftables (netlab_ready fixture), coturn's
``turnserver``; each missing one skips with the reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402
from agentlab import Site, site_config  # noqa: E402
from natsites import STUN_PORT, lab_stun, start_stun  # noqa: E402
from netlab import nat  # noqa: E402

from mpvpn.core.noise import genpsk  # noqa: E402

HUB_IP = nat.INET_IPS[0]
SITES = {"a": (1, "172.30.0.1", "192.168.10.1"), "c": (3, "172.30.0.3", "192.168.30.1")}
KEEPALIVE, DEAD_AFTER = 0.3, 3  # dead detection ~0.9 s idle, less under traffic
TURN_MS = 100.0  # the agent acts on a dead verdict within the turn of its loop that made it


@pytest.fixture
def direct_lab(netlab_ready, request):
    """(lab, hub, sites): the sites behind NATs of the kind ``request.param``
    (default ``eim``); behind ``edm`` NATs they also have the lab's coturn as
    `config relay`."""
    reason = coturn.unavailable_reason()
    if reason:
        sys.stderr.write(f"\ndirect path lab test skipped: {reason}\n")
        pytest.skip(reason)
    kind = getattr(request, "param", "eim")
    relays = (f"\nconfig relay\n\toption address '{nat.INET_IPS[0]}:{STUN_PORT}'\n"
              "\toption username 'alice'\n\toption password 'secret'\n") if kind == "edm" else ""
    lab = nat.NatLab(kinds=(kind, kind))
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="mpvpn-direct-")
    agents = []
    try:
        server = lab_stun(lab)
        start_stun(server, lab)
        work = Path(tmp.name)
        psk = genpsk()
        stun = "".join(f"\tlist stun '{ip}:{STUN_PORT}'\n" for ip in nat.INET_IPS)
        fast = f"\toption keepalive_idle '{KEEPALIVE}'\n\toption dead_after '{DEAD_AFTER}'\n"

        def config(role, idx, vnc, lan, bind, extra, sections=""):
            text, network = site_config(role, psk, idx, vnc, lan, 1, fast + extra)
            text = text.replace(f"option bind_ip '10.1.0.{idx}'", f"option bind_ip '{bind}'")
            text = text.replace("option server_address '10.1.0.2:7000'",
                                f"option server_address '{HUB_IP}:7000'")
            return text.replace("255.255.255.252", "255.255.255.0") + sections, network

        hub = Site(lab, lab.inet, work, "hub")
        hub.write(*config("server", 2, "172.30.0.2", "192.168.20.1", HUB_IP,
                          "\toption hub_forward '1'\n"))
        sites = {}
        for (name, (idx, vnc, lan)), ns in zip(SITES.items(), lab.sites):
            s = Site(lab, ns.router, work, name)
            s.write(*config("client", idx, vnc, lan, ns.router_ip, stun + f"\toption name 'site-{name}'\n",
                            relays))
            sites[name] = s
        agents = [hub, *sites.values()]
        hub.start()
        hub.wait(lambda st: True, 10, "hub up")
        for s in sites.values():
            s.start()
        yield lab, hub, sites
    finally:
        for a in agents:
            if a.proc is not None:
                a.stop()
        if server is not None:
            server.close()
        lab.close()
        tmp.cleanup()


def _peer(st: dict, name: str) -> dict | None:
    for p in (st.get("direct") or {}).get("peers", []):
        if p["name"] == name:
            return p
    return None


def _connected(*sites, public: bool = True) -> None:
    """Wait until each site is connected to the hub (through its NAT, with a
    STUN mapping when ``public``) and was told of the other site."""
    for s in sites:
        s.wait(lambda st: st["state"] == "connected" and len(st["sessions"][0]["via"]) == 1
               and (not public or st["uplinks"][0]["public"] is not None),
               30, "connected to the hub through the NAT, the other site announced")


def _forwarded(hub) -> int:
    return hub.status()["counters"]["hub_forwarded"]


def test_two_sites_behind_nat_go_direct_and_back_through_the_hub_when_the_path_is_cut(direct_lab):
    lab, hub, sites = direct_lab
    a, c = sites["a"], sites["c"]
    na, nc = lab.sites
    _connected(a, c)
    # continuous pings A -> C's vNIC (through the hub first)
    t_ping = time.monotonic()
    ping = lab.popen(na.router, ["ping", "-n", "-i", "0.1", "-W", "1", SITES["c"][1]],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st_a = a.wait(lambda st: (_peer(st, "site-c") or {}).get("state") == "direct", 30,
                      "A's traffic to C direct")
        c.wait(lambda st: (_peer(st, "site-a") or {}).get("state") == "direct", 15, "C's traffic to A direct")
        to_direct = time.monotonic() - t_ping  # (polled every 0.1 s)
        pa = _peer(st_a, "site-c")
        assert pa["keyed_after"] is not None and pa["up_after"] is not None
        links = [ln for ln in st_a["links"] if ln["session_id"] == pa["session_id"]]
        assert links and all(ln["path"] == "punched" for ln in links), links
        # the hub forwards nothing more between them
        time.sleep(0.5)
        f0 = _forwarded(hub)
        time.sleep(2.0)
        assert _forwarded(hub) == f0
        # cut the direct path in A's NAT box: nothing between the two NATs' public addresses
        rules = ("table inet cut {\n chain f {\n  type filter hook forward priority -10;\n"
                 f"  ip daddr {nc.public_ip} drop\n  ip saddr {nc.public_ip} drop\n }}\n}}\n")
        lab.run(na.nat, ["nft", "-f", "-"], input=rules)
        t_cut = time.monotonic()
        st_a = a.wait(lambda st: (_peer(st, "site-c") or {}).get("state") == "via hub", 15,
                      "A's traffic to C back through the hub")
        waited = time.monotonic() - t_cut
        pa = _peer(st_a, "site-c")
        # the agent's own account: it moved the traffic at the dead verdict itself
        verdicts = [ln["dead_after_ms"] for ln in st_a["links"]
                    if ln["session_id"] == pa["session_id"] and ln["dead_after_ms"] is not None]
        assert pa["down_quiet"] is not None and verdicts
        assert pa["down_quiet"] * 1000 <= max(verdicts) + TURN_MS, (pa, verdicts)
        f1 = _forwarded(hub)
        time.sleep(2.0)
        assert _forwarded(hub) >= f1 + 10  # the pings go through the hub again
    finally:
        ping.terminate()
        out, _err = ping.communicate(timeout=10)
    seqs = sorted(int(x) for x in re.findall(r"icmp_seq=(\d+)", out))
    replies = len(seqs)
    lost = (seqs[-1] - seqs[0] + 1 - replies) if seqs else None
    sys.stderr.write(f"\ndirect lab: both sites direct {to_direct:.2f} s after the first ping; "
                     f"A direct {pa['up_after']} s after the hub's offer "
                     f"(keyed after {pa['keyed_after']} s); back through the hub "
                     f"{waited:.2f} s after the cut (agent: nothing heard for {pa['down_quiet']} s); "
                     f"{replies} ping replies, {lost} lost between the first and the last\n")
    assert replies > 0


def test_a_nat_reboot_with_new_ports_moves_the_direct_path_to_the_new_mapping(direct_lab):
    """Both sites direct through EIM NATs; A's NAT box reboots and hands out
    new public ports (conntrack flushed, 7100).  A's STUN round sees the new
    mapping, A tells the hub (UPDATE), the hub sends C an update of its
    offer with A's new candidate, and the pair is direct again on the new
    mapping: C's direct subflow is fed from A's new public port (C's NAT
    passes only what comes from where C sent to, so without the update
    nothing of A's reaches C), and the hub's forwarded counter stops again."""
    lab, hub, sites = direct_lab
    a, c = sites["a"], sites["c"]
    na, _nc = lab.sites
    _connected(a, c)
    ping = lab.popen(na.router, ["ping", "-n", "-i", "0.1", "-W", "1", SITES["c"][1]],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        a.wait(lambda st: (_peer(st, "site-c") or {}).get("state") == "direct", 30, "A's traffic to C direct")
        st_c = c.wait(lambda st: (_peer(st, "site-a") or {}).get("state") == "direct", 15,
                      "C's traffic to A direct")
        sid = _peer(st_c, "site-a")["session_id"]
        before = {ln["remote"] for ln in st_c["links"] if ln["session_id"] == sid}
        assert before and all(r.startswith(f"{na.public_ip}:") and not r.endswith(":7100") for r in before), before

        lab.reboot(na, port=7100)

        def moved(st):
            p = _peer(st, "site-a") or {}
            return p.get("state") == "direct" and any(
                ln["session_id"] == p.get("session_id") and ln["state"] == "established"
                and ln["remote"] == f"{na.public_ip}:7100" for ln in st["links"])

        c.wait(moved, 40, "C's direct subflow to A on A's new mapping")
        st_a = a.wait(lambda st: (_peer(st, "site-c") or {}).get("state") == "direct", 15,
                      "A's traffic to C direct again")
        assert st_a["uplinks"][0]["public"].endswith(":7100"), st_a["uplinks"][0]
        time.sleep(0.5)
        f0 = _forwarded(hub)
        time.sleep(2.0)
        assert _forwarded(hub) == f0  # the hub forwards nothing between them again
    finally:
        ping.terminate()
        out, _err = ping.communicate(timeout=10)
    seqs = sorted(int(x) for x in re.findall(r"icmp_seq=(\d+)", out))
    sys.stderr.write(f"\ndirect lab (NAT reboot): {len(seqs)} ping replies, "
                     f"{(seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else None} lost between the first and the last\n")
    assert seqs


@pytest.mark.parametrize("direct_lab", ["edm"], indirect=True)
def test_two_sites_behind_symmetric_nats_go_direct_through_a_relay(direct_lab):
    """Both sites behind endpoint-dependent NATs: punching cannot open the
    pair, so a site's relay (`config relay`) takes it after RELAY_AFTER; its
    relayed candidate reaches the other site as an update of the hub's offer,
    and their traffic leaves the hub all the same (through the relay)."""
    lab, hub, sites = direct_lab
    a, c = sites["a"], sites["c"]
    na, _nc = lab.sites
    _connected(a, c, public=False)
    ping = lab.popen(na.router, ["ping", "-n", "-i", "0.2", "-W", "1", SITES["c"][1]],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st_a = a.wait(lambda st: (_peer(st, "site-c") or {}).get("state") == "direct", 40,
                      "A's traffic to C direct through a relay")
        pa = _peer(st_a, "site-c")
        links = [ln for ln in st_a["links"] if ln["session_id"] == pa["session_id"]]
        assert any(ln["path"] == "relayed" for ln in links), links
        time.sleep(0.5)
        f0 = _forwarded(hub)
        time.sleep(2.0)
        assert _forwarded(hub) == f0
    finally:
        ping.terminate()
        out, _err = ping.communicate(timeout=10)
    sys.stderr.write(f"\ndirect lab (edm, relayed): A direct {pa['up_after']} s after the hub's offer; "
                     f"{len(re.findall(r'icmp_seq=', out))} ping replies\n")
