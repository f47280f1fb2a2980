#!/usr/bin/env python3
"""Core benchmark: user packets per second through SMPU encode -> decode ->
reorder, for 1, 2 and 3 subflows at 0 % and 20 % loss per subflow; then the
same through the scheduler's aggregate and adaptive modes (one bulk TCP
flow of real IPv4 packets, both sides running the mode's scheduler).

Both sessions run in this one process on one core; datagrams are handed over
in memory (no sockets), so this measures the protocol engine alone.  The
yardstick row, measured in the same run, is the bare minimum any
encapsulation needs: pack a header, concatenate, decode it.

    python bench/core.py [--packets N] [--size BYTES] [--batched-only] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from mpvpn.core import fastpath, wire  # noqa: E402
from mpvpn.core.scheduler import make_scheduler  # noqa: E402
from mpvpn.tools.simnet import SimPair  # noqa: E402

SCHED_ROWS = (("aggregate", 3, 0.0), ("aggregate", 3, 0.2),
              ("adaptive", 3, 0.0), ("adaptive", 3, 0.2))
SCHED_RATE = 50e6  # bytes/s: initial_rate of the scheduler rows


def tcp_packet(size: int) -> bytes:
    """An IPv4 TCP segment (ACK + payload) of ``size`` bytes: a bulk flow's packet."""
    size = max(size, 41)
    ip = bytes([0x45, 0, *size.to_bytes(2, "big"), 0, 1, 0x40, 0, 64, 6, 0, 0,
                10, 0, 0, 1, 10, 0, 0, 2])
    tcp = bytes([0xC3, 0x50, 0x01, 0xBB, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xFF, 0xFF,
                 0, 0, 0, 0])
    return ip + tcp + bytes(size - 40)


def yardstick(packets: int, size: int) -> float:
    payload = bytes(size)
    pack, decode = wire.HEADER.pack, wire.decode
    t0 = time.perf_counter()
    for seq in range(1, packets + 1):
        d = pack(1, 0x10, 1, 0, 7, size, 0, 0, seq) + payload
        h = decode(d)
        _ = d[20:]
        if h.seq != seq:
            raise AssertionError
    return packets / (time.perf_counter() - t0)


def _timers(a, b, now: float) -> int:
    """Run both sessions' due timers; how many packets b's hold released."""
    released = 0
    for s in (a, b):
        t = s.get_timer()
        if t is not None and t <= now:
            out = s.handle_timer(now)
            if s is b:
                released += len(out)
    return released


def engine(n: int, loss: float, packets: int, size: int, seed: int = 1,
           sealed: bool = False, mode: str = "duplicate") -> dict:
    pair = SimPair(n, delay=0.001, seed=seed, sealed=sealed)
    if mode != "duplicate":
        # The model starts out at 400 Mbit/s per subflow (the links here are
        # unlimited), so the run measures the steady state -- packets leave
        # -- and not the start-up ramp with a full, dropping queue.
        pair.a.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
        pair.b.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
    if not pair.handshake():
        raise RuntimeError("handshake failed")
    a, b = pair.a, pair.b
    rng = random.Random(seed)
    # pre-drawn drop decisions so the RNG is not timed
    drops = [rng.random() < loss for _ in range(packets * n)] if loss else None
    payload = bytes(size) if mode == "duplicate" else tcp_packet(size)
    now = pair.now
    delivered = 0
    send, out, recv = a.send, a.datagrams_to_send, b.receive_datagram
    # Timers every 64 packets (keepalives; the agent's loop looks once per
    # batch), and at every packet while the scheduler holds a queue: it
    # releases queued packets at its deadline (aggregate, adaptive).
    queueing = mode != "duplicate"
    sched = a.scheduler
    k = 0

    def carry(now: float) -> int:
        """a's datagrams to b (data dropped per the drawn decisions), b's to a."""
        nonlocal k
        got = 0
        for m, d in out():
            if drops is not None and d[1] == 0x10:
                k += 1
                if drops[(k - 1) % len(drops)]:
                    continue
            got += len(recv(d, m, now))
        for m, d in b.datagrams_to_send():
            a.receive_datagram(d, m, now)
        return got

    t0 = time.perf_counter()
    for i in range(packets):
        send(payload, now)
        delivered += carry(now)
        now += 1e-5  # 100k packets/s of simulated time
        if not i & 63 or (queueing and sched.pending):  # the scheduler releases at its deadline
            delivered += _timers(a, b, now)
    # what the scheduler still holds goes out at its pace (counted, and timed)
    for _ in range(100_000):
        delivered += carry(now)
        if not (queueing and sched.pending):
            break
        now += 1e-5
        delivered += _timers(a, b, now)
    dt = time.perf_counter() - t0
    delivered += len(b.handle_timer(now + 10.0))
    return _row(mode, n, loss, sealed, packets, dt, delivered)


def _row(mode: str, n: int, loss: float, sealed: bool, packets: int, dt: float, delivered: int) -> dict:
    return {
        "mode": mode,
        "subflows": n,
        "loss": loss,
        "sealed": sealed,
        "packets": packets,
        "seconds": dt,
        "pps": packets / dt,
        "datagrams_per_s": packets * n / dt,
        "us_per_packet": dt / packets * 1e6,
        "delivered_loss": 1 - delivered / packets,
        "expected_loss": loss ** n,
    }


def engine_batched(n: int, loss: float, packets: int, size: int, batch: int = 64, seed: int = 1,
                   mode: str = "duplicate") -> dict:
    """Sealed traffic through the batch API the agent uses (send_many /
    datagrams_by_member / receive_many): the C loops where built
    (mpvpn.core.fastpath), else the same calls in Python.  Aggregate and
    adaptive: the bulk TCP flow of engine(), the scheduler deciding a batch
    at a time (offer_many)."""
    pair = SimPair(n, delay=0.001, seed=seed, sealed=True)
    queueing = mode != "duplicate"
    if queueing:
        pair.a.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
        pair.b.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
    if not pair.handshake():
        raise RuntimeError("handshake failed")
    a, b = pair.a, pair.b
    sched = a.scheduler
    rng = random.Random(seed)
    drops = [rng.random() < loss for _ in range(packets * n)] if loss else None
    payload = tcp_packet(size) if queueing else bytes(size)
    now = pair.now
    delivered = k = 0
    t0 = time.perf_counter()
    for i in range(0, packets + 100_000 * batch if queueing else packets, batch):
        if i < packets:
            a.send_many([payload] * min(batch, packets - i), now)
        elif not sched.pending:
            break  # what the scheduler still held has left (at its pace, timed)
        for m, dgrams in a.datagrams_by_member().items():
            if drops is not None:
                kept = []
                for d in dgrams:
                    if d[1] == 0x10:  # only data is dropped (as in engine())
                        k += 1
                        if drops[(k - 1) % len(drops)]:
                            continue
                    kept.append(d)
                dgrams = kept
            delivered += len(b.receive_many(dgrams, m, now))
        now += 1e-5 * batch
        delivered += _timers(a, b, now)
        for m, d in b.datagrams_to_send():
            a.receive_datagram(d, m, now)
    dt = time.perf_counter() - t0
    delivered += len(b.handle_timer(now + 10.0))
    label = {"duplicate": "dup", "aggregate": "agg", "adaptive": "adapt"}[mode]
    label += ", batch" + (" C" if fastpath.LOOPS is not None else " py")
    return _row(label, n, loss, True, packets, dt, delivered)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--batched-only", action="store_true",
                    help="only the batch rows (send_many, as the agent runs): duplicate, aggregate, adaptive")
    args = ap.parse_args(argv)

    base = yardstick(args.packets, args.size)
    rows = []
    if not args.batched_only:
        rows += [engine(n, p, args.packets, args.size) for p in (0.0, 0.2) for n in (1, 2, 3)]
        rows += [engine(n, p, args.packets, args.size, sealed=True)
                 for n, p in ((1, 0.0), (3, 0.0), (3, 0.2))]
        rows += [engine(n, p, args.packets, args.size, mode=mode) for mode, n, p in SCHED_ROWS]
    rows += [engine_batched(n, p, args.packets, args.size) for n, p in ((3, 0.0), (3, 0.2))]
    # aggregate and adaptive as the agent runs them: a tun read's batch at a time
    rows += [engine_batched(3, p, args.packets, args.size, mode=mode) for mode in ("aggregate", "adaptive")
             for p in (0.0, 0.2)]
    ref = rows[0]["pps"]
    print(f"SMPU core, {args.packets} packets of {args.size} B, Python {platform.python_version()}, "
          f"one core, in-memory")
    print(f"yardstick (pack + concat + decode only): {base:,.0f} pkt/s")
    hdr = f"{'mode':>14} {'subflows':>8} {'AEAD':>5} {'loss':>5} {'user pkt/s':>11} {'datagrams/s':>12} {'us/pkt':>7} " \
          f"{'vs row 1':>8} {'Mbit/s':>7} {'delivered loss':>15} {'p^N':>7}"
    print(hdr)
    for r in rows:
        r["ratio_vs_single_clean"] = r["pps"] / ref
        r["ratio_vs_yardstick"] = r["pps"] / base
        mbit = r["pps"] * args.size * 8 / 1e6
        print(f"{r['mode']:>14} {r['subflows']:>8} {'yes' if r['sealed'] else 'no':>5} {r['loss'] * 100:>4.0f}% {r['pps']:>11,.0f} "
              f"{r['datagrams_per_s']:>12,.0f} {r['us_per_packet']:>7.2f} "
              f"{r['ratio_vs_single_clean']:>8.2f} {mbit:>7.0f} "
              f"{r['delivered_loss'] * 100:>14.3f}% {r['expected_loss'] * 100:>6.3f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "core", "size": args.size, "yardstick_pps": base,
                       "python": platform.python_version(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
