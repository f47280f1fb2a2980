#!/usr/bin/env python3
"""Agent benchmark in the namespace lab: TCP goodput LAN host -> LAN host
through two real agents (duplicate mode over 3 carriers, encrypted), added
latency, CPU seconds per GB carried and agent memory, each next to a
baseline measured in the same run:

* ``kernel``: TCP straight over one carrier veth (router to router, no tunnel);
* ``yardstick``: bench/yardstick_fwd.py, a ~40-line unencrypted Python
  tun <-> UDP forwarder over one carrier.

    python bench/agent.py [--seconds S] [--offload off,gro,tso] [--json FILE]     (root; needs iperf3)

Each mpvpn row is measured per tun offload mode (``MPVPN_TUN_OFFLOAD``, see
mpvpn.io.tun): ``off`` is the plain one-packet-per-system-call path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agentlab import TwoSites  # noqa: E402
from netlab import Lab  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def iperf(lab, src_ns, dst_ns, dst_ip, seconds: float, omit: int = 0, streams: int = 1,
          cc: str | None = None, trace: dict | None = None) -> tuple[float, int]:
    """TCP goodput (bit/s) and bytes received, iperf3 src -> dst (the first
    ``omit`` seconds, slow start, not counted; ``streams`` parallel TCP flows;
    ``cc`` the congestion control, default the host's).  ``trace``, if
    given, gets the sender's Mbit/s per second (``mbit``) and its TCP
    retransmissions (``retransmits``, per second and in all)."""
    srv = lab.popen(dst_ns, ["iperf3", "-s", "-1", "-B", dst_ip], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    r = lab.run(src_ns, ["iperf3", "-c", dst_ip, "-t", str(seconds), "-O", str(omit), "-J",
                         "-P", str(streams)] + (["-C", cc] if cc else []),
                timeout=seconds + omit + 30)
    srv.wait(10)
    doc = json.loads(r.stdout)
    if trace is not None:
        sums = [iv["sum"] for iv in doc.get("intervals", ())]
        trace["mbit"] = [round(x["bits_per_second"] / 1e6, 1) for x in sums]
        trace["retransmits"] = [x.get("retransmits") for x in sums]
        trace["retransmits_total"] = doc["end"].get("sum_sent", {}).get("retransmits")
    end = doc["end"]["sum_received"]
    return end["bits_per_second"], end["bytes"]


def ping_rtts(lab, src_ns, dst, count=400, interval=0.01) -> list[float]:
    r = lab.run(src_ns, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", dst],
                timeout=count * interval + 20, check=False)
    return [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def measure(lab, label, pids, src_ns, dst_ns, dst_ip, seconds) -> dict:
    c0 = sum(cpu_seconds(p) for p in pids)
    bps, nbytes = iperf(lab, src_ns, dst_ns, dst_ip, seconds)
    c1 = sum(cpu_seconds(p) for p in pids)
    rtts = ping_rtts(lab, src_ns, dst_ip)
    row = {"path": label, "goodput_mbit": bps / 1e6, "bytes": nbytes,
           "rtt_p50_ms": pct(rtts, 0.5), "rtt_p99_ms": pct(rtts, 0.99),
           "cpu_s_per_gb": (c1 - c0) / (nbytes / 1e9) if pids else None,
           "rss_mib": max(rss_mib(p) for p in pids) if pids else None}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--offload", default="off,tso",
                    help="tun offload modes to measure, comma-separated: off, gro (coalesced writes "
                         "only), tso (and super-segment reads); default off,tso")
    ap.add_argument("--fastpath", default="on",
                    help="C loops of the data path (mpvpn.core.fastpath), comma-separated: on, off; default on")
    ap.add_argument("--modes", default="duplicate",
                    help="base.mode of both agents for the 3-carrier rows, comma-separated: duplicate, "
                         "aggregate, adaptive; default duplicate")
    ap.add_argument("--nack", default="on",
                    help="base.nack of both agents (duplicate mode repairs), comma-separated: off, on; "
                         "default on (the default of every mode since issue 17)")
    ap.add_argument("--no-one-carrier", dest="one_carrier", action="store_false",
                    help="skip the 1-carrier rows")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("needs root and iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 2
    rows = []
    with Lab(3) as lab:
        rows.append(measure(lab, "kernel (carrier veth, no tunnel)", [], lab.ra, lab.rb, "10.1.0.2",
                            args.seconds))
        py = sys.executable
        fa = lab.popen(lab.ra, [py, str(HERE / "yardstick_fwd.py"), "172.29.0.1/30", "192.168.20.0/24",
                                "10.1.0.1", "10.1.0.2", "7100"], stdout=subprocess.PIPE, text=True)
        fb = lab.popen(lab.rb, [py, str(HERE / "yardstick_fwd.py"), "172.29.0.2/30", "192.168.10.0/24",
                                "10.1.0.2", "10.1.0.1", "7100"], stdout=subprocess.PIPE, text=True)
        assert fa.stdout.readline().strip() == "ready" and fb.stdout.readline().strip() == "ready"
        rows.append(measure(lab, "yardstick (python fwd, 1 carrier, plain)", [fa.pid, fb.pid],
                            lab.ha, lab.hb, "192.168.20.2", args.seconds))
        Lab.stop(fa)
        Lab.stop(fb)
        runs = [(1, m, f, "off", "duplicate") for m in args.offload.split(",")
                for f in args.fastpath.split(",") if args.one_carrier]
        runs += [(3, m, f, k, b) for b in args.modes.split(",") for m in args.offload.split(",")
                 for f in args.fastpath.split(",") for k in args.nack.split(",")]
        for n, mode, fast, nack, base_mode in runs:
            os.environ["MPVPN_TUN_OFFLOAD"] = mode  # inherited by both agents (see mpvpn.io.tun)
            os.environ["MPVPN_FASTPATH"] = "1" if fast == "on" else "0"  # see mpvpn.core.fastpath
            cloops = (", C" if fast == "on" else "") + (", nack" if nack == "on" else "")
            extra = f"\toption nack '{1 if nack == 'on' else 0}'\n\toption mode '{base_mode}'\n"
            with TwoSites(lab, carriers=n, extra_base=extra) as ts:
                ts.start(subflows=n)
                rows.append(measure(lab, f"mpvpn ({base_mode + ' x3' if n == 3 else '1 carrier'}, AEAD, {mode}{cloops})",
                                    [ts.a.proc.pid, ts.b.proc.pid], lab.ha, lab.hb, "192.168.20.2",
                                    args.seconds))
                st = ts.b.status()
                rows[-1]["duplicates_dropped"] = st["counters"]["duplicates"]
                rows[-1]["tun_offload"] = mode
                rows[-1]["fastpath"] = fast == "on"
                rows[-1]["nack"] = nack == "on"
                rows[-1]["mode"] = base_mode
    kernel, yard, ours = rows[0], rows[1], rows[-1]
    raw_rtts = kernel["rtt_p50_ms"]
    print(f"agent benchmark: iperf3 TCP {args.seconds:.0f} s, ping 400 x 10 ms; both agents on this "
          f"{os.cpu_count()}-core machine")
    print(f"{'path':<50}{'Mbit/s':>9}{'vs yard':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU s/GB':>10}{'RSS MiB':>9}")
    for r in rows:
        r["ratio_vs_yardstick"] = r["goodput_mbit"] / yard["goodput_mbit"]
        r["added_p50_ms"] = r["rtt_p50_ms"] - raw_rtts
        cpu = "-" if r["cpu_s_per_gb"] is None else f"{r['cpu_s_per_gb']:.1f}"
        rss = "-" if r["rss_mib"] is None else f"{r['rss_mib']:.1f}"
        print(f"{r['path']:<50}{r['goodput_mbit']:>9.0f}{r['ratio_vs_yardstick']:>8.2f}"
              f"{r['rtt_p50_ms']:>8.3f}{r['rtt_p99_ms']:>8.3f}{cpu:>10}{rss:>9}")
    print(f"added latency (p50) over the raw carrier: yardstick {yard['added_p50_ms']:.3f} ms, "
          f"mpvpn {ours['added_p50_ms']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "agent", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
