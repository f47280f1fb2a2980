#!/usr/bin/env python3
"""Loss table in the namespace lab: a UDP stream from LAN host A to LAN host
B through two real agents (duplicate mode), loss p on every carrier A->B
(nftables), for N = 1, 2, 3 carriers.  Measured delivered loss next to the
model p^N (and its binomial standard deviation for the sample size).

    python bench/loss.py [--packets N] [--rate PPS] [--json FILE]     (root)
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
from netlab import Lab  # noqa: E402

LOSSES = (1, 5, 10, 20, 30)


def stream(lab, packets: int, rate: float) -> int:
    sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "1.5", stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    lab.python(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(packets), str(rate),
               timeout=packets / rate + 30)
    out, _ = sink.communicate(timeout=60)
    return int(out.split()[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rows = []
    with Lab(3) as lab:
        for n in (1, 2, 3):
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
    print(f"delivered loss, UDP {args.packets} packets at {args.rate:.0f} pkt/s per cell, "
          f"loss on every carrier A->B, duplicate mode")
    print(f"{'carriers':>8} {'p':>5} {'measured':>9} {'p^N':>8} {'(sd)':>7} {'vs p':>7}")
    for r in rows:
        vs = r["delivered_loss"] / r["loss_per_carrier"]
        print(f"{r['carriers']:>8} {100 * r['loss_per_carrier']:>4.0f}% {100 * r['delivered_loss']:>8.3f}% "
              f"{100 * r['model']:>7.3f}% {100 * r['model_sd']:>6.3f}% {vs:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "loss", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
