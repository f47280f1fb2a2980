"""TURN relay fallback end to end (issue 15, e2e tests 2, 3 and 5): two real
agents in the namespace lab, the ``mobile`` carrier (3) of both sites behind
endpoint-dependent ("symmetric") nftables NAT boxes (tests/netlab/nat.py
NatCarriers), the real coturn in the lab internet as STUN server and TURN
relay, real conntrack.

Needs root/namespaces/nftables (netlab_ready), coturn's ``turnserver`` and
``conntrack``; each missing one skips with the reason.  Durations are never
asserted: outcomes are checked with the agents' own status (states, counters,
the relay's records) and packet counts."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402
from agentlab import Stream, TwoSites  # noqa: E402
from netlab import nat  # noqa: E402
from test_natlab import PROBE, SRC  # noqa: E402
from natsites import link, unavailable_reason, uplink, write_configs  # noqa: E402


PORT = 3478
MOBILE = 3  # carrier index of `mobile` in agentlab.site_config
RELAY = f"{nat.INET_IPS[0]}:{PORT}"
NOWHERE = "203.0.113.99:3478"  # an address of the lab internet where nobody answers


def relay_sections(*addresses, user="alice", password="secret") -> str:
    return "".join(f"\nconfig relay\n\toption address '{a}'\n\toption username '{user}'\n"
                   f"\toption password '{password}'\n" for a in addresses)


class Relays:
    """coturn in the lab internet (STUN on both addresses, TURN relaying from .1)."""

    def __init__(self, nc, extra=(), ports=(50000, 50199), port=PORT):
        self.nc, self.extra, self.ports, self.port = nc, list(extra), ports, port
        self.server = None

    def start(self):
        self.server = coturn.Coturn(listen=nat.INET_IPS, port=self.port, relay_ip=nat.INET_IPS[0],
                                    relay_ports=self.ports, loopback_peers=False,
                                    prefix=self.nc.prefix_argv(self.nc.inet), extra=self.extra)

        def probe():
            return self.nc.python(self.nc.inet, PROBE, str(SRC), nat.INET_IPS[0], str(self.port),
                                  check=False, timeout=10).returncode == 0
        self.server.start(timeout=15, probe=probe)
        return self

    def kill(self):
        self.server.stop()

    def close(self):
        if self.server is not None:
            self.server.close()


@pytest.fixture
def relay_sites(make_lab):
    """Factory: (lab, NatCarriers, Relays, TwoSites) with mobile behind EDM NATs
    on both sides; ``relays``: the `config relay` addresses of both sites."""
    reason = unavailable_reason()
    if reason:
        sys.stderr.write(f"\nrelay e2e tests skipped: {reason}\n")
        pytest.skip(reason)
    made = []

    def make(relays=(RELAY,), kinds=("edm", "edm"), extra_base="", coturn_extra=(), password="secret",
             relay_ports=(50000, 50199), udp_timeout=None, turn_port=None):
        lab = make_lab(carriers=3)
        nc = nat.NatCarriers(lab, {MOBILE: kinds})
        made.append(nc)
        if udp_timeout is not None:
            for site in (nc.carrier(MOBILE).a_site, nc.carrier(MOBILE).b_site):
                nc.set_udp_timeout(site, udp_timeout)
        server = Relays(nc, coturn_extra, relay_ports)
        made.append(server)
        server.start()
        if turn_port is not None:  # a TURN server of its own, apart from STUN's flows
            made.append(Relays(nc, coturn_extra, (50200, 50299), turn_port).start())
        sites = TwoSites(lab)
        made.append(sites)
        write_configs(sites, nc, extra_base, relay_sections(*relays, password=password))
        return lab, nc, server, sites

    yield make
    for thing in reversed(made):
        thing.close()


def relayed_up(st: dict) -> bool:
    return (st["state"] == "connected"
            and sum(ln["state"] == "established" for ln in st["links"]) == 3
            and link(st, "mobile")["path"] == "relayed")


def test_both_behind_symmetric_nat_mobile_is_relayed(relay_sites):
    """e2e 2: both `mobile` uplinks behind EDM NATs: punching cannot work,
    both uplinks allocate on coturn, and mobile comes up through the relay
    (relay to relay), 3 of 3 subflows; LAN ping works; mobile alone carries
    a stream; a carrier set down mid-stream loses no packet (duplicate)."""
    lab, nc, relays, sites = relay_sites()
    mc = nc.carrier(MOBILE)
    sites.start(wait=False)
    a = sites.a.wait(relayed_up, 60, "3 of 3 subflows, mobile relayed")
    b = sites.b.wait(relayed_up, 60, "3 of 3 subflows, mobile relayed")
    for st, public in ((a, mc.a_public), (b, mc.b_public)):
        ln = link(st, "mobile")
        assert ln["relay"] == RELAY, ln
        assert ln["relay_reason"] == ("both ends behind NAT, this one symmetric: "
                                      "the direct path did not open"), ln
        up = uplink(st, "mobile")
        assert up["nat"] == "endpoint-dependent", up
        r = up["relay"]
        assert r["state"] == "ready" and r["relay"] == RELAY and r["relayed"].startswith(nat.INET_IPS[0])
        assert r["sent"] > 0 and r["received"] > 0, r
        assert "secret" not in repr(st)                 # the password never shows
        # the peer's subflow talks to the other side's relayed address
        for other in ("telecom", "unicom"):
            assert link(st, other)["path"] == "direct" and link(st, other)["relay"] is None
            assert uplink(st, other)["relay"]["state"] == "idle"   # never needed there
    assert link(a, "mobile")["remote"] == uplink(b, "mobile")["relay"]["relayed"]
    assert link(b, "mobile")["remote"] == uplink(a, "mobile")["relay"]["relayed"]
    assert a["session_id"] == b["session_id"]
    p = lab.ping(lab.ha, "192.168.20.2", count=20, interval=0.02)
    assert p.received == 20, p
    # a stream while a direct carrier goes down: duplicate mode loses nothing
    s = Stream(lab, lab.ha, lab.hb, "192.168.20.2", 6001).start()
    time.sleep(1.0)
    lab.link_down(1)
    time.sleep(2.0)
    sent, got, dups = s.stop()
    assert sent > 0 and (got, dups) == (sent, 0), (sent, got, dups)
    # mobile (relayed) and unicom carry on; then mobile alone
    lab.link_down(2)
    sites.a.wait(lambda st: sum(ln["state"] == "established" for ln in st["links"]) == 1
                 and link(st, "mobile")["state"] == "established", 30, "only mobile up")
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p
    st = sites.a.status()
    assert link(st, "mobile")["downs"] == 0 and st["session_id"] == a["session_id"]


def test_first_relay_unreachable_the_second_is_used(relay_sites):
    """e2e 3, first half: two relays configured, the first does not answer:
    each uplink records why and allocates on the second."""
    lab, nc, relays, sites = relay_sites(relays=(NOWHERE, RELAY))
    sites.start(wait=False)
    for site in (sites.a, sites.b):
        st = site.wait(relayed_up, 60, "mobile relayed through the second relay")
        ln = link(st, "mobile")
        assert ln["relay"] == RELAY, ln
        r = uplink(st, "mobile")["relay"]
        first, second = r["relays"]
        assert first["address"] == NOWHERE and first["failed"]
        assert first["reason"] == f"allocation failed: no answer from relay {NOWHERE} after 5.5 s"
        assert second["address"] == RELAY and not second["failed"]
        assert r["switches"] == 1


def test_relay_killed_mid_session(relay_sites):
    """e2e 3/5: the relay dies mid-session: the relayed subflow goes down,
    the relay does not answer the refresh that checks it, so it counts as
    failed and the carrier's status says why; the other subflows never
    notice (no down, same session), the LANs keep talking."""
    lab, nc, relays, sites = relay_sites()
    sites.start(wait=False)
    a = sites.a.wait(relayed_up, 60, "mobile relayed")
    sites.b.wait(relayed_up, 60, "mobile relayed")
    s = Stream(lab, lab.ha, lab.hb, "192.168.20.2", 6001).start()
    time.sleep(0.5)
    relays.kill()

    def noticed(st):
        r = uplink(st, "mobile")["relay"]
        return (link(st, "mobile")["state"] != "established"
                and any(x["failed"] for x in r["relays"]) and r["last_error"] is not None)
    st = sites.a.wait(noticed, 60, "the relay counted as failed")
    time.sleep(0.5)
    sent, got, dups = s.stop()
    assert sent > 0 and (got, dups) == (sent, 0), (sent, got, dups)   # telecom/unicom carried all
    r = uplink(st, "mobile")["relay"]
    assert "did not answer a refresh in 5.5 s" in r["last_error"], r
    assert f"through relay {RELAY} went down" in r["last_error"], r
    assert r["state"] in ("waiting", "allocating")
    for other in ("telecom", "unicom"):
        ln = link(st, other)
        assert ln["state"] == "established" and ln["downs"] == 0, ln
    assert st["session_id"] == a["session_id"]
    assert "Traceback" not in sites.a.log() and "Traceback" not in sites.b.log()


@pytest.mark.parametrize("coturn_extra, ports, password, words", [
    (("user-quota=1",), (50000, 50199), "secret", ("allocation quota reached", "486")),
    ((), (50000, 50000), "secret", ("insufficient capacity", "508")),  # one relay port for two
    ((), (50000, 50199), "wrong", ("wrong username or password", "401")),
], ids=["quota-486", "capacity-508", "bad-credentials-401"])
def test_turn_errors_no_traceback_words_in_status(relay_sites, coturn_extra, ports, password, words):
    """e2e 5: TURN errors from the relay end in words in the uplink's relay
    status, never a traceback; the direct carriers are unaffected."""
    lab, nc, relays, sites = relay_sites(coturn_extra=coturn_extra, password=password,
                                         relay_ports=ports)
    sites.start(wait=False)

    def two_up_and_relay_tried(st):
        r = uplink(st, "mobile")["relay"]
        return (sum(ln["state"] == "established" for ln in st["links"]) >= 2
                and r is not None and r["started"] and (r["last_error"] or r["state"] == "ready"))
    a = sites.a.wait(two_up_and_relay_tried, 60, "the relay tried")
    b = sites.b.wait(two_up_and_relay_tried, 60, "the relay tried")
    errs = [uplink(st, "mobile")["relay"]["last_error"] for st in (a, b)]
    if password == "wrong":
        assert all(e and all(w in e for w in words) for e in errs), errs
    else:  # both sites allocate on the one relay: the second one is refused
        assert any(e and all(w in e for w in words) for e in errs), errs
    for st in (a, b):
        for other in ("telecom", "unicom"):
            assert link(st, other)["state"] == "established"
    assert "Traceback" not in sites.a.log() and "Traceback" not in sites.b.log()


def test_junk_from_the_relay_address_is_counted(relay_sites):
    """e2e 5: junk sent to our relayed address from the permitted IP (the
    peer's relay, 203.0.113.1) but another port: the relay forwards it as Data
    indications; each is a counted drop, the relayed subflow stays up, no
    traceback."""
    lab, nc, relays, sites = relay_sites()
    sites.start(wait=False)
    a = sites.a.wait(relayed_up, 60, "mobile relayed")
    relayed = uplink(a, "mobile")["relay"]["relayed"]
    host, port = relayed.rsplit(":", 1)
    junk = (b"\x00" * 3, b"\x01" + b"\xff" * 40, os.urandom(200), b"\x40\x00\x00\x05abc")
    code = ("import socket, sys, os\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('{nat.INET_IPS[0]}', 0))\n"
            f"for d in {junk!r}:\n"
            f"    s.sendto(d, ('{host}', {port}))\n")
    nc.python(nc.inet, code)
    time.sleep(1.0)
    st = sites.a.status()
    assert link(st, "mobile")["state"] == "established"
    assert "Traceback" not in sites.a.log()
    # what came through the relay (as Data indications from an unbound port)
    # was dropped somewhere, counted: by the TURN client (no channel/permission
    # for that port) or by SMPU (too short, unknown session, failed auth)
    r = uplink(st, "mobile")["relay"]
    counted = sum(r["drops"].values()) + st["counters"]["malformed"] + st["counters"]["unknown_session"] \
        + st["counters"]["auth_failures"]
    assert counted >= len(junk), (r["drops"], st["counters"])


def test_relayed_pair_moves_to_the_direct_path_when_one_appears(relay_sites):
    """While relayed, the agents keep probing the peer's direct candidates:
    the NAT boxes become endpoint-independent (new flows only; the flows to
    the relay keep their mappings), the old STUN mappings expire, a STUN
    re-check (SIGHUP) learns the new public ports and sends them; the probes
    to them get through, and mobile moves from the relay to the direct
    (punched) path in the same session, without going down."""
    import signal

    # (the relay on its own port: a STUN server's flow that is also the
    # relay's would keep its old mapping; the NAT's UDP timeout is short so
    # that the STUN flows' old mappings are gone when the re-check comes)
    turn_relay = f"{nat.INET_IPS[0]}:{PORT + 2}"
    lab, nc, relays, sites = relay_sites(relays=(turn_relay,), udp_timeout=3, turn_port=PORT + 2)
    mc = nc.carrier(MOBILE)
    sites.start(wait=False)
    a = sites.a.wait(relayed_up, 60, "mobile relayed")
    sites.b.wait(relayed_up, 60, "mobile relayed")
    assert link(a, "mobile")["relay"] == turn_relay
    for site in (mc.a_site, mc.b_site):
        nc.change_kind(site, "eim")
    time.sleep(4.5)
    for site in (mc.a_site, mc.b_site):   # mappings live long enough for both ends' probes
        nc.set_udp_timeout(site, 30)
    for s in (sites.a, sites.b):
        s.proc.send_signal(signal.SIGHUP)  # re-check: the new mappings go to the peer

    def direct(st):
        ln = link(st, "mobile")
        return ln["state"] == "established" and ln["path"] == "punched" and ln["relay"] is None
    a2 = sites.a.wait(direct, 60, "mobile on the direct path")
    b2 = sites.b.wait(direct, 60, "mobile on the direct path")
    # each end talks to the other's NAT directly (its public mapping), no relay
    assert link(a2, "mobile")["remote"].startswith(f"{mc.b_public}:")
    assert link(b2, "mobile")["remote"].startswith(f"{mc.a_public}:")
    for st in (a2, b2):
        assert st["session_id"] == a["session_id"]
        assert link(st, "mobile")["downs"] == 0          # moved, never went down
        assert uplink(st, "mobile")["nat"] == "endpoint-independent"
    assert "moved from the relay to punched" in sites.a.log()
    p = lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05)
    assert p.received == 10, p


def test_a_relay_change_on_reload_restarts_the_sessions_with_it(relay_sites):
    """SIGHUP with a changed `config relay`: the uplinks' relay paths are
    made at start, so the agent restarts its sessions with the new list."""
    import signal

    lab, nc, relays, sites = relay_sites()
    sites.start(wait=False)
    sites.a.wait(relayed_up, 60, "mobile relayed")
    text = (sites.a.uci_dir / "orayboxvpn").read_text()
    (sites.a.uci_dir / "orayboxvpn").write_text(text + relay_sections(NOWHERE))
    sites.a.proc.send_signal(signal.SIGHUP)
    st = sites.a.wait(lambda st: len((uplink(st, "mobile")["relay"] or {}).get("relays", [])) == 2,
                      30, "the new relay list in use")
    assert [r["address"] for r in uplink(st, "mobile")["relay"]["relays"]] == [RELAY, NOWHERE]
    assert "reloaded: configuration changed, restarting sessions" in sites.a.log()
    sites.a.wait(relayed_up, 60, "mobile relayed again")
