"""Acceptance bounds for the statistical checks of the suite.

A test that counts random events (lost pings, lost datagrams) must accept
what chance produces: its bounds come from the number of trials, so that a
correct program fails the check with probability below ``ALPHA`` however
busy the machine is (a slow machine sends fewer samples; the bounds widen).
"""

from __future__ import annotations

import math

ALPHA = 1e-6  # false-failure probability of one check


def _log_pmf(n: int, k: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_interval(n: int, p: float, alpha: float = ALPHA) -> tuple[int, int]:
    """(lo, hi): for X ~ Binomial(n, p), P(X < lo) <= alpha/2 and
    P(X > hi) <= alpha/2 (exact tails, summed from the pmf)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError("need n >= 0 and 0 <= p <= 1")
    if n == 0 or p == 0.0:
        return 0, 0
    if p == 1.0:
        return n, n
    pmf = [math.exp(_log_pmf(n, k, p)) for k in range(n + 1)]
    lo, acc = 0, 0.0
    while lo < n and acc + pmf[lo] <= alpha / 2:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while hi > 0 and acc + pmf[hi] <= alpha / 2:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


def fraction_interval(n: int, p: float, alpha: float = ALPHA) -> tuple[float, float]:
    """binomial_interval as fractions of n (an observed loss rate's bounds)."""
    lo, hi = binomial_interval(n, p, alpha)
    return lo / n, hi / n


def min_trials_to_tell(p: float, alpha: float = ALPHA) -> int:
    """The fewest trials for which a rate p is told apart from 0: the lower
    bound of binomial_interval(n, p) is at least 1."""
    return math.ceil(math.log(alpha / 2) / math.log1p(-p))
