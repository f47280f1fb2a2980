"""The lab's model of three WAN carriers, shared by the scheduler benchmarks
(aggregate.py, loss.py, failover.py): tbf 50/30/20 Mbit/s on the sending
router, one-way delay 10/25/40 ms +- 2/3/4 ms jitter through the lab's delay
shim (FIFO, each direction)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Lab  # noqa: E402

RATES = {1: 50, 2: 30, 3: 20}  # Mbit/s (tbf)
DELAYS = {1: (10, 2), 2: (25, 3), 3: (40, 4)}  # one-way ms, jitter ms (shim, each direction)


def describe(delays: bool = True) -> str:
    """One line saying what the carriers are."""
    desc = ", ".join(f"{RATES[c]} Mbit/s" + (f" {DELAYS[c][0]}+-{DELAYS[c][1]} ms" if delays else "")
                     for c in RATES)
    return f"carriers (tbf rate, one-way delay +- jitter, FIFO, each direction): {desc}"


def make_lab(delays: bool = True) -> Lab:
    """Three carriers at RATES, through the delay shim unless ``delays`` is False."""
    lab = Lab(3, delays=DELAYS if delays else None)
    for c, mbit in RATES.items():
        lab.set_rate(c, mbit)
    return lab
