#!/usr/bin/env python3
"""Hub benchmark in the namespace lab (issue 16): TCP goodput between two
client sites through a hub with ``base.hub_forward`` (the hub opens each
packet with one site's keys and seals it with the other's, in-process),
next to a direct pair measured in the same run (a site and the hub's LAN:
one session, one hop), with added latency, CPU seconds per GB of every agent
on the path and the hub's memory.

    python bench/hub.py [--seconds S] [--sites N] [--carriers C] [--json FILE]   (root; needs iperf3)
    python bench/hub.py --handshakes [--keys K] [--seconds S] [--inflight N]
                                          (handshakes per second, and a storm's cost to the others)
    python bench/hub.py --workers 1,2 [--seconds S] [--rounds R]
                                          (forwarding between two site pairs, hub in 1 vs 2 processes)
    python bench/hub.py --idle 1,10,50 [--made ns|crowd] [--seconds S]
                                          (the hub's cost per connected idle site)

The hub serves ``--sites`` client sites (A plus add_site routers c, d, ...);
the load runs between A and C, the others are connected and idle.  With
``--idle``, for each number of sites: the hub's RSS and CPU share over
``--seconds`` with every site connected and idle (keepalives only).  Sites
are made (``--made``) as one namespace pair per site (``ns``: netlab's
add_site, at most 25 sites) or as agents sharing one namespace, each bound to
its own addresses on shared veths to the hub (``crowd``: netlab's add_crowd,
up to 150; the default when a count exceeds 25).  Either way every site is
a real agent process with its own control connection and UDP subflows; the
hub sees no difference but the source addresses.

``--workers 1,2``: the hub (``base.workers``) forwards between two pairs
of client sites at once (A -> C and D -> E, iperf3 each, every site on its
own namespace and carriers); with 2 processes the sites reconnect until
each pair's sessions sit in one process and the two pairs in different
ones (``--placement crossed``: each pair split over the two processes,
every forwarded packet handed over; session ids are random, so a hub with
many sites sees half of its site-to-site traffic crossed).  Goodput of both pairs together, CPU seconds
per GB of the hub's processes and of all agents, and the ratio against 1
process measured in the same run.  Everything -- the four sites, iperf3
and the hub -- shares this machine's cores, so the hub is rarely what
limits; ``--hub-cap P`` puts each hub process in its own cgroup capped at
P % of one core (bench/cost.py's CpuCap: a router's slow core per process),
so that the hub limits and the ratio says how its data path scales with
cores.

``--handshakes``: the hub has ``--keys`` ``config site`` sections (each
site its own PSK: a first message costs one keyed hash per key) and site A
connected; a storm client (bench/hubstorm.py, the real client machine over
real TCP, ``--inflight`` connections at once, from its own namespace) opens
connections for ``--seconds`` per phase: ``junk`` (random first messages),
``replay`` (one captured genuine first message again and again),
``genuine`` (handshake to WELCOME with the sites' keys in turn, under the
hub's default handshake budget), and ``genuine`` again with the budget
lifted (``MPVPN_HANDSHAKE_RATE``, the hub restarted: what its CPU
sustains).  Meanwhile A's LAN host pings the hub's LAN host 200 times a
second: the loss and RTT say what the storm costs an established session.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

import agent as agentbench  # noqa: E402  (bench/agent.py: iperf, ping, CPU and RSS helpers)
from hublab import HubLab  # noqa: E402
from netlab import Lab  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sites", type=int, default=3, help="client sites on the hub (2..25; default 3)")
    ap.add_argument("--carriers", type=int, default=2, help="carriers per site (default 2)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--idle", metavar="N,N,...", help="measure the idle cost at these numbers of sites")
    ap.add_argument("--made", choices=("ns", "crowd"),
                    help="--idle: a namespace pair per site (ns, <= 25) or agents sharing one (crowd, <= 150)")
    ap.add_argument("--handshakes", action="store_true", help="handshakes per second and a storm's cost")
    ap.add_argument("--workers", metavar="N,N", help="forwarding with the hub in these numbers of processes")
    ap.add_argument("--rounds", type=int, default=1, help="--workers: measure each count this often")
    ap.add_argument("--placement", choices=("paired", "crossed"), default="paired",
                    help="--workers: each pair in one process (paired) or split over two (crossed)")
    ap.add_argument("--hub-cap", type=float, metavar="P",
                    help="--workers: each hub process capped at P %% of one core (cgroup)")
    ap.add_argument("--keys", type=int, default=50, help="--handshakes: config site sections on the hub")
    ap.add_argument("--inflight", type=int, default=32, help="--handshakes: connections open at once")
    args = ap.parse_args(argv)
    if args.idle:
        return idle(args)
    if args.handshakes:
        return handshakes(args)
    if args.workers:
        return workers_bench(args)
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    if not 2 <= args.sites <= 25:
        ap.error("--sites must be 2..25")
    letters = "".join(chr(ord("c") + k) for k in range(args.sites - 1))
    rows = []
    with Lab(args.carriers) as lab, HubLab(lab, letters, forward=True) as h:
        h.start()
        a, c = h.sites["a"], h.sites["c"]
        a.agent.wait(lambda st: c.lan in st["routes"], 30, "A routes C's LAN")
        hub_pid = h.hub.proc.pid
        idle_rss = agentbench.rss_mib(hub_pid)
        rows.append(agentbench.measure(lab, "direct pair: A -> hub LAN (1 session)",
                                       [a.agent.proc.pid, hub_pid], a.host_ns, lab.hb, "192.168.20.2",
                                       args.seconds))
        rows.append(agentbench.measure(lab, "through the hub: A -> C LAN (2 sessions)",
                                       [a.agent.proc.pid, hub_pid, c.agent.proc.pid], a.host_ns,
                                       c.host_ns, c.host_ip, args.seconds))
        st = h.hub.status()
        fwd = {se["name"]: se["forwarded"] for se in st["sessions"]}
        rows[-1]["hub_forwarded_packets"] = st["counters"]["hub_forwarded"]
        rows[-1]["hub_spoofed"] = st["counters"]["hub_spoofed"]
        for row in rows:
            row["hub_rss_mib"] = agentbench.rss_mib(hub_pid)
        # the same, with forwarded packets sent through the hub's kernel (tun ->
        # routing -> tun: MPVPN_HUB_PATH=kernel), for comparison
        h.hub.stop()
        h.hub.start({"MPVPN_HUB_PATH": "kernel"})
        h.wait_connected()
        a.agent.wait(lambda st: c.lan in st["routes"], 30, "A routes C's LAN again")
        hub_pid = h.hub.proc.pid
        rows.append(agentbench.measure(lab, "through the hub's kernel: A -> C LAN",
                                       [a.agent.proc.pid, hub_pid, c.agent.proc.pid], a.host_ns,
                                       c.host_ns, c.host_ip, args.seconds))
        rows[-1]["hub_rss_mib"] = agentbench.rss_mib(hub_pid)
    direct, via = rows[0]["goodput_mbit"], rows[1]["goodput_mbit"]
    doc = {"sites": args.sites, "carriers": args.carriers, "seconds": args.seconds,
           "hub_rss_idle_mib": idle_rss, "rows": rows, "via_hub_over_direct": via / direct if direct else None,
           "forwarded_per_site": fwd, "in_process_over_kernel": via / rows[2]["goodput_mbit"]}
    print(f"hub with {args.sites} client sites, {args.carriers} carriers each, duplicate mode, AEAD; "
          f"hub RSS {idle_rss:.1f} MiB connected and idle")
    print(f"{'path':44} {'Mbit/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU s/GB':>9} {'hub RSS':>8}")
    for r in rows:
        print(f"{r['path']:44} {r['goodput_mbit']:8.1f} {r['rtt_p50_ms']:7.2f} {r['rtt_p99_ms']:7.2f} "
              f"{r['cpu_s_per_gb']:9.1f} {r['hub_rss_mib']:7.1f}M")
    print(f"through the hub / direct pair: {doc['via_hub_over_direct']:.2f}; "
          f"in-process / through the hub's kernel: {via / rows[2]['goodput_mbit']:.2f}")
    return _emit(args, doc)


def _emit(args, doc: dict) -> int:
    """The run's document: to ``--json FILE`` if asked, and as the last line."""
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))
    return 0


def idle(args) -> int:
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.idle.split(",")]
    made = args.made or ("crowd" if max(counts) > 25 else "ns")
    top = 25 if made == "ns" else 150
    if not all(1 <= n <= top for n in counts):
        print(f"--idle: 1..{top} sites with --made {made}", file=sys.stderr)
        return 2
    rows = []
    for n in counts:
        if made == "ns":
            letters = "".join(chr(ord("c") + k) for k in range(n - 1))
            hub_of = lambda lab, letters=letters: HubLab(lab, letters, forward=True)  # noqa: E731
        else:
            hub_of = lambda lab, n=n: HubLab(lab, "", forward=True, with_a=False, crowd=n)  # noqa: E731
        with Lab(args.carriers) as lab, hub_of(lab) as h:
            h.start()
            pid = h.hub.proc.pid
            time.sleep(2.0)  # the announcements settle
            c0, t0 = agentbench.cpu_seconds(pid), time.monotonic()
            time.sleep(args.seconds)
            cpu = (agentbench.cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            st = h.hub.status()
            rows.append({"sites": n, "hub_rss_mib": agentbench.rss_mib(pid), "hub_cpu_pct": 100 * cpu,
                         "subflows": n * args.carriers, "sessions": len(st["sessions"]),
                         "established": sum(ln["state"] == "established"
                                            for se in st["sessions"] for ln in se["links"])})
    how = ("a namespace pair per site (netlab add_site)" if made == "ns" else
           "agents sharing one namespace, each bound to its own addresses (netlab add_crowd)")
    print(f"hub, idle sites ({args.carriers} carriers each, keepalive_idle 0.75 s, hub_forward on), "
          f"{args.seconds:g} s each; sites: {how}, every one a real agent process")
    print(f"{'sites':>5} {'sessions':>8} {'subflows up':>11} {'hub RSS MiB':>11} {'hub CPU %':>9}")
    for r in rows:
        print(f"{r['sites']:5d} {r['sessions']:8d} {r['established']:11d} {r['hub_rss_mib']:11.1f} "
              f"{r['hub_cpu_pct']:9.2f}")
    doc = {"idle": rows, "carriers": args.carriers, "seconds": args.seconds, "made": made}
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per = (b["hub_rss_mib"] - a["hub_rss_mib"]) / (b["sites"] - a["sites"])
        cpu = (b["hub_cpu_pct"] - a["hub_cpu_pct"]) / (b["sites"] - a["sites"])
        doc["per_site_kib"], doc["per_site_cpu_pct"] = per * 1024, cpu
        print(f"per added site: {per * 1024:.0f} KiB RSS, {cpu:.3f} % CPU")
    return _emit(args, doc)


def _hub_pids(h) -> list[int]:
    st = h.hub.status()
    return [h.hub.proc.pid] + [int(p) for p in (st.get("workers") or {}).get("pids", {}).values()]


def _place(h, n: int, crossed: bool = False) -> dict:
    """With n > 1: restart sites until A and C share a process, D and E
    share another one (``crossed``: A and C in different processes, D and E
    too: every forwarded packet is handed over); {site: process}."""
    def where():
        st = h.hub.status()
        by_vnc = {s.vnc: name for name, s in h.sites.items()}
        return {by_vnc[se["peer"]["vnc"]["ip"]]: se["session_id"] % n for se in st["sessions"]}

    for _ in range(40):
        w = where()
        if crossed:
            if n == 1 or (w["c"] != w["a"] and w["e"] != w["d"]):
                return w
            name = "c" if w["c"] == w["a"] else "e"
        elif n == 1 or (w["c"] == w["a"] and w["d"] != w["a"] and w["e"] == w["d"]):
            return w
        else:
            name = "c" if w["c"] != w["a"] else "d" if w["d"] == w["a"] else "e"
        site = h.sites[name]
        site.agent.stop()
        site.agent.start()
        h.wait_connected()
        site.agent.wait(lambda st, nm=name: st["routes"] == h.expected_routes(nm), 30, "routes")
    raise RuntimeError(f"could not place the pairs: {where()}")


def workers_bench(args) -> int:
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    counts = list(dict.fromkeys(int(x) for x in args.workers.split(",")))  # (repeat with --rounds)
    rows = []
    for _round in range(args.rounds):
        for n in counts:
            with Lab(args.carriers) as lab, HubLab(lab, "cde", forward=True,
                                                   hub_base=f"\toption workers '{n}'\n") as h:
                h.start()
                for name, s in h.sites.items():
                    s.agent.wait(lambda st, nm=name: st["routes"] == h.expected_routes(nm), 30, "routes")
                placed = _place(h, n, args.placement == "crossed")
                hub = _hub_pids(h)
                caps = []
                if args.hub_cap:
                    from cost import CpuCap
                    for i, pid in enumerate(hub):
                        caps.append(CpuCap(f"mpvpn-hubcap-{os.getpid()}-{i}", args.hub_cap))
                        caps[-1].add(pid)
                sites = [s.agent.proc.pid for s in h.sites.values()]
                got = {}
                pairs = (("a", "c"), ("d", "e"))

                def run(src, dst):
                    d = h.sites[dst]
                    got[(src, dst)] = agentbench.iperf(lab, h.sites[src].host_ns, d.host_ns, d.host_ip,
                                                       args.seconds)

                c_hub0, c_all0 = ([agentbench.cpu_seconds(p) for p in hub],
                                  sum(agentbench.cpu_seconds(p) for p in hub + sites))
                t0 = time.monotonic()
                threads = [threading.Thread(target=run, args=p) for p in pairs]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                dt = time.monotonic() - t0
                c_hub = [agentbench.cpu_seconds(p) - c for p, c in zip(hub, c_hub0)]
                c_all = sum(agentbench.cpu_seconds(p) for p in hub + sites) - c_all0
                nbytes = sum(b for _bps, b in got.values())
                st = h.hub.status()
                for cap in caps:
                    cap.close()
                rows.append({"workers": n, "placement": placed,
                             "goodput_mbit": sum(bps for bps, _b in got.values()) / 1e6,
                             "per_pair_mbit": {f"{a}->{b}": got[(a, b)][0] / 1e6 for a, b in pairs},
                             "hub_cpu_pct": [100 * c / dt for c in c_hub],
                             "hub_cpu_s_per_gb": sum(c_hub) / (nbytes / 1e9),
                             "all_cpu_s_per_gb": c_all / (nbytes / 1e9),
                             "worker_drops": st["counters"].get("worker_drops", 0),
                             "hub_forwarded": st["counters"]["hub_forwarded"]})
    print(f"hub forwarding between two site pairs at once (A->C, D->E; iperf3 {args.seconds:g} s each; "
          f"{args.carriers} carriers per site, duplicate mode, AEAD); the hub in 1 or more processes "
          f"(base.workers), each pair's sessions "
          f"{'in one process' if args.placement == 'paired' else 'in two processes (handed over)'}; "
          f"all on this machine's "
          f"{os.cpu_count()} cores" + (f"; each hub process capped at {args.hub_cap:g} % of a core"
                                       if args.hub_cap else ""))
    print(f"{'workers':>7} {'Mbit/s':>8} {'A->C':>7} {'D->E':>7} {'hub CPU % per process':>22} "
          f"{'hub s/GB':>8} {'all s/GB':>8} {'drops':>6}")
    for r in rows:
        pp = list(r["per_pair_mbit"].values())
        print(f"{r['workers']:7d} {r['goodput_mbit']:8.1f} {pp[0]:7.1f} {pp[1]:7.1f} "
              f"{' / '.join(f'{c:.0f}' for c in r['hub_cpu_pct']):>22} {r['hub_cpu_s_per_gb']:8.2f} "
              f"{r['all_cpu_s_per_gb']:8.2f} {r['worker_drops']:6d}")
    base = [r["goodput_mbit"] for r in rows if r["workers"] == counts[0]]
    doc = {"rows": rows, "seconds": args.seconds, "carriers": args.carriers, "hub_cap": args.hub_cap,
           "placement": args.placement}
    for n in counts[1:]:
        more = [r["goodput_mbit"] for r in rows if r["workers"] == n]
        ratios = [m / b for m, b in zip(more, base) if b]
        doc[f"ratio_{n}_over_{counts[0]}"] = ratios
        print(f"goodput with {n} processes / with {counts[0]}: "
              f"{', '.join(f'{x:.2f}' for x in ratios)} (per round)")
    return _emit(args, doc)


def _ping_during(lab, seconds: float, out: dict) -> threading.Thread:
    """A's LAN host pings the hub's LAN host every 5 ms for ``seconds`` (in a thread)."""
    n = int(seconds / 0.005)

    def run():
        out["ping"] = lab.ping(lab.ha, lab.hb_ip, count=n, interval=0.005, timeout=2.0,
                               extra=("-w", f"{seconds + 20:g}"))
    t = threading.Thread(target=run)
    t.start()
    return t


def _phase(lab, h, label: str, kind: str | None, keyfile: Path, source: str, args) -> dict:
    pid = h.hub.proc.pid
    before = h.hub.status()["control"]
    got: dict = {}
    c0, t0 = agentbench.cpu_seconds(pid), time.monotonic()
    pinger = _ping_during(lab, args.seconds, got)
    storm = None
    if kind is None:
        time.sleep(args.seconds)
    else:
        cp = lab.run(lab.ns("rx"), [sys.executable, str(HERE / "hubstorm.py"), kind, "--server",
                                    f"{lab.carrier(1).b_ip}:7000", "--keys", str(keyfile),
                                    "--seconds", f"{args.seconds:g}", "--inflight", str(args.inflight),
                                    "--source", source], timeout=args.seconds + 120)
        storm = json.loads(cp.stdout.strip().splitlines()[-1])
    cpu = agentbench.cpu_seconds(pid) - c0
    dt = time.monotonic() - t0
    pinger.join()
    ping = got["ping"]
    after = h.hub.status()["control"]
    closed = {k: v - before["closed_by_reason"].get(k, 0) for k, v in after["closed_by_reason"].items()
              if v != before["closed_by_reason"].get(k, 0)}
    ended = sum(storm["counts"].values()) if storm else 0
    ok = storm["counts"].get("ok", 0) if storm else 0
    return {"phase": label, "storm": storm, "hub_cpu_s": cpu, "hub_cpu_pct": 100 * cpu / dt,
            "connections_per_s": ended / storm["seconds"] if storm else 0.0,
            "handshakes_per_s": ok / storm["seconds"] if storm else 0.0,
            "hub_cpu_ms_per_connection": 1000 * cpu / ended if ended else None,
            "hub_cpu_ms_per_handshake": 1000 * cpu / ok if ok else None,
            "hub_closed_by_reason": closed, "ping_sent": ping.sent, "ping_received": ping.received,
            "ping_avg_ms": ping.rtt_avg, "ping_max_ms": ping.rtt_max}


def handshakes(args) -> int:
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    if not 1 <= args.keys <= 100:
        print("--keys: 1..100", file=sys.stderr)
        return 2
    from mpvpn.core.noise import genpsk

    keys = [(f"s{k}", genpsk(), f"172.30.0.{150 + k}") for k in range(args.keys)]
    sections = "".join(f"\nconfig site 's{k}'\n\toption psk '{psk}'\n" for k, (_n, psk, _v) in enumerate(keys))
    rows = []
    # the agents' run directories on tmpfs, as /var/run on OpenWrt: the hub
    # saves its handshake freshness records there after every handshake, and
    # an fsync on this machine's disk would be counted as the handshake's cost
    if os.path.isdir("/dev/shm"):
        tempfile.tempdir = "/dev/shm"
    with tempfile.TemporaryDirectory(prefix="mpvpn-storm-") as tmp, Lab(args.carriers) as lab, \
            HubLab(lab, "", forward=True, hub_sections=sections) as h:
        keyfile = Path(tmp) / "keys.json"
        keyfile.write_text(json.dumps(keys))
        source = lab.add_crowd(1).members[0][1]  # the storm's own namespace and address
        h.start()
        for label, kind in (("idle (no storm)", None), ("junk first messages", "junk"),
                            ("replayed first message", "replay"),
                            ("genuine, default budget", "genuine")):
            rows.append(_phase(lab, h, label, kind, keyfile, source, args))
        h.hub.stop()
        h.hub.start({"MPVPN_HANDSHAKE_RATE": "100000"})
        h.wait_connected()
        rows.append(_phase(lab, h, "genuine, budget lifted", "genuine", keyfile, source, args))
    print(f"hub with {args.keys} `config site` keys and site A connected ({args.carriers} carriers); "
          f"storm: {args.inflight} connections at once from another namespace, {args.seconds:g} s a "
          f"phase; A's LAN host pings the hub's LAN every 5 ms meanwhile; run directories in "
          f"{tempfile.gettempdir()}")
    print(f"{'phase':26} {'conn/s':>7} {'hs/s':>7} {'hub CPU%':>8} {'ms/conn':>8} {'ms/hs':>6} "
          f"{'ping lost':>9} {'avg ms':>6} {'max ms':>7}")
    for r in rows:
        per_c, per_h = r["hub_cpu_ms_per_connection"], r["hub_cpu_ms_per_handshake"]
        print(f"{r['phase']:26} {r['connections_per_s']:7.0f} {r['handshakes_per_s']:7.1f} "
              f"{r['hub_cpu_pct']:8.1f} {per_c if per_c is not None else float('nan'):8.3f} "
              f"{per_h if per_h is not None else float('nan'):6.2f} "
              f"{r['ping_sent'] - r['ping_received']:4d}/{r['ping_sent']:<4d} "
              f"{r['ping_avg_ms'] or float('nan'):6.2f} {r['ping_max_ms'] or float('nan'):7.1f}")
    for r in rows:
        if r["storm"]:
            print(f"  {r['phase']}: client saw {r['storm']['counts']}; hub closed {r['hub_closed_by_reason']}")
    doc = {"keys": args.keys, "inflight": args.inflight, "seconds": args.seconds, "rows": rows}
    return _emit(args, doc)


if __name__ == "__main__":
    sys.exit(main())
