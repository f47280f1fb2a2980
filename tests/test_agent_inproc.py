"""Two Agents in this process, back to back through in-memory kernel objects
(tests/fakes.py): the data path (mpvpn.agent.send, mpvpn.agent.receive) and the control
wiring, run by the agents' own selector loops and real clock.  No root, no
namespaces, no network: these run for any user."""

from __future__ import annotations

import ipaddress
import time

import pytest
from agentlab import WAIT_SCALE, site_config
from fakes import MemoryHost, MemoryNet

from mpvpn.agent import config as cfgmod
from mpvpn.agent import receive, send
from mpvpn.agent.agent import Agent
from mpvpn.core import wire
from mpvpn.core.noise import genpsk

CARRIERS = 3
FAST = "\toption keepalive_idle '0.2'\n\toption keepalive_active '0.1'\n"


def ipv4_udp(src: str, dst: str, payload: bytes, sport: int = 5000, dport: int = 6000) -> bytes:
    """An IPv4/UDP packet (checksums zero: nothing on the way checks them)."""
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    total = 20 + len(udp) + len(payload)
    hdr = (bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, 17]) + b"\0\0"
           + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    return hdr + udp + payload


def ipv4_syn(src: str, dst: str, mss: int) -> bytes:
    """An IPv4 TCP SYN with an MSS option (checksums zero)."""
    tcp = (bytes([0x30, 0x39, 0x00, 0x50]) + bytes(8) + bytes([0x60, 0x02]) + (65535).to_bytes(2, "big")
           + bytes(4) + bytes([2, 4]) + mss.to_bytes(2, "big"))
    hdr = (bytes([0x45, 0]) + (20 + len(tcp)).to_bytes(2, "big") + bytes(4) + bytes([64, 6]) + b"\0\0"
           + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    return hdr + tcp



def run_agents(agents, seconds: float) -> None:
    """Turn the agents' loops (``agents()``: the ones running now) for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for a in agents():
            a.step(0.002)


def step_until(agents, pred, what: str, timeout: float = 10.0):
    """Turn the agents' loops (``agents()``: the ones running now) until
    ``pred()`` is true; its value, or a failed assertion naming ``what``."""
    end = time.monotonic() + timeout * WAIT_SCALE
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        for a in agents():
            a.step(0.002)

class Pair:
    """Site A (client, LAN 192.168.10.0/24) and site B (server, LAN
    192.168.20.0/24) as in tests/agentlab.py, on one MemoryNet."""

    def __init__(self, tmp_path, psk=None, psk_b=None, extra_base=FAST, drop=None, b_sections=""):
        psk = psk or genpsk()
        self.net = MemoryNet(drop=drop)
        self.a, self.ha = self._site(tmp_path / "a", "client", psk, 1, "172.30.0.1", "192.168.10.1", extra_base)
        self.b, self.hb = self._site(tmp_path / "b", "server", psk_b or psk, 2, "172.30.0.2", "192.168.20.1",
                                     extra_base, b_sections)

    def _site(self, d, role, psk, idx, vnc, lan, extra_base, sections=""):
        d.mkdir()
        text, network = site_config(role, psk, idx, vnc, lan, carriers=CARRIERS, extra_base=extra_base)
        (d / "orayboxvpn").write_text(text + sections)
        (d / "network").write_text(network)
        cfg, problems = cfgmod.load_config(str(d))
        assert cfg is not None, problems
        host = MemoryHost(self.net, [f"10.{i}.0.{idx}" for i in range(1, CARRIERS + 1)])
        return Agent(cfg, uci_dir=str(d), run_dir=str(d / "run"), io=host, name=f"site-{role}"), host

    def __enter__(self):
        self.b.setup()
        self.a.setup()
        return self

    def __exit__(self, *exc):
        for agent in (self.a, self.b):
            agent.teardown()

    def run(self, seconds: float) -> None:
        run_agents(lambda: (self.a, self.b), seconds)

    def until(self, pred, what: str, timeout: float = 10.0):
        return step_until(lambda: (self.a, self.b), pred, what, timeout)

    def connected(self, subflows: int = CARRIERS):
        def ok():
            sa, sb = self.a.status(), self.b.status()
            return all(s["state"] == "connected" and sum(ln["state"] == "established" for ln in s["links"])
                       == subflows for s in (sa, sb)) and (sa, sb)
        return self.until(ok, f"both sites connected over {subflows} subflows")


def test_header_offsets_of_the_receive_path_are_the_wire_layout():
    hdr = wire.encode_header(wire.DATA, 7, 0x01020304, 99, 0, flags=wire.F_SEALED)
    assert hdr[receive.MEMBER] == 7
    assert receive.session_id_of(hdr) == 0x01020304
    assert hdr[receive.SESSION_KEY] == bytes([7, wire.F_SEALED, 1, 2, 3, 4])
    assert receive.MIN_DATAGRAM == len(hdr) == 20


def test_the_syn_pre_filter_passes_exactly_what_mss_clamp_may_change():
    syn = ipv4_syn("192.168.10.2", "192.168.20.2", 1460)
    ack = bytearray(syn)
    ack[send.IPV4_HLEN + send.TCP_FLAGS] = 0x10
    assert send.may_be_syn(syn) and not send.may_be_syn(bytes(ack))
    assert not send.may_be_syn(ipv4_udp("192.168.10.2", "192.168.20.2", bytes(40)))
    assert send.may_be_syn(b"\x46" + bytes(60))  # IPv4 options: mss.clamp looks
    assert not send.may_be_syn(syn[:43])
    counters = {"mss_clamped": 0}
    out = send.clamp_syn([syn], (1380, 1360), counters)
    assert out != [syn] and int.from_bytes(out[0][42:44], "big") == 1380 and counters["mss_clamped"] == 1
    assert send.clamp_syn([syn], None, counters) == [syn]
    assert send.clamp_syn([syn, syn], (1380, 1360), counters) == [syn, syn] and counters["mss_clamped"] == 1


def test_control_handshake_over_an_in_memory_stream_installs_routes(tmp_path):
    with Pair(tmp_path) as p:
        sa, sb = p.connected()
        assert sa["session_id"] == sb["session_id"] and sa["session_id"]
        assert sa["peer"]["name"] == "site-server" and sb["peer"]["name"] == "site-client"
        assert p.ha.netcfg.routes == {"192.168.20.0/24": "mpvpn0"}
        assert p.hb.netcfg.routes == {"192.168.10.0/24": "mpvpn0"}
        assert p.ha.links["mpvpn0"]["address"] == "172.30.0.1/30"
        assert sa["control"]["state"] == "established" and sb["control"]["connections"] == 1
    assert p.ha.netcfg.routes == {} and p.hb.netcfg.routes == {}  # removed on stop
    assert "mpvpn0" not in p.ha.links


def test_a_wrong_psk_gives_no_session_and_says_why(tmp_path):
    with Pair(tmp_path, psk=genpsk(), psk_b=genpsk()) as p:
        p.until(lambda: p.b.control_counters.get("bad_psk", 0) >= 1, "the server refusing")
        st = p.until(lambda: (lambda s: s["last_error"] and "PSK" in s["last_error"] and s)(p.a.status()),
                     "the client saying why")
        assert st["state"] == "connecting" and st["session_id"] is None
        assert p.a.sessions == {} and p.b.sessions == {}
        assert p.ha.netcfg.routes == {} and p.b.status()["sessions"] == []


def test_a_packet_written_into_one_tun_comes_out_of_the_other(tmp_path):
    with Pair(tmp_path) as p:
        p.connected()
        there = [ipv4_udp("192.168.10.2", "192.168.20.2", b"to B %d" % i) for i in range(20)]
        back = [ipv4_udp("192.168.20.2", "192.168.10.2", b"to A %d" % i) for i in range(20)]
        for pkt in there:
            p.ha.tun.inject(pkt)
        for pkt in back:
            p.hb.tun.inject(pkt)
        p.until(lambda: len(p.hb.tun.written) >= 20 and len(p.ha.tun.written) >= 20, "both ways delivered")
        p.run(0.2)  # (and nothing more comes)
        assert p.hb.tun.written == there and p.ha.tun.written == back
        # nowhere to go: counted, not sent
        p.ha.tun.inject(ipv4_udp("192.168.10.2", "8.8.8.8", b"x"))
        p.until(lambda: p.a.counters["tun_no_route"] == 1, "the unrouted packet counted")


def test_duplicate_mode_sends_every_packet_on_each_subflow_and_delivers_it_once(tmp_path):
    seen: dict = {}  # carrier (second octet of the source) -> DATA datagrams A sent

    def count(src, dst, d):
        if src[0].endswith(".1") and d[1] == wire.DATA:
            carrier = int(src[0].split(".")[1])
            seen[carrier] = seen.get(carrier, 0) + 1
        return False

    with Pair(tmp_path, drop=count) as p:
        p.connected()
        assert not seen  # no user data yet
        n = 30
        for i in range(n):
            p.ha.tun.inject(ipv4_udp("192.168.10.2", "192.168.20.2", b"dup %d" % i))
        p.until(lambda: len(p.hb.tun.written) >= n, "delivered")
        p.run(0.2)
        assert seen == {c: n for c in range(1, CARRIERS + 1)}
        assert len(p.hb.tun.written) == n
        cb = p.b.status()["counters"]
        assert cb["delivered"] == n and cb["duplicates"] == (CARRIERS - 1) * n


def test_a_subflow_that_loses_everything_goes_down_and_nothing_is_lost(tmp_path):
    lose = {"on": False}

    def drop(src, dst, d):  # carrier 2 goes dark, both ways
        return lose["on"] and (src[0].startswith("10.2.") or dst[0].startswith("10.2."))

    with Pair(tmp_path, drop=drop) as p:
        p.connected()
        lose["on"] = True
        pkts = [ipv4_udp("192.168.10.2", "192.168.20.2", b"loss %d" % i) for i in range(40)]
        for pkt in pkts:
            p.ha.tun.inject(pkt)
        p.until(lambda: len(p.hb.tun.written) >= 40, "delivered over the other carriers")
        assert p.hb.tun.written == pkts
        assert p.net.dropped > 0
        sa, sb = p.connected(subflows=CARRIERS - 1)  # the dark one is declared down
        down = [ln for ln in sa["links"] if ln["state"] != "established"]
        assert [ln["type"] for ln in down] == ["unicom"]
        lose["on"] = False  # and it comes back
        p.connected()


def test_rekey_by_volume_through_the_control_wiring_loses_nothing(tmp_path):
    """note_sealed -> the control connection's KEYS exchange -> Sealer.rotate
    on both agents, while packets flow: every packet arrives once, none fails
    authentication, the session stays."""
    with Pair(tmp_path, extra_base=FAST + "\toption rekey_packets '1000'\n") as p:
        sa, _ = p.connected()
        epoch0, sid = sa["sessions"][0]["epoch"], sa["session_id"]
        n = 2500  # 2.5 budgets of 1000 packets
        pkts = [ipv4_udp("192.168.10.2", "192.168.20.2", b"rekey %d" % i) for i in range(n)]
        for i in range(0, n, 50):  # in bursts, as traffic comes
            for pkt in pkts[i:i + 50]:
                p.ha.tun.inject(pkt)
            p.run(0.01)
        p.until(lambda: len(p.hb.tun.written) >= n, "delivered")
        p.run(0.2)
        assert p.hb.tun.written == pkts
        st_a, st_b = p.a.status(), p.b.status()
        vol = st_a["control"]["counters"].get("rekey_volume", 0)
        assert vol >= 2, st_a["control"]["counters"]
        assert st_a["sessions"][0]["epoch"] >= epoch0 + vol
        assert st_a["sessions"][0]["counters"]["auth_failures"] == st_b["sessions"][0]["counters"]["auth_failures"] == 0
        assert st_a["session_id"] == st_b["session_id"] == sid


def test_syns_entering_the_tunnel_are_clamped_to_fit_the_vnic(tmp_path):
    with Pair(tmp_path) as p:
        p.connected()
        mtu = p.a.cfg.vnc.mtu
        p.ha.tun.inject(ipv4_syn("192.168.10.2", "192.168.20.2", 1460))
        p.until(lambda: p.hb.tun.written, "the SYN delivered")
        got = p.hb.tun.written[0]
        assert int.from_bytes(got[42:44], "big") == mtu - 40
        assert p.a.status()["counters"]["mss_clamped"] == 1


def test_junk_at_an_uplink_is_counted_and_kept_no_state(tmp_path):
    with Pair(tmp_path) as p:
        sa, _ = p.connected()
        sid = sa["session_id"]
        ep = next(e for (ip, _port), e in p.hb.uplinks.items() if ip == "10.1.0.2")  # B's carrier 1
        src = ("198.51.100.9", 4444)
        ep.put(b"short", src)
        ep.put(wire.encode_header(wire.DATA, 1, (sid + 1) & 0xFFFFFFFF, 1, 0), src)
        member_2 = [m for m, up in p.b.sessions[sid].uplink_of.items() if up.addr != "10.1.0.2"][0]
        ep.put(wire.encode_header(wire.DATA, member_2, sid, 1, 0), src)
        p.until(lambda: p.b.counters["malformed"] >= 1 and p.b.counters["unknown_session"] >= 1
                and p.b.counters["wrong_uplink"] >= 1, "the junk counted")
        assert p.b.counters["malformed"] == p.b.counters["unknown_session"] == p.b.counters["wrong_uplink"] == 1
        assert list(p.b.sessions) == [sid]


# Moved here from tests/test_agent.py (they need no root): same assertions.

def test_server_routes_each_packet_to_the_site_that_owns_its_destination(tmp_path):
    """Hub and spoke: one tun, several client sites; the longest prefix wins."""
    from mpvpn.agent.agent import DataSession
    from mpvpn.core.controlmsg import PeerInfo, Vnc

    text, net = site_config("server", genpsk(), 2, "172.30.0.2", "192.168.20.1")
    (tmp_path / "orayboxvpn").write_text(text.replace("255.255.255.252", "255.255.255.0"))
    (tmp_path / "network").write_text(net)
    cfg, problems = cfgmod.load_config(str(tmp_path))
    assert cfg is not None, problems
    agent = Agent(cfg, uci_dir=str(tmp_path), run_dir=str(tmp_path / "run"))

    def site(sid, name, vnc_ip, lans):
        ds = DataSession(sess=type("S", (), {"session_id": sid})(),
                         peer=PeerInfo(name, (), Vnc(vnc_ip, "255.255.255.0"), tuple(lans)))
        ds.routes = list(lans)
        agent.sessions[sid] = ds
        return ds

    a = site(1, "site-a", "172.30.0.1", ["192.168.10.0/24", "fd10::/64"])
    c = site(3, "site-c", "172.30.0.3", ["192.168.30.0/24", "192.168.10.128/25"])
    agent._rebuild_route_table()

    def v4(dst):
        return bytes([0x45]) + bytes(15) + bytes(int(x) for x in dst.split(".")) + bytes(20)

    def v6(dst):
        return bytes([0x60]) + bytes(23) + ipaddress.ip_address(dst).packed + bytes(8)

    assert agent._route(v4("192.168.10.7")) is a
    assert agent._route(v4("192.168.10.200")) is c  # more specific prefix of site C
    assert agent._route(v4("192.168.30.1")) is c
    assert agent._route(v4("172.30.0.3")) is c  # the peer's vNIC address
    assert agent._route(v6("fd10::5")) is a
    assert agent._route(v4("8.8.8.8")) is None and agent._route(v6("ff02::2")) is None
    assert agent._route(b"") is None and agent._route(b"\x45\x00") is None


def test_a_vnic_that_cannot_be_recreated_ends_the_agent_with_the_reason(tmp_path):
    import errno
    import os
    import selectors

    from mpvpn.io.tun import MemoryTun, TunError

    class DeletedTun(MemoryTun):
        """A tun whose device was deleted: reads fail with EBADFD, as
        drivers/net/tun.c tun_chr_read_iter() does once the fd is detached."""

        def read_packets(self):
            raise OSError(errno.EBADFD, os.strerror(errno.EBADFD))

    def no_tun(name):  # as LinuxTun when /dev/net/tun cannot be opened
        raise TunError(errno.ENOENT, f"cannot create tun {name!r}: [Errno 2] No such file or directory")

    text, net = site_config("client", genpsk(), 1, "172.30.0.1", "192.168.10.1")
    (tmp_path / "orayboxvpn").write_text(text)
    (tmp_path / "network").write_text(net)
    cfg, problems = cfgmod.load_config(str(tmp_path))
    agent = Agent(cfg, uci_dir=str(tmp_path), run_dir=str(tmp_path / "run"), tun_factory=no_tun)
    agent.tun = DeletedTun("mpvpn0")
    agent.sel.register(agent.tun, selectors.EVENT_READ, agent._on_tun)
    agent.tun.inject(b"x")
    with pytest.raises(OSError, match=r"vNIC mpvpn0 vanished and cannot be recreated: cannot create tun"):
        agent.step(0.5)
    assert agent.tun is None and agent.counters["vnic_recreated"] == 0
    agent.teardown()


def test_the_memory_udp_coalesces_like_udp_gro_and_loses_what_has_no_receiver():
    net = MemoryNet()
    host = MemoryHost(net, ["10.9.0.1", "10.9.0.2"])
    a, _ = host.open_uplink("10.9.0.1", 1000, None)
    b, _ = host.open_uplink("10.9.0.2", 1000, None)
    from mpvpn.io.udp import UplinkUnavailable
    with pytest.raises(UplinkUnavailable):
        host.open_uplink("10.9.0.3", 1000, None)
    with pytest.raises(OSError, match="in use"):
        host.open_uplink("10.9.0.1", 1000, None)
    assert a.send([b"x" * 10, b"y" * 10, b"z" * 4, b"w" * 10], ("10.9.0.2", 1000)) == 0
    assert a.send([b"lost"], ("10.9.0.7", 1)) == 0
    assert b.recv() == ([b"x" * 10, b"y" * 10, b"z" * 4], ("10.9.0.1", 1000))  # a shorter one ends a run
    assert b.recv() == ([b"w" * 10], ("10.9.0.1", 1000))
    with pytest.raises(BlockingIOError):
        b.recv()
    a.close()
    b.close()
    assert net.udp == {}


def test_a_reload_applies_changed_sites_and_policies_to_live_sessions(tmp_path):
    """SIGHUP on the hub: a site whose key was removed loses its session at
    once (it authenticated with a key the hub no longer has) and cannot come
    back; changed policies reach the running sessions' schedulers (status
    showed the new ones while the old ones kept steering)."""
    key = genpsk()
    site = f"\nconfig site 'branch'\n\toption psk '{key}'\n"
    with Pair(tmp_path, psk=key, psk_b=genpsk(), b_sections=site) as p:
        _, sb = p.connected()
        assert sb["sessions"][0]["site"] == "branch"
        conf = tmp_path / "b" / "orayboxvpn"
        text = conf.read_text()
        # 1. a policy added: the live scheduler takes it, the session stays
        conf.write_text(text + "\nconfig policy 'cams'\n\toption src '192.168.10.50'\n"
                        "\tlist carrier 'telecom'\n")
        sid = sb["session_id"]
        p.b.reload()
        assert [pol.name for pol in p.b.sessions[sid].sess.scheduler.options.policies] == ["cams"]
        assert p.b.sessions[sid].conn.state.value == "established"
        # 2. the site's key removed: its session ends, and the key is refused
        conf.write_text(text.replace(site, ""))
        p.b.reload()
        p.until(lambda: p.b.status()["control"]["closed_by_reason"].get("revoked") == 1, "revoked")
        p.until(lambda: p.b.control_counters.get("bad_psk", 0) >= 1, "the old key refused")
        assert p.b.sessions == {}


class FakeStun:
    """Two STUN servers on the MemoryNet that answer Binding requests with
    the mapping ``mapped(source)`` (the codec of mpvpn.core.stun, as coturn
    answers: XOR-MAPPED-ADDRESS and FINGERPRINT; the real coturn is in
    tests/test_natlab.py and tests/test_nat_e2e.py)."""

    ADDRS = (("203.0.113.1", 3478), ("203.0.113.2", 3478))

    def __init__(self, net, mapped):
        from fakes import MemoryUDP

        self.mapped = mapped
        self.eps = []
        for a in self.ADDRS:
            ep = MemoryUDP(net, a, gro=False)
            net.udp[a] = ep
            self.eps.append(ep)
        self.requests = 0

    def pump(self) -> None:
        from mpvpn.core import stun

        for ep in self.eps:
            while ep.queue:
                (data,), src = ep.recv()
                m = stun.decode(data)
                self.requests += 1
                value = stun.encode_address(self.mapped(src), xor=True, txid=m.txid)
                ep.send([stun.encode(stun.BINDING, stun.SUCCESS, m.txid, [(stun.XOR_MAPPED_ADDRESS, value)],
                                     fingerprint=True)], src)


def test_stun_on_the_uplink_sockets_candidates_reach_the_peer_and_sighup_rechecks(tmp_path):
    """base.stun: each uplink asks from its own socket (the answers are
    demultiplexed off the SMPU socket), A's mobile uplink learns a mapping
    that is not its address (behind NAT), its candidates reach B, which
    then punches that pair (path `punched`); a SIGHUP (reload) asks again,
    a new mapping goes to B as an UPDATE in the same session."""
    port = {"mobile": 7000}

    def mapped(src):
        return ("198.51.100.1", port["mobile"]) if src[0] == "10.3.0.1" else src  # A's mobile is NATed

    stun_opts = "".join(f"\tlist stun '{h}:{p}'\n" for h, p in FakeStun.ADDRS)
    with Pair(tmp_path, extra_base=FAST + stun_opts) as pair:
        fake = FakeStun(pair.net, mapped)

        def ready():
            fake.pump()
            sb = pair.b.status()
            return (sb["state"] == "connected"
                    and sum(ln["state"] == "established" for ln in sb["links"]) == CARRIERS
                    and any(ln["path"] == "punched" for ln in sb["links"]) and sb)
        sb = pair.until(ready, "B punches towards A's mobile candidates")
        sa = pair.a.status()
        ups = {u["name"]: u for u in sa["uplinks"]}
        assert ups["mobile"]["public"] == "198.51.100.1:7000" and ups["mobile"]["nat"] == "endpoint-independent"
        assert ups["telecom"]["public"] == "10.1.0.1:7000" and ups["telecom"]["nat"] == "none"
        assert all(u["stun"]["drops"] == {} or set(u["stun"]["drops"]) == {"unknown_transaction"}
                   for u in sa["uplinks"])
        paths = {ln["type"]: ln["path"] for ln in sb["links"]}
        assert paths == {"telecom": "direct", "unicom": "direct", "mobile": "punched"}
        assert {ln["type"]: ln["path"] for ln in sa["links"]}["mobile"] == "punched"
        assert sa["counters"]["unknown_session"] == 0  # no STUN answer went to SMPU
        (ds,) = pair.b.sessions.values()
        (mob,) = [u for u in ds.peer.uplinks if u.type == "mobile"]
        assert [(c.kind, c.addr, c.port) for c in mob.candidates] == [
            ("host", "10.3.0.1", 7000), ("srflx", "198.51.100.1", 7000)]
        sid, ups_before = sb["session_id"], {ln["type"]: ln["ups"] for ln in sb["links"]}
        asked = fake.requests
        port["mobile"] = 7100  # the NAT hands out a new port; SIGHUP (hotplug) asks again
        pair.a.reload()

        def learnt():
            fake.pump()
            (ds,) = pair.b.sessions.values()
            (mob,) = [u for u in ds.peer.uplinks if u.type == "mobile"]
            return any(c.port == 7100 for c in mob.candidates)
        pair.until(learnt, "the new mapping reaches B as an UPDATE")
        assert fake.requests >= asked + 2 * CARRIERS
        sa, sb = pair.a.status(), pair.b.status()
        assert {u["name"]: u for u in sa["uplinks"]}["mobile"]["stun"]["changes"] == 1
        assert sb["session_id"] == sid
        assert {ln["type"]: ln["ups"] for ln in sb["links"]} == ups_before


def test_bad_stun_input_is_counted_and_the_tunnel_keeps_serving(tmp_path):
    """Issue 15 e2e 5, the STUN part: answers with a wrong transaction id,
    malformed or oversized ones from a configured server, and a STUN answer
    from an address that is not a server: no traceback, each one counted
    where it went (the STUN client's drops, or SMPU's unknown_session), the
    subflows stay up and the mapping learnt stays."""
    from mpvpn.core import stun

    stun_opts = "".join(f"\tlist stun '{h}:{p}'\n" for h, p in FakeStun.ADDRS)
    with Pair(tmp_path, extra_base=FAST + stun_opts) as pair:
        fake = FakeStun(pair.net, lambda src: ("198.51.100.1", 7000) if src[0] == "10.3.0.1" else src)

        def ready():
            fake.pump()
            sa = pair.a.status()
            return (sa["state"] == "connected"
                    and sum(ln["state"] == "established" for ln in sa["links"]) == CARRIERS
                    and all(u["public"] for u in sa["uplinks"]) and sa)
        sa = pair.until(ready, "connected, every uplink's mapping known")
        before = sa["counters"]["unknown_session"]
        ups_before = {ln["type"]: ln["ups"] for ln in sa["links"]}
        mobile = ("10.3.0.1", 7000)
        server = fake.eps[0]
        txid = bytes(12)
        good = stun.encode(stun.BINDING, stun.SUCCESS, txid,
                           [(stun.XOR_MAPPED_ADDRESS, stun.encode_address(("192.0.2.66", 1), xor=True,
                                                                          txid=txid))], fingerprint=True)
        bad_fp = bytearray(good)
        bad_fp[-1] ^= 1
        # shaped like STUN (length field = body) but an attribute runs past the end
        malformed = (good[:2] + (8).to_bytes(2, "big") + good[4:20]
                     + (0x0020).to_bytes(2, "big") + (0xFF).to_bytes(2, "big") + bytes(4))
        assert stun.looks_like_stun(malformed)
        oversized = stun.encode(stun.BINDING, stun.SUCCESS, txid, [(stun.SOFTWARE, b"x" * 1600)])
        request = stun.encode(stun.BINDING, stun.REQUEST, txid)
        for d in (good, bytes(bad_fp), malformed, oversized, request):
            server.send([d], mobile)  # from a configured server
        pair.net.deliver(("198.51.100.66", 3478), mobile, good)  # a STUN answer from elsewhere
        pair.run(0.3)
        sa = pair.a.status()
        drops = {u["name"]: u for u in sa["uplinks"]}["mobile"]["stun"]["drops"]
        # (no round is running: a well-formed answer is an unknown transaction, whatever its fingerprint)
        assert drops.get("unknown_transaction", 0) >= 2, drops
        assert drops.get("malformed") == 1 and drops.get("oversized") == 1, drops
        assert drops.get("not_a_binding_response") == 1, drops
        assert sa["counters"]["unknown_session"] == before + 1  # the one from elsewhere: SMPU's
        assert {u["name"]: u for u in sa["uplinks"]}["mobile"]["public"] == "198.51.100.1:7000"
        assert {ln["type"]: ln["ups"] for ln in sa["links"]} == ups_before
        assert sum(ln["state"] == "established" for ln in sa["links"]) == CARRIERS


def test_a_relay_name_that_hangs_in_dns_does_not_stall_the_agent(tmp_path):
    """`config relay` by name: the lookup runs in a thread (mpvpn.io.resolve);
    while it hangs (a dead DNS server) the agent's loop carries on -- the
    sites connect --, and the answer, when it comes, is applied on the loop."""
    import threading

    from mpvpn.io.resolve import Resolver

    release = threading.Event()
    asked = []

    def hanging_gai(host, port, family, type_):
        asked.append(host)
        release.wait(60)
        return [(family, type_, 17, "", ("203.0.113.9", port))]

    relay = ("\nconfig relay\n\toption address 'turn.example.test'\n"
             "\toption username 'u'\n\toption password 'p'\n")
    pair = Pair(tmp_path, b_sections=relay)
    pair.b.resolver = Resolver(pair.b.post, getaddrinfo=hanging_gai)
    with pair:
        try:
            pair.connected()
            assert asked == ["turn.example.test"] * CARRIERS
            ups = [u for u in pair.b.uplinks.values() if u.relay is not None]
            assert len(ups) == CARRIERS and all(u.relay.names.looking_up for u in ups)
            assert all(u["relay"]["looking_up"] for u in pair.b.status()["uplinks"])
        finally:
            release.set()
        pair.until(lambda: not any(u.relay.names.looking_up for u in ups), "the answers applied on the loop")
        assert all(u.relay.sources == {("203.0.113.9", 3478)} for u in ups)
        assert pair.b.resolver.finished == CARRIERS


def test_each_uplink_socket_gets_the_configured_receive_buffer(tmp_path):
    """base.rx_buffer (KiB) is what the agent asks for on every uplink's
    socket (the queue bulk TCP fills when this agent is the bottleneck)."""
    with Pair(tmp_path, extra_base=FAST + "\toption rx_buffer '64'\n") as p:
        p.connected()
        assert list(p.ha.rcvbufs.values()) == [64 << 10] * CARRIERS
        assert list(p.hb.rcvbufs.values()) == [64 << 10] * CARRIERS
    (tmp_path / "unset").mkdir()
    with Pair(tmp_path / "unset") as p:  # unset: the kernel's cap (mpvpn.io.udp.open_uplink)
        p.connected()
        assert list(p.ha.rcvbufs.values()) == [None] * CARRIERS
