"""mpvpn.core.aqm: CoDel's control law over "did this turn empty the
vNIC's ring?", and which packet it drops.  Fake clock only."""

from __future__ import annotations

from math import sqrt

import pytest

from mpvpn.core import aqm


def turns(q, drained: bool, start: float, end: float, step: float) -> list:
    """The times at which ``q`` asked for a drop over turns every ``step`` s."""
    out, t = [], start
    while t < end:
        if q.on_turn(drained, t):
            out.append(t)
        t = round(t + step, 9)
    return out


def test_a_queue_every_turn_empties_is_never_dropped_from():
    q = aqm.StandingQueue(0.01)
    assert turns(q, True, 0.0, 5.0, 0.0005) == [] and q.drops == 0


def test_a_standing_queue_is_dropped_from_after_one_interval_then_faster():
    q = aqm.StandingQueue(0.01)
    drops = turns(q, False, 0.0, 0.2, 0.0005)
    assert drops[0] >= 0.01  # a burst shorter than the interval loses nothing
    assert drops[0] <= 0.0105
    assert q.drops == len(drops) >= 5
    gaps = [b - a for a, b in zip(drops, drops[1:])]
    for n, gap in enumerate(gaps, start=1):  # RFC 8289: drop n+1 comes interval/sqrt(n) after drop n
        assert 0.01 / sqrt(n) - 0.0005 - 1e-9 <= gap <= 0.01 / sqrt(n) + 0.0005 + 1e-9


def test_a_turn_that_empties_the_queue_ends_the_dropping_and_a_new_burst_gets_its_interval():
    q = aqm.StandingQueue(0.01)
    assert turns(q, False, 0.0, 0.05, 0.001)
    assert q.dropping
    assert not q.on_turn(True, 0.05) and not q.dropping
    again = turns(q, False, 0.051, 0.08, 0.001)
    assert again and again[0] >= 0.051 + 0.01 - 1e-9


def test_dropping_resumes_near_the_last_rate_when_the_queue_comes_back_soon():
    q = aqm.StandingQueue(0.01)
    turns(q, False, 0.0, 0.3, 0.0005)
    before = q.count
    assert before > 3
    q.on_turn(True, 0.3)
    turns(q, False, 0.3005, 0.312, 0.0005)  # back within 16 intervals: count carries over
    assert q.count > 2


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError):
        aqm.StandingQueue(0)


def test_drop_one_bulk_takes_the_oldest_large_packet_and_never_a_small_one():
    small, big1, big2 = b"s" * 60, b"A" * 1400, b"B" * 1400
    a, b = [small, big1, small, big2], [big2]
    assert aqm.drop_one_bulk([a, b])
    assert a == [small, small, big2] and b == [big2]
    only_small = [small] * 5
    assert not aqm.drop_one_bulk([only_small, []]) and only_small == [small] * 5
    assert aqm.drop_one_bulk([[small], b]) and b == []
