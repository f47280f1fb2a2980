#!/usr/bin/env python3
"""Scheduler benchmark in the namespace lab (issue 7): carriers rate-limited
to 50/30/20 Mbit/s with tbf, TCP LAN host to LAN host through two real
agents, for each base.mode; once on clean carriers and once with 5 % loss
on the 30 Mbit/s carrier.  Goodput is quoted against the 100 Mbit/s sum and
against the fastest single carrier (what duplicate mode can reach): steady
state (iperf3, first 3 s omitted) and a whole fixed-size transfer with
sha256 check (which includes the ramp-up).

    python bench/aggregate.py [--bytes N] [--seconds S] [--json FILE]   (root, iperf3)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agent import iperf  # noqa: E402  (bench/agent.py)
from agentlab import TwoSites, tcp_transfer  # noqa: E402
from netlab import Lab  # noqa: E402

RATES = {1: 50, 2: 30, 3: 20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=30_000_000)
    ap.add_argument("--seconds", type=float, default=8.0, help="steady-state iperf3 run (after 3 s)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rows = []
    for loss in (0, 5):
        for mode in ("duplicate", "aggregate", "adaptive"):
            with Lab(3) as lab, TwoSites(lab, extra_base=f"\toption mode '{mode}'\n") as ts:
                for c, mbit in RATES.items():
                    lab.set_rate(c, mbit)
                if loss:
                    lab.set_loss(2, loss)
                ts.start()
                steady_bps, _ = iperf(lab, lab.ha, lab.hb, "192.168.20.2", args.seconds, omit=3)
                before = sum(ln["tx_bytes"] for ln in ts.a.status()["links"])
                sent, sha_tx, got, sha_rx, secs = tcp_transfer(lab, args.bytes, timeout=300)
                st = ts.a.status()
                wire_bytes = sum(ln["tx_bytes"] for ln in st["links"]) - before
                mbit = got * 8 / secs / 1e6
                steady = steady_bps / 1e6
                rows.append({"mode": mode, "loss_on_30": loss / 100, "goodput_mbit": mbit,
                             "steady_mbit": steady, "steady_vs_sum": steady / sum(RATES.values()),
                             "vs_sum": mbit / sum(RATES.values()), "vs_best_single": mbit / max(RATES.values()),
                             "intact": (got, sha_rx) == (sent, sha_tx),
                             "wire_bytes_per_byte": wire_bytes / max(1, got),
                             "weights": {ln["type"]: ln["weight"] for ln in st["links"]},
                             "retransmits": st["counters"].get("retransmits", 0)})
    print(f"TCP {args.bytes / 1e6:.0f} MB through two agents, carriers {RATES[1]}/{RATES[2]}/{RATES[3]} Mbit/s (tbf)")
    print(f"{'mode':<10}{'loss on 30':>11}{'steady':>8}{'vs sum':>8}{'whole':>8}{'vs sum':>8}{'vs best':>8}"
          f"{'wire/byte':>10}{'intact':>7}")
    for r in rows:
        print(f"{r['mode']:<10}{100 * r['loss_on_30']:>10.0f}%{r['steady_mbit']:>8.1f}{r['steady_vs_sum']:>8.2f}"
              f"{r['goodput_mbit']:>8.1f}{r['vs_sum']:>8.2f}{r['vs_best_single']:>8.2f}"
              f"{r['wire_bytes_per_byte']:>10.2f}{'yes' if r['intact'] else 'NO':>7}")
    print("steady: iperf3 Mbit/s after the first 3 s; whole: a sha256-checked transfer incl. ramp-up")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "aggregate", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
