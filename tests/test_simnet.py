"""The in-memory network simulator used by tests, demo and benchmark."""

import random

import pytest

from mpvpn.simnet import SimLink, SimPair


def test_link_drops_at_its_loss_rate_and_delays():
    rng = random.Random(1)
    lk = SimLink(loss=0.3, delay=0.02)
    arrivals = [lk.transit(10.0, rng) for _ in range(20000)]
    lost = sum(1 for a in arrivals if not a)
    assert lost == lk.dropped and lk.sent == 20000
    assert 0.28 < lost / 20000 < 0.32
    assert all(a == [pytest.approx(10.02)] for a in arrivals if a)


def test_down_link_drops_everything_and_duplicate_doubles():
    rng = random.Random(2)
    assert SimLink(up=False).transit(0.0, rng) == []
    lk = SimLink(duplicate=1.0, delay=0.0)
    assert len(lk.transit(0.0, rng)) == 2


def test_fifo_jitter_never_reorders_but_non_fifo_does():
    rng = random.Random(3)
    fifo = SimLink(delay=0.01, jitter=0.02)
    t = [fifo.transit(i * 0.001, rng)[0] for i in range(500)]
    assert t == sorted(t)
    free = SimLink(delay=0.01, jitter=0.02, fifo=False)
    t = [free.transit(i * 0.001, rng)[0] for i in range(500)]
    assert t != sorted(t)


def test_pair_delivers_both_directions_and_records_events():
    pair = SimPair(2, delay=0.005)
    assert pair.handshake()
    pair.send("a", b"to-b")
    pair.send("b", b"to-a")
    pair.run(0.05)
    assert pair.delivered == {"a": [b"to-a"], "b": [b"to-b"]}
    assert pair.events["a"] and pair.events["b"]
    before = pair.now
    pair.run(1.0)
    assert pair.now == pytest.approx(before + 1.0)
