#!/usr/bin/env python3
"""Memory soak in the namespace lab: is the agents' resident memory bounded?

Two real agents (3 carriers each) run for ``--minutes`` with everything that
allocates per event: carrier flaps (every ``--flap-every`` s one carrier goes
down for ``--flap-down`` s, carriers and both lab modes in turn: blackhole
and link down), rekeys (``base.rekey_interval`` ``--rekey`` s), link tests
(every ``--link-test-every`` s, 0.5 s phases) and a steady ping between the
LAN hosts (10/s).  Every ``--sample`` s it records each agent's RSS, its
open file descriptors and the session's epoch.  The summary compares RSS
after the warm-up (``--warmup`` minutes) with the end and fits a line
through the samples after the warm-up (kB per 10 minutes): flat means
bounded.  With ``--tracemalloc`` the agents run under tracemalloc
(``MPVPN_TRACEMALLOC``, see src/mpvpn/agent/memtrace.py) and the top growth
between the first snapshot after the warm-up and the last is printed per
source line (tracing inflates RSS: use it to find a leak, not to measure).

    python bench/soak.py [--minutes M] [--json FILE] [--tracemalloc]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))

from agentlab import TwoSites  # noqa: E402
from netlab import Lab, parse_ping  # noqa: E402

from mpvpn.io import rpc  # noqa: E402


def rss_kib(pid: int) -> int | None:
    try:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, kB) in kB per 10 minutes."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 600 * sum((t - mx) * (v - my) for t, v in points) / sxx


def tracemalloc_diff(directory: Path, after_s: float, every: float, top: int = 15,
                     traces: int = 3) -> list[str]:
    """Growth per source line between the first snapshot after the warm-up and
    the last, then the full tracebacks of the ``traces`` biggest growers."""
    import tracemalloc

    snaps = sorted(directory.glob("snap-*.tm"))
    if len(snaps) < 2:
        return [f"  fewer than two snapshots in {directory}"]
    first = min(len(snaps) - 2, max(0, int(after_s // every) - 1))
    a = tracemalloc.Snapshot.load(str(snaps[first]))
    b = tracemalloc.Snapshot.load(str(snaps[-1]))
    lines = [f"  {snaps[first].name} -> {snaps[-1].name}: "
             f"{sum(s.size for s in b.statistics('filename')) - sum(s.size for s in a.statistics('filename')):+d} B traced"]
    for st in b.compare_to(a, "lineno")[:top]:
        fr = st.traceback[0]
        lines.append(f"  {st.size_diff:+9d} B {st.count_diff:+6d} blocks  {fr.filename}:{fr.lineno}")
    for st in [st for st in b.compare_to(a, "traceback") if st.size_diff > 0][:traces]:
        lines.append(f"  allocated {st.size_diff:+d} B {st.count_diff:+d} blocks at:")
        lines += [f"      {line}" for line in st.traceback.format(most_recent_first=True)]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes not judged")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--flap-every", type=float, default=20.0, help="seconds between carrier flaps")
    ap.add_argument("--flap-down", type=float, default=4.0, help="seconds a flapped carrier stays down")
    ap.add_argument("--rekey", type=float, default=5.0, help="base.rekey_interval, seconds")
    ap.add_argument("--link-test-every", type=float, default=120.0, help="seconds between link tests")
    ap.add_argument("--tracemalloc", action="store_true", help="agents under tracemalloc; print growth")
    ap.add_argument("--trace-dir", metavar="DIR", help="keep the tracemalloc snapshots here (default: "
                    "a temporary directory, removed)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    total = args.minutes * 60
    tm_dirs = {}
    env = None
    tmp = tempfile.TemporaryDirectory(prefix="mpvpn-soak-")
    samples: list[dict] = []
    events = {"flaps": 0, "link_tests": 0, "link_test_errors": 0}
    with Lab(3) as lab, TwoSites(lab, extra_base=f"\toption rekey_interval '{args.rekey:g}'\n") as ts:
        sites = (("client", ts.a), ("server", ts.b))
        if args.tracemalloc:
            tm_every = max(args.sample, 30.0)
            for name, _s in sites:
                tm_dirs[name] = Path(args.trace_dir or tmp.name) / name
            env = {"MPVPN_TRACEMALLOC_EVERY": str(tm_every)}
            ts.b.start({**env, "MPVPN_TRACEMALLOC": str(tm_dirs["server"])})
            ts.b.wait(lambda st: True, 10, "server up")
            ts.a.start({**env, "MPVPN_TRACEMALLOC": str(tm_dirs["client"])})
            ts.a.wait_connected()
            ts.b.wait_connected()
        else:
            ts.start()
        count = int(total * 10) + 10
        ping = lab.popen(lab.ha, ["ping", "-n", "-q", "-i", "0.1", "-W", "1", "-c", str(count),
                                  "192.168.20.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        t0 = time.monotonic()
        next_sample = t0
        next_flap = t0 + args.flap_every
        next_test = t0 + args.link_test_every / 2
        flap_n = 0
        up_at: tuple[float, int] | None = None
        print(f"soak: {args.minutes:g} min, flap every {args.flap_every:g} s for {args.flap_down:g} s, "
              f"rekey every {args.rekey:g} s, link test every {args.link_test_every:g} s", flush=True)
        print(f"{'t s':>6}{'client RSS kB':>15}{'server RSS kB':>15}{'fds c/s':>10}{'epoch':>7}{'flaps':>7}"
              f"{'tests':>7}", flush=True)
        while True:
            now = time.monotonic()
            if now - t0 >= total and up_at is None:
                break
            if up_at is not None and now >= up_at[0]:
                lab.link_up(up_at[1])
                up_at = None
            if up_at is None and now >= next_flap and now - t0 < total - args.flap_down:
                c = 1 + flap_n % 3
                lab.link_down(c, mode="blackhole" if (flap_n // 3) % 2 == 0 else "carrier")
                up_at = (now + args.flap_down, c)
                flap_n += 1
                events["flaps"] += 1
                next_flap = now + args.flap_every
            if now >= next_test:
                next_test = now + args.link_test_every
                try:
                    r = rpc.call(rpc.socket_path(str(ts.a.run_dir)), "test_links", {"duration": 0.5})
                    events["link_tests" if not r.get("error") else "link_test_errors"] += 1
                except rpc.RpcError:
                    events["link_test_errors"] += 1
            if now >= next_sample:
                next_sample += args.sample
                row = {"t": round(now - t0, 1)}
                for name, s in sites:
                    row[f"{name}_rss_kib"] = rss_kib(s.proc.pid)
                    row[f"{name}_fds"] = fds(s.proc.pid)
                st = ts.a.status() or {}
                sess = (st.get("sessions") or [{}])[0]
                row["epoch"] = sess.get("epoch")
                row["session_id"] = st.get("session_id")
                samples.append(row)
                if len(samples) % max(1, int(60 / args.sample)) == 1:
                    print(f"{row['t']:>6.0f}{row['client_rss_kib'] or 0:>15}{row['server_rss_kib'] or 0:>15}"
                          f"{str(row['client_fds']) + '/' + str(row['server_fds']):>10}{str(row['epoch']):>7}"
                          f"{events['flaps']:>7}{events['link_tests']:>7}", flush=True)
                for name, s in sites:
                    if s.proc.poll() is not None:
                        print(f"{name} agent exited ({s.proc.returncode}):\n{s.log()}", file=sys.stderr)
                        return 1
            time.sleep(0.2)
        ping.send_signal(2)  # SIGINT: ping prints its statistics
        out, _ = ping.communicate(timeout=10)
        pr = parse_ping(out)
        logs = {name: s.log() for name, s in sites}
        sessions = {r["session_id"] for r in samples if r["session_id"] is not None}
    warm = args.warmup * 60
    summary = {}
    for name, _s in sites:
        key = f"{name}_rss_kib"
        after = [(r["t"], r[key]) for r in samples if r["t"] >= warm and r[key] is not None]
        allv = [r[key] for r in samples if r[key] is not None]
        summary[name] = {
            "start_kib": allv[0] if allv else None,
            "after_warmup_kib": after[0][1] if after else None,
            "end_kib": allv[-1] if allv else None,
            "max_kib": max(allv) if allv else None,
            "growth_after_warmup_kib": (after[-1][1] - after[0][1]) if after else None,
            "slope_kib_per_10min": None if slope_per_10min(after) is None else round(slope_per_10min(after), 1),
            "fds_start": samples[0][f"{name}_fds"] if samples else None,
            "fds_end": samples[-1][f"{name}_fds"] if samples else None,
        }
    print()
    print(f"{'agent':<8}{'start':>9}{'@warm-up':>10}{'end':>9}{'max':>9}{'growth':>9}{'kB/10min':>10}"
          f"{'fds':>9}   (RSS kB; growth and slope after {args.warmup:g} min)")
    for name, s in summary.items():
        slope = "-" if s["slope_kib_per_10min"] is None else f"{s['slope_kib_per_10min']:.0f}"
        print(f"{name:<8}{s['start_kib'] or 0:>9}{s['after_warmup_kib'] or 0:>10}{s['end_kib'] or 0:>9}"
              f"{s['max_kib'] or 0:>9}{s['growth_after_warmup_kib'] or 0:>+9}{slope:>10}"
              f"{str(s['fds_start']) + '->' + str(s['fds_end']):>9}")
    print(f"flaps {events['flaps']}, link tests {events['link_tests']} ({events['link_test_errors']} refused), "
          f"last epoch {samples[-1]['epoch'] if samples else None}, sessions seen {len(sessions)}, "
          f"pings {pr.received}/{pr.sent}")
    for name, text in logs.items():
        if "Traceback" in text:
            print(f"{name}: Traceback in the log", file=sys.stderr)
    if args.tracemalloc:
        for name, d in tm_dirs.items():
            print(f"tracemalloc growth, {name}:")
            print("\n".join(tracemalloc_diff(d, warm, float(env["MPVPN_TRACEMALLOC_EVERY"]))))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"bench": "soak", "args": vars(args), "events": events, "summary": summary,
             "pings": {"sent": pr.sent, "received": pr.received}, "samples": samples}, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
