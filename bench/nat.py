#!/usr/bin/env python3
"""NAT traversal benchmark in the namespace lab (issue 15): the cost of the
TURN relay, measured next to a direct carrier in the same run.

Two real agents; carrier 3 (``mobile``) of both sites behind endpoint-
dependent ("symmetric") nftables NAT boxes, so it comes up relayed, relay to
relay, through the real coturn in the lab internet (tests/netlab/nat.py,
tests/test_relay_e2e.py); carriers 1 and 2 are direct.

* time from agent start until ``mobile`` is relayed (3 of 3 subflows);
* the agent's own link test (``mpvpn test-links``: each link alone, both
  directions): capacity and goodput of the relayed ``mobile`` next to the
  direct ``telecom``, and their ratio (the relay's cost);
* idle keepalive traffic per subflow (bytes/s out, from the agents' link
  counters over an idle period), relayed next to direct.

    python bench/nat.py [--phase S] [--idle S] [--rate MBIT] [--json FILE]   (root; needs turnserver)

``--rate`` limits carriers 1 and 3 to the same rate (tc tbf), so the ratio
compares paths of equal capacity; without it both run as fast as this
machine's CPUs let them (coturn forwards in user space, twice per datagram).
Numbers are for orientation; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

import coturn  # noqa: E402
from agentlab import TwoSites, site_config  # noqa: E402
from netlab import Lab, nat, unavailable_reason  # noqa: E402
from test_relay_e2e import MOBILE, PORT, RELAY, Relays, link, relay_sections, relayed_up  # noqa: E402

from mpvpn.core.noise import genpsk  # noqa: E402
from mpvpn.io import rpc  # noqa: E402


def link_test(site, seconds: float) -> dict:
    path = rpc.socket_path(site.run_dir)
    started = rpc.call(path, "test_links", {"duration": seconds})
    if started.get("error"):
        raise RuntimeError(started["error"])
    while True:
        time.sleep(0.5)
        doc = (rpc.call(path, "status") or {}).get("link_test") or {}
        if doc.get("state") in ("done", "failed"):
            return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", type=float, default=2.0, help="seconds per link-test phase")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle for the keepalive rate")
    ap.add_argument("--rate", type=float, default=None, help="Mbit/s limit on carriers 1 and 3")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    reason = unavailable_reason() or coturn.unavailable_reason()
    if reason:
        print(f"bench/nat.py: {reason}", file=sys.stderr)
        return 2
    out: dict = {"phase_s": args.phase, "idle_s": args.idle, "rate_mbit": args.rate}
    with Lab(carriers=3) as lab:
        nc = nat.NatCarriers(lab, {MOBILE: ("edm", "edm")})
        relays = Relays(nc).start()
        sites = TwoSites(lab)
        try:
            psk = genpsk()
            mc = nc.carrier(MOBILE)
            stun = "".join(f"\tlist stun '{ip}:{PORT}'\n" for ip in nat.INET_IPS)
            for site, role, idx, vnc, lan, ip in ((sites.a, "client", 1, "172.30.0.1", "192.168.10.1", mc.a_ip),
                                                  (sites.b, "server", 2, "172.30.0.2", "192.168.20.1", mc.b_ip)):
                text, net = site_config(role, psk, idx, vnc, lan, 3, stun)
                text = text.replace(f"option bind_ip '10.{MOBILE}.0.{idx}'", f"option bind_ip '{ip}'")
                site.write(text + relay_sections(RELAY), net)
            if args.rate:
                for c in (1, MOBILE):
                    lab.set_rate(c, args.rate)
            t0 = time.monotonic()
            sites.start(wait=False)
            st = sites.a.wait(relayed_up, 60, "mobile relayed")
            out["relayed_after_s"] = round(time.monotonic() - t0, 2)
            out["relay_why"] = st["uplinks"][2]["relay"]["why"] if st["uplinks"][2]["relay"] else None
            sites.b.wait(relayed_up, 60, "mobile relayed")
            time.sleep(1.0)
            # idle keepalive traffic per subflow
            before = {ln["type"]: ln["tx_bytes"] for ln in sites.a.status()["links"]}
            time.sleep(args.idle)
            st = sites.a.status()
            out["keepalive_bytes_per_s"] = {ln["type"]: round((ln["tx_bytes"] - before[ln["type"]]) / args.idle, 1)
                                            for ln in st["links"]}
            doc = link_test(sites.a, args.phase)
            res = {(r["name"], r["direction"]): r for r in doc.get("results") or []}
            rows = {}
            for name in ("telecom", "unicom", "mobile"):
                for d in ("up", "down"):
                    r = res.get((name, d))
                    if r:
                        rows[f"{name} {d}"] = {k: r.get(k) for k in ("mbps", "goodput_mbps", "rtt_ms", "loss")}
            out["link_test"] = rows
            out["link_test_state"] = doc.get("state")
            ratios = {}
            for d in ("up", "down"):
                m, t = rows.get(f"mobile {d}"), rows.get(f"telecom {d}")
                if m and t and t.get("goodput_mbps"):
                    ratios[d] = round(m["goodput_mbps"] / t["goodput_mbps"], 3)
            out["relayed_over_direct_goodput"] = ratios
            out["mobile_path"] = link(sites.a.status(), "mobile")["path"]
        finally:
            sites.close()
            relays.close()
            nc.close()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
