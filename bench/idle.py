#!/usr/bin/env python3
"""Idle cost of the agent in the namespace lab: CPU share, resident memory
and keepalive traffic of two connected agents (3 carriers each) carrying no
user traffic, over a fixed window.

    python bench/idle.py [--seconds S] [--json FILE]     (root)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agent import cpu_seconds, rss_mib  # noqa: E402  (bench/agent.py)
from agentlab import TwoSites  # noqa: E402
from netlab import Lab  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rows = []
    with Lab(3) as lab, TwoSites(lab) as ts:
        ts.start()
        time.sleep(2.0)  # let start-up work settle
        sites = (("client", ts.a), ("server", ts.b))
        before = {name: (cpu_seconds(s.proc.pid), s.status()) for name, s in sites}
        time.sleep(args.seconds)
        for name, s in sites:
            c0, st0 = before[name]
            st1 = s.status()
            tx = sum(ln["tx_bytes"] for ln in st1["links"]) - sum(ln["tx_bytes"] for ln in st0["links"])
            rows.append({"agent": name, "seconds": args.seconds,
                         "cpu_percent": 100 * (cpu_seconds(s.proc.pid) - c0) / args.seconds,
                         "rss_mib": rss_mib(s.proc.pid),
                         "keepalive_bytes_per_s_per_subflow": tx / args.seconds / max(1, len(st1["links"]))})
    print(f"idle agents, {args.seconds:.0f} s, 3 subflows each, no user traffic")
    print(f"{'agent':<8}{'CPU %':>8}{'RSS MiB':>9}{'keepalive B/s per subflow':>27}")
    for r in rows:
        print(f"{r['agent']:<8}{r['cpu_percent']:>8.3f}{r['rss_mib']:>9.1f}"
              f"{r['keepalive_bytes_per_s_per_subflow']:>27.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "idle", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
