#!/usr/bin/env python3
"""NAT traversal in the namespace lab (issue 15): time from agent start to
3 of 3 subflows for a direct `mobile` pair and for one punched through two
endpoint-independent NATs (tests/natsites.py: nftables NAT boxes, coturn as
the STUN server); keepalive bytes per second that hold the punched pair's
NAT mappings open while idle; and the time from a NAT reboot on both ends
(conntrack flushed, new public ports) to the pair back up in the same
session.  (Relayed pairs come with the TURN relay fallback.)

    python bench/punch.py [--runs N] [--idle S] [--keepalive S] [--json FILE]     (root)

Times are taken from outside by polling the agents' status every 0.1 s, so
they include up to 0.1 s of polling; they are for orientation, no test
asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agentlab import TwoSites  # noqa: E402
from natsites import NatSites, link, punched_up, unavailable_reason, uplink  # noqa: E402
from netlab import Lab  # noqa: E402


def until(site, pred, what: str, timeout: float = 60.0) -> float:
    """Seconds until ``pred(status)`` holds (polled every 0.1 s)."""
    t0 = time.monotonic()
    site.wait(pred, timeout, what)
    return time.monotonic() - t0


def direct_run() -> float:
    with Lab(3) as lab, TwoSites(lab) as ts:
        t0 = time.monotonic()
        ts.start(wait=False)
        ts.a.wait_connected(3, 60)
        ts.b.wait_connected(3, 60)
        return time.monotonic() - t0


def punched_run(idle: float, keepalive: float | None, port: int) -> dict:
    extra = ""
    if keepalive is not None:
        extra = f"\toption keepalive_idle '{keepalive}'\n\toption nat_keepalive '{keepalive}'\n"
    with Lab(3) as lab, NatSites(lab, ("eim", "eim"), extra) as ns:
        t0 = time.monotonic()
        ns.sites.start(wait=False)
        ns.sites.a.wait(punched_up, 60, "mobile punched")
        ns.sites.b.wait(punched_up, 60, "mobile punched")
        start = time.monotonic() - t0
        time.sleep(1.0)
        st0 = ns.sites.a.status()
        time.sleep(idle)
        st1 = ns.sites.a.status()
        tx = link(st1, "mobile")["tx_bytes"] - link(st0, "mobile")["tx_bytes"]
        down_idle = link(st1, "mobile")["downs"]
        roams_idle = {s: link(s.status(), "mobile")["roams"] for s in (ns.sites.a, ns.sites.b)}
        sid = st1["session_id"]
        for site in (ns.mobile.a_site, ns.mobile.b_site):
            ns.nc.reboot(site, port=port)
        t1 = time.monotonic()

        def back_on(site):
            # back: established on the new mapping, after going down and up
            # again, or (re-punched while established) moved to the peer's new one
            def back(st):
                lk = link(st, "mobile")
                return (lk["state"] == "established" and (lk["downs"] > down_idle or lk["roams"] > roams_idle[site])
                        and (uplink(st, "mobile")["public"] or "").endswith(f":{port}"))
            return back
        ns.sites.a.wait(back_on(ns.sites.a), 200, "mobile back after the NAT reboot")
        ns.sites.b.wait(back_on(ns.sites.b), 200, "mobile back after the NAT reboot")
        recover = time.monotonic() - t1
        same = ns.sites.a.status()["session_id"] == sid == ns.sites.b.status()["session_id"]
        return {"start_s": start, "keepalive_bytes_per_s": tx / idle, "downs_while_idle": down_idle,
                "reboot_recovery_s": recover, "same_session": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0, help="idle window for keepalive bytes (s)")
    ap.add_argument("--keepalive", type=float, default=None,
                    help="keepalive_idle and nat_keepalive for the punched runs (default: the defaults)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    why = unavailable_reason()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    direct = [direct_run() for _ in range(args.runs)]
    punched = [punched_run(args.idle, args.keepalive, 7100 + i) for i in range(args.runs)]

    def med(xs):
        return statistics.median(xs)
    print(f"{args.runs} runs each; keepalive {args.keepalive or 'default'}")
    print(f"start -> 3 of 3 subflows, direct:         median {med(direct):.2f} s  "
          f"(min {min(direct):.2f}, max {max(direct):.2f})")
    starts = [r["start_s"] for r in punched]
    print(f"start -> 3 of 3 subflows, mobile punched: median {med(starts):.2f} s  "
          f"(min {min(starts):.2f}, max {max(starts):.2f})")
    ka = [r["keepalive_bytes_per_s"] for r in punched]
    print(f"keepalive on the idle punched subflow:    median {med(ka):.0f} B/s (one direction, "
          f"downs while idle: {sum(r['downs_while_idle'] for r in punched)})")
    rec = [r["reboot_recovery_s"] for r in punched]
    print(f"NAT reboot (both ends, new ports) -> back: median {med(rec):.2f} s  "
          f"(min {min(rec):.2f}, max {max(rec):.2f}); same session: "
          f"{all(r['same_session'] for r in punched)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "nat", "direct_start_s": direct, "punched": punched},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
