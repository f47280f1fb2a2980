"""End to end, the control connection under attack and under volume: two
real agents in the namespace lab (tests/agentlab.py), asserting on the
agents' own records (status document: reconnect history and counters),
never on wall-clock durations."""

import subprocess
import time

import pytest
from agentlab import UDP_SINK, UDP_SOURCE, TwoSites

from mpvpn.core import controlconn, controlmsg, noise
from mpvpn.io import rpc

pytestmark = pytest.mark.usefixtures("netlab_ready")

# Junk TCP connections to the server's control port from the namespace the
# client runs in (so from the client's own source address, as behind a
# shared NAT): ~20 per second for argv[2] seconds, mixing garbage bytes,
# well-formed frames of garbage, and silent connections held open 3 s.
JUNK = r"""
import os, random, socket, sys, time
dst, seconds = sys.argv[1], float(sys.argv[2])
rng = random.Random(5); held = []; n = 0; t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    s = socket.socket(); s.settimeout(1.0)
    try:
        s.connect((dst, 7000)); n += 1
        k = n % 3
        if k == 0:
            s.sendall(rng.randbytes(rng.randrange(1, 400))); s.close()
        elif k == 1:
            s.sendall((64).to_bytes(2, "big") + rng.randbytes(64) + (32).to_bytes(2, "big") + rng.randbytes(32))
            s.close()
        else:
            held.append((time.monotonic() + 3.0, s))
    except OSError:
        s.close()
    now = time.monotonic()
    for item in [h for h in held if h[0] <= now]:
        item[1].close(); held.remove(item)
    if n == 40:
        print("flooding", flush=True)
    time.sleep(0.05)
print(n, flush=True)
"""


def test_junk_from_the_clients_own_address_does_not_delay_its_reconnect(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab) as ts:
        ts.start()
        sid0 = ts.a.status()["session_id"]
        junk = lab.python_popen(lab.ra, JUNK, "10.1.0.2", "40", stdout=subprocess.PIPE, text=True)
        try:
            assert junk.stdout.readline().strip() == "flooding"  # the source's failure budget is spent
            sids = [sid0]
            for round_ in range(3):
                rpc.call(rpc.socket_path(str(ts.a.run_dir)), "reconnect", timeout=2.0)
                st = ts.a.wait(lambda s: s["session_id"] not in (None, *sids) and
                               s["control"]["state"] == "established", 30, "a new session")
                sids.append(st["session_id"])
                rc = st["control"]["reconnect"]
                # the agent's own record: one attempt, no failure, no BUSY
                assert [w.split()[0] for _t, w in rc["history"]] == ["connect", "established"], rc
                assert (rc["attempts"], rc["failures"], rc["busy"]) == (1, 0, 0)
                assert rc["history"][0][0] <= rc["history"][1][0]
                ts.a.wait_connected(timeout=20)
                time.sleep(1.0)  # let more junk pile up before the next round
            assert junk.poll() is None, "the junk ran through all rounds"
        finally:
            lab.stop(junk)
        assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
        sb = ts.b.status()
        closed = sb["control"]["closed_by_reason"]
        reg = sb["control"]["registry"]
        junk_ends = sum(closed.get(k, 0) for k in ("bad_psk", "malformed", "oversized", "eof",
                                                    "timeout", "evicted"))
        assert junk_ends >= 60 and closed.get("evicted", 0) > 0, closed  # held ones made room
        assert reg.get("replay", 0) == 0 and reg.get("busy_handshake", 0) == 0
        assert reg["sessions_opened"] == 4  # the first session and three reconnects
        for site in (ts.a, ts.b):
            assert "Traceback" not in site.log()


# Send the same first frames (argv[2], hex) argv[3] times, each over a new
# TCP connection, and count the connections that got any byte back.
REPLAY = r"""
import socket, sys
dst, data, times = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
answered = 0
for i in range(times):
    s = socket.create_connection((dst, 7000), timeout=5)
    s.sendall(data)
    got = s.recv(4096)  # the server closes a replay at once: b""
    answered += bool(got)
    s.close()
print(answered, flush=True)
"""


def test_a_replayed_first_message_is_answered_once_end_to_end(make_lab):
    lab = make_lab(carriers=3)
    psk = noise.genpsk()
    with TwoSites(lab, psk=psk) as ts:
        ts.start()
        # a genuine first message (the key holder's), as an eavesdropper records it
        cfg = controlconn.ControlConfig(psk=noise.load_psk(psk), name="recorded",
                                    vnc=controlmsg.Vnc("172.30.0.1", "255.255.255.252"))
        first = controlconn.ClientConnection(cfg, 0.0).data_to_send()
        out = lab.python(lab.ra, REPLAY, "10.1.0.2", first.hex(), "3000", timeout=300).stdout
        assert int(out) == 1  # the original; none of its 2,999 replays
        reg = ts.b.status()["control"]["registry"]
        assert reg["replay"] == 2999 and reg.get("busy_handshake", 0) == 0, reg
        assert ts.b.status()["control"]["closed_by_reason"]["replay"] == 2999
        # the real client was never disturbed
        st = ts.a.status()
        assert st["control"]["reconnect"]["attempts"] == 1 and st["state"] == "connected"
        assert lab.ping(lab.ha, "192.168.20.2", count=5, interval=0.05).received == 5
        # nor after a restart of the server: its records are in the run directory
        ts.b.stop()
        ts.b.start()
        ts.b.wait(lambda s: s["control"].get("state") == "listening", what="listening again")
        out = lab.python(lab.ra, REPLAY, "10.1.0.2", first.hex(), "20", timeout=120).stdout
        assert int(out) == 0
        assert ts.b.status()["control"]["registry"]["replay"] == 20
        assert "restored 1 handshake freshness records" in ts.b.log() or \
            "restored 2 handshake freshness records" in ts.b.log()


def test_rekey_by_volume_under_traffic_loses_nothing(make_lab):
    lab = make_lab(carriers=3)
    with TwoSites(lab, extra_base="\toption rekey_packets '1000'\n") as ts:
        ts.start()
        st0 = ts.a.status()
        epoch0, sid = st0["sessions"][0]["epoch"], st0["session_id"]
        sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "3",
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        count = 3500  # 3.5 budgets of 1000 packets from the client, 7 s
        lab.python(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(count), "500", timeout=60)
        out, _ = sink.communicate(timeout=30)
        got, dups, _last = map(int, out.split())
        st_a, st_b = ts.a.status(), ts.b.status()
        ca, cb = st_a["sessions"][0]["counters"], st_b["sessions"][0]["counters"]
        # no datagram refused for its key (epoch), none given up by the reorder buffer
        assert ca["auth_failures"] == cb["auth_failures"] == 0, (ca, cb)
        assert cb["skipped"] == 0 and ca["sent"] >= count, (ca, cb)
        assert (got, dups) == (count, 0), (ca, cb)
        vol = st_a["control"]["counters"].get("rekey_volume", 0)
        assert vol >= 3, st_a["control"]["counters"]  # by volume: the timer is 120 s
        assert st_a["control"]["counters"]["rekeyed"] >= vol
        epoch_a, epoch_b = st_a["sessions"][0]["epoch"], st_b["sessions"][0]["epoch"]
        assert epoch_a >= epoch0 + vol and abs(epoch_a - epoch_b) <= 1
        assert st_a["session_id"] == st_b["session_id"] == sid  # one session throughout
        # and the other direction too
        assert lab.ping(lab.hb, "192.168.10.2", count=20, interval=0.02).received == 20


# A site with its own valid key that announces another site's name and vNIC
# address (issue 16's hostile test), 25 times; prints the ERROR code it got
# back each time.
IMPOSTOR = r"""
import socket, sys, time
from mpvpn.core import admission, controlconn, controlevents, controlmsg, noise
psk, name, vnc, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = controlconn.ControlConfig(psk=noise.load_psk(psk), name=name,
                            vnc=controlmsg.Vnc(vnc, "255.255.255.0"), lans=("192.168.99.0/24",))
stamps = admission.HandshakeStamps()
codes = []
for i in range(n):
    s = socket.create_connection(("10.1.0.2", 7000), timeout=5)
    c = controlconn.ClientConnection(cfg, time.monotonic(), stamps)
    code = "none"
    while not c.closed:
        s.sendall(c.data_to_send())
        data = s.recv(65536)
        c.receive_data(data, time.monotonic())
        for e in c.events():
            if isinstance(e, controlevents.ProtocolError):
                code = e.code
    s.close()
    codes.append(code)
print(" ".join(codes), flush=True)
"""


def test_a_site_with_its_own_key_cannot_take_over_another_sites_session(make_lab):
    """Issue 16: identity is the key, never the claimed name or address."""
    lab = make_lab(carriers=3)
    k_a, k_h = noise.genpsk(), noise.genpsk()
    sites = (f"\nconfig site 'branch_a'\n\toption psk '{k_a}'\n"
             f"\nconfig site 'hostile'\n\toption psk '{k_h}'\n")
    with TwoSites(lab, psk=k_a, psk_b=noise.genpsk()) as ts:
        for site in (ts.a, ts.b):
            path = site.uci_dir / "orayboxvpn"
            text = path.read_text().replace("'255.255.255.252'", "'255.255.255.0'")
            path.write_text(text + (sites if site is ts.b else ""))
        ts.start()
        st = ts.a.status()
        sid, name = st["session_id"], st["name"]
        out = lab.python(lab.ra, IMPOSTOR, k_h, name, "172.30.0.1", "25", timeout=120).stdout
        assert out.split() == ["vnic"] * 25, out
        # site A was never disturbed: the same session, no reconnect, traffic flows
        st = ts.a.status()
        assert st["session_id"] == sid and st["state"] == "connected"
        assert st["control"]["reconnect"]["attempts"] == 1
        sb = ts.b.status()
        assert [s["session_id"] for s in sb["sessions"]] == [sid]
        assert sb["sessions"][0]["site"] == "branch_a"
        assert sb["control"]["registry"]["claim_refused"] == 25
        assert lab.ping(lab.ha, "192.168.20.2", count=20, interval=0.02).received == 20
