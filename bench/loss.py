#!/usr/bin/env python3
"""Loss table in the namespace lab: a UDP stream from LAN host A to LAN host
B through two real agents (duplicate mode), loss p on every carrier A->B
(nftables), for N = 1, 2, 3 carriers.  Measured delivered loss next to the
model p^N (and its binomial standard deviation for the sample size).

The carriers model real WANs: tbf 50/30/20 Mbit/s and one-way delay
10/25/40 ms +- 2/3/4 ms jitter (the lab's delay shim, FIFO, each direction).

Second table (issue 7): the cost of redundancy per mode.  The same UDP
stream through agents in duplicate, adaptive (base.target_loss 0.001) and
aggregate mode, with loss on both directions of some carriers: delivered
loss next to the bytes the agent put on the wire per byte delivered
(inner IP packets of 228 bytes; SMPU header, AEAD tag and probes included).

    python bench/loss.py [--packets N] [--rate PPS] [--mode-packets N] [--modes M,..] [--scenario S] [--no-delay]
                         [--skip-carriers] [--skip-modes] [--json FILE]     (root)

With --json FILE the p^N table is also drawn into FILE.png (bench/plots.py; matplotlib,
the ``bench`` extra: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agentlab import UDP_SINK, UDP_SOURCE, TwoSites  # noqa: E402
from wan import DELAYS, RATES, describe, make_lab  # noqa: E402

LOSSES = (1, 5, 10, 20, 30)
MODES = ("duplicate", "adaptive", "aggregate")
# carrier -> loss %, both directions
SCENARIOS = {"clean": {}, "5% on the 50 Mbit/s carrier": {1: 5}, "5% on the 30 Mbit/s carrier": {2: 5},
             "2% on every carrier": {1: 2, 2: 2, 3: 2},
             "10% on every carrier": {1: 10, 2: 10, 3: 10}}
INNER = 228  # bytes: the UDP source's 200-byte payload + UDP + IPv4 headers


def wire_bytes(st) -> int:
    return sum(ln["tx_bytes"] for ln in st["links"])


def mode_table(args, delays: bool) -> list:
    rows = []
    with make_lab(delays) as lab:
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
                    rows.append({"mode": mode, "scenario": name, "loss_pct": losses,
                                 "packets": args.mode_packets, "delivered": got,
                                 "delivered_loss": 1 - got / args.mode_packets,
                                 "wire_per_delivered_byte": (wire_bytes(a1) - wire_bytes(a0)) / max(1, got * INNER),
                                 "datagrams_per_packet": data / max(1, sent),
                                 "retransmits": a1["counters"].get("retransmits", 0)
                                 - a0["counters"].get("retransmits", 0),
                                 "skipped": b1["counters"].get("skipped", 0) - b0["counters"].get("skipped", 0),
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--mode-packets", type=int, default=20000, help="packets per cell of the mode table")
    ap.add_argument("--modes", default=",".join(MODES), help="modes of the mode table")
    ap.add_argument("--scenario", default="", help="only the mode-table scenarios whose name contains this")
    ap.add_argument("--no-delay", action="store_true", help="carriers without the delay shim")
    ap.add_argument("--skip-carriers", action="store_true", help="no p^N table")
    ap.add_argument("--skip-modes", action="store_true", help="no mode table")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    delays = not args.no_delay
    rows = []
    with make_lab(delays) as lab:
        for n in () if args.skip_carriers else (1, 2, 3):
            with TwoSites(lab, carriers=n) as ts:
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
    modes = [] if args.skip_modes else mode_table(args, delays)
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
        print(f"{'scenario':<30}{'mode':<11}{'delivered loss':>15}{'wire/byte':>10}{'dgrams/pkt':>11}"
              f"{'re-sends':>9}{'skipped':>8}{'rcvbuf':>7}")
        for r in modes:
            print(f"{r['scenario']:<30}{r['mode']:<11}{100 * r['delivered_loss']:>14.3f}%"
                  f"{r['wire_per_delivered_byte']:>10.2f}{r['datagrams_per_packet']:>11.2f}{r['retransmits']:>9}"
                  f"{r['skipped']:>8}{r['sink_rcvbuf_errors']:>7}")
        print("wire/byte: bytes A put on the wire (data, copies, re-sends, probes, headers) per inner byte "
              "delivered; dgrams/pkt: DATA datagrams per user packet; skipped: numbers B gave up; "
              "rcvbuf: datagrams the sink's host dropped (socket buffer full; should be 0)")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "loss", "rates_mbit": RATES,
                                               "delays_ms": DELAYS if delays else None,
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
