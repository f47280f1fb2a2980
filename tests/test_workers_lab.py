"""A hub whose data path runs in two processes (``base.workers 2``, issue
16) with real agents in network namespaces (tests/hublab.py): sessions are
sharded by id between the main process and a worker; site-to-site through
the hub (within a process and across the two), site to the hub's LAN and
back, every packet arrives exactly once, the status document lists every
session with counters from both processes, and a worker that dies ends the
agent with the reason (procd starts it again).  The hub rekeys by volume
alone (``rekey_packets`` at its minimum, the interval far away): the
volume its workers seal reaches the main process, which holds the control
connections, and the new keys reach the workers, without a packet lost."""

from __future__ import annotations

import itertools
import os
import signal
import time

from agentlab import Stream
from hublab import HubLab

WORKERS = "\toption workers '2'\n\toption rekey_packets '1000'\n"
NO_TIMED_REKEY = "\toption rekey_interval '3600'\n"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def placement(h: HubLab) -> dict:
    """site name -> the process holding its session on the hub (0: main)."""
    st = h.hub.status()
    pid = {k: int(v) for k, v in st["workers"]["pids"].items()}
    assert set(pid) == {"1"}
    by_vnc = {s.vnc: name for name, s in h.sites.items()}
    n = st["workers"]["count"]
    return {by_vnc[se["peer"]["vnc"]["ip"]]: se["session_id"] % n for se in st["sessions"]}


def mixed(h: HubLab, tries: int = 12) -> dict:
    """Restart sites until both processes hold a session (ids are random)."""
    for i in range(tries):
        where = placement(h)
        if len(set(where.values())) == 2:
            return where
        name = sorted(where)[i % len(where)]
        h.sites[name].agent.stop()
        h.sites[name].agent.start()
        h.wait_connected()
        h.sites[name].agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 20, "routes")
    raise AssertionError(f"sessions never spread over both processes: {placement(h)}")


def test_two_workers_carry_every_packet_once_and_status_counts_both(make_lab):
    lab = make_lab(carriers=2)
    with HubLab(lab, "cd", forward=True, hub_base=WORKERS, extra_base=NO_TIMED_REKEY) as h:
        h.start()
        for name, s in h.sites.items():
            s.agent.wait(lambda st, n=name: st["routes"] == h.expected_routes(n), 20, f"{name}'s routes")
        where = mixed(h)
        # idle, the worker sleeps until its sessions' next timer (a loop that
        # spins would use the whole 3 s; sleeping costs a few ms)
        worker = int(h.hub.status()["workers"]["pids"]["1"])
        cpu0 = cpu_seconds(worker)
        time.sleep(3)
        assert cpu_seconds(worker) - cpu0 < 1.0
        names = list(h.sites)
        streams = {}
        for i, (src, dst) in enumerate(itertools.permutations(names, 2)):  # within and across
            d = h.sites[dst]
            streams[(src, dst)] = Stream(lab, h.sites[src].host_ns, d.host_ns, d.host_ip, 6000 + i,
                                         rate=200, quiet=3).start()
        for i, name in enumerate(names):  # each site to the hub's LAN (written to the tun by its holder)
            streams[(name, "hub")] = Stream(lab, h.sites[name].host_ns, lab.hb, lab.hb_ip, 6100 + i,
                                            rate=100, quiet=3).start()
        streams[("hub", "c")] = Stream(lab, lab.hb, h.sites["c"].host_ns, h.sites["c"].host_ip, 6200,
                                       rate=100, quiet=3).start()  # the tun read, handed over
        time.sleep(8)
        for key, s in streams.items():
            sent, got, dups = s.stop()
            assert sent > 100 and (got, dups) == (sent, 0), (key, where, sent, got, dups)
        st = h.hub.status()
        assert len(st["sessions"]) == 3 and all(se["state"] == "connected" for se in st["sessions"])
        # rekeyed by the volume the holder sealed (reported to the main process), keys installed there
        assert all(se["epoch"] >= 2 for se in st["sessions"]), [se["epoch"] for se in st["sessions"]]
        assert st["control"]["registry"].get("rekey_volume", 0) >= 3
        assert st["workers"]["count"] == 2
        assert st["workers"]["sessions"] == {"1": sum(1 for k in where.values() if k == 1)}
        assert len(st["links"]) == 3 * lab.n  # every session's links, from both processes
        fwd = {se["session_id"]: se["forwarded"] for se in st["sessions"]}
        for se in st["sessions"]:  # each site sent to 2 sites and got from 2: counted once per packet
            f = se["forwarded"]
            assert f["from_packets"] >= 200 and f["to_packets"] >= 200, fwd
        assert sum(f["from_packets"] for f in fwd.values()) == sum(f["to_packets"] for f in fwd.values())
        assert st["counters"]["hub_forwarded"] == sum(f["from_packets"] for f in fwd.values())
        assert st["counters"]["delivered"] >= sum(f["from_packets"] for f in fwd.values())

        # a worker that dies ends the agent, with the reason
        os.kill(int(st["workers"]["pids"]["1"]), signal.SIGKILL)
        rc = h.hub.proc.wait(30)
        assert rc != 0
        assert "data-path worker 1" in h.hub.log() and "ended" in h.hub.log()
        h.hub.proc = None
        h.hub.logf.close()
