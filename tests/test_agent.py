"""End to end: two real agents (real tun, real UDP, real routes) in the
namespace lab, configured with the UCI files of issue 4."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from agentlab import UDP_SINK, UDP_SOURCE, Stream, TwoSites, tcp_transfer
from stats import binomial_interval, fraction_interval, min_trials_to_tell

from mpvpn.core.linkstats import LossEstimator
from mpvpn.core.smpu import SessionConfig
from mpvpn.core.subflow import SubflowConfig
from mpvpn.io.netcfg import RTPROT_MPVPN

pytestmark = pytest.mark.usefixtures("netlab_ready")


def routes(lab, ns):
    return lab.run(ns, ["ip", "route", "show", "proto", str(RTPROT_MPVPN)]).stdout.strip()


def links_by_type(st):
    return {ln["type"]: ln for ln in st["links"]}


@pytest.fixture
def sites(make_lab):
    lab = make_lab(carriers=3)
    ts = TwoSites(lab)
    yield lab, ts
    ts.close()


def test_lan_hosts_reach_each_other_and_tcp_arrives_intact(sites):
    lab, ts = sites
    assert not lab.reachable(lab.ha, "192.168.20.2")  # no route before the VPN
    ts.start()
    p = lab.ping(lab.ha, "192.168.20.2", count=20, interval=0.02)
    assert p.received == 20
    assert routes(lab, lab.ra).startswith("192.168.20.0/24 dev mpvpn0")
    assert routes(lab, lab.rb).startswith("192.168.10.0/24 dev mpvpn0")
    sent, sha_tx, got, sha_rx, secs = tcp_transfer(lab, 50_000_000)
    assert (got, sha_rx) == (sent, sha_tx) == (50_000_000, sha_tx)
    # the same with 20 % loss on every carrier, both directions
    for c in (1, 2, 3):
        lab.set_loss(c, 20)
    sent, sha_tx, got, sha_rx, secs = tcp_transfer(lab, 50_000_000)
    assert (got, sha_rx) == (sent, sha_tx)
    lab.ping(lab.ha, "192.168.20.2", count=300, interval=0.01)  # steady traffic both ways
    st = ts.b.status()
    assert st["counters"]["duplicates"] > 0 and st["counters"]["auth_failures"] == 0
    # each carrier's own loss is measured and shown: an estimate over the last
    # LossEstimator.window datagrams (thousands crossed each carrier since 20 % was set)
    lo, hi = fraction_interval(LossEstimator().window, 0.20)
    for ln in st["links"]:
        assert lo <= ln["loss"] <= hi, (ln["type"], ln["loss"], (lo, hi))


def test_delivered_loss_is_p_cubed_not_p(make_lab):
    """Duplicate sending alone (base.nack 0; NACK repairs are on by default)."""
    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption nack '0'\n") as ts:
        ts.start()
        for c in (1, 2, 3):
            lab.set_loss(c, 20, direction="a2b")  # echo requests cross lossy carriers, replies do not
        n = 3000
        p = lab.ping(lab.ha, "192.168.20.2", count=n, interval=0.004, timeout=2.0)
    lost = p.sent - p.received
    lo, hi = binomial_interval(p.sent, 0.2 ** 3)  # seed: 99.2 % delivered
    assert p.sent == n and lo <= lost <= hi, (lost, (lo, hi))
    assert lost < n * 0.20 / 5  # far below one carrier's 20 %


def test_duplicate_mode_with_nack_repairs_what_every_carrier_lost(make_lab):
    """NACK in duplicate mode (the default): the p^3 losses of the test above
    are asked for again and re-sent, so nothing is lost (independent loss on
    each carrier: within what the carriers' loss explains)."""
    lab = make_lab(carriers=3)
    with TwoSites(lab) as ts:
        ts.start()
        for c in (1, 2, 3):
            lab.set_loss(c, 20, direction="a2b")
        n = 3000
        p = lab.ping(lab.ha, "192.168.20.2", count=n, interval=0.004, timeout=2.0)
        c = ts.b.status()["counters"]
        lost_all, _ = binomial_interval(n, 0.2 ** 3)  # ~24 lost on all three: at least this many
        assert c["nacks_sent"] > 0 and c["nack_seqs"] >= lost_all, c
        # a number stays lost only if its re-send (on one lossy carrier) is lost
        # every time it is asked for: p^3 * p^(1 + nack_retries)
        _, hi = binomial_interval(n, 0.2 ** 3 * 0.2 ** (1 + SessionConfig().nack_retries))
        assert p.sent == n and p.sent - p.received <= hi, (p.sent, p.received, hi)


def test_carrier_down_mid_transfer_loses_nothing_and_rejoins(sites):
    lab, ts = sites
    ts.start()
    sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "3",
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    count, rate = 3000, 500.0
    src = lab.python_popen(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(count), str(rate),
                           stdout=subprocess.PIPE, text=True)
    ts.a.wait(lambda s: links_by_type(s)["telecom"]["data_tx"] >= 500, 30, "the stream under way")
    lab.link_down(1)  # carrier 1 also carries the control connection (server_address 10.1.0.2)
    st = ts.a.wait(lambda s: links_by_type(s)["telecom"]["state"] != "established", 30, "telecom down")
    # found dead by its own unanswered probes (how fast is test_subflow's, on a fake clock)
    tel = links_by_type(st)["telecom"]
    assert re.fullmatch(r"no answer to \d+ probes", tel["last_down_reason"]), tel
    sub = SubflowConfig()
    assert tel["dead_after_ms"] >= sub.dead_after * sub.keepalive_active * 1000 - 1, tel  # (rounding)
    assert st["state"] == "connected" and st["session_id"] is not None
    src.wait(60)
    out, _ = sink.communicate(timeout=60)
    got, dups, last = map(int, out.split())
    assert (got, dups, last) == (count, 0, count - 1)  # not one packet lost or doubled
    lab.link_up(1)
    st = ts.a.wait(lambda s: links_by_type(s)["telecom"]["state"] == "established", 30, "telecom back")
    tel = links_by_type(st)["telecom"]
    assert tel["downs"] >= 1 and tel["ups"] == tel["downs"] + 1, tel  # the same subflow rejoined
    assert st["session_id"] == ts.b.status()["session_id"]  # in the same session
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5


def test_restarts_come_back_clean(sites):
    lab, ts = sites
    ts.start()
    # server restart: the client notices, reconnects, the session comes back
    ts.b.stop()
    assert routes(lab, lab.rb) == ""  # everything the server added is gone
    assert "mpvpn0" not in lab.run(lab.rb, ["ip", "link"]).stdout
    ts.b.start()
    ts.a.wait_connected(timeout=30)
    ts.b.wait_connected(timeout=10)
    assert routes(lab, lab.rb).startswith("192.168.10.0/24 dev mpvpn0")
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
    # client crash (kill -9) and restart: no errors about leftovers
    ts.a.stop("KILL")
    ts.a.start()
    ts.a.wait_connected(timeout=20)
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
    for site in (ts.a, ts.b):
        assert "Traceback" not in site.log()
        assert not re.search(r"File exists|already in use", site.log())
    ts.a.stop()
    ts.b.stop()
    for ns in (lab.ra, lab.rb):
        assert routes(lab, ns) == ""
        assert "mpvpn0" not in lab.run(ns, ["ip", "link"]).stdout


def test_wrong_psk_gives_no_tunnel_and_says_why(make_lab):
    from mpvpn.core.noise import genpsk

    lab = make_lab(carriers=3)
    with TwoSites(lab, psk=genpsk(), psk_b=genpsk()) as ts:
        ts.start(wait=False)
        st = ts.a.wait(lambda s: s["last_error"] is not None and "PSK" in s["last_error"], 10,
                       "a PSK error")
        assert st["state"] == "connecting" and st["session_id"] is None
        assert not lab.reachable(lab.ha, "192.168.20.2")
        sb = ts.b.wait(lambda s: s["control"]["closed_by_reason"].get("bad_psk", 0) >= 1, 10,
                       "server counts the bad PSK")
        assert sb["sessions"] == [] and sb["state"] == "connecting"
        assert "rejected a connection" in ts.b.log()
        for site in (ts.a, ts.b):
            assert "Traceback" not in site.log()


def test_status_command_prints_a_readable_summary(sites):
    lab, ts = sites
    ts.start()
    env_py = ["-m", "mpvpn", "status", "--run-dir", str(ts.a.run_dir)]
    import sys

    r = subprocess.run([sys.executable, *env_py], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0
    assert "connected" in r.stdout and "telecom" in r.stdout and "192.168.20.0/24" in r.stdout
    r = subprocess.run([sys.executable, *env_py, "--json"], capture_output=True, text=True, timeout=10)
    import json

    st = json.loads(r.stdout)
    for key in ("state", "role", "mode", "session_id", "peer", "vnc", "routes", "links", "counters",
                "last_error"):
        assert key in st
    assert st["vnc"] == {"ifname": "mpvpn0", "address": "172.30.0.1", "netmask": "255.255.255.252",
                         "mtu": 1400}
    from mpvpn.core.seal import preferred_ciphers

    assert st["sessions"][0]["cipher"] == preferred_ciphers()[0]  # both ends are this CPU
    from mpvpn.core import fastpath

    assert st["dataplane"]["c_loops"] == (fastpath.LOOPS is not None)
    assert st["dataplane"]["tun_offload"] in ("gro", "tso", "off")
    ts.a.stop()
    r = subprocess.run([sys.executable, *env_py], capture_output=True, text=True, timeout=10)
    assert r.returncode == 3 and "not running" in r.stderr


def test_ipv6_inner_packets_and_an_ipv6_carrier(make_lab):
    lab = make_lab(carriers=3, ipv6=True)
    for ns, host, addr, gw in ((lab.ra, None, "fd10::1/64", None), (lab.ha, True, "fd10::2/64", "fd10::1"),
                               (lab.rb, None, "fd20::1/64", None), (lab.hb, True, "fd20::2/64", "fd20::1")):
        lab.run(ns, ["ip", "-6", "addr", "add", addr, "dev", "lan", "nodad"])
        if host:
            lab.run(ns, ["ip", "-6", "route", "add", "default", "via", gw])
    with TwoSites(lab, v6_carriers=(3,), lan6=True) as ts:  # mobile pairs over IPv6 uplinks
        ts.start()
        st = ts.a.status()
        mobile = links_by_type(st)["mobile"]
        assert mobile["local"].startswith("fd00:3::1") and mobile["state"] == "established"
        assert "fd20::/64" in st["routes"]
        p = lab.ping(lab.ha, "fd20::2", count=10, interval=0.02)
        assert p.received == 10  # IPv6 inside the tunnel
        assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.02).received == 5
        lab.link_down(1)
        lab.link_down(2)  # only the IPv6 carrier is left
        ts.a.wait(lambda s: sum(ln["state"] == "established" for ln in s["links"]) == 1, 6, "v6 only")
        assert lab.ping(lab.ha, "fd20::2", count=10, interval=0.02).received == 10


def test_sighup_applies_live_options_in_place_and_restarts_for_the_rest(sites):
    import signal

    lab, ts = sites
    ts.start()
    sid = ts.a.status()["session_id"]
    conf = ts.a.uci_dir / "orayboxvpn"
    text = conf.read_text()
    # live: keepalive tuning; the tunnel and its session stay
    conf.write_text(text.replace("config base 'base'\n", "config base 'base'\n\toption keepalive_idle '0.5'\n"))
    ts.a.proc.send_signal(signal.SIGHUP)
    ts.a.wait(lambda s: "live options applied" in ts.a.log(), 5, "reload logged")
    st = ts.a.status()
    assert st["session_id"] == sid and st["state"] == "connected"
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
    # disruptive: a new rekey interval goes into a new session (a LAN change
    # does not: test_lan_change_is_an_update_that_loses_nothing)
    conf.write_text(conf.read_text().replace("config base 'base'\n",
                                             "config base 'base'\n\toption rekey_interval '100'\n"))
    ts.a.proc.send_signal(signal.SIGHUP)
    st = ts.a.wait(lambda s: s["session_id"] not in (None, sid) and s["state"] == "connected", 20,
                   "a new session")
    ts.a.wait_connected()
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
    # a broken config is refused and the running tunnel kept
    conf.write_text(conf.read_text().replace("option role 'client'", "option role 'nonsense'"))
    ts.a.proc.send_signal(signal.SIGHUP)
    st = ts.a.wait(lambda s: s["last_error"] and "reload refused" in s["last_error"], 5, "refusal")
    assert st["state"] == "connected"
    assert "Traceback" not in ts.a.log()


def test_rekey_under_traffic_loses_nothing(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption rekey_interval '1.5'\n") as ts:
        ts.start()
        epoch0 = ts.a.status()["sessions"][0]["epoch"]
        sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "3",
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        count, rate = 3000, 500.0  # 6 s: several rekeys while packets flow
        lab.python(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(count), str(rate), timeout=30)
        out, _ = sink.communicate(timeout=20)
        got, dups, last = map(int, out.split())
        assert (got, dups) == (count, 0)
        st_a, st_b = ts.a.status(), ts.b.status()
        epoch_a, epoch_b = st_a["sessions"][0]["epoch"], st_b["sessions"][0]["epoch"]
        assert epoch_a >= epoch0 + 2 and abs(epoch_a - epoch_b) <= 1  # keys really changed
        assert st_a["session_id"] == st_b["session_id"]  # same session throughout
        assert st_b["counters"]["auth_failures"] == 0


FAKE_UBUS = """#!/bin/sh
# stands in for OpenWrt's ubus CLI: `ubus call network.interface.<name> status`
name="${2#network.interface.}"
f="$FAKE_UBUS_DIR/$name.json"
[ "$1" = call ] && [ "$3" = status ] && [ -f "$f" ] || { echo "Command failed: Not found" >&2; exit 4; }
cat "$f"
"""


def test_uplink_given_by_interface_follows_its_address(sites, tmp_path):
    import json
    import os
    import signal

    lab, ts = sites
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ubus").write_text(FAKE_UBUS)
    (bindir / "ubus").chmod(0o755)

    def netifd_says(addr):
        (tmp_path / "wan1.json").write_text(json.dumps(
            {"up": True, "l3_device": "c1", "ipv4-address": [{"address": addr, "mask": 24}]}))

    netifd_says("10.1.0.1")
    conf = ts.a.uci_dir / "orayboxvpn"
    conf.write_text(conf.read_text().replace("\toption bind_ip '10.1.0.1'\n", "\toption interface 'wan1'\n"))
    ts.b.start()
    ts.b.wait(lambda s: True, 10, "server up")
    ts.a.start(env_extra={"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_UBUS_DIR": str(tmp_path)})
    st = ts.a.wait_connected()
    assert {u["name"]: u["bind_ip"] for u in st["uplinks"]}["telecom"] == "10.1.0.1"
    # the DHCP lease changes: netifd has a new address, hotplug sends SIGHUP
    lab.run(lab.ra, ["ip", "addr", "add", "10.1.0.11/24", "dev", "c1"])
    netifd_says("10.1.0.11")
    ts.a.proc.send_signal(signal.SIGHUP)
    st = ts.a.wait(lambda s: any(ln["type"] == "telecom" and ln["local"].startswith("10.1.0.11:")
                                 and ln["state"] == "established" for ln in s["links"]), 15,
                   "telecom re-planned on its new address")
    sb = ts.b.status()
    assert any(ln["type"] == "telecom" and ln["remote"].startswith("10.1.0.11:") for ln in sb["links"])
    # -w: ping ends at the 5th reply or the deadline, so a reply made late by a loaded machine counts
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05, extra=["-w", "30"]).received == 5
    # the interface goes down: the uplink waits, the peer drops that subflow
    (tmp_path / "wan1.json").write_text(json.dumps({"up": False, "l3_device": "c1"}))
    ts.a.proc.send_signal(signal.SIGHUP)
    st = ts.a.wait(lambda s: {u["name"]: u["state"] for u in s["uplinks"]}["telecom"] == "waiting"
                   and not any(ln["type"] == "telecom" for ln in s["links"]), 10, "telecom withdrawn")
    assert "is down" in {u["name"]: u["error"] for u in st["uplinks"]}["telecom"]
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5


def test_static_keys_kkpsk0_connect_and_a_wrong_peer_key_is_refused(make_lab):
    import base64

    from mpvpn.core.noise import generate_keypair

    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    a_priv, a_pub = generate_keypair()
    b_priv, b_pub = generate_keypair()
    _x_priv, x_pub = generate_keypair()
    lab = make_lab(carriers=3)
    with TwoSites(lab) as ts:
        for site, priv, peer in ((ts.a, a_priv, b_pub), (ts.b, b_priv, a_pub)):
            conf = site.uci_dir / "orayboxvpn"
            conf.write_text(conf.read_text().replace(
                "config base 'base'\n", f"config base 'base'\n\toption private_key '{b64(priv)}'\n"
                f"\toption peer_public_key '{b64(peer)}'\n"))
        ts.start()
        assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
        ts.a.stop()
        # site A now expects another server key: the handshake must fail, no tunnel
        conf = ts.a.uci_dir / "orayboxvpn"
        conf.write_text(conf.read_text().replace(b64(b_pub), b64(x_pub)))
        ts.a.start()
        st = ts.a.wait(lambda s: s["last_error"] is not None, 10, "a handshake error")
        assert st["state"] == "connecting" and st["session_id"] is None
        assert not lab.reachable(lab.ha, "192.168.20.2")


def test_aggregate_mode_spreads_by_weight_and_delivers_intact(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption mode 'aggregate'\n") as ts:
        for c, mbit in ((1, 50), (2, 30), (3, 20)):
            lab.set_rate(c, mbit)
        lab.set_loss(2, 5)
        ts.start()
        sent, sha_tx, got, sha_rx, secs = tcp_transfer(lab, 20_000_000)
        assert (got, sha_rx) == (sent, sha_tx)
        st = ts.a.status()
        share = {ln["type"]: ln["tx_bytes"] for ln in st["links"]}
        total = sum(share.values())
        assert total < 1.5 * sent  # one copy per packet (plus repairs), not three
        assert share["telecom"] > share["mobile"]  # the 50 Mbit/s carrier carries more than the 20
        w = {ln["type"]: ln["weight"] for ln in st["links"]}
        assert abs(sum(w.values()) - 1.0) < 0.01 and w["telecom"] > w["mobile"]
        assert st["mode"] == "aggregate"


def test_unmatched_carriers_stay_idle_unless_pair_unmatched(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab) as ts:
        conf_b = ts.b.uci_dir / "orayboxvpn"
        conf_b.write_text(conf_b.read_text().replace("option type 'mobile'", "option type 'broadband'"))
        ts.start(subflows=2)
        st = ts.a.status()
        assert sorted(ln["type"] for ln in st["links"]) == ["telecom", "unicom"]  # seed rule
        ts.a.stop()
        conf_a = ts.a.uci_dir / "orayboxvpn"
        conf_a.write_text(conf_a.read_text().replace(
            "config base 'base'\n", "config base 'base'\n\toption pair_unmatched '1'\n"))
        ts.a.start()
        st = ts.a.wait_connected(subflows=3, timeout=20)
        cross = [ln for ln in st["links"] if ln["type"] == "mobile"]
        assert cross and cross[0]["remote"].startswith("10.3.0.2:")


def test_aggregate_mode_carrier_failure_stalls_no_longer_than_detection(make_lab):
    """A carrier fails under a stream: each packet's wait (sent by the source
    to delivered at the sink, one CLOCK_MONOTONIC) is at most the sender's own
    detection time of that carrier (``dead_after_ms``: how long it waited for
    answers) plus the hold for the repair and the path's own worst delay seen
    before the failure.  A busy machine stretches all three alike."""
    from agentlab import UDP_LATENCY_SINK

    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption mode 'aggregate'\n") as ts:
        ts.start()
        sink = lab.python_popen(lab.hb, UDP_LATENCY_SINK, "192.168.20.2", "6000", "3",
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        count, rate = 3000, 1000.0
        src = lab.python_popen(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(count), str(rate),
                               stdout=subprocess.PIPE, text=True)
        st = ts.a.wait(lambda s: sum(ln["data_tx"] for ln in s["links"]) >= 1000, 30, "the stream under way")
        # fail the carrier that carries the stream (its first 330 KB are pinned to one subflow)
        busiest = max(st["links"], key=lambda ln: ln["data_tx"])["type"]
        t_down = time.monotonic()
        lab.link_down(1 + ("telecom", "unicom", "mobile").index(busiest))
        st = ts.a.wait(lambda s: links_by_type(s)[busiest]["state"] != "established", 30, f"{busiest} down")
        carried = links_by_type(st)[busiest]["data_tx"]
        src.wait(60)
        doc = json.loads(sink.communicate(timeout=60)[0])
        got = len(doc["packets"])
        assert doc["dups"] == 0
        # what was in flight on the dead carrier is asked for (NACK) and re-sent on the
        # others while the receiver holds the line for it: 0 lost in quiet runs, up to 6
        # seen on a loaded CI machine (was ~90 of 3000 before the repair of the tail)
        assert got >= count - 30, got
        st = ts.a.status()
        dead = links_by_type(st)[busiest]
        assert dead["state"] != "established"
        assert dead["data_tx"] == carried  # nothing more was put on the dead carrier
        assert sum(ln["data_tx"] for ln in st["links"] if ln["type"] != busiest) > 0
        assert dead["dead_after_ms"] is not None, dead  # found dead by its probes
        detect = dead["dead_after_ms"] / 1000
        waits = [arrived - sent for _, sent, arrived in doc["packets"]]
        before = [arrived - sent for _, sent, arrived in doc["packets"] if arrived < t_down]
        assert before, "nothing arrived before the failure"
        bound = detect + SessionConfig().hold_max + 2 * max(before) + 0.1
        assert max(waits) <= bound, (max(waits), detect, max(before))  # no stall beyond detection


def test_per_host_policy_keeps_a_hosts_traffic_on_its_carrier(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab) as ts:
        conf = ts.a.uci_dir / "orayboxvpn"
        conf.write_text(conf.read_text() + "\nconfig policy 'host_a'\n\toption src '192.168.10.2'\n"
                                           "\tlist carrier 'mobile'\n")
        ts.start()
        before = {ln["type"]: ln["data_tx"] for ln in ts.a.status()["links"]}
        sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "2",
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        lab.python(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", "500", "500", timeout=30)
        got = int(sink.communicate(timeout=20)[0].split()[0])
        assert got == 500
        st = ts.a.status()
        sent = {ln["type"]: ln["data_tx"] - before[ln["type"]] for ln in st["links"]}
        assert sent["mobile"] >= 500 and sent["telecom"] < 10 and sent["unicom"] < 10, sent
        assert st["policies"] == [{"name": "host_a", "src": "192.168.10.2/32", "dst": None,
                                   "carriers": ["mobile"], "exclusive": False, "mode": None,
                                   "priority": False}]


def test_test_links_measures_each_carrier_then_all_both_ways(sites):
    """mpvpn test-links between two real agents: rates follow the carriers' tbf,
    loss shows on the lossy carrier only, errors come back as messages."""
    import json
    import sys

    from mpvpn.io import rpc

    lab, ts = sites
    for c, mbit in ((1, 40), (2, 20), (3, 10)):
        lab.set_rate(c, mbit)
    lab.set_loss(3, 5)
    ts.start()
    path = rpc.socket_path(str(ts.a.run_dir))
    assert rpc.call(path, "test_links", {"duration": 99}) == {
        "error": "duration must be 0.5..10 seconds"}
    assert rpc.call(path, "test_links", {"duration": "2"}) == {"error": "duration must be a number of seconds"}
    assert ts.a.status()["link_test"] is None
    cmd = [sys.executable, "-m", "mpvpn", "test-links", "--duration", "1.5", "--json",
           "--run-dir", str(ts.a.run_dir)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ts.a.wait(lambda st: (st.get("link_test") or {}).get("state") == "running", what="test running")
    assert rpc.call(path, "test_links", {})["error"] == "a link test is already running"
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    doc = json.loads(out)
    assert doc["state"] == "done" and doc["error"] is None and abs(doc["started"] - time.time()) < 120
    res = {(r["name"], r["direction"]): r for r in doc["results"]}
    assert len(res) == 8
    names = {ln["member"]: ln["name"] for ln in ts.a.status()["links"]}
    rate = {"telecom": 40, "unicom": 20, "mobile": 10}
    for name, mbit in rate.items():
        for d in ("up", "down"):
            r = res[(name, d)]
            # the shaper caps it (behaviour); the floor only says the test saw the
            # link at all: how close a loaded machine gets is not this test's business
            assert 0.5 * mbit <= r["mbps"] <= 1.05 * mbit, (name, d, r)
            assert r["rtt_ms"] is not None and r["packets"] > 0
    for d in ("up", "down"):
        # loss = 1 - received / sent over the paced half: bounds from that many datagrams
        # (a busy machine sends fewer, and the bounds widen with it)
        mob = res[("mobile", d)]
        assert mob["loss"] is not None, mob
        sent = round(mob["packets"] / (1 - mob["loss"]))
        assert sent >= min_trials_to_tell(0.05), mob  # enough to tell 5 % from none
        lo, hi = binomial_interval(sent, 0.05)
        assert lo <= sent - mob["packets"] <= hi, (d, mob, sent, (lo, hi))
        for clean in ("telecom", "unicom"):  # the clean carriers do not look like the lossy one
            r = res[(clean, d)]
            assert r["loss"] is not None, r
            sent = round(r["packets"] / (1 - r["loss"]))
            assert sent - r["packets"] < binomial_interval(sent, 0.05)[0], (clean, d, r)
        agg = res[("+".join(names[m] for m in sorted(names)), d)]
        assert 0.5 * 70 <= agg["mbps"] <= 1.05 * 70, agg
    # the peer saw the same test from the other side: its counters stayed clean
    stb = ts.b.status()
    assert stb["link_test"] is None and stb["counters"]["malformed"] == 0


def test_configured_upload_speed_seeds_the_link_rate_until_measured(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption mode 'aggregate'\n") as ts:
        conf = ts.a.uci_dir / "orayboxvpn"
        conf.write_text(conf.read_text().replace(
            "config smpu 'telecom'\n", "config smpu 'telecom'\n\toption upload '2000'\n"))
        ts.start()
        rates = {ln["type"]: (ln["rate_kbps"], ln["rate_measured"]) for ln in ts.a.status()["links"]}
        assert rates == {"telecom": (2000, False), "unicom": (10000, False), "mobile": (10000, False)}


def test_one_hub_serves_two_client_sites_at_once(make_lab):
    """Site B as a hub with two client sites (A, and C on its own carriers),
    each with its own key (`config site`, no shared key on the hub): two
    sessions, each site's LAN reaches the hub's, the hub routes each LAN to
    its own session and names the site, and one client leaving does not
    disturb the other."""
    from agentlab import Site, site_config

    from mpvpn.core.noise import genpsk

    lab = make_lab(carriers=3)
    c = lab.add_site("c")
    with TwoSites(lab) as ts:
        mask29 = ("option netmask '255.255.255.252'", "option netmask '255.255.255.248'")
        for site in (ts.a, ts.b):  # room for three vNIC addresses
            conf = site.uci_dir / "orayboxvpn"
            conf.write_text(conf.read_text().replace(*mask29))
        psk_a = re.search(r"option psk '([^']+)'", (ts.b.uci_dir / "orayboxvpn").read_text()).group(1)
        psk_c = genpsk()
        hub = ts.b.uci_dir / "orayboxvpn"  # only per-site keys on the hub
        hub.write_text(hub.read_text().replace(f"\toption psk '{psk_a}'\n", "")
                       + f"\nconfig site 'branch_a'\n\toption psk '{psk_a}'\n"
                       + f"\nconfig site 'branch_c'\n\toption psk '{psk_c}'\n")
        assert psk_a not in hub.read_text().split("config site")[0]
        text, network = site_config("client", psk_c, 1, "172.30.0.3", c.router_lan_ip)
        for i, ip in c.carrier_ips.items():
            text = text.replace(f"option bind_ip '10.{i}.0.1'", f"option bind_ip '{ip}'")
        site_c = Site(lab, c.router, Path(ts._tmp.name), "c")
        site_c.write(text.replace(*mask29), network)
        ts.start()
        site_c.start()
        try:
            site_c.wait_connected(3)
            st = ts.b.wait(lambda s: len(s["sessions"]) == 2 and all(
                sum(1 for ln in se["links"] if ln["state"] == "established") == 3 for se in s["sessions"]),
                15, "two client sessions")
            assert sorted((se["peer"]["vnc"]["ip"], se["site"]) for se in st["sessions"]) == [
                ("172.30.0.1", "branch_a"), ("172.30.0.3", "branch_c")]
            assert sorted(st["routes"]) == ["192.168.10.0/24", "192.168.30.0/24"]
            for host in (lab.ha, c.host):  # both client LANs reach the hub's LAN, at the same time
                p = lab.ping(host, "192.168.20.2", count=20, interval=0.02)
                assert p.received == 20
            assert lab.ping(lab.hb, c.host_ip, count=10, interval=0.02).received == 10  # and back
            assert lab.ping(lab.hb, "192.168.10.2", count=10, interval=0.02).received == 10
            ts.a.stop()  # one client leaves: the other keeps its session
            st = ts.b.wait(lambda s: len(s["sessions"]) == 1, 15, "A's session gone")
            assert st["sessions"][0]["peer"]["vnc"]["ip"] == "172.30.0.3"
            assert st["routes"] == ["192.168.30.0/24"]
            assert lab.ping(c.host, "192.168.20.2", count=10, interval=0.02).received == 10
        finally:
            site_c.stop()


def test_the_pure_python_data_path_still_carries_everything(sites):
    """A router without the compiled loops (no orayboxvpn-fastpath package):
    the same TCP transfer, intact, clean and at 20 % loss per carrier."""
    lab, ts = sites
    ts.start(env_extra={"MPVPN_FASTPATH": "0"})
    for site in (ts.a, ts.b):
        dp = site.status()["dataplane"]
        assert dp["c_loops"] is False and "MPVPN_FASTPATH=0" in dp["c_loops_off_why"]
        assert dp["tun_offload"] == "gro"  # the pure-Python default
    sent, sha_tx, got, sha_rx, _ = tcp_transfer(lab, 20_000_000)
    assert (got, sha_rx) == (sent, sha_tx)
    for c in (1, 2, 3):
        lab.set_loss(c, 20)
    sent, sha_tx, got, sha_rx, _ = tcp_transfer(lab, 10_000_000)
    assert (got, sha_rx) == (sent, sha_tx)
    assert ts.b.status()["counters"]["duplicates"] > 0


MSS_SERVER = r"""
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(1); print("ready", flush=True)
c, _ = l.accept(); print(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True); c.recv(1)
"""

MSS_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True); s.close()
"""


def _mss_both_ways(lab, port: int) -> tuple[int, int]:
    """TCP_MAXSEG of a fresh connection ha -> hb: (client's, server's)."""
    srv = lab.python_popen(lab.hb, MSS_SERVER, "192.168.20.2", str(port), stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        client = int(lab.python(lab.ha, MSS_CLIENT, "192.168.20.2", str(port)).stdout)
        server = int(srv.stdout.readline())
    finally:
        srv.kill()
        srv.wait(5)
    return client, server


def test_syns_through_the_tunnel_get_an_mss_that_fits_and_the_option_turns_it_off(sites):
    """The LAN hosts have 1500-byte links (MSS 1460) but the vNIC carries 1400:
    each agent lowers the MSS of the SYNs it reads from its vNIC, so both ends
    send segments that fit at once (1360 minus the 12 bytes of timestamps);
    ``mss_clamp 0`` (live on SIGHUP) leaves them at 1460 - 12."""
    import signal

    lab, ts = sites
    ts.start()
    assert _mss_both_ways(lab, 5301) == (1360 - 12, 1360 - 12)
    assert ts.a.status()["counters"]["mss_clamped"] >= 1  # the SYN
    assert ts.b.status()["counters"]["mss_clamped"] >= 1  # the SYN-ACK
    for site in (ts.a, ts.b):
        conf = site.uci_dir / "orayboxvpn"
        conf.write_text(conf.read_text().replace("config base 'base'\n",
                                                 "config base 'base'\n\toption mss_clamp '0'\n"))
        site.proc.send_signal(signal.SIGHUP)
        site.wait(lambda s, site=site: "live options applied" in site.log(), 5, "reload logged")
    assert _mss_both_ways(lab, 5302) == (1460 - 12, 1460 - 12)


# -- lifecycle: one agent per run directory and vNIC, leftovers, live LAN change, lost vNIC --------

def _ifindex(lab, ns, ifname="mpvpn0"):
    import json

    return json.loads(lab.run(ns, ["ip", "-j", "link", "show", ifname]).stdout)[0]["ifindex"]


def test_a_second_agent_is_refused_and_touches_nothing(sites, tmp_path):
    lab, ts = sites
    ts.start()
    pid = ts.a.proc.pid
    before = (_ifindex(lab, lab.ra), routes(lab, lab.ra), ts.a.status()["session_id"])
    both = [Stream(lab, lab.ha, lab.hb, "192.168.20.2", 6001).start(),
            Stream(lab, lab.hb, lab.ha, "192.168.10.2", 6002).start()]
    time.sleep(0.5)
    same_dir = ts.a.run_once()
    other_dir = ts.a.run_once(run_dir=tmp_path / "other-run")
    time.sleep(0.5)
    for sent, got, dups in (s.stop() for s in both):
        assert sent > 0 and (got, dups) == (sent, 0)  # the running agent carried every packet
    for r in (same_dir, other_dir):
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    assert re.search(rf"ERROR: cannot run: another agent \(pid {pid}\) is running with run directory "
                     rf"{re.escape(str(ts.a.run_dir))}", same_dir.stderr), same_dir.stderr
    assert f"another agent (pid {pid}) is running with vNIC mpvpn0" in other_dir.stderr, other_dir.stderr
    assert not (tmp_path / "other-run" / "orayboxvpn.sock").exists()  # nothing made there
    assert ts.a.proc.poll() is None
    assert (_ifindex(lab, lab.ra), routes(lab, lab.ra), ts.a.status()["session_id"]) == before
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05, timeout=5).received == 5


def test_after_kill_9_the_next_agent_starts_and_cleans_only_dead_leftovers(sites):
    lab, ts = sites
    ts.start()
    dead = ts.a.proc.pid
    ts.a.stop("KILL")
    lock = ts.a.run_dir / "agent.lock"
    assert lock.read_text().strip() == str(dead)  # the file stays; the kernel dropped the flock
    # what a dead owner may leave under our vNIC name (a tun made persistent, a
    # route of ours on it), and a route of ours on another device: another
    # agent's (another vNIC name), which must survive
    for cmd in ("ip tuntap add mode tun mpvpn0", "ip link set mpvpn0 up",
                f"ip route add 10.77.0.0/24 dev mpvpn0 proto {RTPROT_MPVPN}",
                "ip link add other0 type veth peer name other0p", "ip link set other0 up",
                "ip link set other0p up", f"ip route add 10.88.0.0/24 dev other0 proto {RTPROT_MPVPN}"):
        lab.run(lab.ra, cmd)
    ts.a.start()
    ts.a.wait_connected(timeout=20)
    r = routes(lab, lab.ra)
    assert "192.168.20.0/24 dev mpvpn0" in r and "10.77.0.0/24" not in r
    assert "10.88.0.0/24 dev other0" in r
    assert "removing leftovers of an agent that is gone: interface mpvpn0 and 1 route(s)" in ts.a.log()
    assert lock.read_text().strip() == str(ts.a.proc.pid)
    assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05, timeout=5).received == 5
    # a device of our name that is not a tun is not ours to delete: refuse, say why
    ts.a.stop()
    lab.run(lab.ra, "ip link add mpvpn0 type veth peer name mpvpn0p")
    r = ts.a.run_once()
    assert r.returncode == 1 and "interface mpvpn0 exists and is not a tun device (veth)" in r.stderr
    assert "mpvpn0" in lab.run(lab.ra, ["ip", "link"]).stdout


def test_lan_change_is_an_update_that_loses_nothing(make_lab):
    lab = make_lab(carriers=3)
    ts = TwoSites(lab, extra_base="\toption rekey_interval '3600'\n")  # epoch moves only on a restart
    try:
        _lan_change_is_an_update(lab, ts)
    finally:
        ts.close()


def _lan_change_is_an_update(lab, ts):
    import signal

    ts.start()
    st0 = ts.a.status()
    sid, connects = st0["session_id"], st0["counters"]["control_connects"]
    epoch = st0["sessions"][0]["epoch"]
    conf = ts.a.uci_dir / "orayboxvpn"
    text = conf.read_text()
    both = [Stream(lab, lab.ha, lab.hb, "192.168.20.2", 6001).start(),
            Stream(lab, lab.hb, lab.ha, "192.168.10.2", 6002).start()]
    time.sleep(0.5)
    conf.write_text(text.replace("config base 'base'\n", "config base 'base'\n\tlist lan_subnet '10.99.0.0/24'\n"))
    ts.a.proc.send_signal(signal.SIGHUP)
    sb = ts.b.wait(lambda s: "10.99.0.0/24" in s["routes"], 10, "B routes the new subnet")
    assert "10.99.0.0/24 dev mpvpn0" in routes(lab, lab.rb)
    assert sb["sessions"][0]["peer"]["lans"] == ["192.168.10.0/24", "10.99.0.0/24"]
    time.sleep(0.5)
    conf.write_text(text)  # and away again
    ts.a.proc.send_signal(signal.SIGHUP)
    ts.b.wait(lambda s: "10.99.0.0/24" not in s["routes"], 10, "B drops the subnet")
    assert "10.99.0.0/24" not in routes(lab, lab.rb)
    # the same from the server's side: the client's routes follow
    conf_b = ts.b.uci_dir / "orayboxvpn"
    text_b = conf_b.read_text()
    conf_b.write_text(text_b.replace("config base 'base'\n", "config base 'base'\n\tlist lan_subnet '10.98.0.0/24'\n"))
    ts.b.proc.send_signal(signal.SIGHUP)
    ts.a.wait(lambda s: "10.98.0.0/24" in s["routes"], 10, "A routes the server's new subnet")
    assert "10.98.0.0/24 dev mpvpn0" in routes(lab, lab.ra)
    conf_b.write_text(text_b)
    ts.b.proc.send_signal(signal.SIGHUP)
    ts.a.wait(lambda s: "10.98.0.0/24" not in s["routes"], 10, "A drops it")
    time.sleep(0.5)
    for sent, got, dups in (s.stop() for s in both):
        assert sent > 0 and (got, dups) == (sent, 0)  # not one packet lost on the unchanged LANs
    st = ts.a.status()
    assert st["session_id"] == sid and st["counters"]["control_connects"] == connects  # no restart
    assert st["sessions"][0]["epoch"] == epoch and st["control"]["epoch"] == st0["control"]["epoch"]
    assert ts.b.status()["session_id"] == sid
    for site in (ts.a, ts.b):
        assert site.log().count("LAN change announced") == 2 and "restarting sessions" not in site.log()
    # a LAN that clashes with the peer's is refused by the peer, as in the first exchange
    conf.write_text(text.replace("config base 'base'\n", "config base 'base'\n\tlist lan_subnet '192.168.20.0/25'\n"))
    ts.a.proc.send_signal(signal.SIGHUP)
    st = ts.a.wait(lambda s: s["last_error"] and "overlap" in s["last_error"], 10, "the peer's refusal")
    assert "192.168.20.0/25" in st["last_error"]
    assert "192.168.20.0/25" not in routes(lab, lab.rb)
    for site in (ts.a, ts.b):
        assert "Traceback" not in site.log()


def test_a_deleted_vnic_is_recreated_with_its_address_and_routes(sites):
    lab, ts = sites
    ts.start()
    sid = ts.a.status()["session_id"]
    old = _ifindex(lab, lab.ra)
    lab.run(lab.ra, ["ip", "link", "del", "mpvpn0"])
    st = ts.a.wait(lambda s: s["counters"]["vnic_recreated"] == 1, 10, "the vNIC recreated")
    assert "vNIC mpvpn0 vanished" in ts.a.log() and "vNIC mpvpn0 recreated" in ts.a.log()
    assert _ifindex(lab, lab.ra) != old
    assert "172.30.0.1/30" in lab.run(lab.ra, ["ip", "addr", "show", "mpvpn0"]).stdout
    assert routes(lab, lab.ra).startswith("192.168.20.0/24 dev mpvpn0")
    assert st["session_id"] == sid and ts.a.proc.poll() is None
    assert lab.ping(lab.ha, "192.168.20.2", count=10, interval=0.05, timeout=5).received == 10
    assert "Traceback" not in ts.a.log()
