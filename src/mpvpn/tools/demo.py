"""In-memory SMPU demo: two endpoints, three simulated carriers with loss,
delay and jitter; prints each carrier's loss next to the loss after SMPU
keeps one copy of every packet (duplicate mode), then fails one carrier
mid-stream and shows that nothing is lost.

    python -m mpvpn.tools.demo [--packets N] [--loss PERCENT] [--seed S]
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

from mpvpn.tools.simnet import SimPair

CARRIERS = [("telecom", 0.010, 0.002), ("unicom", 0.025, 0.003), ("mobile", 0.040, 0.004)]
COVERAGE = 0.99  # the share of runs the printed range holds


# --- what a run should give: the number of lost packets is binomial ------------------------

def _binomial_window(n: int, p: float) -> tuple[int, list[float]]:
    """(k0, pmf[k0:...]) of Binomial(n, p), cut where the tails are below 1e-20."""
    if n == 0 or p <= 0.0:
        return 0, [1.0]
    if p >= 1.0:
        return n, [1.0]
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    lo, hi = max(0, int(mean - 10 * sd - 10)), min(n, int(mean + 10 * sd + 10))
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(lo, hi + 1)]
    return lo, [math.exp(x) for x in logs]


def lost_range(groups: list[tuple[int, float]], coverage: float = COVERAGE) -> tuple[int, int]:
    """(lo, hi): the number of lost packets that ``coverage`` of runs fall within (at most
    (1 - coverage) / 2 of them below lo, as many above hi), when ``n`` packets each are lost
    with probability ``p`` for each (n, p) of ``groups``, independently (the sum of
    binomials, its distribution convolved exactly)."""
    if not 0.0 < coverage < 1.0:
        raise ValueError("coverage must be between 0 and 1")
    k0, pmf = 0, [1.0]
    for n, p in groups:
        if n < 0 or not 0.0 <= p <= 1.0:
            raise ValueError("need n >= 0 and 0 <= p <= 1")
        j0, q = _binomial_window(n, p)
        out = [0.0] * (len(pmf) + len(q) - 1)
        for i, a in enumerate(pmf):
            if a:
                for j, b in enumerate(q):
                    out[i + j] += a * b
        k0, pmf = k0 + j0, out
    tail = (1.0 - coverage) / 2
    lo, acc = 0, 0.0
    while lo < len(pmf) - 1 and acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = len(pmf) - 1, 0.0
    while hi > 0 and acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return k0 + lo, k0 + hi


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.2f} %"


def explain_loss(sent: int, lost: int, p: float, by_carriers: dict[int, int], n_carriers: int,
                 outages: list[str], coverage: float = COVERAGE) -> list[str]:
    """The lines that put a measured delivered loss next to what chance allows for this
    many packets: p^N for all carriers up; when a carrier was out of use for part of the
    run (``by_carriers``: packets sent -> how many carriers were up), the range for that."""
    share = f"{100 * coverage:g} % of runs"
    lo, hi = lost_range([(sent, p ** n_carriers)], coverage)
    lines = [f"expected  {100 * p ** n_carriers:.2f} % (p^{n_carriers}); with {sent} packets "
             f"{share} measure {_pct(lo, sent)} to {_pct(hi, sent)}"]
    fewer = {k: v for k, v in by_carriers.items() if k < n_carriers and v}
    if fewer:
        lo, hi = lost_range([(v, p ** k) for k, v in sorted(by_carriers.items()) if v], coverage)
        had = ", ".join(f"{v} packets had {k} carrier{'s' if k != 1 else ''}" for k, v in sorted(fewer.items()))
        lines.append(f"          {'; '.join(outages) or 'a carrier was out of use'}: {had},")
        lines.append(f"          so this run expects {_pct(lo, sent)} to {_pct(hi, sent)}")
    verdict = "inside" if lo <= lost <= hi else ("below" if lost < lo else "ABOVE")
    lines.append(f"          measured {_pct(lost, sent)}: {verdict} that range")
    return lines


def _run_phase(pair: SimPair, count: int, rate: float, tag: int) -> tuple[int, int, list[int], Counter]:
    """Stream ``count`` numbered packets A -> B; returns (sent, delivered, their indexes in
    arrival order, packets sent -> how many subflows were up when each was sent)."""
    before = len(pair.delivered["b"])
    up = Counter()
    for i in range(count):
        up[len(pair.a.up)] += 1
        pair.send("a", i.to_bytes(4, "big") + bytes([tag]) + bytes(115))
        pair.run(1.0 / rate)
    pair.run(1.0)  # drain: let late copies and hold deadlines settle
    got = [p for p in pair.delivered["b"][before:] if p[4] == tag]
    idx = [int.from_bytes(p[:4], "big") for p in got]
    return count, len(set(idx)), idx, up


def _outages(pair: SimPair, since: float) -> list[str]:
    """'mobile' out of use 0.69 s (no answer to 3 probes), from A's subflow events."""
    down: dict[int, tuple[float, str]] = {}
    spans: list[tuple[int, float, str]] = []
    for t, ev in pair.events["a"]:
        if t < since:
            continue
        kind = type(ev).__name__
        if kind == "SubflowDown":
            down[ev.member] = (t, getattr(ev, "reason", ""))
        elif kind == "SubflowUp" and ev.member in down:
            t0, why = down.pop(ev.member)
            spans.append((ev.member, t - t0, why))
    spans += [(m, pair.now - t0, why) for m, (t0, why) in down.items()]
    names = {m: name for m, (name, _, _) in enumerate(CARRIERS, start=1)}
    return [f"'{names.get(m, m)}' out of use {d:.2f} s" + (f" ({why})" if why else "") for m, d, why in spans]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mpvpn demo", description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--loss", type=float, default=20.0, help="loss per carrier, percent")
    ap.add_argument("--rate", type=float, default=2000.0, help="packets per second")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    if not 0 <= args.loss <= 100 or args.packets < 1 or args.rate <= 0:
        ap.error("need 0 <= loss <= 100, packets >= 1, rate > 0")
    p = args.loss / 100.0

    pair = SimPair(0, seed=args.seed)
    for m, (name, delay, jitter) in enumerate(CARRIERS, start=1):
        pair.add_subflow(m, loss=p, delay=delay, jitter=jitter)
        pair.a.subflows[m].name = pair.b.subflows[m].name = name
    if not pair.handshake(timeout=30):
        print("subflows did not come up (loss too high?)")
        return 1

    start = pair.now
    sent, got, idx, up = _run_phase(pair, args.packets, args.rate, tag=1)
    in_order = all(x < y for x, y in zip(idx, idx[1:]))
    n = len(CARRIERS)
    print(f"SMPU duplicate mode, {n} carriers, {sent} packets A -> B at {args.rate:.0f} pkt/s")
    print(f"{'carrier':<10}{'one-way delay':>14}{'loss on carrier':>17}")
    for m, (name, delay, jitter) in enumerate(CARRIERS, start=1):
        lk = pair.links[("a", m)]
        print(f"{name:<10}{delay * 1000:>9.0f}±{jitter * 1000:.0f} ms{100 * lk.dropped / max(1, lk.sent):>16.2f}%")
    print(f"{'delivered':<10}{'':>14}{_pct(sent - got, sent).replace(' ', ''):>17}   "
          f"(in order: {'yes' if in_order else 'NO'})")
    for line in explain_loss(sent, sent - got, p, dict(up), n, _outages(pair, start)):
        print(line)
    c = pair.b.counters()
    print(f"receiver: {c['delivered']} delivered, {c['duplicates']} duplicate copies dropped, "
          f"{c['deadline_releases']} hold-deadline releases, hold {pair.b.reorder.hold * 1000:.1f} ms")

    # Failover: carrier 1 goes down mid-stream, with no loss on the others.
    for m in range(1, n + 1):
        pair.set(m, loss=0.0)
    count = max(1000, args.packets // 10)
    before = len(pair.delivered["b"])
    half = count // 2
    pair.stream("a", half, args.rate, size=120, tag=2)
    pair.set(1, up=False)
    pair.stream("a", count - half, args.rate, size=120, tag=2, first=half)
    pair.run(2.0)
    got2 = {int.from_bytes(x[:4], "big") for x in pair.delivered["b"][before:] if x[4] == 2}
    st = pair.a.subflows[1]
    print(f"\nfailover: '{CARRIERS[0][0]}' down after packet {half}: {len(got2)}/{count} delivered, "
          f"subflow state on A: {st.state.value}")
    pair.set(1, up=True)
    pair.run(3.0)
    print(f"carrier back: subflow state on A: {st.state.value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
