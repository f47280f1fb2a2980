"""mpvpn.core.linktest through two sessions on simulated links (fake clock)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stats import binomial_interval, min_trials_to_tell

from mpvpn.core import linktest, wire
from mpvpn.core.linktest import LinkTestError
from mpvpn.tools.simnet import SimPair

MBIT = 1e6 / 8


def lab(sealed=True, rates=(50, 30, 20), loss=(0.0, 0.0, 0.0), seed=1):
    p = SimPair(len(rates), delay=0.01, seed=seed, sealed=sealed)
    assert p.handshake()
    for m, (r, l) in enumerate(zip(rates, loss), start=1):
        p.set(m, rate=r * MBIT, queue=100_000, loss=l)
    p.run(1.0)
    return p


def run_test(p, duration=2.0, limit=60.0):
    a = p.session("a")
    a.start_link_test(p.now, duration)
    end = p.now + limit
    while a.linktest.run.state == "running" and p.now < end:
        p.run(0.25)
    return a.linktest.status()


def by(results, name, direction):
    return next(r for r in results if r["name"] == name and r["direction"] == direction)


def test_each_link_alone_then_all_both_ways_finds_rates_and_loss():
    p = lab(loss=(0.0, 0.05, 0.0))
    doc = run_test(p)
    assert doc["state"] == "done" and doc["error"] is None and doc["phases"] == 8
    res = doc["results"]
    assert [(r["name"], r["direction"]) for r in res] == [
        ("sub1", "up"), ("sub1", "down"), ("sub2", "up"), ("sub2", "down"),
        ("sub3", "up"), ("sub3", "down"), ("sub1+sub2+sub3", "up"), ("sub1+sub2+sub3", "down")]
    payload_share = 1400 / (1400 + wire.HEADER_LEN + wire.TAG_LEN)  # what the test counts
    for name, rate in (("sub1", 50), ("sub2", 30 * 0.95), ("sub3", 20)):
        for d in ("up", "down"):
            r = by(res, name, d)
            assert 0.85 * rate * payload_share <= r["mbps"] <= 1.02 * rate, (name, d, r)
            assert r["goodput_mbps"] <= r["mbps"]
            assert 15 <= r["rtt_ms"] <= 80  # 20 ms of path plus a queue
    for d in ("up", "down"):
        assert by(res, "sub1", d)["loss"] < 0.005 and by(res, "sub3", d)["loss"] < 0.005
        # the link's own 5 %, not the ramp's overflow: bounds from the datagrams sent
        r2 = by(res, "sub2", d)
        sent = round(r2["packets"] / (1 - r2["loss"]))
        lo, hi = binomial_interval(sent, 0.05)
        assert sent >= min_trials_to_tell(0.05) and lo <= sent - r2["packets"] <= hi, (r2, sent, (lo, hi))
        agg = by(res, "sub1+sub2+sub3", d)
        assert 0.85 * 97 * payload_share <= agg["mbps"] <= 102
        assert agg["packets"] > 0 and agg["bytes"] >= agg["packets"] * 1400


def test_the_load_stays_out_of_the_subflow_counters_and_loss_estimates():
    p = lab(rates=(20,), loss=(0.0,))
    a, b = p.session("a"), p.session("b")
    sub_a, sub_b = a.subflows[1], b.subflows[1]
    before = (sub_a.tx_packets, sub_b.rx_packets)
    doc = run_test(p, duration=1.0)
    assert doc["state"] == "done"
    assert sum(r["packets"] for r in doc["results"]) > 500
    # only keepalives were counted: a few per second, not the thousands of loads
    assert sub_a.tx_packets - before[0] < 200 and sub_b.rx_packets - before[1] < 200
    # the ramp overflowed the 20 Mbit/s queue, yet the subflow's loss estimate stays clean
    assert p.link(1, "a")[0].qdropped > 0
    assert (sub_b.loss_in.ppm() or 0) < 10_000
    assert a.counters()["delivered"] == 0 and b.counters()["delivered"] == 0  # nothing handed to the tun


def test_a_lost_pull_is_sent_again():
    p = lab(sealed=False, rates=(20,))
    a = p.session("a")
    orig = a.datagrams_to_send
    dropped = []

    def lossy(now=None):
        out = orig(now)
        keep = []
        for m, d in out:
            if d[1] == wire.Op.TEST and d[wire.HEADER_LEN] == linktest.PULL and len(dropped) < 2:
                dropped.append(d)
                continue
            keep.append((m, d))
        return keep

    a.datagrams_to_send = lossy
    doc = run_test(p, duration=1.0)
    assert len(dropped) == 2  # the first round (both copies) was lost
    assert doc["state"] == "done" and doc["error"] is None
    assert by(doc["results"], "sub1", "down")["mbps"] > 15


def test_a_busy_peer_fails_only_the_down_phases_and_says_why():
    p = lab(rates=(20,))
    a, b = p.session("a"), p.session("b")
    b.start_link_test(p.now, 3.0)  # the peer runs its own test at the same time
    a.start_link_test(p.now, 1.0)
    end = p.now + 30
    while a.linktest.run.state == "running" and p.now < end:
        p.run(0.25)
    doc = a.linktest.status()
    assert doc["state"] == "done"
    assert "no load from the peer" in doc["error"]
    assert by(doc["results"], "sub1", "down")["mbps"] is None
    assert b.linktest.pulls_ignored > 0


def test_starting_is_refused_with_a_reason():
    p = SimPair(1, delay=0.01)
    a = p.session("a")
    with pytest.raises(LinkTestError, match="no established subflow"):
        a.start_link_test(p.now, 1.0)
    assert p.handshake()
    for bad in (0.1, 11, "x", None):
        with pytest.raises(LinkTestError, match="duration"):
            a.start_link_test(p.now, bad)
    a.start_link_test(p.now, 1.0)
    with pytest.raises(LinkTestError, match="already running"):
        a.start_link_test(p.now, 1.0)


def test_a_link_that_dies_mid_test_ends_the_phase_by_its_deadline():
    p = lab(rates=(20, 20))
    a = p.session("a")
    a.start_link_test(p.now, 1.0)
    p.run(0.4)
    p.set(1, up=False)
    started = p.now
    while a.linktest.run.state == "running" and p.now < started + 60:
        p.run(0.25)
    doc = a.linktest.status()
    assert doc["state"] in ("done", "failed")
    assert p.now - started < 6 * (1.0 + linktest.GRACE) + 5
    assert a.linktest.deadline() is None or a.linktest.sender is None or a.linktest.sender.done


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 2))
def test_any_test_payload_is_counted_or_ignored_never_raised(payload, member):
    p = SimPair(2, delay=0.01)
    assert p.handshake()
    b = p.session("b")
    seq = 10_000
    d = wire.encode(wire.Op.TEST, member, p.a.session_id, seq, payload)
    if len(payload) < wire.TEST_HEAD.size:
        assert isinstance(wire.decode(d), wire.DecodeError)
    p.inject("b", member, d)
    p.run(0.5)
    assert b.linktest.sender is None or b.linktest.sender.flows  # a PULL only for up members


def test_a_pull_for_members_that_are_not_up_is_ignored():
    p = SimPair(1, delay=0.01)
    assert p.handshake()
    body = linktest.PULL_BODY.pack(1000, 1000, 1) + bytes([7])
    d = wire.encode(wire.Op.TEST, 1, p.a.session_id, 10_000,
                    wire.TEST_HEAD.pack(linktest.PULL, 5, 0, 0) + body)
    p.inject("b", 1, d)
    assert p.session("b").linktest.sender is None
    assert p.session("b").linktest.pulls_ignored == 1
