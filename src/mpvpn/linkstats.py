"""Per-subflow link estimators: RTT (RFC 6298 smoothing) and loss from
echoed packet counters (after angt/mud).  Sans-I/O: callers pass ``now``.
"""

from __future__ import annotations

import math


class RttEstimator:
    """Smoothed RTT and RTT variance, RFC 6298 section 2 (alpha 1/8, beta 1/4)."""

    __slots__ = ("srtt", "rttvar", "latest", "min_rtt", "samples", "_provisional")

    ALPHA = 0.125
    BETA = 0.25

    def __init__(self):
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.latest: float | None = None
        self.min_rtt: float | None = None
        self.samples = 0
        self._provisional = False

    def sample(self, rtt: float, provisional: bool = False) -> None:
        """Feed one RTT measurement in seconds (ignored if not finite or < 0).

        A ``provisional`` sample (the handshake's: it may include ARP or
        neighbour discovery on a fresh path) is replaced by the first
        ordinary one instead of being averaged with it.
        """
        if not (rtt >= 0.0 and math.isfinite(rtt)):
            return
        if self._provisional:
            self.srtt = self.rttvar = self.min_rtt = None
            self._provisional = False
        if provisional and self.srtt is None:
            self._provisional = True
        self.latest = rtt
        self.samples += 1
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar += self.BETA * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += self.ALPHA * (rtt - self.srtt)

    def timeout(self, floor: float = 0.0) -> float | None:
        """srtt + 4*rttvar (None before the first sample), at least ``floor``."""
        if self.srtt is None:
            return None
        return max(floor, self.srtt + 4 * self.rttvar)


class LossEstimator:
    """Loss of one direction of a subflow, from the peer's echoed counters.

    Every probe from the peer says how many datagrams the peer has sent on this
    subflow so far (``tx_total``); we know how many of them arrived
    (``rx_total``).  Between two probes, ``dtx - drx`` datagrams were lost.
    Both sums decay with time constant ``tau`` seconds so that a link that
    recovers is trusted again, however bad it was; and their mass is capped
    at ``window`` datagrams so that a big burst (a bulk transfer on a clean
    link) cannot hide a link that turns bad right after it.
    """

    __slots__ = ("tau", "window", "_last_tx", "_last_rx", "_last_t", "_sent", "_lost", "probes")

    def __init__(self, tau: float = 3.0, window: int = 200):
        if tau <= 0 or window < 1:
            raise ValueError("need tau > 0 and window >= 1")
        self.tau = tau
        self.window = window
        self._last_tx: int | None = None
        self._last_rx = 0
        self._last_t = 0.0
        self._sent = 0.0
        self._lost = 0.0
        self.probes = 0

    def observe(self, tx_total: int, rx_total: int, now: float) -> None:
        """A probe arrived: the peer had sent ``tx_total``, we received ``rx_total``."""
        self.probes += 1
        if self._last_tx is None or tx_total < self._last_tx:
            # first probe, or the peer's counter restarted: re-base only
            self._last_tx, self._last_rx, self._last_t = tx_total, rx_total, now
            return
        dtx = tx_total - self._last_tx
        if dtx == 0:
            return
        drx = rx_total - self._last_rx
        decay = math.exp(-max(0.0, now - self._last_t) / self.tau)
        self._sent = self._sent * decay + dtx
        self._lost = self._lost * decay + (dtx - drx)
        if self._sent > self.window:
            f = self.window / self._sent
            self._sent *= f
            self._lost *= f
        self._last_tx, self._last_rx, self._last_t = tx_total, rx_total, now

    @property
    def loss(self) -> float | None:
        """Loss rate in [0, 1], or None before two probes with traffic between."""
        if self._sent <= 0.0:
            return None
        return min(1.0, max(0.0, self._lost / self._sent))

    def ppm(self) -> int | None:
        v = self.loss
        return None if v is None else int(round(v * 1_000_000))
