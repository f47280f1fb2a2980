"""`make demo`: two sites, three carriers, the real agent, on this machine.

Builds the namespace lab (router A and B, a LAN host behind each, three
carriers with 10/25/40 ms one-way delay), starts `mpvpn run` on both routers
with the configuration of the issue-4 example, and shows what a user would
check: the tunnel comes up, LAN hosts reach each other, 20 % loss on every
carrier becomes ~0.8 %, and a carrier failing mid-stream loses nothing.
Everything is torn down at the end.  Needs root (network namespaces).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from agentlab import UDP_SINK, UDP_SOURCE, TwoSites  # noqa: E402
from netlab import Lab, unavailable_reason  # noqa: E402

from mpvpn.cli import _print_status  # noqa: E402
from mpvpn.tools.demo import explain_loss  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    why = unavailable_reason()
    if why:
        print(f"the two-site demo needs network namespaces: {why}", file=sys.stderr)
        return 2
    delays = {1: (10, 2), 2: (25, 3), 3: (40, 4)}
    with Lab(3, delays=delays) as lab, TwoSites(lab) as ts:
        say("site A (client, 192.168.10.0/24) and site B (server, 192.168.20.0/24), carriers "
            "telecom/unicom/mobile with 10/25/40 ms one-way delay")
        ok = lab.reachable(lab.ha, "192.168.20.2")
        print(f"before the VPN, host A reaches host B: {ok}")
        ts.start()
        time.sleep(1.0)  # a keepalive round replaces the handshake's RTT sample (it includes ARP)
        say("mpvpn status on router A")
        _print_status(ts.a.status())
        p = lab.ping(lab.ha, "192.168.20.2", count=50, interval=0.02)
        say(f"ping host A -> host B: {p.received}/{p.sent} replies, rtt avg {p.rtt_avg:.1f} ms "
            f"(the fastest carrier's round trip is ~20 ms)")
        for c in (1, 2, 3):
            lab.set_loss(c, 20, direction="a2b")
        n = 1500
        t_run = time.monotonic()
        p = lab.ping(lab.ha, "192.168.20.2", count=n, interval=0.01, timeout=2.0)
        t_run = time.monotonic() - t_run
        lost = p.sent - p.received
        say(f"20 % loss on every carrier A->B: {lost}/{p.sent} pings lost = {100 * lost / p.sent:.2f} % "
            f"(one carrier alone: 20 %; three: 0.2^3 = 0.8 %, and NACK repair, on by default, "
            f"asks again for what all three lost)")
        print("   without repair (duplicate sending alone):")
        for line in explain_loss(p.sent, lost, 0.2, {3: p.sent}, 3, []):
            print(f"   {line.strip()}")
        print("   with repair a measurement below that range is the repair at work: what is left "
              "is what could not come back in time")
        # the range holds when all three carriers carried every ping: say so when one did not
        for ln in ts.a.status()["links"]:
            age = ln.get("last_down_age")
            if ln["state"] != "established" or (age is not None and age < t_run):
                print(f"   (carrier {ln['type']} went down during the pings: the range above assumes "
                      f"all three carried every ping; fewer carriers lose more)")
        st = ts.b.status()
        for ln in st["links"]:
            print(f"   carrier {ln['type']:<8} loss measured by B on A->B: "
                  f"{100 * (ln['loss_in'] or 0):.1f} %")
        for c in (1, 2, 3):
            lab.set_loss(c, 0, direction="a2b")
        say("carrier 'telecom' (which also carries the control connection) fails mid-stream")
        sink = lab.python_popen(lab.hb, UDP_SINK, "192.168.20.2", "6000", "2", stdout=subprocess.PIPE,
                                text=True)
        sink.stdout.readline()
        count = 2000
        src = lab.python_popen(lab.ha, UDP_SOURCE, "192.168.20.2", "6000", str(count), "500",
                               stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        lab.link_down(1)
        t0 = time.monotonic()
        st = ts.a.wait(lambda s: any(ln["type"] == "telecom" and ln["state"] != "established"
                                     for ln in s["links"]), 5, "telecom down")
        print(f"   router A marked telecom down after {time.monotonic() - t0:.2f} s; still "
              f"{st['state']}: {st['state_text']}")
        src.wait(30)
        out, _ = sink.communicate(timeout=30)
        got, dups, _last = map(int, out.split())
        print(f"   UDP stream: {got}/{count} datagrams arrived, {dups} duplicated")
        lab.link_up(1)
        t0 = time.monotonic()
        ts.a.wait(lambda s: all(ln["state"] == "established" for ln in s["links"]), 10, "rejoin")
        print(f"   telecom back: subflow re-established after {time.monotonic() - t0:.2f} s")
        say("stopping both agents; the lab is removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
