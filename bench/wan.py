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
# Other labs of the same carriers (issue 17, item 5: repairs at any RTT from
# 0.1 ms to 300 ms): "none" the bare veths (RTT well under 1 ms, two sites on
# one metro network), "lab" the delays above, "150" 150 ms one way on each
# (RTT 300 ms, a satellite hop or the far side of the world).
LABS = {"none": None, "lab": DELAYS, "150": {1: (150, 2), 2: (150, 3), 3: (150, 4)}}


def _delays(delays) -> dict | None:
    """True: DELAYS; False or None: none; a dict: itself."""
    if delays is True:
        return DELAYS
    return delays or None


def describe(delays=True) -> str:
    """One line saying what the carriers are (``delays``: as for make_lab)."""
    d = _delays(delays)
    desc = ", ".join(f"{RATES[c]} Mbit/s" + (f" {d[c][0]}+-{d[c][1]} ms" if d else "")
                     for c in RATES)
    return f"carriers (tbf rate, one-way delay +- jitter, FIFO, each direction): {desc}"


def make_lab(delays=True) -> Lab:
    """Three carriers at RATES, through the delay shim unless ``delays`` is
    False (True: DELAYS; a dict: carrier -> (one-way ms, jitter ms))."""
    lab = Lab(3, delays=_delays(delays))
    for c, mbit in RATES.items():
        lab.set_rate(c, mbit)
    return lab
