#!/usr/bin/env python3
"""Failover in the namespace lab: a carrier fails under a running stream.

Two real agents, carriers as real WANs (tbf 50/30/20 Mbit/s, one-way delay
10/25/40 ms +- 2/3/4 ms jitter through the lab's delay shim).  A numbered UDP
stream (228-byte inner packets) runs from LAN host A to LAN host B; after
``--before`` seconds the carrier that carried most of it is set down (both
directions).  Per mode: packets lost, the longest gap between two deliveries
at the receiver (the stall), and how long the agent took to mark the subflow
down (detection).  Target (issue 7): no stall longer than detection; no
packet lost (duplicate mode by construction, aggregate/adaptive by NACK
repair of the dead carrier's in-flight tail).

Each row also keeps the receiver's timeline: packets that arrived per 10 ms
bin from the first packet sent, with the moment the carrier was set down
(``fail_at_s``) on the same clock (CLOCK_MONOTONIC is one clock for every
namespace).  With --json FILE the timelines are drawn into FILE.png
(bench/plots.py; matplotlib, ``pip install -e '.[bench]'``).

    python bench/failover.py [--rate PPS] [--packets N] [--before S] [--no-delay]
                             [--modes duplicate,aggregate,adaptive] [--json FILE]   (root)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agentlab import UDP_LATENCY_SINK, UDP_SOURCE, TwoSites  # noqa: E402
from netlab import Lab  # noqa: E402
from wan import make_lab  # noqa: E402

CARRIERS = ("telecom", "unicom", "mobile")
BIN_S = 0.010


def timeline(packets: list, t_fail: float, bin_s: float = BIN_S) -> dict:
    """The receiver's view of one run: ``packets`` are UDP_LATENCY_SINK's
    [number, sent, arrived] rows (monotonic seconds), ``t_fail`` when the carrier
    was set down.  Returns arrivals per ``bin_s`` from the first send, where the
    failure and the longest pause between two arrivals (the stall) fall on that
    axis, and the stall's length."""
    if not packets:
        return {"bin_s": bin_s, "counts": [], "fail_at_s": None, "stall_s": 0.0, "stall_at_s": None}
    t0 = min(p[1] for p in packets)
    arr = sorted(p[2] - t0 for p in packets)
    counts = [0] * (int(arr[-1] / bin_s) + 1)
    for a in arr:
        counts[int(a / bin_s)] += 1
    gap, at = 0.0, None
    for x, y in zip(arr, arr[1:]):
        if y - x > gap:
            gap, at = y - x, x
    return {"bin_s": bin_s, "counts": counts, "fail_at_s": round(t_fail - t0, 4),
            "stall_s": round(gap, 4), "stall_at_s": None if at is None else round(at, 4)}


def one(lab: Lab, mode: str, args) -> dict:
    with TwoSites(lab, extra_base=f"\toption mode '{mode}'\n") as ts:
        ts.start()
        time.sleep(1.0)  # a few keepalives: RTTs measured, hold settled
        sink = lab.python_popen(lab.hb, UDP_LATENCY_SINK, "192.168.20.2", "6000", "3",
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout.readline().strip() == "ready"
        before = {ln["type"]: ln["data_tx"] for ln in ts.a.status()["links"]}
        src = lab.python_popen(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(args.packets),
                               str(args.rate), stdout=subprocess.PIPE, text=True)
        time.sleep(args.before)
        links = ts.a.status()["links"]
        busiest = max(links, key=lambda ln: ln["data_tx"] - before.get(ln["type"], 0))["type"]
        t_fail = time.monotonic()
        lab.link_down(1 + CARRIERS.index(busiest))
        detected = None
        while src.poll() is None:
            if detected is None:
                st = {ln["type"]: ln["state"] for ln in ts.a.status()["links"]}
                if st.get(busiest) != "established":
                    detected = time.monotonic() - t_fail
            time.sleep(0.02)
        out, _ = sink.communicate(timeout=30)
        packets = json.loads(out)["packets"]
        tl = timeline(packets, t_fail)
        cb = ts.b.status()["counters"]
        ca = ts.a.status()["counters"]
        lab.link_up(1 + CARRIERS.index(busiest))
        return {"mode": mode, "failed": busiest, "packets": args.packets, "rate_pps": args.rate,
                "delivered": len(packets), "lost": args.packets - len(packets), "stall_s": tl["stall_s"],
                "detection_s": None if detected is None else round(detected, 3),
                "nack_seqs": cb.get("nack_seqs", 0), "nack_retransmits": ca.get("nack_retransmits", 0),
                "skipped": cb.get("skipped", 0), "timeline": tl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="packets per second")
    ap.add_argument("--packets", type=int, default=4000)
    ap.add_argument("--before", type=float, default=1.5, help="seconds of stream before the failure")
    ap.add_argument("--modes", default="duplicate,aggregate,adaptive")
    ap.add_argument("--no-delay", action="store_true", help="direct veth carriers (no shim)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    with make_lab(not args.no_delay) as lab:
        for mode in args.modes.split(","):
            rows.append(one(lab, mode, args))
    print(f"failover: {args.packets} packets at {args.rate:g}/s, carriers 50/30/20 Mbit/s"
          + ("" if args.no_delay else ", 10/25/40 ms one-way"))
    print(f"{'mode':<11}{'failed':<9}{'lost':>6}{'stall ms':>10}{'detect ms':>11}{'NACKed':>8}{'re-sent':>9}"
          f"{'skipped':>9}")
    for r in rows:
        det = "-" if r["detection_s"] is None else f"{1000 * r['detection_s']:.0f}"
        print(f"{r['mode']:<11}{r['failed']:<9}{r['lost']:>6}{1000 * r['stall_s']:>10.0f}{det:>11}"
              f"{r['nack_seqs']:>8}{r['nack_retransmits']:>9}{r['skipped']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "failover", "rate_pps": args.rate,
                                               "packets": args.packets, "delays": not args.no_delay,
                                               "rows": rows}, indent=1))
        try:  # the picture next to the JSON (matplotlib: pip install -e '.[bench]')
            from plots import failover_plot
        except ImportError as e:
            print(f"no picture: {e}", file=sys.stderr)
        else:
            print(f"picture: {failover_plot(rows, Path(args.json).with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
