#!/usr/bin/env python3
"""Latency benchmark in the namespace lab: ping through the tunnel, idle and
while a bulk TCP transfer (iperf3) runs through the same tunnel, as the
latency *added* over the raw carrier measured in the same run, next to the
40-line Python forwarder (bench/yardstick_fwd.py) and glorytun when built.

    python bench/latency.py [--count N] [--interval S] [--repeat R] [--peers yardstick,glorytun]
                            [--trace] [--json FILE]     (root; iperf3)

Rows (each idle and under load; p50 / p90 / p99 / max of the RTT and the
p50 / p99 added over the raw carrier's p50 / p99 of the same phase):

* ``raw carrier``: ping router A -> router B over carrier 1 (no tunnel); under
  load, iperf3 runs over the same carrier.
* ``yardstick``: the 40-line unencrypted forwarder over carrier 1, LAN host ->
  LAN host.
* ``glorytun``: glorytun 0.3.x over the 3 carriers (bench/cost.py starts it;
  found on PATH, in ``GLORYTUN=/path`` or /opt/peers/glorytun/glorytun).
* ``mpvpn``: two real agents, duplicate mode over 3 carriers, sealed, C loops
  (``--fastpath``, ``--modes`` to vary).
* ``CPU us/ping``: the tunnel processes' CPU time per idle ping (both ways,
  both ends); it moves much less with the machine's load than the RTTs.

With ``--trace`` the agents run with ``MPVPN_LATENCY_TRACE=1`` and the
bench prints each agent's per-stage histogram (mpvpn.agent.latency) for the
idle and the loaded phase.  ``--diag`` samples the kernel queues of both ends
under load (bench/kqueues.py: socket buffers and their drops, the tun ring's
depth and drops, the bulk sender's cwnd / RTT).  ``--cc`` picks the bulk
sender's congestion control (the host's default otherwise: bbr and cubic
queue differently).  Experiment knobs (docs/performance.md "Latency"):
``--offload``, ``--txqueuelen`` and ``--rcvbuf`` (lists: one row each),
``--env NAME=V1,V2`` (one row per value), ``--cap``.  Machine load from other jobs shows in every row alike: quote
ratios and ranges of ``--repeat`` runs, not single figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from agentlab import TwoSites  # noqa: E402
from netlab import Lab  # noqa: E402

import kqueues  # noqa: E402

GLORYTUN_BUILT = Path("/opt/peers/glorytun/glorytun")
CC = ""  # the bulk sender's congestion control (--cc; "": the host's default)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def ping_rtts(lab, src_ns, dst, count, interval) -> tuple[list, int]:
    """RTTs in ms of ``count`` pings (56 bytes, like a VoIP frame), and how many were lost."""
    r = lab.run(src_ns, ["ping", "-n", "-c", str(count), "-i", str(interval),
                         "-W", "1", dst], timeout=count * interval + 30, check=False)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
    return rtts, count - len(rtts)


def bulk_start(lab, src_ns, dst_ns, dst_ip, seconds: float):
    """iperf3 TCP src -> dst for ``seconds`` (server, client) processes."""
    srv = lab.popen(dst_ns, ["iperf3", "-s", "-1", "-B", dst_ip], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    cc = ["-C", CC] if CC else []
    cli = lab.popen(src_ns, ["iperf3", "-c", dst_ip, "-t", str(seconds), "-J", *cc],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return srv, cli


def bulk_end(srv, cli, seconds: float) -> float:
    """Goodput of the bulk transfer in Mbit/s (nan if iperf3 failed)."""
    try:
        out, _ = cli.communicate(timeout=seconds + 30)
        srv.wait(10)
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    except Exception:
        Lab.stop(cli)
        Lab.stop(srv)
        return float("nan")


def phase_stats(rtts, lost) -> dict:
    return {"n": len(rtts), "lost": lost, "p50": pct(rtts, 0.5), "p90": pct(rtts, 0.9),
            "p99": pct(rtts, 0.99), "max": max(rtts) if rtts else float("nan")}


def cpu_seconds(pids) -> float:
    from agent import cpu_seconds as one
    return sum(one(p) for p in pids)


def counter_deltas(before: dict, after: dict) -> dict:
    """{site: {counter: increase}} of the agents' status counters, nonzero only."""
    return {site: {k: v - before[site].get(k, 0) for k, v in after[site].items()
                   if isinstance(v, int) and v != before[site].get(k, 0)} for site in after}


def measure(lab, label, src_ns, dst_ns, dst_ip, args, trace=None, pids=(), devs=None, counters=None) -> dict:
    """Idle ping, then ping while iperf3 runs src -> dst through the same path.
    ``devs``: {namespace: vNIC} whose kernel queues ``--diag`` samples under load;
    ``counters()``: the agents' status counters, whose increase under load ``--diag`` reports;
    ``trace(reset)``: the agents' stage histograms (reset=True: start afresh);
    ``pids``: the tunnel's processes, whose CPU time per idle ping is reported
    (CPU time, unlike RTT, hardly moves with the machine's load)."""
    if trace is not None:
        trace(True)
    c0 = cpu_seconds(pids)
    idle = phase_stats(*ping_rtts(lab, src_ns, dst_ip, args.count, args.interval))
    if pids and idle["n"]:
        idle["cpu_us_per_ping"] = (cpu_seconds(pids) - c0) / idle["n"] * 1e6
    idle_trace = trace(False) if trace is not None else None
    dur = args.count * args.interval + 3.0
    sampler = kqueues.Sampler(lab, devs, tcp_ns=src_ns).calibrate() if args.diag and devs else None
    srv, cli = bulk_start(lab, src_ns, dst_ns, dst_ip, dur)
    time.sleep(1.5)  # past slow start: the queues are as full as bulk TCP keeps them
    if trace is not None:
        trace(True)
    if sampler is not None:
        sampler.start()
    c0 = counters() if args.diag and counters is not None else None
    loaded = phase_stats(*ping_rtts(lab, src_ns, dst_ip, args.count, args.interval))
    queues = sampler.stop() if sampler is not None else None
    if c0 is not None:
        queues = dict(queues or {}, agent_counters=counter_deltas(c0, counters()))
    extra = trace(False) if trace is not None else None
    mbit = bulk_end(srv, cli, dur)
    row = {"path": label, "idle": idle, "loaded": loaded, "bulk_mbit": mbit}
    if queues is not None:
        row["kernel_queues"] = queues
    if extra is not None:
        row["trace"] = {"idle": idle_trace, "loaded": extra}
    return row


def yardstick(lab, args) -> dict:
    py = sys.executable
    fa = lab.popen(lab.ra, [py, str(HERE / "yardstick_fwd.py"), "172.29.0.1/30", "192.168.20.0/24",
                            "10.1.0.1", "10.1.0.2", "7100"], stdout=subprocess.PIPE, text=True)
    fb = lab.popen(lab.rb, [py, str(HERE / "yardstick_fwd.py"), "172.29.0.2/30", "192.168.10.0/24",
                            "10.1.0.2", "10.1.0.1", "7100"], stdout=subprocess.PIPE, text=True)
    try:
        assert fa.stdout.readline().strip() == "ready" and fb.stdout.readline().strip() == "ready"
        return measure(lab, "yardstick (python fwd, 1 carrier, plain)", lab.ha, lab.hb, "192.168.20.2", args,
                       pids=(fa.pid, fb.pid), devs={lab.ra: "yard0", lab.rb: "yard0"})
    finally:
        Lab.stop(fa)
        Lab.stop(fb)
        lab.run(lab.ra, ["ip", "link", "del", "yard0"], check=False)
        lab.run(lab.rb, ["ip", "link", "del", "yard0"], check=False)


def glorytun(lab, args, skipped: list) -> dict | None:
    import cost

    if not cost.find_peer("glorytun") and GLORYTUN_BUILT.exists():
        os.environ["GLORYTUN"] = str(GLORYTUN_BUILT)
    why = cost.peer_missing("glorytun")
    if why:
        skipped.append(why)
        return None
    with tempfile.TemporaryDirectory(prefix="mpvpn-lat-") as tmp:
        try:
            t = cost.Glorytun(lab, 3, Path(tmp))
        except Exception as e:
            skipped.append(f"glorytun: did not start ({e})")
            return None
        try:
            if not any(lab.reachable(lab.ha, "192.168.20.2", timeout=1.0) for _ in range(15)):
                skipped.append("glorytun: started but 192.168.20.2 not reachable through it")
                return None
            return measure(lab, "glorytun 0.3.4 (x3 paths, AEGIS-256)", lab.ha, lab.hb, "192.168.20.2", args,
                           pids=t.pids_a + t.pids_b, devs={lab.ra: "gta", lab.rb: "gtb"})
        finally:
            t.close(lab)
            for ns, dev in ((lab.ra, "gta"), (lab.rb, "gtb")):
                lab.run(ns, ["ip", "link", "del", dev], check=False)


def mpvpn(lab, args, mode: str, fast: str, txqueuelen: int = 0) -> dict:
    os.environ["MPVPN_FASTPATH"] = "1" if fast == "on" else "0"
    env = {"MPVPN_LATENCY_TRACE": "1"} if args.trace else None
    with TwoSites(lab, carriers=3, extra_base=f"\toption mode '{mode}'\n") as ts:
        ts.start(subflows=3, env_extra=env)
        if txqueuelen:  # the vNICs' ring (an experiment)
            for ns in (lab.ra, lab.rb):
                lab.run(ns, ["ip", "link", "set", "dev", "mpvpn0", "txqueuelen", str(txqueuelen)])

        def counters() -> dict:
            from mpvpn.io import rpc
            out = {}
            for site in (ts.a, ts.b):
                doc = rpc.call(rpc.socket_path(str(site.run_dir)), "status", {}, timeout=5.0)
                out[site.name] = dict(doc.get("counters") or {})  # (its sessions' counters, summed)
            return out

        def trace(reset: bool) -> dict:
            from mpvpn.io import rpc
            return {site.name: rpc.call(rpc.socket_path(str(site.run_dir)), "latency",
                                        {"reset": reset}, timeout=5.0)
                    for site in (ts.a, ts.b)}

        label = f"mpvpn ({mode} x3, AEAD{', C loops' if fast == 'on' else ''})"
        caps = []
        if args.cap:  # each agent in a cgroup capped at this share of one core (bench/cost.py)
            import cost
            caps = [cost.CpuCap(f"mpvpn-lat-{os.getpid()}-{s.name}", args.cap) for s in (ts.a, ts.b)]
            for cap, site in zip(caps, (ts.a, ts.b)):
                cap.add(site.proc.pid)
            label += f" capped {args.cap:g} %"
        try:
            return measure(lab, label, lab.ha, lab.hb, "192.168.20.2", args,
                           trace=trace if args.trace else None, pids=(ts.a.proc.pid, ts.b.proc.pid),
                           devs={lab.ra: "mpvpn0", lab.rb: "mpvpn0"}, counters=counters)
        finally:
            for c in caps:
                c.close()


def env_variants(specs: list) -> list:
    """``["A=1,2", "B=x"]`` -> [{A: 1, B: x}, {A: 2, B: x}]: one mpvpn row per
    combination (``--env``); no specs: one row with the inherited environment."""
    out = [{}]
    for spec in specs:
        name, _, values = spec.partition("=")
        out = [dict(e, **{name: v}) for e in out for v in values.split(",")]
    return out


def one_run(args) -> tuple[list, list]:
    rows, skipped = [], []
    with Lab(3) as lab:
        rows.append(measure(lab, "raw carrier (router to router, no tunnel)", lab.ra, lab.rb, "10.1.0.2", args))
        if "yardstick" in args.peers:
            rows.append(yardstick(lab, args))
        if "glorytun" in args.peers:
            r = glorytun(lab, args, skipped)
            if r is not None:
                rows.append(r)
        for envs in env_variants(args.env):
            os.environ.update(envs)  # inherited by both agents
            for rcvbuf in args.rcvbuf.split(","):
                if rcvbuf:
                    os.environ["MPVPN_UDP_RCVBUF"] = rcvbuf  # (mpvpn.io.udp)
                for mode in args.modes.split(","):
                    for fast, txq in ((f, q) for f in args.fastpath.split(",") for q in args.txqueuelen.split(",")):
                        rows.append(mpvpn(lab, args, mode, fast, int(txq or 0)))
                        if txq:
                            rows[-1]["path"] += f" txqlen {txq}"
                        if rcvbuf:
                            rows[-1]["path"] += f" rcvbuf {int(rcvbuf) >> 10}k"
                        if envs:
                            rows[-1]["path"] += " " + " ".join(f"{k[6:] if k.startswith('MPVPN_') else k}={v}"
                                                               for k, v in envs.items())
                os.environ.pop("MPVPN_UDP_RCVBUF", None)
            for k in envs:
                os.environ.pop(k, None)
    raw = rows[0]
    for r in rows:
        for ph in ("idle", "loaded"):
            s = r[ph]
            s["added_p50"] = s["p50"] - raw[ph]["p50"]
            s["added_p99"] = s["p99"] - raw[ph]["p99"]
    return rows, skipped


def print_rows(rows, args) -> None:
    print(f"{'path':<58}{'phase':>7}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}{'+p50':>7}{'+p99':>7}"
          f"{'lost':>5}{'bulk Mbit/s':>12}{'CPU us/ping':>12}")
    for r in rows:
        for ph in ("idle", "loaded"):
            s = r[ph]
            bulk = f"{r['bulk_mbit']:.0f}" if ph == "loaded" else ""
            cpu = f"{s['cpu_us_per_ping']:.0f}" if "cpu_us_per_ping" in s else ""
            print(f"{r['path'][:57]:<58}{ph:>7}{s['p50']:>7.3f}{s['p90']:>7.3f}{s['p99']:>7.3f}"
                  f"{s['max']:>7.2f}{s['added_p50']:>7.3f}{s['added_p99']:>7.3f}{s['lost']:>5}{bulk:>12}{cpu:>12}")


def print_trace(trace: dict) -> None:
    from mpvpn.agent.latency import format_report

    for phase, docs in trace.items():
        for site, doc in docs.items():
            print(f"-- agent {site}, per-stage latency, {phase} (MPVPN_LATENCY_TRACE) --")
            print(format_report(doc))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="pings per phase (default 1000)")
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between pings (default 0.005)")
    ap.add_argument("--repeat", type=int, default=1, help="whole runs, each in a fresh lab (default 1)")
    ap.add_argument("--peers", default="yardstick,glorytun", help="baselines besides the raw carrier")
    ap.add_argument("--modes", default="duplicate", help="base.mode of the mpvpn rows (comma-separated)")
    ap.add_argument("--fastpath", default="on", help="C loops of the mpvpn rows: on, off (comma-separated)")
    ap.add_argument("--rcvbuf", default="", help="MPVPN_UDP_RCVBUF values for the mpvpn rows (comma-separated bytes)")
    ap.add_argument("--txqueuelen", default="",
                    help="set the agents' vNIC txqueuelen (experiment; comma-separated: one row each)")
    ap.add_argument("--offload", default="", help="MPVPN_TUN_OFFLOAD for the mpvpn rows (off, gro, tso)")
    ap.add_argument("--cap", type=float, default=0, help="cap each agent at this %% of one core (cgroup)")
    ap.add_argument("--trace", action="store_true", help="agents with MPVPN_LATENCY_TRACE=1; print stages")
    ap.add_argument("--diag", action="store_true",
                    help="sample the ends' kernel queues under load (socket buffers, tun ring, qdisc)")
    ap.add_argument("--cc", default="", help="the bulk TCP's congestion control (cubic, bbr; default the host's)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=V1,V2",
                    help="run the mpvpn rows once per value of this agent environment variable (experiments)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    global CC
    CC = args.cc
    if args.offload:
        os.environ["MPVPN_TUN_OFFLOAD"] = args.offload  # inherited by both agents (mpvpn.io.tun)
    runs = []
    for i in range(args.repeat):
        rows, skipped = one_run(args)
        runs.append({"rows": rows, "skipped": skipped})
        print(f"latency benchmark run {i + 1}/{args.repeat}: ping {args.count} x {args.interval * 1000:g} ms "
              f"per phase, RTT ms; +p50/+p99 = added over the raw carrier's in the same phase; "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print_rows(rows, args)
        for why in skipped:
            print(f"skipped: {why}")
        for r in rows:
            if r.get("kernel_queues"):
                print(f"-- kernel queues under load, {r['path']} (--diag) --")
                print(kqueues.format_summary(r["kernel_queues"]))
            if r.get("trace"):
                print_trace(r["trace"])
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "latency", "count": args.count,
                                               "interval": args.interval, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
