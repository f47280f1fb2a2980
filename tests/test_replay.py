"""Tests for mpvpn.core.replay.ReplayWindow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core.replay import SEQ_LIMIT, ReplayWindow


class Model:
    """Reference: a set of everything seen plus the window rule."""

    def __init__(self, size):
        self.size = size
        self.seen = set()
        self.last = 0

    def check(self, seq):
        return 0 < seq < SEQ_LIMIT and seq not in self.seen and seq > self.last - self.size

    def update(self, seq):
        if not self.check(seq):
            return False
        self.seen.add(seq)
        self.last = max(self.last, seq)
        return True


@pytest.mark.parametrize("size", [0, 32, 63, 65, 100, -64, 64.0])
def test_bad_size_rejected(size):
    with pytest.raises(ValueError):
        ReplayWindow(size)


def test_default_size():
    assert ReplayWindow().size == 8192


def test_zero_and_out_of_range_never_valid():
    w = ReplayWindow(64)
    for seq in (0, -1, SEQ_LIMIT, SEQ_LIMIT + 5):
        assert not w.check(seq)
        assert not w.update(seq)
    assert w.last == 0
    assert w.update(SEQ_LIMIT - 1)
    assert w.last == SEQ_LIMIT - 1
    assert not w.update(SEQ_LIMIT - 1)
    assert not w.check(0)


def test_in_order_then_replay():
    w = ReplayWindow(128)
    for seq in range(1, 500):
        assert w.check(seq)
        assert w.update(seq)
        assert not w.check(seq)
        assert not w.update(seq)
    assert w.last == 499


def test_check_does_not_modify():
    w = ReplayWindow(64)
    assert w.check(10)
    assert w.check(10)
    assert w.last == 0
    assert w.update(10)
    assert w.check(5)
    assert w.check(5)
    assert w.update(5)
    assert not w.check(5)


def test_out_of_order_inside_window_accepted_once():
    w = ReplayWindow(64)
    assert w.update(100)
    for seq in (99, 37, 60, 80):
        assert w.update(seq)
        assert not w.update(seq)
    assert w.last == 100


def test_window_boundary_exact():
    size = 128
    w = ReplayWindow(size)
    assert w.update(1000)
    oldest = 1000 - size + 1
    assert not w.check(oldest - 1)
    assert not w.update(oldest - 1)
    assert w.check(oldest)
    assert w.update(oldest)
    assert not w.update(oldest)


@pytest.mark.parametrize("last", range(1000, 1000 + 64 * 3, 7))
def test_boundary_every_alignment(last):
    # The window is size numbers long whatever its alignment to words.
    w = ReplayWindow(64)
    assert w.update(last)
    for seq in range(last - 63, last):
        assert w.check(seq), seq
    assert not w.check(last - 64)
    for seq in range(last - 63, last):
        assert w.update(seq)
    assert not any(w.check(s) for s in range(last - 100, last + 1))


def test_seen_bits_cleared_when_window_moves():
    w = ReplayWindow(64)
    assert w.update(5)
    # Move forward by exactly the ring size in words: word of 5 is reused.
    assert w.update(5 + 64 * 2)
    assert not w.check(5)  # too old now, not "seen"
    # A number sharing the reused word that was never seen must be accepted.
    assert w.update(5 + 64 * 2 - 1)
    assert w.update(5 + 64 * 2 - 60)


def test_huge_jump_is_fast_and_correct():
    w = ReplayWindow(8192)
    for seq in range(1, 9000):
        w.update(seq)
    big = 1 << 62
    assert w.update(big)
    assert w.last == big
    assert not w.check(8999)
    assert w.check(big - 1)
    assert w.update(big - 8191)
    assert not w.update(big - 8192)
    # A small move forward keeps the bits still inside the window.
    assert w.update(big + 100)
    assert not w.update(big)  # seen
    assert w.update(big + 1)  # never seen
    assert not w.check(big - 8191)  # seen, and now outside the window


def test_reset():
    w = ReplayWindow(64)
    for seq in range(1, 70):
        w.update(seq)
    w.reset()
    assert w.last == 0
    assert w.update(3)
    assert w.update(1)


_seq_ops = st.lists(
    st.tuples(
        st.sampled_from(["check", "update"]),
        st.one_of(
            st.integers(-2, 400),  # dense, around the window
            st.integers(0, 64 * 40),  # moderate jumps
            st.sampled_from([SEQ_LIMIT - 1, SEQ_LIMIT, 1 << 40]),  # edges
        ),
    ),
    max_size=300,
)


@settings(max_examples=150, deadline=None)
@given(size=st.sampled_from([64, 128, 192, 512]), ops=_seq_ops)
def test_matches_set_model(size, ops):
    w = ReplayWindow(size)
    m = Model(size)
    for op, seq in ops:
        if op == "check":
            assert w.check(seq) == m.check(seq), (op, seq)
        else:
            assert w.update(seq) == m.update(seq), (op, seq)
        assert w.last == m.last


@settings(max_examples=100, deadline=None)
@given(
    size=st.sampled_from([64, 128, 256]),
    start=st.integers(1, 1 << 63),
    steps=st.lists(st.integers(-300, 300), max_size=200),
)
def test_random_walk_matches_model(size, start, steps):
    # Sequence numbers wandering around a point, as reordering produces.
    w = ReplayWindow(size)
    m = Model(size)
    seq = start
    for step in steps:
        seq = max(0, seq + step)
        assert w.check(seq) == m.check(seq)
        assert w.update(seq) == m.update(seq)
        assert w.last == m.last
