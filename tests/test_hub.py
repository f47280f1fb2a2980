"""Site-to-site through the hub (base.hub_forward, issue 16): the hub's
decisions (mpvpn.core.hubforward), what a site accepts of the hub's
announcements (peercheck.usable_via), the ``via`` field of the hub's UPDATE,
and a hub with three client agents in this process over in-memory kernel
objects (tests/fakes.py; the namespace e2e is in tests/test_agent.py)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from agentlab import site_config
from fakes import MemoryHost, MemoryNet
from test_agent_inproc import FAST, ipv4_udp, run_agents, step_until

from mpvpn.agent import config as cfgmod
from mpvpn.agent.agent import Agent
from mpvpn.core import controlmsg, hubforward
from mpvpn.core.controlmsg import Bad, PeerInfo, ViaSite, Vnc, parse_message
from mpvpn.core.noise import genpsk
from mpvpn.core.pairing import Uplink
from mpvpn.core.peercheck import usable_via

CARRIERS = 2
HUB_LAN = "192.168.20.0/24"
# client sites: (index, vNIC address, LAN router address)
CLIENTS = {"a": (1, "172.30.0.1", "192.168.10.1"), "c": (3, "172.30.0.3", "192.168.30.1"),
           "d": (4, "172.30.0.4", "192.168.40.1")}


# ------------------------------------------------------------------ the decisions, alone

def v4(src: str, dst: str, payload: bytes = b"x") -> bytes:
    return ipv4_udp(src, dst, payload)


def v6(src: str, dst: str) -> bytes:
    return (bytes([0x60]) + bytes(7) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed + bytes(8))


def forwarder(enabled=True):
    fw = hubforward.HubForward(enabled)
    fw.rebuild([("A", "172.30.0.1", ("192.168.10.0/24", "fd10::/64")),
                ("C", "172.30.0.3", ("192.168.30.0/24", "192.168.10.128/25")),
                ("D", "172.30.0.4", ())])
    return fw


def test_a_packet_for_another_site_goes_to_that_sites_session_and_the_rest_to_the_tun():
    fw = forwarder()
    to_c = v4("192.168.10.5", "192.168.30.9")
    to_d_vnic = v4("172.30.0.1", "172.30.0.4")
    to_c_specific = v4("192.168.10.5", "192.168.10.200")  # C's more specific prefix
    to_hub = v4("192.168.10.5", "192.168.20.2")
    own = v4("192.168.10.5", "192.168.10.6")  # A's own LAN: as before, to the tun
    v6_to_nobody = v6("fd10::1", "fd30::1")
    local, out = fw.split("A", [to_c, to_hub, to_d_vnic, to_c_specific, own, v6_to_nobody, b"", b"\x45"])
    assert out == {"C": [to_c, to_c_specific], "D": [to_d_vnic]}
    assert local == [to_hub, own, v6_to_nobody, b"", b"\x45"]
    assert fw.counters["forwarded"] == 3 and fw.counters["forwarded_bytes"] == 3 * len(to_c)
    assert fw.site("A") == {"from_packets": 3, "from_bytes": 3 * len(to_c), "to_packets": 0,
                            "to_bytes": 0, "refused": 0, "spoofed": 0}
    assert fw.site("C")["to_packets"] == 2 and fw.site("D")["to_packets"] == 1


def test_a_source_outside_the_senders_claims_is_dropped_and_counted():
    fw = forwarder()
    spoofed = [v4("192.168.30.7", "172.30.0.4"),  # C's LAN as source, from A
               v4("10.0.0.1", "172.30.0.4"),  # nobody's
               v4("192.168.10.200", "172.30.0.4")]  # inside A's /24 but C's /25
    local, out = fw.split("A", spoofed + [v4("172.30.0.1", "172.30.0.4")])
    assert local == [] and list(out) == ["D"] and len(out["D"]) == 1
    assert fw.counters["spoofed"] == 3 and fw.site("A")["spoofed"] == 3


def test_with_forwarding_off_nothing_goes_from_one_site_to_another():
    fw = forwarder(enabled=False)
    pkts = [v4("192.168.10.5", "192.168.30.9"), v4("172.30.0.1", "172.30.0.4")]
    hub = v4("192.168.10.5", "192.168.20.2")
    local, out = fw.split("A", pkts + [hub])
    assert out == {} and local == [hub]
    assert fw.counters["refused"] == 2 and fw.site("A")["refused"] == 2
    assert fw.counters["forwarded"] == 0


def test_a_site_kept_apart_is_neither_told_nor_reached():
    sites = [(k, ViaSite(f"site-{k}", f"172.30.0.{k}", (f"192.168.{k}.0/24",))) for k in (1, 2, 3)]
    views, cut = hubforward.views(sites, apart={2})
    assert cut == 0 and views == {1: (sites[2][1],), 2: (), 3: (sites[0][1],)}
    fw = forwarder()
    fw.rebuild([("A", "172.30.0.1", ("192.168.10.0/24",)), ("C", "172.30.0.3", ("192.168.30.0/24",)),
                ("D", "172.30.0.4", ("192.168.40.0/24",))], apart={"D"})
    to_d, from_d = v4("192.168.10.5", "192.168.40.9"), v4("192.168.40.9", "192.168.10.5")
    to_c, d_to_hub = v4("192.168.10.5", "192.168.30.9"), v4("192.168.40.9", "192.168.20.2")
    assert fw.split("A", [to_d, to_c]) == ([], {"C": [to_c]})
    assert fw.split("D", [from_d, d_to_hub]) == ([d_to_hub], {})
    assert fw.site("A")["refused"] == 1 and fw.site("D")["refused"] == 1


def test_each_site_sees_all_others_within_the_message_budget():
    sites = [(k, ViaSite(f"site-{k}", f"172.30.0.{k}", (f"192.168.{k}.0/24",))) for k in (3, 1, 2)]
    views, cut = hubforward.views(sites)
    assert cut == 0
    assert [v.name for v in views[1]] == ["site-2", "site-3"]
    assert [v.name for v in views[3]] == ["site-1", "site-2"]
    one = len(controlmsg.dumps(sites[0][1].to_json())) + 1
    views, cut = hubforward.views(sites, budget=one)  # room for one entry per site
    assert all(len(v) == 1 for v in views.values()) and cut == 3
    views, cut = hubforward.views(sites, limit=0)
    assert all(v == () for v in views.values()) and cut == 6


# ------------------------------------------------------------------ the wire and what a site accepts

def _update(via) -> bytes:
    return controlmsg.dumps({"type": "UPDATE", "ack": 0, "plan": [], "via": via})


def test_via_is_parsed_strictly_and_only_from_the_hub():
    good = [{"name": "site-c", "vnc": "172.30.0.3", "lans": ["192.168.30.0/24"]}]
    m = parse_message(_update(good), from_client=False)
    assert m["via"] == (ViaSite("site-c", "172.30.0.3", ("192.168.30.0/24",)),)
    bad = [
        [{"name": "site-c", "vnc": "172.30.0.3"}],  # missing lans
        [{"name": "site-c", "vnc": "172.30.0.3", "lans": [], "x": 1}],
        [{"name": "bad name", "vnc": "172.30.0.3", "lans": []}],
        [{"name": "c", "vnc": "172.30.0.3/32", "lans": []}],
        [{"name": "c", "vnc": "172.30.0.3", "lans": ["192.168.30.1/24"]}],  # host bits
        [{"name": "c", "vnc": "172.30.0.3", "lans": ["10.0.0.0/8"] * (controlmsg.MAX_LANS + 1)}],
        [{"name": "c", "vnc": "172.30.0.3", "lans": []}, {"name": "c", "vnc": "172.30.0.4", "lans": []}],
        [{"name": f"s{i}", "vnc": f"10.0.{i // 250}.{i % 250}", "lans": []}
         for i in range(controlmsg.MAX_VIA + 1)],
        "site-c",
    ]
    for v in bad:
        with pytest.raises(Bad):
            parse_message(_update(v), from_client=False)
    client = controlmsg.dumps({"type": "UPDATE", "seq": 1, "lans": [], "via": good})
    with pytest.raises(Bad):  # a site cannot tell the hub what it forwards
        parse_message(client, from_client=True)


def test_a_site_routes_only_the_announced_sites_that_fit_with_its_own():
    ups = (Uplink("telecom", "telecom", "10.1.0.1", 7000),)
    me = PeerInfo("site-a", ups, Vnc("172.30.0.1", "255.255.255.0"), ("192.168.10.0/24",))
    via = (ViaSite("ok", "172.30.0.3", ("192.168.30.0/24",)),
           ViaSite("outside", "172.31.0.9", ()),
           ViaSite("me", "172.30.0.1", ()),
           ViaSite("hub", "172.30.0.2", ()),
           ViaSite("default", "172.30.0.5", ("0.0.0.0/0",)),
           ViaSite("mylan", "172.30.0.6", ("192.168.10.128/25",)),
           ViaSite("hublan", "172.30.0.7", ("192.168.20.0/24",)),
           ViaSite("vnic", "172.30.0.8", ("172.30.0.0/16",)),
           ViaSite("uplink", "172.30.0.9", ("10.1.0.0/16",)),
           ViaSite("again", "172.30.0.10", ("192.168.30.0/25",)),  # overlaps "ok"
           ViaSite("ok2", "172.30.0.11", ("192.168.50.0/24", "fd50::/64")))
    hub = PeerInfo("hub", (Uplink("telecom", "telecom", "10.1.0.2", 7000),),
                   Vnc("172.30.0.2", "255.255.255.0"), ("192.168.20.0/24",), via=via)
    kept, refused = usable_via(me, hub)
    assert [s.name for s in kept] == ["ok", "ok2"]
    assert [n for n, _why in refused] == ["outside", "me", "hub", "default", "mylan", "hublan",
                                          "vnic", "uplink", "again"]
    assert kept[0].routes == ["192.168.30.0/24", "172.30.0.3/32"]


# ------------------------------------------------------------------ a hub and three agents in this process

class HubClock:
    """time.monotonic, or a moment it is held at (``hold``)."""

    def __init__(self):
        self.held = None

    def __call__(self) -> float:
        return time.monotonic() if self.held is None else self.held

    def hold(self) -> None:
        self.held = time.monotonic()

    def release(self) -> None:
        self.held = None


class Hub:
    """Site B (server, LAN 192.168.20.0/24) with client sites A, C, D on one
    MemoryNet, every vNIC in 172.30.0.0/24."""

    def __init__(self, tmp_path, forward: bool = True, apart=None, direct: bool = False,
                 extra: str = "", per_site=None):
        """``apart``: None (one shared key) or the sites whose own key's
        `config site` section (every site then has one) says ``forward 0``;
        ``direct``: base.direct everywhere (direct paths between sites:
        tests/test_direct.py; off here, where the hub's forwarding is tested);
        ``extra``: more base options for every agent; ``per_site``: client
        name -> more base options for that site alone."""
        self.net = MemoryNet()
        self.hub_clock = HubClock()
        psk = genpsk()
        keys = {n: genpsk() if apart is not None else psk for n in CLIENTS}
        site_extra = FAST + ("" if direct else "\toption direct '0'\n") + extra
        extra = site_extra + ("\toption hub_forward '1'\n" if forward else "")
        sections = "".join(f"\nconfig site 'site_{n}'\n\toption psk '{keys[n]}'\n"
                           + ("\toption forward '0'\n" if n in apart else "")
                           for n in CLIENTS) if apart is not None else ""
        self.b, self.hb = self._site(tmp_path / "b", "server", psk, 2, "172.30.0.2", "192.168.20.1", extra,
                                     clock=self.hub_clock, sections=sections)
        self.sites = {}
        for name, (idx, vnc, lan) in CLIENTS.items():
            self.sites[name] = self._site(tmp_path / name, "client", keys[name], idx, vnc, lan,
                                          site_extra + (per_site or {}).get(name, ""))

    def _site(self, d, role, psk, idx, vnc, lan, extra, clock=time.monotonic, sections=""):
        d.mkdir()
        text, network = site_config(role, psk, idx, vnc, lan, carriers=CARRIERS, extra_base=extra)
        if sections:  # only the sites' own keys
            text = text.replace(f"\toption psk '{psk}'\n", "") + sections
        (d / "orayboxvpn").write_text(text.replace("255.255.255.252", "255.255.255.0"))
        (d / "network").write_text(network)
        cfg, problems = cfgmod.load_config(str(d))
        assert cfg is not None, problems
        host = MemoryHost(self.net, [f"10.{i}.0.{idx}" for i in range(1, CARRIERS + 1)])
        return Agent(cfg, uci_dir=str(d), run_dir=str(d / "run"), io=host, name=f"site-{d.name}",
                     clock=clock), host

    def agents(self):
        return [self.b] + [a for a, _h in self.sites.values() if a.tun is not None]

    def __enter__(self):
        self.b.setup()
        for a, _h in self.sites.values():
            a.setup()
        return self

    def __exit__(self, *exc):
        for a in self.agents():
            a.teardown()

    def until(self, pred, what: str, timeout: float = 10.0):
        return step_until(self.agents, pred, what, timeout)

    def run(self, seconds: float) -> None:
        run_agents(self.agents, seconds)

    def connected(self, names=tuple(CLIENTS)) -> None:
        def up(agent, sessions):
            st = agent.status()
            return len(st["sessions"]) == sessions and sum(
                ln["state"] == "established" for ln in st["links"]) == CARRIERS * sessions
        self.until(lambda: up(self.b, len(names)) and all(up(self.sites[n][0], 1) for n in names),
                   f"{', '.join(names)} connected to the hub over every carrier")

    def routes(self, name: str) -> set:
        return set(self.sites[name][1].netcfg.routes)


def lan(name: str) -> str:
    return CLIENTS[name][2].rsplit(".", 1)[0] + ".0/24"


def host(name: str) -> str:
    return CLIENTS[name][2].rsplit(".", 1)[0] + ".2"


def expected_routes(name: str, present=("a", "c", "d"), apart=()) -> set:
    out = {HUB_LAN}
    if name in apart:
        return out
    for other in present:
        if other != name and other not in apart:
            out |= {lan(other), CLIENTS[other][1] + "/32"}
    return out


def test_every_site_reaches_every_other_through_the_hub_and_a_leaving_site_is_withdrawn(tmp_path):
    with Hub(tmp_path) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        # every LAN host to every other site's LAN host and vNIC: out of that site's tun, intact
        sent = {n: [] for n in CLIENTS}
        for src in CLIENTS:
            for dst in CLIENTS:
                if dst == src:
                    continue
                for k in range(5):
                    p = v4(host(src), host(dst), b"%s->%s %d" % (src.encode(), dst.encode(), k))
                    sent[dst].append(p)
                    h.sites[src][1].tun.inject(p)
                p = v4(CLIENTS[src][1], CLIENTS[dst][1], b"vnic")
                sent[dst].append(p)
                h.sites[src][1].tun.inject(p)
        h.until(lambda: all(len(h.sites[n][1].tun.written) >= len(sent[n]) for n in CLIENTS),
                "every packet delivered")
        h.run(0.2)
        for n in CLIENTS:
            assert sorted(h.sites[n][1].tun.written) == sorted(sent[n]), n
        assert h.hb.tun.written == []  # none of it took a trip through the hub's kernel
        st = h.b.status()
        assert st["counters"]["hub_forwarded"] == 36 and st["counters"]["hub_spoofed"] == 0
        fwd = {se["name"]: se["forwarded"] for se in st["sessions"]}
        for n in CLIENTS:
            assert fwd[f"site-{n}"]["from_packets"] == 12 and fwd[f"site-{n}"]["to_packets"] == 12
        sa = h.sites["a"][0].status()
        assert sorted(v["name"] for v in sa["sessions"][0]["via"]) == ["site-c", "site-d"]
        # a spoofed source from A (C's LAN) towards D: dropped at the hub and counted
        h.sites["a"][1].tun.inject(v4(host("c"), host("d"), b"spoof"))
        h.until(lambda: h.b.status()["counters"]["hub_spoofed"] == 1, "the spoofed packet counted")
        assert len(h.sites["d"][1].tun.written) == len(sent["d"])
        # A leaves: C and D lose its routes (UPDATE), and get them back when it returns
        a, ha = h.sites["a"]
        a.teardown()
        h.until(lambda: all(h.routes(n) == expected_routes(n, ("c", "d")) for n in ("c", "d")),
                "A's routes withdrawn at C and D")
        assert ha.netcfg.routes == {}
        a.__init__(a.cfg, uci_dir=a.uci_dir, run_dir=a.run_dir, io=ha, name="site-a")
        a.setup()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "A's routes back")
        h.connected()
        ha.tun.written.clear()
        h.sites["d"][1].tun.inject(v4(host("d"), host("a"), b"welcome back"))
        h.until(lambda: ha.tun.written == [v4(host("d"), host("a"), b"welcome back")], "D reaches A again")


def test_without_hub_forward_sites_learn_nothing_and_a_forced_route_is_refused(tmp_path):
    with Hub(tmp_path, forward=False) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == {HUB_LAN} for n in CLIENTS), "each routing only the hub's LAN")
        h.run(0.3)
        assert all(h.routes(n) == {HUB_LAN} for n in CLIENTS)
        # a compromised site A routes C's LAN into its tunnel anyway: the hub drops it
        a, ha = h.sites["a"]
        ds = next(iter(a.sessions.values()))
        a._set_routes(ds, ds.routes + [lan("c"), "172.30.0.3/32"])
        for k in range(10):
            ha.tun.inject(v4(host("a"), host("c"), b"%d" % k))
        ha.tun.inject(v4("172.30.0.1", "172.30.0.3", b"vnic"))
        h.until(lambda: h.b.status()["counters"]["hub_refused"] == 11, "the hub refusing 11 packets")
        h.run(0.2)
        assert h.sites["c"][1].tun.written == [] and h.hb.tun.written == []
        fwd = {se["name"]: se["forwarded"] for se in h.b.status()["sessions"]}
        assert fwd["site-a"]["refused"] == 11 and fwd["site-c"]["to_packets"] == 0
        # the hub's own LAN is still reached
        ha.tun.inject(v4(host("a"), "192.168.20.2", b"hub"))
        h.until(lambda: h.hb.tun.written == [v4(host("a"), "192.168.20.2", b"hub")], "the hub's LAN")


def _record_deletions(hostobj) -> list:
    gone = []
    real = hostobj.netcfg.del_route

    def del_route(dst, ifname):
        gone.append(dst)
        return real(dst, ifname)
    hostobj.netcfg.del_route = del_route
    return gone


def test_a_reconnecting_site_keeps_the_other_sites_routed_until_the_hub_tells_it_again(tmp_path):
    """Fail closed: a new control session with the same hub replaces the old
    one; the other sites' routes are carried over (never deleted, so their
    traffic never takes the default route) until the hub's announcement."""
    with Hub(tmp_path) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        first = set(a.sessions)
        gone = _record_deletions(ha)
        a.rpc_handlers()["reconnect"]({})
        h.until(lambda: a.sessions and set(a.sessions) != first and a.status()["sessions"][0]["via"],
                "A's new session told about the others")
        h.run(0.3)
        assert gone == [] and h.routes("a") == expected_routes("a")


def test_carried_over_sites_are_withdrawn_when_the_hub_does_not_announce_them(tmp_path, monkeypatch):
    from mpvpn.agent import agent as agentmod

    monkeypatch.setattr(agentmod, "VIA_GRACE", 0.5)
    with Hub(tmp_path) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        a, ha = h.sites["a"]
        h.b.hub.enabled = False  # (as after a reload without hub_forward, minus the withdrawal)
        a.rpc_handlers()["reconnect"]({})
        h.until(lambda: h.routes("a") == {HUB_LAN}, "A's carried-over routes withdrawn")
        assert a.status()["sessions"][0]["via"] == []


def test_a_site_flapping_its_lans_costs_the_others_one_announcement_per_interval(tmp_path):
    """20 LAN changes of site A while the hub's clock stands still: C and D
    get the first change at once and then, once the interval has passed, one
    UPDATE with the final state; never one per flap."""
    from mpvpn.agent import agent as agentmod
    from mpvpn.core import controlconn

    with Hub(tmp_path) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        told = []
        real = controlconn.ServerConnection.send_update

        def send_update(conn, now, uplinks=None, lans=None, via=None):
            if via is not None:
                told.append((conn.peer.name, tuple(s.name for s in via),
                             tuple(x for s in via for x in s.lans)))
            return real(conn, now, uplinks, lans, via)
        controlconn.ServerConnection.send_update = send_update
        try:
            a, _ha = h.sites["a"]
            h.run(agentmod.HUB_ANNOUNCE_INTERVAL)  # (the last announcement round is over)
            h.hub_clock.hold()
            for k in range(20):
                for c in a.controls:
                    c.conn.send_update(time.monotonic(), lans=["192.168.%d.0/24" % (11 + k % 2)])
                    a._control_pump(c, time.monotonic())
                h.until(lambda k=k: h.b.registry.counters["sessions_opened"] and all(
                    "192.168.%d.0/24" % (11 + k % 2) in se["peer"]["lans"]
                    for se in h.b.status()["sessions"] if se["name"] == "site-a"), "the hub has A's flap")
            assert sorted(t[0] for t in told) == ["site-c", "site-d"]  # the first flap, at once
            h.hub_clock.release()
            h.until(lambda: len(told) == 4, "the final state announced")
            h.run(0.3)
        finally:
            controlconn.ServerConnection.send_update = real
        assert len(told) == 4
        assert all("192.168.12.0/24" in t[2] for t in told[2:])  # the last flap (k = 19)
        for n in ("c", "d"):
            h.until(lambda n=n: lan("a") not in h.routes(n) and "192.168.12.0/24" in h.routes(n),
                    f"{n} routes A's final LAN")


def test_hub_forward_applies_on_reload_and_the_sites_follow(tmp_path):
    """SIGHUP with hub_forward switched on: the same sessions, every site
    told about the others; switched off: everything withdrawn again."""
    with Hub(tmp_path, forward=False) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == {HUB_LAN} for n in CLIENTS), "only the hub's LAN")
        ids = set(h.b.sessions)
        conf = tmp_path / "b" / "orayboxvpn"
        conf.write_text(conf.read_text().replace("config base 'base'\n",
                                                 "config base 'base'\n\toption hub_forward '1'\n"))
        h.b.reload()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        assert set(h.b.sessions) == ids and h.b.status()["hub_forward"] is True
        conf.write_text(conf.read_text().replace("\toption hub_forward '1'\n", ""))
        h.b.reload()
        h.until(lambda: all(h.routes(n) == {HUB_LAN} for n in CLIENTS), "the others withdrawn")
        assert set(h.b.sessions) == ids and h.b.status()["hub_forward"] is False


def test_a_site_announces_at_most_max_lans():
    lans = [f"10.{i}.0.0/16" for i in range(controlmsg.MAX_LANS + 1)]
    for msg in ({"type": "UPDATE", "seq": 1, "lans": lans},
                {"type": "HELLO", "name": "s", "uplinks": [], "vnc": {"ip": "172.30.0.3", "netmask": "24"},
                 "lans": lans, "mode": "duplicate"}):
        with pytest.raises(Bad):
            parse_message(controlmsg.dumps(msg), from_client=True)
    assert parse_message(controlmsg.dumps({"type": "UPDATE", "seq": 1, "lans": lans[:-1]}),
                         from_client=True)["lans"] == tuple(lans[:-1])


@pytest.mark.parametrize("role, mask, warned", [
    ("server", "255.255.255.252", "room for one client site only"),
    ("server", "255.255.255.0", None),
    ("client", "255.255.255.0", "is a server option; a client ignores it"),
])
def test_check_warns_about_a_hub_that_cannot_forward(tmp_path, role, mask, warned):
    text, network = site_config(role, genpsk(), 2, "172.30.0.2", "192.168.20.1", carriers=1,
                                extra_base="\toption hub_forward '1'\n")
    (tmp_path / "orayboxvpn").write_text(text.replace("255.255.255.252", mask))
    (tmp_path / "network").write_text(network)
    cfg, problems = cfgmod.load_config(str(tmp_path))
    assert cfg is not None and cfg.base.hub_forward is (role == "server")
    found = [p for p in problems if "hub_forward" in str(p)]
    if warned is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].severity == cfgmod.WARNING and warned in str(found[0])


def test_a_site_with_forward_0_stays_apart_and_reload_brings_it_in(tmp_path):
    """Per-site keys; `config site` site_d has forward 0: A and C reach each
    other, D is told about nobody and nobody about D, a route forced at A
    towards D is refused at the hub, D still reaches the hub's LAN.  Setting
    forward 1 (SIGHUP, sessions kept) brings D in."""
    with Hub(tmp_path, apart=("d",)) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n, apart=("d",)) for n in CLIENTS),
                "A and C routing each other, D apart")
        assert [se["site"] for se in sorted(h.b.status()["sessions"], key=lambda x: x["name"])] == \
            ["site_a", "site_c", "site_d"]
        a, ha = h.sites["a"]
        ds = next(iter(a.sessions.values()))
        a._set_routes(ds, ds.routes + [lan("d")])  # a compromised A
        ha.tun.inject(v4(host("a"), host("d"), b"to d"))
        ha.tun.inject(v4(host("a"), host("c"), b"to c"))
        h.until(lambda: h.sites["c"][1].tun.written == [v4(host("a"), host("c"), b"to c")], "A reaches C")
        h.until(lambda: h.b.status()["counters"]["hub_refused"] == 1, "A -> D refused")
        hd = h.sites["d"][1]
        hd.tun.inject(v4(host("d"), "192.168.20.2", b"hub"))
        h.until(lambda: h.hb.tun.written == [v4(host("d"), "192.168.20.2", b"hub")], "D reaches the hub")
        assert hd.tun.written == []
        ids = set(h.b.sessions)
        conf = tmp_path / "b" / "orayboxvpn"
        conf.write_text(conf.read_text().replace("\toption forward '0'\n", ""))
        h.b.reload()
        h.until(lambda: all(h.routes(n) == expected_routes(n) | ({lan("d")} if n == "a" else set())
                            for n in CLIENTS), "D brought in")
        assert set(h.b.sessions) == ids


def test_a_site_key_added_on_reload_is_accepted_without_a_restart(tmp_path):
    with Hub(tmp_path, apart=()) as h:
        h.connected()
        ids = set(h.b.sessions)
        key = genpsk()
        conf = tmp_path / "b" / "orayboxvpn"
        conf.write_text(conf.read_text() + f"\nconfig site 'site_e'\n\toption psk '{key}'\n")
        h.b.reload()
        e, he = h._site(tmp_path / "e", "client", key, 5, "172.30.0.5", "192.168.50.1", FAST)
        h.sites["e"] = (e, he)
        e.setup()
        try:
            h.until(lambda: len(h.b.sessions) == 4, "E's session")
            assert ids < set(h.b.sessions)
            st = {se["name"]: se["site"] for se in h.b.status()["sessions"]}
            assert st["site-e"] == "site_e"
            h.until(lambda: "192.168.50.0/24" in h.routes("a"), "A told about E")
        finally:
            del h.sites["e"]
            e.teardown()


def test_mpvpn_status_text_lists_a_hubs_sites_and_a_sites_peers_via_the_hub(tmp_path, capsys):
    from mpvpn import cli

    with Hub(tmp_path) as h:
        h.connected()
        h.until(lambda: all(h.routes(n) == expected_routes(n) for n in CLIENTS), "every site's routes")
        h.sites["a"][1].tun.inject(v4(host("a"), host("c"), b"x"))
        h.until(lambda: h.b.status()["counters"]["hub_forwarded"] == 1, "one packet forwarded")
        cli._print_status(h.b.status())
        hub = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("site ")]
        assert hub == ["site site-a 172.30.0.1 LANs 192.168.10.0/24: forwarded to others 1 pkts, from others 0 pkts",
                       "site site-c 172.30.0.3 LANs 192.168.30.0/24: forwarded to others 0 pkts, from others 1 pkts",
                       "site site-d 172.30.0.4 LANs 192.168.40.0/24: forwarded to others 0 pkts, from others 0 pkts"]
        cli._print_status(h.sites["a"][0].status())
        via = [ln.strip() for ln in capsys.readouterr().out.splitlines() if "via hub" in ln]
        assert via == ["via hub site-b: site-c 172.30.0.3 LANs 192.168.30.0/24",
                       "via hub site-b: site-d 172.30.0.4 LANs 192.168.40.0/24"]
