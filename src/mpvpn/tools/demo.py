"""In-memory SMPU demo: two endpoints, three simulated carriers with loss,
delay and jitter; prints each carrier's loss next to the loss after SMPU
keeps one copy of every packet (duplicate mode), then fails one carrier
mid-stream and shows that nothing is lost.

    python -m mpvpn.tools.demo [--packets N] [--loss PERCENT] [--seed S]
"""

from __future__ import annotations

import argparse

from mpvpn.tools.simnet import SimPair

CARRIERS = [("telecom", 0.010, 0.002), ("unicom", 0.025, 0.003), ("mobile", 0.040, 0.004)]


def _run_phase(pair: SimPair, count: int, rate: float, tag: int) -> tuple[int, int, list[int]]:
    before = len(pair.delivered["b"])
    pair.stream("a", count, rate, size=120, tag=tag)
    pair.run(1.0)  # drain: let late copies and hold deadlines settle
    got = [p for p in pair.delivered["b"][before:] if p[4] == tag]
    idx = [int.from_bytes(p[:4], "big") for p in got]
    return count, len(set(idx)), idx


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

    sent, got, idx = _run_phase(pair, args.packets, args.rate, tag=1)
    in_order = all(x < y for x, y in zip(idx, idx[1:]))
    n = len(CARRIERS)
    print(f"SMPU duplicate mode, {n} carriers, {sent} packets A -> B at {args.rate:.0f} pkt/s")
    print(f"{'carrier':<10}{'one-way delay':>14}{'loss on carrier':>17}")
    for m, (name, delay, jitter) in enumerate(CARRIERS, start=1):
        lk = pair.links[("a", m)]
        print(f"{name:<10}{delay * 1000:>9.0f}±{jitter * 1000:.0f} ms{100 * lk.dropped / max(1, lk.sent):>16.2f}%")
    print(f"{'delivered':<10}{'':>14}{100 * (1 - got / sent):>16.2f}%   "
          f"(expected p^{n} = {100 * p ** n:.2f}%; in order: {'yes' if in_order else 'NO'})")
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
