"""Per-stage latency trace of the data path, off unless ``MPVPN_LATENCY_TRACE=1``.

Where a packet's time goes inside one agent, from the agent's own monotonic
clock (and, for the wait in a UDP socket, the kernel's receive timestamp,
``SO_TIMESTAMPNS``)::

    send:    tun.read     the reads of one wake-up (route, MSS clamp included)
             send.seal    Session.send_many: sequence, seal, schedule
             send.udp     the datagrams out through the uplinks' sockets
    receive: udp.queue    kernel receive -> our recvmsg (the socket buffer's queue)
             udp.read     the receives of one wake-up: open, replay, reorder,
                          tun writes included
             tun.write    the tun writes (coalesced super-segments)
    loop:    loop.busy    select() returned -> select() called again: how long
                          the loop cannot see a new packet
             loop.timers  the timer work of one turn (keepalives, NACK ticks, hold)
             loop.sleep   the timeout the loop handed to select()
    batches: tun.batch    packets taken from the tun per wake-up (a count, not a time)
             udp.batch    datagrams taken from one uplink per wake-up

``bench/latency.py --trace`` prints these for each agent (rpc ``latency``).
Cost when on: two clock reads per stage per wake-up, one histogram update
each; when off the agent holds ``None`` and pays one ``is None`` test per
wake-up.
"""

from __future__ import annotations

import os
from math import frexp

ENV = "MPVPN_LATENCY_TRACE"
SUB = 4  # buckets per octave: an upper bound within 19 % of the true value


class Histogram:
    """Non-negative samples in log buckets (``SUB`` per octave) of micro-units
    (microseconds for times, packets for counts)."""

    __slots__ = ("counts", "n", "total", "max")

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    @staticmethod
    def bucket(x: float) -> int:
        """Index of the bucket holding ``x`` (>= 0): 0 for x < 1, else
        ``SUB * floor(log2 x) + sub-octave + 1``."""
        if x < 1.0:
            return 0
        m, e = frexp(x)  # x = m * 2**e, 0.5 <= m < 1
        return SUB * (e - 1) + int((m * 2.0 - 1.0) * SUB) + 1

    @staticmethod
    def upper(index: int) -> float:
        """The (exclusive) upper edge of bucket ``index``."""
        if index == 0:
            return 1.0
        e, sub = divmod(index - 1, SUB)
        return (1 << e) * (1 + (sub + 1) / SUB)

    def add(self, x: float, weight: int = 1) -> None:
        b = self.bucket(x)
        self.counts[b] = self.counts.get(b, 0) + weight
        self.n += weight
        self.total += x * weight
        if x > self.max:
            self.max = x

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile (the edge of its bucket, at most ``max``)."""
        if not self.n:
            return 0.0
        rank = q * self.n
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(self.upper(b), self.max)
        return self.max

    def doc(self) -> dict:
        return {"n": self.n, "mean": round(self.total / self.n, 1) if self.n else 0.0,
                "p50": round(self.quantile(0.5), 1), "p90": round(self.quantile(0.9), 1),
                "p99": round(self.quantile(0.99), 1), "max": round(self.max, 1)}


STAGES = ("tun.read", "send.seal", "send.udp", "udp.queue", "udp.read", "tun.write",
          "loop.busy", "loop.timers", "loop.sleep", "tun.batch", "udp.batch")
COUNTS = ("tun.batch", "udp.batch")  # samples are counts, not times


class LatencyTrace:
    """The histograms of one agent; ``clock`` is the agent's (monotonic
    seconds), durations are passed in as seconds."""

    __slots__ = ("stages", "clock")

    def __init__(self, clock):
        self.clock = clock
        self.stages = {name: Histogram() for name in STAGES}

    @classmethod
    def from_env(cls, clock, environ=os.environ) -> LatencyTrace | None:
        return cls(clock) if environ.get(ENV, "") not in ("", "0") else None

    def time(self, stage: str, seconds: float, weight: int = 1) -> None:
        """A duration of ``stage`` (``weight``: for how many packets it counts)."""
        self.stages[stage].add(seconds * 1e6 if seconds > 0 else 0.0, weight)

    def count(self, stage: str, n: int) -> None:
        self.stages[stage].add(float(n))

    def report(self) -> dict:
        """``{"enabled": True, "unit": ..., "stages": {name: {n, mean, p50, p90, p99, max}}}``:
        times in microseconds, batches in packets."""
        return {"enabled": True, "unit": "us (batches: packets)",
                "stages": {k: h.doc() for k, h in self.stages.items()}}

    def reset(self) -> None:
        for h in self.stages.values():
            h.__init__()


def format_report(doc: dict) -> str:
    """The report as a table (bench/latency.py)."""
    if not doc or not doc.get("enabled"):
        return "  (trace off: start the agent with MPVPN_LATENCY_TRACE=1)"
    lines = [f"  {'stage':<12}{'n':>9}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>10}"]
    for name, s in doc["stages"].items():
        unit = " pkt" if name in COUNTS else " us"
        lines.append(f"  {name:<12}{s['n']:>9}{s['mean']:>9}{s['p50']:>9}{s['p90']:>9}{s['p99']:>9}"
                     f"{s['max']:>10}{unit}")
    return "\n".join(lines)
