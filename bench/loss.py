#!/usr/bin/env python3
"""Loss table in the namespace lab: a UDP stream from LAN host A to LAN host
B through two real agents (duplicate mode), loss p on every carrier A->B
(nftables), for N = 1, 2, 3 carriers, NACK off.  Measured delivered loss next to the
model p^N (and its binomial standard deviation for the sample size).

The carriers model real WANs: tbf 50/30/20 Mbit/s and one-way delay
10/25/40 ms +- 2/3/4 ms jitter (the lab's delay shim, FIFO, each direction).

Second table (issue 7): the cost of redundancy per mode.  The same UDP
stream through agents in duplicate, adaptive (base.target_loss 0.001) and
aggregate mode, with loss on both directions of some carriers: delivered
loss next to the bytes the agent put on the wire per byte delivered
(inner IP packets of 228 bytes; SMPU header, AEAD tag and probes included).

Third table (issue 17, item 2; ``--tcp``): TCP through loss.  iperf3 from
LAN host A to LAN host B through two agents in duplicate mode over three
unshaped, undelayed veth carriers (bench/agent.py's lab), random loss on
every carrier (both directions) of 0 / 5 / 20 %, NACK repair off and on,
cubic and bbr senders.  Each lossy figure is a ratio against the clean
figure of the same agents and sender in the same run (medians of
``--repeat`` rounds, the cells of a round interleaved), next to the loss the
tunnel delivered (numbers the receiver gave up), the bytes on the wire per
byte delivered, and ping through the tunnel while the sender runs.

    python bench/loss.py [--packets N] [--rate PPS] [--mode-packets N] [--modes M,..] [--scenario S] [--no-delay]
                         [--skip-carriers] [--skip-modes] [--delays none,lab,150] [--json FILE]     (root)
    python bench/loss.py --tcp [--tcp-losses 0,5,20] [--cc cubic,bbr] [--nack off,on] [--seconds S]
                         [--repeat N] [--json FILE]     (root; needs iperf3)

With --json FILE the p^N table is also drawn into FILE.png (bench/plots.py; matplotlib,
the ``bench`` extra: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agent import iperf, pct  # noqa: E402
from agentlab import UDP_SINK, UDP_SOURCE, TwoSites  # noqa: E402
from netlab import Lab  # noqa: E402
from wan import DELAYS, LABS, RATES, describe, make_lab  # noqa: E402

LOSSES = (1, 5, 10, 20, 30)
MODES = ("duplicate", "adaptive", "aggregate")
# carrier -> loss %, both directions
SCENARIOS = {"clean": {}, "5% on the 50 Mbit/s carrier": {1: 5}, "5% on the 30 Mbit/s carrier": {2: 5},
             "2% on every carrier": {1: 2, 2: 2, 3: 2},
             "10% on every carrier": {1: 10, 2: 10, 3: 10}}
INNER = 228  # bytes: the UDP source's 200-byte payload + UDP + IPv4 headers


def wire_bytes(st) -> int:
    return sum(ln["tx_bytes"] for ln in st["links"])


def mode_table(args, lab_name: str) -> list:
    rows = []
    with make_lab(LABS[lab_name]) as lab:
        for mode in args.modes.split(","):
            with TwoSites(lab, extra_base=f"\toption mode '{mode}'\n\toption target_loss '0.001'\n") as ts:
                ts.start()
                for name, losses in SCENARIOS.items():
                    if args.scenario and args.scenario not in name:
                        continue
                    for c in RATES:
                        lab.set_loss(c, losses.get(c, 0))
                    stream(lab, int(2 * args.rate), args.rate)  # warm-up: loss estimates
                    a0, b0, e0 = ts.a.status(), ts.b.status(), rcvbuf_errors(lab)
                    got = stream(lab, args.mode_packets, args.rate)
                    a1, b1, e1 = ts.a.status(), ts.b.status(), rcvbuf_errors(lab)
                    sent = a1["counters"]["sent"] - a0["counters"]["sent"]
                    data = sum(ln["data_tx"] for ln in a1["links"]) - sum(ln["data_tx"] for ln in a0["links"])
                    rows.append({"lab": lab_name, "mode": mode, "scenario": name, "loss_pct": losses,
                                 "packets": args.mode_packets, "delivered": got,
                                 "delivered_loss": 1 - got / args.mode_packets,
                                 "wire_per_delivered_byte": (wire_bytes(a1) - wire_bytes(a0)) / max(1, got * INNER),
                                 "datagrams_per_packet": data / max(1, sent),
                                 "retransmits": a1["counters"].get("retransmits", 0)
                                 - a0["counters"].get("retransmits", 0),
                                 "skipped": b1["counters"].get("skipped", 0) - b0["counters"].get("skipped", 0),
                                 "nack_too_late": b1["counters"].get("nack_too_late", 0)
                                 - b0["counters"].get("nack_too_late", 0),
                                 "tx_sched_drops": a1["counters"].get("tx_sched_drops", 0)
                                 - a0["counters"].get("tx_sched_drops", 0),
                                 "hold_ms": (b1.get("sessions") or [{}])[0].get("hold_ms"),
                                 "sink_rcvbuf_errors": e1 - e0})
                for c in RATES:
                    lab.set_loss(c, 0)
    return rows


# The sink with an 8 MB receive buffer: a NACK repair releases everything the
# reorder buffer held behind the gap at once (up to hold x rate packets), and
# the default ~200 KB buffer overflowed in the receiving host (UdpRcvbufErrors),
# which looked like delivered loss in aggregate/adaptive mode.
BIG_SINK = UDP_SINK.replace(
    "s.settimeout(", "s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20); s.settimeout(", 1)  # SO_RCVBUFFORCE


def rcvbuf_errors(lab) -> int:
    """UDP datagrams the receiving host dropped for a full socket buffer."""
    lines = [ln.split() for ln in lab.run(lab.hb, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def stream(lab, packets: int, rate: float) -> int:
    sink = lab.python_popen(lab.hb, BIG_SINK, "192.168.20.2", "6000", "1.5", stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    lab.python(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(packets), str(rate),
               timeout=packets / rate + 30)
    out, _ = sink.communicate(timeout=60)
    return int(out.split()[0])


TCP_LOSSES = (0, 5, 20)


def _counter(st, key) -> int:
    return st["counters"].get(key, 0)


def tcp_cell(lab, ts, cc: str, seconds: float) -> dict:
    """One iperf3 run A -> B (1 s of slow start not counted), ping A -> B
    through the tunnel during it, and what the agents counted meanwhile."""
    a0, b0 = ts.a.status(), ts.b.status()
    pinger = lab.popen(lab.ha, ["ping", "-n", "-i", "0.01", "-W", "1", "-w", str(int(seconds + 1)),
                                "192.168.20.2"], stdout=subprocess.PIPE, text=True)
    bps, nbytes = iperf(lab, lab.ha, lab.hb, "192.168.20.2", seconds, omit=1, cc=cc)
    out, _ = pinger.communicate(timeout=seconds + 30)
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    a1, b1 = ts.a.status(), ts.b.status()

    def d(st1, st0, k):
        return _counter(st1, k) - _counter(st0, k)

    def given_up(st1, st0):  # the share of sequence numbers the receiver gave up
        skipped = d(st1, st0, "skipped")
        return skipped / max(1, skipped + d(st1, st0, "delivered"))

    return {"mbit": bps / 1e6, "bytes": nbytes,
            "wire_per_byte": (wire_bytes(a1) - wire_bytes(a0)) / max(1, nbytes),
            "loss_a2b": given_up(b1, b0), "loss_b2a": given_up(a1, a0),
            "nack_seqs": d(b1, b0, "nack_seqs") + d(a1, a0, "nack_seqs"),
            "nack_too_late": d(b1, b0, "nack_too_late") + d(a1, a0, "nack_too_late"),
            "retransmits": d(a1, a0, "nack_retransmits") + d(b1, b0, "nack_retransmits"),
            # why numbers were given up, summed over both agents
            "why": {k: d(a1, a0, k) + d(b1, b0, k) for k in (
                "reorder_flushes", "deadline_releases", "nack_again", "nack_unavailable",
                "nack_budget_drops", "nack_untracked")},
            "hold_ms": [(st.get("sessions") or [{}])[0].get("hold_ms") for st in (a1, b1)],
            "srtt_ms": [ln.get("rtt_ms") for ln in b1["links"]],
            "ping_p50_ms": pct(rtts, 0.5), "ping_p99_ms": pct(rtts, 0.99), "pings": len(rtts)}


def tcp_table(args) -> list:
    """Cells (nack, cc, loss %, round) of the TCP-through-loss table."""
    cells = []
    ccs = args.cc.split(",")
    losses = [float(x) for x in args.tcp_losses.split(",")]
    with Lab(3) as lab:
        if args.tcp_rate:  # the tunnel, not the CPU, the bottleneck (a machine shared with other jobs)
            for c in (1, 2, 3):
                lab.set_rate(c, args.tcp_rate, latency_ms=10)
        for rnd in range(args.repeat):
            for nack in args.nack.split(","):
                extra = "\toption mode 'duplicate'\n" + (
                    "" if nack == "auto" else f"\toption nack '{1 if nack == 'on' else 0}'\n")
                with TwoSites(lab, extra_base=extra) as ts:
                    ts.start()
                    iperf(lab, lab.ha, lab.hb, "192.168.20.2", 1)  # warm-up
                    for cc in ccs:
                        for p in losses:
                            for c in (1, 2, 3):
                                lab.set_loss(c, p)
                            cell = tcp_cell(lab, ts, cc, args.seconds)
                            cell.update({"nack": nack, "cc": cc, "loss_pct": p, "round": rnd})
                            cells.append(cell)
                            print(f"  round {rnd} nack {nack:<4} {cc:<6} {p:>4.0f} %: {cell['mbit']:8.0f} Mbit/s, "
                                  f"given up {100 * cell['loss_a2b']:.3f} % / {100 * cell['loss_b2a']:.3f} %, "
                                  f"too late {cell['nack_too_late']} {cell['why']} hold {cell['hold_ms']} srtt {cell['srtt_ms']}", file=sys.stderr, flush=True)
                    for c in (1, 2, 3):
                        lab.set_loss(c, 0)
    return cells


def tcp_summary(cells: list) -> list:
    """Medians per (nack, cc, loss) and the ratios against the clean figure of
    the same nack setting and sender (and against nack off, clean)."""
    def med(xs):
        xs = sorted(xs)
        n = len(xs)
        return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if xs else float("nan")

    keys = []
    for c in cells:
        k = (c["nack"], c["cc"], c["loss_pct"])
        if k not in keys:
            keys.append(k)
    rows = []
    for k in keys:
        group = [c for c in cells if (c["nack"], c["cc"], c["loss_pct"]) == k]
        row = {"nack": k[0], "cc": k[1], "loss_pct": k[2], "rounds": len(group)}
        for f in ("mbit", "wire_per_byte", "loss_a2b", "loss_b2a", "ping_p50_ms", "ping_p99_ms",
                  "nack_seqs", "nack_too_late", "retransmits"):
            row[f] = med([c[f] for c in group])
        rows.append(row)
    for r in rows:
        clean = [x for x in rows if x["nack"] == r["nack"] and x["cc"] == r["cc"] and x["loss_pct"] == 0]
        off = [x for x in rows if x["nack"] == "off" and x["cc"] == r["cc"] and x["loss_pct"] == r["loss_pct"]]
        r["ratio_vs_clean"] = r["mbit"] / clean[0]["mbit"] if clean else None
        r["ratio_vs_nack_off"] = r["mbit"] / off[0]["mbit"] if off else None
        # per round too: the spread of the same-run ratio
        per = []
        for c in cells:
            if (c["nack"], c["cc"], c["loss_pct"]) == (r["nack"], r["cc"], r["loss_pct"]):
                base = [x for x in cells if (x["nack"], x["cc"], x["loss_pct"], x["round"])
                        == (r["nack"], r["cc"], 0, c["round"])]
                if base:
                    per.append(c["mbit"] / base[0]["mbit"])
        r["ratio_per_round"] = per
    return rows


def print_tcp(rows: list, args) -> None:
    shaped = f"tbf {args.tcp_rate:.0f} Mbit/s (10 ms queue)" if args.tcp_rate else "unshaped"
    print(f"TCP through loss: iperf3 {args.seconds:.0f} s (+1 s not counted) A -> B, duplicate mode x3, AEAD, "
          f"{shaped} undelayed veth carriers, loss on every carrier both directions; medians of "
          f"{args.repeat} round(s), each lossy cell as a ratio against the clean one of the same "
          f"agents and sender in the same round; ping -i 0.01 through the tunnel during each run")
    print(f"{'nack':<5}{'cc':<7}{'loss':>5}{'Mbit/s':>8}{'vs clean':>9}{'(rounds)':>18}{'vs off':>7}"
          f"{'gave up A>B':>12}{'B>A':>8}{'wire/B':>7}{'p50 ms':>7}{'p99 ms':>7}{'late':>6}")
    for r in rows:
        per = "/".join(f"{x:.2f}" for x in r["ratio_per_round"])
        off = "-" if r["ratio_vs_nack_off"] is None else f"{r['ratio_vs_nack_off']:.2f}"
        print(f"{r['nack']:<5}{r['cc']:<7}{r['loss_pct']:>4.0f}%{r['mbit']:>8.0f}{r['ratio_vs_clean']:>9.2f}"
              f"{per:>18}{off:>7}{100 * r['loss_a2b']:>11.3f}%{100 * r['loss_b2a']:>7.3f}%"
              f"{r['wire_per_byte']:>7.2f}{r['ping_p50_ms']:>7.2f}{r['ping_p99_ms']:>7.2f}"
              f"{r['nack_too_late']:>6.0f}")
    print("vs clean: this cell / the clean cell of the same nack setting and sender (per round in brackets); "
          "vs off: / nack off, same loss and sender; gave up: sequence numbers the receiving agent gave up "
          "(delivered loss), data and ack direction; wire/B: bytes A put on the wire per byte delivered; "
          "late: numbers missing too long to ask for")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--mode-packets", type=int, default=20000, help="packets per cell of the mode table")
    ap.add_argument("--modes", default=",".join(MODES), help="modes of the mode table")
    ap.add_argument("--scenario", default="", help="only the mode-table scenarios whose name contains this")
    ap.add_argument("--no-delay", action="store_true", help="carriers without the delay shim (= --delays none)")
    ap.add_argument("--delays", default="lab",
                    help="labs of the mode table, comma-separated: none (bare veths, RTT < 1 ms), lab "
                         "(10/25/40 ms one way), 150 (150 ms one way); default lab")
    ap.add_argument("--tcp", action="store_true", help="the TCP-through-loss table only (issue 17, item 2)")
    ap.add_argument("--tcp-losses", default=",".join(str(x) for x in TCP_LOSSES),
                    help="loss %% per carrier of the TCP table; 0 first (the clean reference)")
    ap.add_argument("--cc", default="cubic,bbr", help="TCP congestion controls of the TCP table")
    ap.add_argument("--nack", default="off,on", help="base.nack of the TCP table: off, on, auto")
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 seconds per TCP cell")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the TCP table")
    ap.add_argument("--tcp-rate", type=float, default=0.0,
                    help="tbf Mbit/s on every carrier of the TCP table (10 ms queue); default unshaped")
    ap.add_argument("--skip-carriers", action="store_true", help="no p^N table")
    ap.add_argument("--skip-modes", action="store_true", help="no mode table")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.tcp:
        if not shutil.which("iperf3"):
            print("needs iperf3 (apt-get install iperf3)", file=sys.stderr)
            return 2
        cells = tcp_table(args)
        rows = tcp_summary(cells)
        print_tcp(rows, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"bench": "loss-tcp", "tcp_rate_mbit": args.tcp_rate or None,
                                                   "seconds": args.seconds, "rows": rows, "cells": cells}, indent=2))
        return 0
    labs = ["none"] if args.no_delay else args.delays.split(",")
    delays = LABS[labs[0]]
    rows = []
    with make_lab(delays) as lab:
        for n in () if args.skip_carriers else (1, 2, 3):
            # NACK off: this table measures what duplicate sending alone delivers (p^N)
            with TwoSites(lab, carriers=n, extra_base="\toption nack '0'\n") as ts:
                ts.start(subflows=n)
                for p in LOSSES:
                    for c in range(1, n + 1):
                        lab.set_loss(c, p, direction="a2b")
                    got = stream(lab, args.packets, args.rate)
                    q = (p / 100) ** n
                    rows.append({"carriers": n, "loss_per_carrier": p / 100, "packets": args.packets,
                                 "delivered": got, "delivered_loss": 1 - got / args.packets,
                                 "model": q, "model_sd": math.sqrt(q * (1 - q) / args.packets)})
                for c in range(1, n + 1):
                    lab.set_loss(c, 0, direction="a2b")
    modes = [] if args.skip_modes else [r for name in labs for r in mode_table(args, name)]
    print(describe(delays))
    if rows:
        print(f"delivered loss, UDP {args.packets} packets at {args.rate:.0f} pkt/s per cell, "
              f"loss on every carrier A->B, duplicate mode")
        print(f"{'carriers':>8} {'p':>5} {'measured':>9} {'p^N':>8} {'(sd)':>7} {'vs p':>7}")
        for r in rows:
            vs = r["delivered_loss"] / r["loss_per_carrier"]
            print(f"{r['carriers']:>8} {100 * r['loss_per_carrier']:>4.0f}% {100 * r['delivered_loss']:>8.3f}% "
                  f"{100 * r['model']:>7.3f}% {100 * r['model_sd']:>6.3f}% {vs:>7.3f}")
    if modes:
        print(f"cost of redundancy: UDP {args.mode_packets} packets of {INNER} B at {args.rate:.0f} pkt/s per cell "
              f"(after {2 * args.rate:.0f} warm-up packets), loss on both directions, target_loss 0.1 %")
        for name in labs:
            print(f"{name}: {describe(LABS[name])}")
        print(f"{'lab':<5}{'scenario':<30}{'mode':<11}{'delivered loss':>15}{'wire/byte':>10}{'dgrams/pkt':>11}"
              f"{'re-sends':>9}{'skipped':>8}{'late':>6}{'qdrop':>6}{'hold ms':>8}{'rcvbuf':>7}")
        for r in modes:
            hold = "-" if r["hold_ms"] is None else f"{r['hold_ms']:.1f}"
            print(f"{r['lab']:<5}{r['scenario']:<30}{r['mode']:<11}{100 * r['delivered_loss']:>14.3f}%"
                  f"{r['wire_per_delivered_byte']:>10.2f}{r['datagrams_per_packet']:>11.2f}{r['retransmits']:>9}"
                  f"{r['skipped']:>8}{r['nack_too_late']:>6}{r['tx_sched_drops']:>6}{hold:>8}{r['sink_rcvbuf_errors']:>7}")
        print("wire/byte: bytes A put on the wire (data, copies, re-sends, probes, headers) per inner byte "
              "delivered; dgrams/pkt: DATA datagrams per user packet; skipped: numbers B gave up; "
              "late: numbers B found missing too late to ask for; qdrop: packets A's scheduler queue dropped "
              "(tx_sched_drops: overflow or older than max_sojourn, never sent); hold: B's reorder hold at the end; "
              "rcvbuf: datagrams the sink's host dropped (socket buffer full; should be 0)")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "loss", "rates_mbit": RATES,
                                               "delays_ms": DELAYS if delays else None,
                                               "labs": {n: LABS[n] for n in labs},
                                               "rows": rows, "modes": modes}, indent=2))
        if rows:  # the picture next to the JSON (matplotlib: pip install -e '.[bench]')
            try:
                from plots import loss_plot
            except ImportError as e:
                print(f"no picture: {e}", file=sys.stderr)
            else:
                print(f"picture: {loss_plot(rows, Path(args.json).with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
