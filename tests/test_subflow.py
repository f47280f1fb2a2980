"""The subflow state machine: 3-way open, 2-way close, keepalive, dead detection."""

import re

import pytest

from mpvpn.core import wire
from mpvpn.core.smpu import SessionConfig, SubflowDown, SubflowUp
from mpvpn.core.subflow import RESPONDER_OVERRIDES, TRANSITIONS, State, SubflowConfig
from mpvpn.core.wire import Op
from mpvpn.tools.simnet import SimPair


def ops_sent(pair, side):
    """Flush a side's queue into a list of (member, opcode) without delivering."""
    return [(m, d[1]) for m, d in pair.session(side).datagrams_to_send()]


def test_every_state_is_reachable_and_can_get_back_to_closed():
    reach = {State.CLOSED}
    changed = True
    while changed:
        changed = False
        for (s, _e), n in list(TRANSITIONS.items()) + list(RESPONDER_OVERRIDES.items()):
            if s in reach and n not in reach:
                reach.add(n)
                changed = True
    assert reach == set(State)
    for st in State:
        # from every state some path leads back to CLOSED
        seen, todo = {st}, [st]
        while todo:
            cur = todo.pop()
            for (s, _e), n in TRANSITIONS.items():
                if s is cur and n not in seen:
                    seen.add(n)
                    todo.append(n)
        assert State.CLOSED in seen


def test_three_way_open_over_clean_links():
    pair = SimPair(2, delay=0.010)
    assert pair.handshake(timeout=1.0)
    for side in "ab":
        for sub in pair.session(side).subflows.values():
            assert sub.state is State.ESTABLISHED
            # RTT measured by the handshake itself: 2 x 10 ms
            assert sub.rtt.srtt == pytest.approx(0.020, abs=0.002)
    # the initiator sent CONNECT and ACK, the responder CONNECT_ACK, per subflow
    assert pair.a.subflows[1].ups == 1 and pair.b.subflows[1].ups == 1


def test_lost_connect_is_retried_with_doubling_backoff_capped():
    cfg = SessionConfig(subflow=SubflowConfig(connect_backoff=0.2, keepalive_idle=0.75))
    pair = SimPair(0, config=cfg)
    t0 = pair.now
    pair.add_subflow(1, up=False)  # every CONNECT is lost
    link = pair.links[("a", 1)]
    seen, sent = 1, []  # the first CONNECT went out at t0
    while pair.now - t0 < 4.0:
        pair.run(0.005)
        if link.sent != seen:
            sent.append(pair.now - t0)
            seen = link.sent
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    # first retry after 0.2 s, then 0.4, then capped at keepalive_idle (0.75)
    assert sent[0] == pytest.approx(0.2, abs=0.01)
    assert gaps[0] == pytest.approx(0.4, abs=0.01)
    assert gaps[1:] and all(g == pytest.approx(0.75, abs=0.01) for g in gaps[1:])
    pair.set(1, up=True)
    pair.run(1.0)
    assert pair.a.subflows[1].established and pair.b.subflows[1].established


def test_lost_ack_responder_establishes_on_first_traffic():
    pair = SimPair(1, delay=0.005)
    # let CONNECT and CONNECT_ACK through, then lose exactly the ACK
    pair.run(0.004)  # CONNECT in flight
    pair.run(0.003)  # CONNECT arrived at b, CONNECT_ACK in flight
    pair.set(1, "a", up=False)
    pair.run(0.010)  # CONNECT_ACK arrived, a established, ACK lost
    assert pair.a.subflows[1].established
    assert pair.b.subflows[1].state is State.CONNECT_RCVD
    pair.set(1, "a", up=True)
    pair.send("a", b"hello")
    pair.run(0.05)
    assert pair.b.subflows[1].established
    assert pair.delivered["b"] == [b"hello"]


def test_lost_connect_ack_is_answered_again():
    pair = SimPair(1, delay=0.005)
    pair.set(1, "b", up=False)  # CONNECT_ACKs lost
    pair.run(0.5)
    assert pair.b.subflows[1].state is State.CONNECT_RCVD
    assert not pair.a.subflows[1].established
    pair.set(1, "b", up=True)
    pair.run(1.0)
    assert pair.a.subflows[1].established and pair.b.subflows[1].established


def test_half_open_responder_gives_up():
    cfg = SessionConfig(subflow=SubflowConfig(connect_rcvd_timeout=2.0))
    pair = SimPair(1, delay=0.005, config=cfg)
    pair.run(0.007)
    pair.set(1, up=False)
    pair.a.subflows[1].deadline = None  # initiator falls silent
    pair.run(2.5)
    assert pair.b.subflows[1].state is State.CLOSED


def _time_to_down(pair, side, member):
    for t, ev in pair.events[side]:
        if isinstance(ev, SubflowDown) and ev.member == member:
            return t
    return None


def test_dead_detected_within_half_a_second_while_data_flows():
    pair = SimPair(3, delay=0.010, jitter=0.002)
    assert pair.handshake()
    pair.stream("a", 200, 1000.0)  # traffic flowing
    t_fail = pair.now
    pair.set(2, up=False)
    pair.stream("a", 800, 1000.0, first=200)
    down = _time_to_down(pair, "a", 2)
    assert down is not None and down - t_fail <= 0.5
    # the status records the verdict: when it came, and the silence it took
    st = pair.a.subflows[2].status(pair.now)
    assert st["last_down_age"] == round(pair.now - down, 3) and st["downs"] == 1
    # dead_after + 1 active intervals: the window, however many probes it took
    assert 3 * 100 <= st["dead_after_ms"] <= 500
    # a fresh link has few answered probes to go by: more, faster probes fill the window
    m = re.fullmatch(r"no answer to (\d+) probes", st["last_down_reason"])
    assert m and int(m.group(1)) >= 3
    # duplicate mode: nothing was lost meanwhile
    pair.run(0.5)
    got = sorted(int.from_bytes(p[:4], "big") for p in pair.delivered["b"])
    assert got == list(range(1000))


def test_dead_detected_within_three_seconds_when_idle():
    pair = SimPair(2, delay=0.010)
    assert pair.handshake()
    pair.run(5.0)
    for side in "ab":
        assert all(s.established for s in pair.session(side).subflows.values())
    t_fail = pair.now
    pair.set(1, up=False)
    pair.run(4.0)
    for side in "ab":
        down = _time_to_down(pair, side, 1)
        assert down is not None and down - t_fail <= 3.0, side
    assert pair.b.subflows[1].state is State.CLOSED  # responder waits
    assert pair.a.subflows[1].state is State.CONNECT_SENT  # initiator re-probes
    assert pair.a.subflows[2].established and pair.a.connected


def test_carrier_returns_and_rejoins_within_three_keepalive_intervals():
    pair = SimPair(2, delay=0.010)
    assert pair.handshake()
    pair.set(1, up=False)
    pair.run(5.0)
    assert not pair.a.subflows[1].established
    t_back = pair.now
    pair.set(1, up=True)
    pair.run(3 * 0.75)
    ups = [t for t, ev in pair.events["a"] if isinstance(ev, SubflowUp) and ev.member == 1 and t >= t_back]
    assert ups and ups[0] - t_back <= 3 * 0.75
    assert pair.b.subflows[1].established


def test_one_way_failure_takes_the_subflow_down_on_both_sides():
    pair = SimPair(2, delay=0.010)
    assert pair.handshake()
    pair.set(1, "b", up=False)  # b -> a dead, a -> b still works
    pair.run(5.0)
    assert not pair.a.subflows[1].established
    assert not pair.b.subflows[1].established
    assert pair.a.subflows[2].established


def test_lossy_but_alive_link_is_not_declared_dead():
    # 20 % loss each way: 36 % of probe round trips fail; fixed 3-probe rule
    # would flap every few seconds.  The adaptive plan must hold it up.
    pair = SimPair(1, delay=0.015, jitter=0.003, loss=0.20, seed=3)
    assert pair.handshake(timeout=10)
    for _ in range(20):
        pair.stream("a", 100, 500.0)  # 0.2 s of traffic
        pair.run(1.5)  # idle
    assert pair.a.subflows[1].downs == 0 and pair.b.subflows[1].downs == 0
    interval, need = pair.a.subflows[1].probe_plan(pair.now)
    assert need > 3 and interval < 0.75


def test_probe_plan_keeps_detection_window_on_lossy_links():
    pair = SimPair(1)
    sub = pair.a.subflows[1]
    c = sub.config
    # unmeasured: counted as lossy (many probes in the same window) ...
    interval, need = sub.probe_plan(pair.now)
    assert need > c.dead_after + 5
    assert interval * (need + 1) == pytest.approx(c.keepalive_idle * (c.dead_after + 1))
    # ... until enough probes came back: then the configured plan
    for _ in range(300):
        sub.probe_fail.observe(True)
    assert sub.probe_plan(pair.now) == (c.keepalive_idle, c.dead_after)
    sub.loss_out_ppm = 300_000
    interval, need = sub.probe_plan(pair.now)
    assert need > c.dead_after
    assert interval * (need + 1) == pytest.approx(c.keepalive_idle * (c.dead_after + 1))


def test_two_way_close_and_lost_close_ack_retries():
    pair = SimPair(2, delay=0.005)
    assert pair.handshake()
    pair.a.remove_subflow(1, pair.now)
    pair.run(0.1)
    assert 1 not in pair.a.subflows
    assert pair.b.subflows[1].state is State.CLOSED
    assert pair.a.connected and pair.a.subflows[2].established
    # now lose the CLOSE_ACK: the closer retries, then gives up and closes anyway
    pair.set(2, "b", up=False)
    pair.b.remove_subflow(2, pair.now)
    pair.run(2.0)
    assert 2 not in pair.b.subflows
    assert not pair.b.connected


def test_close_reason_travels_in_close():
    pair = SimPair(1, delay=0.005)
    assert pair.handshake()
    pair.a.close(pair.now)
    out = pair.a.datagrams_to_send()
    assert len(out) == 1
    h = wire.decode(out[0][1])
    assert h.opcode == Op.CLOSE
    assert out[0][1][-1] == wire.CloseReason.SHUTDOWN


def test_stray_control_datagrams_are_ignored_and_counted():
    pair = SimPair(1, delay=0.005)
    assert pair.handshake()
    sub = pair.b.subflows[1]
    before = sub.unexpected
    # responder receives a CONNECT_ACK: responders never get one
    d = wire.encode(Op.CONNECT_ACK, 1, pair.b.session_id, 99, wire.CONNECT_ACK.pack(1, 2))
    pair.inject("b", 1, d)
    assert sub.unexpected == before + 1 and sub.established
    # a CLOSE_ACK while established is not in the table
    pair.inject("b", 1, wire.encode(Op.CLOSE_ACK, 1, pair.b.session_id, 100))
    assert sub.unexpected == before + 2 and sub.established


def test_keepalives_measure_rtt_and_report_loss_to_the_sender():
    pair = SimPair(1, delay=0.020, seed=5)
    assert pair.handshake()
    pair.set(1, "a", loss=0.10)
    for _ in range(15):
        pair.stream("a", 200, 1000.0)
    sub = pair.a.subflows[1]
    assert sub.rtt.srtt == pytest.approx(0.040, abs=0.005)
    # b measured a->b loss from a's counters and told a
    assert sub.loss == pytest.approx(0.10, abs=0.04)
    assert pair.b.subflows[1].loss_in.loss == pytest.approx(0.10, abs=0.04)
    assert pair.b.subflows[1].loss in (None, 0.0)


def test_config_validation():
    with pytest.raises(ValueError):
        SubflowConfig(keepalive_active=1.0, keepalive_idle=0.5).validate()
    with pytest.raises(ValueError):
        SubflowConfig(dead_after=0).validate()
    with pytest.raises(ValueError):
        SubflowConfig(keepalive_startup=0.0).validate()
    SubflowConfig(keepalive_active=0.01, keepalive_startup=0.02).validate()  # (the agent's minimum)
    with pytest.raises(ValueError):
        SessionConfig(send_buffer=1000).validate()


def test_reopen_after_an_endpoint_moved_runs_the_handshake_again():
    pair = SimPair(2, delay=0.005)
    assert pair.handshake()
    sub = pair.a.subflows[1]
    sub.open(pair.now)  # the uplink got a new address
    assert sub.state is State.CONNECT_SENT
    assert pair.a.connected  # the other subflow carries on
    pair.run(0.2)
    assert sub.established and pair.b.subflows[1].established
    downs = [ev for _, ev in pair.events["a"] if isinstance(ev, SubflowDown)]
    assert [(d.member, d.reason) for d in downs] == [(1, "endpoint changed")]
    with pytest.raises(RuntimeError):
        pair.b.subflows[1].open(pair.now)  # responders never open


def _bare_subflow():
    from mpvpn.core.subflow import Subflow
    emitted = []
    sub = Subflow(3, True, SubflowConfig(), lambda s, op, p: emitted.append(op),
                  lambda *a: None)
    return sub, emitted


def test_subflow_counts_what_it_sent_and_received_through_its_methods():
    sub, _ = _bare_subflow()
    sub.on_sent(40)
    sub.on_data_sent(3, 3000, 1.0)
    assert (sub.tx_packets, sub.tx_bytes, sub.data_tx, sub.data_tx_at) == (4, 3040, 3, 1.0)
    sub.on_receive(100, 2.0)
    sub.on_receive(900, 2.5, 3)
    assert (sub.rx_packets, sub.rx_bytes, sub.last_rx) == (4, 1000, 2.5)
    sub.on_data(2.5, 2)
    sub.on_stale(4, 1)
    sub.on_malformed()
    st = sub.status(3.0)
    assert (st["data_rx"], st["duplicates"], st["late"], st["malformed"]) == (2, 4, 1, 1)


def test_a_new_source_moves_the_remote_and_counts_a_roam_only_when_it_changes():
    sub, _ = _bare_subflow()
    sub.on_source(("10.0.0.1", 1))
    assert (sub.remote, sub.roams) == (("10.0.0.1", 1), 0)  # the first one is no roam
    sub.on_source(("10.0.0.1", 1))
    assert sub.roams == 0
    sub.on_source(("10.0.0.2", 1))
    assert (sub.remote, sub.roams) == (("10.0.0.2", 1), 1)


def test_a_stale_copy_counts_as_received_and_as_duplicate_or_late():
    sub, _ = _bare_subflow()
    sub.on_stale_copy(100, 1.0, False)
    sub.on_stale_copy(50, 2.0, True)
    assert (sub.rx_packets, sub.rx_bytes, sub.last_rx, sub.duplicates, sub.late) == (2, 150, 2.0, 1, 1)


def test_authentic_new_data_counts_once():
    # (an unauthentic one never reaches the subflow: test_smpu's forged-datagram test)
    sub, _ = _bare_subflow()
    sub.on_data_received(1000, 1.0)
    assert (sub.rx_packets, sub.rx_bytes, sub.data_rx, sub.last_rx) == (1, 1000, 1, 1.0)


def _lossy_runs(loss: float, seeds, seconds: float = 4.0):
    """Fresh sessions of three subflows at ``loss`` each way (random, seeded):
    data for 0.5 s, then idle for 0.5 s, repeated -- so the start, the idle
    and the active probe plans and the turns between them all occur.
    Returns the pairs."""
    pairs = []
    for seed in seeds:
        pair = SimPair(3, delay=0.015, jitter=0.003, loss=loss, seed=seed)
        assert pair.handshake(timeout=30)
        for _ in range(int(seconds)):
            pair.stream("a", 250, 500.0)
            pair.run(0.5)
        pairs.append(pair)
    return pairs


@pytest.mark.parametrize("loss", [0.20, 0.30])
def test_no_subflow_goes_down_at_20_and_30_percent_random_loss(loss):
    """Dead detection sizes its count of missed probes to the measured loss
    (probe_false_dead = 1e-6 per probe interval) and treats a link it knows
    nothing about yet as lossy.  Over N probe intervals a correct rule gives
    a number of false downs inside the binomial bound for N at 1e-6; the
    fixed 3-probe rule at the start (loss not yet measured) fails a probe
    interval with (1 - (1 - loss)**2)**3 = 4.7 % (20 %) / 13 % (30 %): it
    went down in 4 of 10 fresh 20 % sessions."""
    from stats import binomial_interval

    pairs = _lossy_runs(loss, range(16))
    subs = [s for pair in pairs for side in "ab" for s in pair.session(side).subflows.values()]
    intervals = sum(s.probes_sent for s in subs)
    downs = sum(s.downs for s in subs)
    assert intervals > 2000  # the sample the bound is for
    assert downs <= binomial_interval(intervals, 1e-6)[1], [s.last_down_reason for s in subs if s.downs]
    # the plan did adapt: more probes, faster, in the same window
    interval, need = pairs[0].a.subflows[1].probe_plan(pairs[0].now)
    assert need > 3 and interval < 0.75


@pytest.mark.parametrize("loss", [0.20, 0.30])
def test_a_cut_carrier_is_still_detected_within_the_window_at_high_loss(loss):
    """However many probes the lossy link needs, a cut carrier goes down
    (dead_after + 1) active intervals after its last answer, as on a clean one."""
    pair = _lossy_runs(loss, [5], seconds=2.0)[0]
    sub = pair.a.subflows[2]
    c = sub.config
    pair.stream("a", 100, 500.0)
    assert sub.established
    t_cut = pair.now
    pair.set(2, up=False)
    pair.stream("a", 500, 500.0)
    down = _time_to_down(pair, "a", 2)
    rto = sub.rtt.timeout() or 0.0
    window = max((c.dead_after + 1) * c.keepalive_active, rto)
    assert down is not None and down > t_cut
    # silence from the last answer (one may still arrive just after the cut)
    # to the verdict: the window, plus at most one probe interval
    assert sub.dead_silence <= window + sub.probe_plan(pair.now)[0] + 1e-9
    assert down - t_cut <= window + sub.probe_plan(pair.now)[0] + sub.rtt.srtt
    assert pair.a.subflows[1].established and pair.a.subflows[3].established


def test_probe_failure_prior_and_evidence():
    from mpvpn.core.linkstats import ProbeFailure
    pf = ProbeFailure()
    assert pf.rate == pytest.approx(1 / 3)  # nothing known: as lossy as 20 % each way
    for _ in range(5):
        pf.observe(True)
    assert pf.rate < 0.01  # a few answered probes: clean
    for _ in range(400):
        pf.observe(False)
        pf.observe(True)
        pf.observe(True)
    assert pf.rate == pytest.approx(1 / 3, abs=0.01)  # the share over the window


def test_the_peers_own_keepalives_count_as_answers():
    """An echo of ours in the peer's KEEPALIVE proves our direction just as
    its KEEPALIVE-ACK does: probes it covers are no longer unanswered."""
    pair = SimPair(1, delay=0.010)
    assert pair.handshake()
    pair.run(3.0)
    a, b = pair.a.subflows[1], pair.b.subflows[1]
    a._next_probe = pair.now  # a probes now; its answer is lost
    pair.set(1, "b", up=False)
    pair.session("a").handle_timer(pair.now)
    pair.run(0.05)
    assert a.probes_unanswered >= 1
    pair.set(1, "b", up=True)
    b._next_probe = pair.now  # b's own keepalive echoes a's probe
    pair.session("b").handle_timer(pair.now)
    pair.run(0.015)
    assert a.probes_unanswered == 0


def test_a_ramping_meter_probes_every_half_rtt_without_hastening_the_dead_verdict():
    """While its link meter is in start-up and the scheduler holds traffic for
    it (LinkMeter.ramping), a subflow probes every half RTT (each echo may
    double the estimate) instead of every keepalive_active; the dead verdict
    still waits for dead_after probe intervals of silence."""
    pair = SimPair(2, delay=0.020)  # RTT 40 ms: a probe every 20 ms while ramping
    assert pair.handshake()
    sf = pair.a.subflows[1]

    def probes():
        return sf.tx_packets - sf.data_tx

    def stream(seconds, ramping, first):
        n, end = first, pair.now + seconds
        while pair.now < end:
            if ramping:
                sf.meter.held = True  # as the scheduler does while the link is full
            pair.send("a", n.to_bytes(4, "big") + bytes(96))
            n += 1
            pair.run(0.005)
        return n

    n = stream(0.3, False, 0)  # data flowing: the active interval
    p0 = probes()
    n = stream(1.0, False, n)
    assert sf.meter.startup and 8 <= probes() - p0 <= 12  # every 100 ms
    p0 = probes()
    n = stream(1.0, True, n)
    assert 40 <= probes() - p0 <= 55  # every ~20 ms
    t_fail = pair.now
    pair.set(1, up=False)
    stream(1.0, True, n)
    down = _time_to_down(pair, "a", 1)
    assert down is not None and 0.3 <= down - t_fail <= 0.5  # as without ramping


def test_an_unanswered_probe_is_followed_by_the_next_one_an_rto_later_while_data_flows():
    """While user data flows, the one probe outstanding still unanswered after
    an RTO brings the next probe at once (the scheduler suspects a subflow on
    its second unanswered probe), not a keepalive_active later; once, and
    the dead verdict still waits for its silence."""
    pair = SimPair(2, delay=0.010)  # RTT 20 ms, RTO ~20-30 ms
    assert pair.handshake()
    sf = pair.a.subflows[1]
    n = 0

    def step():
        nonlocal n
        pair.send("a", n.to_bytes(4, "big") + bytes(96))
        n += 1
        pair.run(0.001)

    for _ in range(500):  # data flowing: the active interval, probes answered
        step()
    assert sf.probes_unanswered <= 1
    while sf.probes_unanswered:  # just after an answer
        step()
    t_fail, heard = pair.now, sf.last_answer
    pair.set(1, up=False)
    sent = []  # when each probe after the cut left
    p = sf.tx_packets - sf.data_tx
    while len(sent) < 3 and pair.now - t_fail < 1.0:
        step()
        q = sf.tx_packets - sf.data_tx
        if q != p:
            sent.append(pair.now)
            p = q
    gap = sf.config.keepalive_active
    assert len(sent) == 3 and sent[0] - t_fail <= gap + 0.002
    rto = sf.rtt.timeout()
    assert sent[1] - sent[0] <= rto + 0.002 < gap / 2  # the re-probe
    assert sent[2] - sent[1] >= gap - rto - 0.002  # then the regular schedule
    while pair.now - t_fail < 1.0:
        step()
    down = _time_to_down(pair, "a", 1)
    # silence decides, as before: dead_after probe intervals since the last answer
    assert down is not None and 0.3 <= down - heard <= 0.5
