import math

import pytest

from mpvpn.linkstats import LossEstimator, RttEstimator


def test_rtt_first_sample_then_rfc6298_smoothing():
    r = RttEstimator()
    assert r.timeout() is None
    r.sample(0.100)
    assert r.srtt == pytest.approx(0.100) and r.rttvar == pytest.approx(0.050)
    r.sample(0.200)
    assert r.rttvar == pytest.approx(0.75 * 0.050 + 0.25 * 0.100)
    assert r.srtt == pytest.approx(0.875 * 0.100 + 0.125 * 0.200)
    assert r.min_rtt == pytest.approx(0.100) and r.latest == pytest.approx(0.200)
    assert r.timeout() == pytest.approx(r.srtt + 4 * r.rttvar)


def test_rtt_converges_and_ignores_garbage():
    r = RttEstimator()
    for _ in range(200):
        r.sample(0.040)
    r.sample(float("nan"))
    r.sample(-1.0)
    assert r.srtt == pytest.approx(0.040, rel=1e-3)
    assert r.rttvar < 1e-4
    assert r.samples == 200


def test_loss_from_echoed_counters():
    e = LossEstimator(tau=1000.0)  # effectively no decay
    assert e.loss is None
    e.observe(tx_total=10, rx_total=10, now=0.0)  # first probe only bases
    assert e.loss is None
    e.observe(tx_total=110, rx_total=90, now=1.0)  # 100 sent, 80 arrived
    assert e.loss == pytest.approx(0.20, abs=1e-3)
    e.observe(tx_total=210, rx_total=190, now=2.0)  # 100 sent, 100 arrived
    assert e.loss == pytest.approx(0.10, abs=1e-3)
    assert e.ppm() == pytest.approx(100_000, abs=200)


def test_loss_recovers_after_a_bad_period():
    e = LossEstimator(tau=3.0)
    e.observe(0, 0, 0.0)
    tx = rx = 0
    for t in range(1, 6):  # 5 s at 50 % loss
        tx += 100
        rx += 50
        e.observe(tx, rx, float(t))
    assert e.loss == pytest.approx(0.5, abs=0.01)
    for t in range(6, 36):  # 30 s clean
        tx += 100
        rx += 100
        e.observe(tx, rx, float(t))
    assert e.loss < 0.01


def test_loss_rebases_when_peer_counter_restarts_and_clamps():
    e = LossEstimator(tau=1000.0)
    e.observe(100, 100, 0.0)
    e.observe(5, 5, 1.0)  # counter went backwards: peer restarted
    assert e.loss is None
    e.observe(15, 20, 2.0)  # more received than sent (reordering): clamp at 0
    assert e.loss == 0.0
    with pytest.raises(ValueError):
        LossEstimator(tau=0)
    assert not math.isnan(e.loss)


def test_a_big_clean_burst_does_not_hide_a_link_turning_bad():
    e = LossEstimator()
    e.observe(0, 0, 0.0)
    e.observe(100_000, 100_000, 0.5)  # 100k datagrams, none lost
    tx = rx = 100_000
    t = 0.5
    for _ in range(20):  # 2 s at 300 datagrams/s, 20 % lost
        t += 0.1
        tx += 30
        rx += 24
        e.observe(tx, rx, t)
    assert e.loss > 0.15


def test_handshake_sample_is_replaced_by_the_first_probe():
    r = RttEstimator()
    r.sample(0.160, provisional=True)  # included ARP on a fresh path
    assert r.srtt == pytest.approx(0.160)  # better than nothing until a probe
    r.sample(0.080)
    assert r.srtt == pytest.approx(0.080) and r.rttvar == pytest.approx(0.040)
    assert r.min_rtt == pytest.approx(0.080)
    r.sample(0.070, provisional=True)  # only a first sample can be provisional
    r.sample(0.080)
    assert r.srtt == pytest.approx(0.875 * (0.875 * 0.080 + 0.125 * 0.070) + 0.125 * 0.080)
