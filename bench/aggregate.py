#!/usr/bin/env python3
"""Scheduler benchmark in the namespace lab (issue 7): carriers rate-limited
to 50/30/20 Mbit/s with tbf and delayed 10/25/40 ms one way (+- 2/3/4 ms
jitter, FIFO: no reordering) by the lab's delay shim, in each direction;
TCP LAN host to LAN host through two real agents, for each base.mode; once
on clean carriers and once with 5 % loss on the 30 Mbit/s carrier (both
directions, nftables, after the shim).  Goodput is quoted against the
100 Mbit/s sum and against the fastest single carrier (what duplicate mode
can reach): steady state (iperf3, first 3 s omitted) and a whole
fixed-size transfer with sha256 check (which includes the ramp-up).
With --json FILE the goodput is also drawn into FILE.png (bench/plots.py;
matplotlib, ``pip install -e '.[bench]'``).

First, the carriers alone (router to router, no tunnel): TCP goodput of
each against its tbf rate, the ping RTT, and the shim's counters (frames it
dropped or failed to send: 0 means it kept up).  The shim's counters are
also read after every agent run.

    python bench/aggregate.py [--bytes N] [--seconds S] [--modes M,..] [--losses 0,5]
                              [--cc cubic,bbr] [--no-delay] [--cold S [--cold-only]] [--runs N]
                              [--json FILE]   (root, iperf3)

``--cold S`` first runs iperf3 for S seconds right after the agents came up
(issue 17 item 3: a whole transfer from a cold start, the ramp included);
with --cold-only each run also prints the sender's Mbit/s per second and
its TCP retransmissions (and keeps them in --json), to tell a stall from a
slow ramp.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agent import iperf  # noqa: E402  (bench/agent.py)
from agentlab import TwoSites, tcp_transfer  # noqa: E402
from wan import DELAYS, RATES, describe, make_lab  # noqa: E402

MODES = ("duplicate", "aggregate", "adaptive")


def shim_counters(lab) -> dict:
    """{carrier: {forwarded, dropped, send_errors}} summed over both directions."""
    if lab.wan is None:
        return {}
    out = {}
    for c in RATES:
        st = lab.shim_stats(c)
        out[c] = {k: st["a2b"][k] + st["b2a"][k] for k in ("forwarded", "dropped", "send_errors")}
    return out


def tbf_drops(lab) -> dict:
    """{carrier: packets tbf dropped on router A (queue full)}."""
    out = {}
    for c in RATES:
        txt = lab.run(lab.ra, ["tc", "-s", "qdisc", "show", "dev", f"c{c}"]).stdout
        m = re.search(r"dropped (\d+)", txt)
        out[c] = int(m.group(1)) if m else 0
    return out


def udp_rcvbuf_errors(lab, ns) -> int:
    """UDP datagrams dropped in ``ns`` for a full socket buffer (an agent that fell behind)."""
    lines = [ln.split() for ln in lab.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def shim_delta(after: dict, before: dict) -> dict:
    return {c: {k: v - before.get(c, {}).get(k, 0) for k, v in d.items()} for c, d in after.items()}


def check_carriers(delays: bool, seconds: float, cc: str | None) -> list:
    """Each carrier alone, router to router: does tbf (+ shim) give the intended rate?"""
    rows = []
    with make_lab(delays) as lab:
        for c, mbit in RATES.items():
            ip = f"10.{c}.0.2"
            lab.ping(lab.ra, ip, count=2, interval=0.2)  # ARP
            s0 = shim_counters(lab)
            srv = lab.popen(lab.rb, ["iperf3", "-s", "-1", "-B", ip], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            r = lab.run(lab.ra, ["iperf3", "-c", ip, "-t", str(seconds), "-O", "1", "-J"]
                        + (["-C", cc] if cc else []),
                        timeout=seconds + 30)
            srv.wait(10)
            end = json.loads(r.stdout)["end"]
            ping = lab.ping(lab.ra, ip, count=20, interval=0.05)
            shim = shim_delta(shim_counters(lab), s0).get(c)
            got = end["sum_received"]["bits_per_second"] / 1e6
            rows.append({"carrier": c, "tbf_mbit": mbit, "delay_ms": DELAYS[c][0] if delays else 0,
                         "jitter_ms": DELAYS[c][1] if delays else 0, "tcp_mbit": got,
                         "tcp_vs_tbf": got / mbit, "tcp_retransmits": end["sum_sent"].get("retransmits"),
                         "ping_min_ms": ping.rtt_min, "ping_avg_ms": ping.rtt_avg,
                         "ping_max_ms": ping.rtt_max, "shim": shim})
    return rows


class Sampler:
    """Polls site A's status while traffic runs: the loss each subflow reports."""

    def __init__(self, site, period: float = 0.5):
        self.site, self.period = site, period
        self.samples: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            st = self.site.status()
            if st is not None:
                self.samples.append({ln["type"]: ln["loss"] for ln in st["links"]})

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)

    def mean_loss(self) -> dict:
        out = {}
        for s in self.samples:
            for k, v in s.items():
                if v is not None:
                    out.setdefault(k, []).append(v)
        return {k: round(sum(v) / len(v), 5) for k, v in out.items()}


def run_mode(mode: str, loss: int, delays: bool, cc: str | None, args) -> dict:
    with make_lab(delays) as lab, TwoSites(lab, extra_base=f"\toption mode '{mode}'\n") as ts:
        if loss:
            lab.set_loss(2, loss)
        ts.start()
        cold = None
        if args.cold:
            # a cold start: the first transfer after the agents came up, no
            # second omitted (the ramp included: links not yet measured)
            trace: dict = {}
            cold_bps, _ = iperf(lab, lab.ha, lab.hb, "192.168.20.2", args.cold, omit=0, cc=cc, trace=trace)
            cold = cold_bps / 1e6
            if args.cold_only:
                return {"mode": mode, "loss_on_30": loss / 100, "delays": delays, "cc": cc or "default",
                        "cold_mbit": cold, "cold_vs_sum": cold / sum(RATES.values()),
                        "cold_trace": trace}
        s0 = shim_counters(lab)
        t0, r0 = tbf_drops(lab), udp_rcvbuf_errors(lab, lab.rb)
        st0 = ts.a.status()
        with Sampler(ts.a) as smp:
            steady_bps, _ = iperf(lab, lab.ha, lab.hb, "192.168.20.2", args.seconds, omit=3,
                                  streams=args.streams, cc=cc)
        st1 = ts.a.status()
        t1, r1 = tbf_drops(lab), udp_rcvbuf_errors(lab, lab.rb)
        sent, sha_tx, got, sha_rx, secs = tcp_transfer(lab, args.bytes, timeout=300, cc=cc)
        st = ts.a.status()
        stb = ts.b.status()
        shim = shim_delta(shim_counters(lab), s0)

    def wire(s):
        return sum(ln["tx_bytes"] for ln in s["links"])

    def data_tx(s):
        return sum(ln["data_tx"] for ln in s["links"])

    mbit = got * 8 / secs / 1e6
    steady = steady_bps / 1e6
    ca, ca0 = st["counters"], st1["counters"]
    total = sum(RATES.values())
    return {"mode": mode, "loss_on_30": loss / 100, "delays": delays, "cc": cc or "default",
            "cold_mbit": cold, "goodput_mbit": mbit, "steady_mbit": steady, "steady_vs_sum": steady / total, "streams": args.streams,
            "vs_sum": mbit / total, "vs_best_single": mbit / max(RATES.values()),
            "intact": (got, sha_rx) == (sent, sha_tx),
            "wire_bytes_per_byte": (wire(st) - wire(st1)) / max(1, got),
            # copies per user packet while iperf3 ran (A -> B), re-sends included
            "copies_steady": (data_tx(st1) - data_tx(st0)) / max(1, st1["counters"]["sent"]
                                                                  - st0["counters"]["sent"]),
            "weights": {ln["type"]: ln["weight"] for ln in st["links"]},
            "reported_loss_mean": smp.mean_loss(),
            "retransmits": ca.get("retransmits", 0) - ca0.get("retransmits", 0),
            "b_skipped": stb["counters"].get("skipped", 0),
            "b_nack_too_late": stb["counters"].get("nack_too_late", 0),
            "b_deadline_releases": stb["counters"].get("deadline_releases", 0),
            "b_hold_ms": stb["sessions"][0]["hold_ms"] if stb.get("sessions") else None,
            "a_tx_sched_drops": ca.get("tx_sched_drops", 0),
            # where "carrier loss" came from during the steady run: our uplink's
            # queue overflowing (an over-estimated rate) or agent B falling behind
            "tbf_drops_steady": {c: t1[c] - t0[c] for c in RATES},
            "b_udp_rcvbuf_errors_steady": r1 - r0,
            "a_datagrams_steady": {ln["type"]: ln["data_tx"] - l0["data_tx"]
                                   for ln, l0 in zip(st1["links"], st0["links"])},
            "shim": shim}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=30_000_000)
    ap.add_argument("--seconds", type=float, default=8.0, help="steady-state iperf3 run (after 3 s)")
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP flows in the steady run")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--losses", default="0,5", help="percent on the 30 Mbit/s carrier")
    ap.add_argument("--cc", default="cubic,bbr",
                    help="TCP congestion control of the senders, one run each (cubic: the Linux, Windows "
                         "and macOS default; bbr: what this machine's kernel defaults to)")
    ap.add_argument("--no-delay", action="store_true", help="carriers without the delay shim")
    ap.add_argument("--skip-check", action="store_true", help="no per-carrier check")
    ap.add_argument("--cold", type=float, default=0.0, metavar="S",
                    help="first an S-second iperf3 right after the agents start (cold start, ramp included)")
    ap.add_argument("--cold-only", action="store_true", help="only the cold-start run (with --cold)")
    ap.add_argument("--runs", type=int, default=1, help="each row this many times")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.cold_only and not args.cold:
        ap.error("--cold-only needs --cold S")
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    delays = not args.no_delay
    modes = [m for m in args.modes.split(",") if m]
    losses = [int(x) for x in args.losses.split(",") if x]
    ccs = [c for c in args.cc.split(",") if c] or [None]
    carriers = [] if args.skip_check else check_carriers(delays, 5.0, ccs[0])
    rows = [run_mode(mode, loss, delays, cc, args) for _ in range(args.runs)
            for cc in ccs for loss in losses for mode in modes]
    print(describe(delays))
    if args.cold_only:
        print(f"TCP through two agents from a cold start: iperf3 {args.cold:g} s right after the agents came up")
        for r in rows:
            t = r["cold_trace"]
            print(f"{r['cc']:<6}{r['mode']:<10}{100 * r['loss_on_30']:>3.0f}% on 30: cold {r['cold_mbit']:6.1f} Mbit/s "
                  f"({r['cold_vs_sum']:.3f} of the sum); per second {t.get('mbit')}, "
                  f"TCP retransmits {t.get('retransmits_total')}")
        if args.json:
            Path(args.json).write_text(json.dumps({"bench": "aggregate", "rates_mbit": RATES, "rows": rows}, indent=2))
        return 0
    if carriers:
        print(f"{'carrier':<8}{'tbf':>6}{'TCP':>8}{'vs tbf':>8}{'ping min/avg/max ms':>22}"
              f"{'shim fwd':>10}{'dropped':>9}{'errors':>8}")
        for r in carriers:
            s = r["shim"] or {"forwarded": 0, "dropped": 0, "send_errors": 0}
            print(f"{r['carrier']:<8}{r['tbf_mbit']:>6}{r['tcp_mbit']:>8.1f}{r['tcp_vs_tbf']:>8.2f}"
                  f"{r['ping_min_ms']:>8.1f}/{r['ping_avg_ms']:.1f}/{r['ping_max_ms']:.1f}"
                  f"{s['forwarded']:>10}{s['dropped']:>9}{s['send_errors']:>8}")
        print("(TCP over the bare carrier; 0.95-0.96 of tbf is the TCP/IP header share)")
    alone = sum(r["tcp_mbit"] for r in carriers) if carriers else None
    if alone:
        # the same ratio against what TCP gets from the carriers alone in this run
        for r in rows:
            r["steady_vs_carriers_tcp"] = r["steady_mbit"] / alone
        print(f"the carriers alone give TCP {alone:.1f} Mbit/s together ({alone / sum(RATES.values()):.3f} "
              "of the sum); through the agents each 1400-byte packet carries 64 bytes more")
    print(f"TCP through two agents: iperf3 {args.seconds:.0f} s after 3 s, {args.streams} flow(s) (steady), then "
          f"{args.bytes / 1e6:.0f} MB sha256-checked (whole)")
    if args.cold:
        for r in rows:
            print(f"  {r['cc']:<6}{r['mode']:<10}{100 * r['loss_on_30']:>3.0f}%: cold start, {args.cold:g} s: "
                  f"{r['cold_mbit']:.1f} Mbit/s")
    print(f"{'cc':<6}{'mode':<10}{'loss on 30':>11}{'steady':>8}{'vs sum':>8}{'vs TCP':>8}{'whole':>8}{'vs sum':>8}"
          f"{'vs best':>8}{'copies':>8}{'wire/byte':>10}{'intact':>7}{'skipped':>8}{'shim drop':>10}")
    for r in rows:
        sd = sum(v["dropped"] + v["send_errors"] for v in r["shim"].values()) if r["shim"] else 0
        vt = r.get("steady_vs_carriers_tcp")
        print(f"{r['cc']:<6}{r['mode']:<10}{100 * r['loss_on_30']:>10.0f}%{r['steady_mbit']:>8.1f}{r['steady_vs_sum']:>8.2f}"
              f"{'-' if vt is None else f'{vt:.2f}':>8}"
              f"{r['goodput_mbit']:>8.1f}{r['vs_sum']:>8.2f}{r['vs_best_single']:>8.2f}"
              f"{r['copies_steady']:>8.2f}{r['wire_bytes_per_byte']:>10.2f}{'yes' if r['intact'] else 'NO':>7}"
              f"{r['b_skipped']:>8}{sd:>10}")
    print("vs TCP: steady goodput over the carriers' own TCP goodput (first table); "
          "copies: datagrams per user packet A->B during the steady run (re-sends included); "
          "wire/byte: during the whole transfer; skipped: sequence numbers B gave up")
    for r in rows:
        print(f"  {r['cc']:<6}{r['mode']:<10}{100 * r['loss_on_30']:>3.0f}%: reported loss {r['reported_loss_mean']}, "
              f"weights {r['weights']}, re-sends {r['retransmits']}, hold {r['b_hold_ms']} ms; steady run: "
              f"tbf drops {r['tbf_drops_steady']} of datagrams {r['a_datagrams_steady']}, "
              f"B socket overflows {r['b_udp_rcvbuf_errors_steady']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "aggregate", "rates_mbit": RATES,
                                               "delays_ms": DELAYS if delays else None,
                                               "carriers": carriers, "rows": rows}, indent=2))
        try:  # the picture next to the JSON (matplotlib: pip install -e '.[bench]')
            from plots import aggregate_plot
        except ImportError as e:
            print(f"no picture: {e}", file=sys.stderr)
        else:
            doc = json.loads(Path(args.json).read_text())
            print(f"picture: {aggregate_plot(doc, Path(args.json).with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
