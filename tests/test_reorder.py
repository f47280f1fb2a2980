"""Tests for mpvpn.core.reorder.ReorderBuffer (seed 001 "Receiving")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core.reorder import SKIP_MEMORY, ReorderBuffer


def push_all(buf, seqs, now=0.0):
    """Push seqs (item = seq) and return everything released, flattened."""
    out = []
    for s in seqs:
        out += buf.push(s, s, now)
    return out


# -- construction ------------------------------------------------------------


@pytest.mark.parametrize("capacity,hold", [(0, None), (-1, None), (4, -0.001), (4, math.nan)])
def test_bad_arguments(capacity, hold):
    with pytest.raises(ValueError):
        ReorderBuffer(capacity, hold)


def test_start_and_zero_hold_accepted():
    b = ReorderBuffer(1, 0.0, start=41)
    assert b.last == 41 and len(b) == 0
    assert b.push(42, "a", 0.0) == ["a"]
    assert b.last == 42


# -- the seed's rule ------------------------------------------------------------


def test_seed_worked_example():
    b = ReorderBuffer(6, None, start=5)
    assert push_all(b, [8, 9, 10, 12]) == []
    assert (b.last, len(b)) == (5, 4)
    assert b.push(7, 7, 0.0) == []
    assert len(b) == 5
    assert b.push(6, 6, 0.0) == [6, 7, 8, 9, 10]
    assert (b.last, len(b)) == (10, 1)
    # 11 never comes; 13..17 fill the buffer.
    assert push_all(b, range(13, 18)) == []
    assert (b.last, len(b)) == (10, 6)
    assert b.push(18, 18, 0.0) == [12, 13, 14, 15, 16, 17, 18]
    assert (b.last, len(b)) == (18, 0)
    assert (b.flushes, b.flushed, b.skipped) == (1, 7, 1)
    assert b.delivered == 12
    # 11 is now late, 12 a duplicate.
    assert b.push(11, 11, 0.0) == []
    assert b.push(12, 12, 0.0) == []
    assert (b.late, b.duplicates) == (1, 1)


def test_in_order_releases_immediately():
    b = ReorderBuffer(4, None)
    for s in range(1, 100):
        assert b.push(s, f"p{s}", 0.0) == [f"p{s}"]
    assert b.last == 99 and b.delivered == 99 and len(b) == 0


def test_duplicates_of_released_and_buffered():
    b = ReorderBuffer(4, None)
    assert b.push(1, "a", 0.0) == ["a"]
    assert b.push(1, "a2", 0.0) == []
    assert b.push(3, "c", 0.0) == []
    assert b.push(3, "c2", 0.0) == []  # buffered already: first copy kept
    assert b.duplicates == 2 and b.late == 0
    assert b.push(2, "b", 0.0) == ["b", "c"]


def test_flush_releases_in_order_and_gives_up_gaps():
    b = ReorderBuffer(3, None)
    assert push_all(b, [9, 4, 7]) == []
    # Y below some buffered items is still released in sequence order.
    assert b.push(5, 5, 0.0) == [4, 5, 7, 9]
    assert b.last == 9 and len(b) == 0
    # Gaps: 1-3, 6, 8.
    assert b.skipped == 5
    for s in (1, 2, 3, 6, 8):
        b.push(s, s, 0.0)
    assert b.late == 5 and b.duplicates == 0
    for s in (4, 5, 7, 9):
        b.push(s, s, 0.0)
    assert b.late == 5 and b.duplicates == 4


def test_capacity_one():
    b = ReorderBuffer(1, None)
    assert b.push(3, 3, 0.0) == []
    assert b.push(5, 5, 0.0) == [3, 5]
    assert b.last == 5 and b.skipped == 3 and b.flushes == 1


def test_is_stale():
    b = ReorderBuffer(4, None, start=10)
    assert b.is_stale(10) and b.is_stale(3)
    assert not b.is_stale(11) and not b.is_stale(13)
    b.push(13, 13, 0.0)
    assert b.is_stale(13) and not b.is_stale(12)
    counters = (b.duplicates, b.late, b.delivered)
    b.is_stale(13)
    b.is_stale(5)
    assert (b.duplicates, b.late, b.delivered) == counters


def test_stale_push_never_stores_item():
    # The engine may count a stale copy with push(seq, None, now).
    b = ReorderBuffer(4, None)
    b.push(3, "real", 0.0)
    assert b.is_stale(3)
    assert b.push(3, None, 0.0) == []
    assert b.push(1, 1, 0.0) == [1]
    assert b.push(2, 2, 0.0) == [2, "real"]


def test_reset_clears_state_keeps_counters():
    b = ReorderBuffer(2, 0.1)
    push_all(b, [1, 3, 4, 6])  # flush on 6: gives up 2 and 5
    assert b.skipped == 2
    b.push(8, 8, 0.0)
    b.reset(100)
    assert b.last == 100 and len(b) == 0 and b.next_deadline() is None
    assert b.push(101, "x", 1.0) == ["x"]
    assert b.push(5, 5, 1.0) == [] and b.duplicates == 1  # skip memory forgotten
    assert b.delivered == 5  # 1, then 3 4 6 (flush), then 101


def test_skip_memory_is_bounded():
    b = ReorderBuffer(1, None)
    # Capacity 1: every second push flushes, leaving two one-number gaps.
    seq = 0
    for _ in range(SKIP_MEMORY + 10):
        seq += 2
        b.push(seq, seq, 0.0)  # gap at seq-1
        seq += 2
        b.push(seq, seq, 0.0)  # flush; gap at seq-1
    assert len(b._skips) == SKIP_MEMORY
    # The newest given-up numbers are known as late, the oldest forgotten.
    b.push(seq - 1, None, 0.0)
    assert b.late == 1
    b.push(1, None, 0.0)
    assert b.late == 1 and b.duplicates == 1


# -- hold deadline -------------------------------------------------------------


def test_hold_none_never_expires():
    b = ReorderBuffer(4, None)
    b.push(3, 3, 0.0)
    assert b.next_deadline() is None
    assert b.expire(1e9) == []
    assert len(b) == 1 and b.deadline_releases == 0


def test_expire_gives_up_gap_and_continues():
    b = ReorderBuffer(8, 0.05)
    assert b.push(3, 3, 1.00) == []
    assert b.push(4, 4, 1.02) == []
    assert b.push(7, 7, 1.03) == []
    assert b.next_deadline() == pytest.approx(1.05)
    assert b.expire(1.049) == []
    # 3 expires; 4 continues contiguously even though not expired itself.
    assert b.expire(1.05) == [3, 4]
    assert b.last == 4 and len(b) == 1
    assert (b.skipped, b.deadline_releases, b.delivered) == (2, 1, 2)
    assert b.next_deadline() == pytest.approx(1.08)
    assert b.push(2, 2, 1.06) == [] and b.late == 1
    assert b.push(5, 5, 1.06) == [5]
    assert b.expire(1.08) == [7]
    assert b.skipped == 3 and b.deadline_releases == 2 and len(b) == 0
    assert b.next_deadline() is None


def test_expire_uses_highest_expired_not_earliest():
    # Arrival order differs from sequence order: 9 arrived first, 6 later.
    b = ReorderBuffer(8, 0.01)
    b.push(9, 9, 0.000)
    b.push(6, 6, 0.005)
    b.push(8, 8, 0.006)
    b.push(12, 12, 0.020)
    # At 0.0105 only 9 has expired, but everything below 9 goes with it.
    assert b.expire(0.0105) == [6, 8, 9]
    assert b.last == 9
    assert b.skipped == 5 + 1  # 1..5, 7
    assert len(b) == 1 and b.next_deadline() == pytest.approx(0.030)


def test_hold_changed_at_run_time():
    b = ReorderBuffer(8, 1.0)
    b.push(5, 5, 10.0)
    assert b.next_deadline() == pytest.approx(11.0)
    b.hold = 0.2
    assert b.next_deadline() == pytest.approx(10.2)
    assert b.expire(10.2) == [5]
    b.push(8, 8, 20.0)
    b.hold = None
    assert b.next_deadline() is None and b.expire(100.0) == []
    b.hold = 0.0
    assert b.expire(20.0) == [8]


def test_next_deadline_skips_released_entries():
    b = ReorderBuffer(8, 0.1)
    b.push(2, 2, 0.0)
    b.push(5, 5, 0.5)
    assert b.push(1, 1, 0.6) == [1, 2]
    # The entry for 2 is dead; the deadline is 5's.
    assert b.next_deadline() == pytest.approx(0.6)


def test_next_deadline_triggers_a_release():
    b = ReorderBuffer(8, 0.013)
    for s, t in [(4, 0.1), (3, 0.2), (9, 0.3)]:
        b.push(s, s, t)
    n = 0
    while (d := b.next_deadline()) is not None:
        assert b.expire(d), "expire at next_deadline() must release"
        n += 1
    assert n == 2 and b.last == 9 and len(b) == 0


def test_arrivals_memory_bounded_without_hold():
    # Buffer never empties and nobody asks for deadlines: the arrival log
    # must still stay O(capacity).
    cap = 8
    b = ReorderBuffer(cap, None)
    b.push(3, 3, 0.0)  # 1 and 2 never come... until the very end
    seq = 3
    for i in range(5000):
        seq += 1
        b.push(seq, seq, float(i))
        assert len(b) <= cap
        assert len(b._arrivals) <= 2 * cap
    assert b.flushes > 0


def test_clock_going_backwards_does_not_break_deadlines():
    b = ReorderBuffer(8, 0.1)
    b.push(3, 3, 5.0)
    b.push(4, 4, 4.0)  # stale clock: treated as arriving at 5.0
    assert b.next_deadline() == pytest.approx(5.1)
    assert b.expire(5.1) == [3, 4]
    b.push(7, 7, 6.0)
    b.push(9, 9, 5.5)  # clamped to 6.0, so it does not expire before 7
    b.push(5, 5, 6.0)  # 5 released at once, 7 stays buffered
    assert b.next_deadline() == pytest.approx(6.1)
    b.push(6, 6, 6.0)  # releases 6, 7: 9 is now the earliest
    assert b.next_deadline() == pytest.approx(6.1)
    assert b.expire(6.0999) == []
    assert b.expire(6.1) == [9]


def test_expire_ignores_released_entries():
    b = ReorderBuffer(8, 0.1)
    b.push(3, 3, 0.0)
    b.push(5, 5, 0.5)
    assert push_all(b, [1, 2], now=0.05) == [1, 2, 3]
    # 3's deadline (0.1) has passed but 3 is gone: nothing to release.
    assert b.expire(0.2) == []
    assert b.deadline_releases == 0 and b.last == 3 and b.skipped == 0
    assert b.expire(0.6) == [5]
    assert b.deadline_releases == 1 and b.skipped == 1


# -- properties ----------------------------------------------------------------


@st.composite
def scenarios(draw):
    """A multi-subflow receive trace on a fake clock.

    n packets, sent 1 ms apart; each on k copies (subflows); every copy is
    dropped or delayed arbitrarily.  Returns the pushes sorted by arrival
    time plus the times at which the engine calls expire().
    """
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 3))
    capacity = draw(st.integers(1, 8))
    hold = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.002, 0.01, 0.05])))
    start = draw(st.sampled_from([0, 1000, (1 << 64) - 100]))
    delays = st.one_of(st.none(), st.floats(0.0, 0.1, allow_nan=False))  # None = lost
    events = []
    for i in range(n):
        for _ in range(k):
            d = draw(delays)
            if d is not None:
                events.append((i * 0.001 + d, start + 1 + i))
    events.sort()
    expiries = draw(st.lists(st.floats(0.0, 0.2, allow_nan=False), max_size=15))
    return capacity, hold, start, events, sorted(expiries)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_multipath_trace_properties(scenario):
    capacity, hold, start, events, expiries = scenario
    b = ReorderBuffer(capacity, hold, start)
    released = []
    first_ok = set()  # seqs whose first copy arrived while seq > X
    seen = set()
    arrival = {}  # buffered seq -> arrival time (model)
    dup = late = releases = 0

    def take(out):
        released.extend(out)
        for s in out:
            arrival.pop(s, None)
        # Nothing is ever released twice and order never goes backwards.
        assert all(a < c for a, c in zip(released, released[1:]))

    def do_expire(now):
        nonlocal releases
        out = b.expire(now)
        releases += bool(out)
        take(out)
        if hold is not None:
            # Nothing overstays its deadline once expire(now) has run.
            assert all(t + hold > now for t in arrival.values())
            want = min(arrival.values()) + hold if arrival else None
            assert b.next_deadline() == want
        assert len(b) == len(arrival)

    ei = 0
    for t, seq in events:
        while ei < len(expiries) and expiries[ei] <= t:
            do_expire(expiries[ei])
            ei += 1
        stale = b.is_stale(seq)
        x_before = b.last
        if seq not in seen:
            seen.add(seq)
            if seq > x_before:
                first_ok.add(seq)
        # Model of the drop classification.
        if seq <= x_before:
            if seq in released:
                dup += 1
            else:
                late += 1
        elif seq in arrival:
            dup += 1
        assert stale == (seq <= x_before or seq in arrival)
        out = b.push(seq, seq, t)
        if not stale and seq not in out:
            arrival[seq] = t
        take(out)
        assert len(b) <= capacity
        assert (b.duplicates, b.late) == (dup, late)
        if hold is not None:
            assert b.next_deadline() == (min(arrival.values()) + hold if arrival else None)
    for now in expiries[ei:]:
        do_expire(now)

    # Drain whatever is left by shrinking the hold to zero.
    b.hold = 0.0
    out = b.expire(1.0)
    releases += bool(out)
    take(out)
    assert len(b) == 0
    assert b.deadline_releases == releases

    assert set(released) == first_ok
    assert b.delivered == len(released)
    assert b.delivered + b.duplicates + b.late == len(events)
    x = b.last
    assert x == (max(released) if released else start)
    # Every number up to X was released exactly once or given up.
    assert b.skipped == x - start - len(released)
    assert b.flushed <= b.delivered
    assert b.flushes <= b.flushed


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 6),
    seqs=st.lists(st.integers(1, 30), max_size=80),
)
def test_arbitrary_push_order_without_hold(capacity, seqs):
    # Any order at all (no clock involved): the stream is strictly increasing
    # and a buffered item is only held while a gap below it is open.
    b = ReorderBuffer(capacity, None)
    released = []
    for s in seqs:
        released += b.push(s, s, 0.0)
        assert len(b) <= capacity
        assert all(a < c for a, c in zip(released, released[1:]))
        assert b.last == (released[-1] if released else 0)
        # The buffer never holds X+1 (it would have been released).
        assert not b.is_stale(b.last + 1)
    assert b.delivered == len(released)
    assert b.delivered + b.duplicates + b.late + len(b) == len(seqs)


def test_defer_holds_deadline_releases_but_not_in_order_delivery():
    rb = ReorderBuffer(capacity=16, hold=0.010)
    assert rb.push(1, "a", 0.0) == ["a"]
    assert rb.push(3, "c", 0.0) == []  # 2 missing
    rb.defer(0.050)  # a repair for 2 is on its way
    assert rb.next_deadline() == 0.050
    assert rb.expire(0.020) == [] and rb.skipped == 0
    assert rb.push(2, "b", 0.030) == ["b", "c"]  # the repair arrived in time
    assert rb.push(5, "e", 0.031) == []
    rb.defer(0.040)  # an earlier floor never moves it back
    assert rb.hold_until == 0.050 and rb.deferrals == 1
    assert rb.expire(0.049) == []
    assert rb.expire(0.050) == ["e"] and rb.skipped == 1  # bounded: given up at the floor
    rb.reset()
    assert rb.hold_until == -math.inf


def test_overlapping_deferrals_never_hold_an_item_past_the_cap():
    """Under steady loss a repair is always on its way for some gap, so the
    floor keeps moving; a gap whose re-send was lost must still be given up
    at arrival + hold_cap, not when the buffer overflows (seen in the lab:
    8 flushes and 0.9 % loss at 10 % loss per carrier)."""
    for cap in (None, 0.100):
        rb = ReorderBuffer(capacity=1024, hold=0.010)
        rb.hold_cap = cap
        rb.push(1, "a", 0.0)
        released = []
        first_out = None
        t = 0.0
        seq = 3  # 2 is lost for good
        while t < 0.300:
            rb.defer(t + 0.050)  # another gap's repair, every 5 ms
            released += rb.push(seq, seq, t)
            released += rb.expire(t)
            if released and first_out is None:
                first_out = t
            seq += 1
            t += 0.005
        if cap is None:
            assert released == []  # held while the floor moved
        else:
            assert released[:2] == [3, 4] and rb.skipped == 1 and rb.flushes == 0
            assert cap <= first_out <= cap + 0.005  # 3 arrived at 0 and waited the cap


def test_in_order_state_only_while_nothing_is_buffered():
    r = ReorderBuffer(16, 0.05)
    assert r.in_order_state() == (0, 0, 0)
    r.push(2, "b", 0.0)  # 1 missing: 2 waits
    assert r.in_order_state() is None
    r.push(1, "a", 0.0)
    assert r.in_order_state() == (2, 0, 0)


def test_a_run_delivered_outside_push_must_continue_x_exactly():
    r = ReorderBuffer(16, 0.05)
    r.push(1, "a", 0.0)
    r.took_in_order(4, 3)  # 2, 3, 4 delivered by the caller
    assert (r.last, r.delivered) == (4, 4)
    assert r.is_stale(3) and not r.is_stale(5)
    with pytest.raises(ValueError):
        r.took_in_order(8, 2)  # a gap: 5, 6 were never delivered
    r.push(6, "f", 0.0)
    with pytest.raises(ValueError):
        r.took_in_order(5, 1)  # something is buffered: push() must decide
    assert (r.last, r.delivered) == (4, 4)
    r.count_stale(2, 1)
    assert (r.duplicates, r.late) == (2, 1)


def test_check_copy_counts_stale_copies_as_push_would():
    a, b = ReorderBuffer(16, 0.05), ReorderBuffer(16, 0.05)
    for r in (a, b):
        r.push(1, "a", 0.0)
        r.push(3, "c", 0.0)
        r.expire(1.0)  # 2 given up: 3 delivered
        r.push(5, "e", 1.0)  # buffered
    for seq in (1, 2, 3, 5, 4, 6):
        kind = a.check_copy(seq)
        stale = b.is_stale(seq)
        assert (kind != 0) == stale
        if stale:
            b.push(seq, None, 1.0)
        assert kind == {1: 1, 2: 2, 3: 1, 5: 1, 4: 0, 6: 0}[seq]
    assert (a.duplicates, a.late) == (b.duplicates, b.late) == (3, 1)


def test_give_up_releases_the_line_only_at_its_head():
    """give_up (a NACK-less loss: congestion) skips a number next in line at
    once and releases what waited behind it; one behind another gap waits."""
    buf = ReorderBuffer(16, 0.1)
    assert buf.push(1, "a", 0.0) == ["a"]
    for s in (3, 5, 6):
        assert buf.push(s, s, 0.0) == []
    assert buf.give_up([4]) == []  # 2 still missing ahead of it: skipped when the line gets there
    assert buf.push(2, "b", 0.0) == ["b", 3, 5, 6]  # 2 came after all; 4 skipped on the way
    assert (buf.last, buf.skipped, buf.given_up, len(buf)) == (6, 1, 1, 0)
    assert buf.push(4, "late", 0.0) == [] and buf.late == 1  # a re-send after all: late
    assert buf.push(9, 9, 0.0) == []
    assert buf.give_up([7, 8]) == [9] and buf.last == 9


def test_the_buffer_checks_the_hold_it_is_given():
    rb = ReorderBuffer(16, 0.01)
    rb.set_hold(0.05, 0.2)
    assert (rb.hold, rb.hold_cap) == (0.05, 0.2)
    rb.set_hold(None)
    assert (rb.hold, rb.hold_cap) == (None, 0.2)  # the cap stays unless given
    for bad in ((-1.0, None), (float("nan"), None), (0.1, -0.5)):
        with pytest.raises(ValueError):
            rb.set_hold(*bad)
    assert (rb.hold, rb.hold_cap) == (None, 0.2)


def test_a_burst_s_deferral_may_keep_items_past_the_cap_until_it_ends():
    """A failed carrier's tail is repaired one re-send after another: its
    deferral brings its own, longer cap (the engine bounds it); the next
    deferral, once it is over, does not inherit it."""
    rb = ReorderBuffer(capacity=64, hold=0.010)
    rb.hold_cap = 0.100
    rb.push(1, "a", 0.0)
    rb.push(3, "c", 0.0)  # 2 missing
    rb.defer(0.300, cap=0.250)
    assert rb.next_deadline() == 0.250
    assert rb.expire(0.200) == []  # past hold_cap: the re-sends are still coming
    assert rb.expire(0.250) == ["c"] and rb.skipped == 1  # but not past its own cap
    rb.push(5, "e", 0.295)  # 4 missing
    assert rb.expire(0.300) == []  # the deferral is over
    rb.defer(0.500)
    assert rb.next_deadline() == pytest.approx(0.395)  # hold_cap again
    with pytest.raises(ValueError):
        rb.defer(0.6, cap=-1.0)
