"""The in-memory network simulator used by tests, demo and benchmark."""

import random

import pytest

from mpvpn.tools.simnet import SimLink, SimPair


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


def test_rate_limited_link_spaces_departures_and_drops_beyond_its_queue():
    rng = random.Random(4)
    lk = SimLink(delay=0.01, rate=1000.0, queue=3000)
    t = [lk.transit(0.0, rng, 1000) for _ in range(4)]
    # 1 s per 1000-byte datagram; the fourth does not fit the 3000-byte queue
    # (which counts the datagram being sent)
    assert t[:3] == [[pytest.approx(1.01)], [pytest.approx(2.01)], [pytest.approx(3.01)]]
    assert t[3] == [] and lk.qdropped == 1 and lk.dropped == 1
    assert lk.backlog(0.0) == pytest.approx(3000)
    assert lk.backlog(2.5) == pytest.approx(500)
    assert lk.transit(10.0, rng, 500) == [pytest.approx(10.51)]  # idle again: no wait
    assert SimLink().backlog(0.0) == 0.0


def test_pair_over_rate_limited_links_carries_at_most_the_rate():
    pair = SimPair(0)
    pair.add_subflow(1, delay=0.005, rate=100e3)
    assert pair.handshake()
    t0 = pair.now
    for _ in range(300):  # 300 kB at once
        pair.a.send(bytes(1000), pair.now)
    pair.run(1.0)
    assert len(pair.delivered["b"]) == pytest.approx(100, abs=3)
    assert pair.delivered_at["b"][0] > t0
    assert len(pair.delivered_at["b"]) == len(pair.delivered["b"])
