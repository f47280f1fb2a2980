"""mpvpn.core.nack on its own: decisions out, no session, no callbacks."""

from mpvpn.core import wire
from mpvpn.core.nack import NackReceiver, NackRound, NackSender
from mpvpn.core.reorder import ReorderBuffer
from mpvpn.core.smpu import SessionConfig


class _Rtt:
    def __init__(self, srtt):
        self.srtt, self.rttvar = srtt, 0.001


class _Sub:
    """What NackReceiver.tick reads of a subflow (mpvpn.core.subflow.Subflow):
    ``member``, ``rtt.srtt`` and ``suspect(now)``."""

    def __init__(self, member, srtt, suspect=False):
        self.member, self.rtt, self._suspect = member, _Rtt(srtt), suspect

    def suspect(self, now):
        return self._suspect


def test_a_gap_is_asked_for_on_the_fastest_subflows_and_the_line_is_held():
    cfg = SessionConfig()
    rx = NackReceiver(cfg)
    reorder = ReorderBuffer(64, 0.1)
    reorder.push(1, "a", 0.0)
    rx.on_data(1, 1, 0.0, reorder.last)
    reorder.push(5, "e", 0.001)
    rx.on_data(1, 5, 0.001, reorder.last)  # 2, 3, 4 missing
    assert list(rx.missing) == [2, 3, 4] and rx.next is not None
    slow, fast, mid = _Sub(1, 0.050), _Sub(2, 0.010), _Sub(3, 0.020)
    r = rx.tick(rx.next, [slow, fast, mid], reorder)
    assert isinstance(r, NackRound)
    assert [wire.nack_decode(p) for p in r.payloads] == [[2, 3, 4]]
    assert [s.member for s in r.targets] == [2, 3][:cfg.nack_copies]  # fastest first
    assert r.defer is not None and r.defer > rx.last
    assert rx.nacks_sent == 1 and rx.nack_seqs == 3 and not rx.missing
    assert set(rx.asked) == {2, 3, 4}  # asked again if the re-send does not come
    # a re-send arrives: no longer asked for once the reorder buffer has it
    reorder.push(2, "b", 0.02)
    rx.on_data(2, 2, 0.02, reorder.last)
    assert rx.tick(rx.last, [fast], reorder).payloads == []  # rate limit: nothing yet


def test_a_suspect_subflow_gets_a_nack_copy_only_after_the_others():
    """The carrier that just failed under a flow caused the gap, is still
    established (no dead verdict yet) and was often the fastest: a NACK copy
    on it is lost, so with two copies only one would reach the sender."""
    for copies, want in ((None, [2, 3]), (3, [2, 3, 1])):  # 3: duplicate mode, every subflow
        rx = NackReceiver(SessionConfig())
        reorder = ReorderBuffer(64, 0.1)
        reorder.push(1, "a", 0.0)
        rx.on_data(1, 1, 0.0, reorder.last)
        reorder.push(5, "e", 0.001)
        rx.on_data(2, 5, 0.001, reorder.last)
        failed, mid, slow = _Sub(1, 0.010, suspect=True), _Sub(2, 0.020), _Sub(3, 0.050)
        r = rx.tick(rx.next, [failed, mid, slow], reorder, copies)
        assert [s.member for s in r.targets] == want


def test_reset_forgets_everything_missing():
    rx = NackReceiver(SessionConfig())
    rx.on_data(1, 10, 0.0, 0)
    assert rx.missing
    rx.reset()
    assert not rx.missing and not rx.asked and rx.next is None


def test_the_sender_resends_only_what_it_has_once_and_within_budget():
    cfg = SessionConfig(retransmit_burst=1, retransmit_budget=0.0)
    tx = NackSender(cfg)
    up = [_Sub(1, 0.01), _Sub(2, 0.02)]
    assert tx.on_nack(wire.nack_encode([7, 8, 9]), 1.0, 100, []) is None  # nothing up
    seqs = tx.on_nack(wire.nack_encode([7, 8, 9]), 1.0, 100, up)
    assert seqs == [7, 8, 9]
    assert not tx.decide(7, None, 1.0) and tx.nack_unavailable == 1
    assert not tx.decide(8, (8, b"x", [], 0.995), 1.0) and tx.nack_duplicates == 1  # just re-sent
    assert tx.decide(9, (9, b"x", []), 1.0)
    tx.spend()
    tx.resent()
    assert not tx.decide(9, (9, b"x", []), 1.0) and tx.nack_budget_drops == 1  # budget spent
    assert (tx.nacks_received, tx.nack_retransmits) == (2, 1)


def test_the_core_modules_of_this_split_stay_sans_io():
    """nack, schedbase and the session's two sides import no sockets, clocks
    or event loops (the I/O edges are the agent's)."""
    import ast
    import importlib
    banned = {"socket", "select", "selectors", "time", "asyncio", "threading", "os", "subprocess"}
    for name in ("mpvpn.core.nack", "mpvpn.core.schedbase", "mpvpn.core.smpu_send", "mpvpn.core.smpu_receive",
                 "mpvpn.core.smpu", "mpvpn.core.wire"):
        mod = importlib.import_module(name)
        tree = ast.parse(open(mod.__file__).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & banned, (name, imported & banned)


def _gap(rx, reorder, now, lost=2):
    """DATA 1 and lost + 1 arrive at ``now`` on member 1: ``lost`` is missing."""
    for seq in (lost - 1, lost + 1):
        reorder.push(seq, seq, now)
        rx.on_data(1, seq, now, reorder.last)


def test_a_round_holds_the_line_until_its_retry_at_0_1_ms_and_300_ms():
    """A round defers the hold's releases until the number can be asked for
    again (ask, re-send lost, ask again): before, the deferral ended just
    before the retry, and every lost re-send was a lost packet."""
    for srtt in (0.0001, 0.300):
        cfg = SessionConfig()
        rx = NackReceiver(cfg)
        rx.wait_min = rx.interval = max(cfg.nack_floor, min(cfg.nack_interval, srtt))
        reorder = ReorderBuffer(64, max(cfg.hold_min, 2 * srtt))  # (the session's hold: one repair)
        reorder.hold_cap = 1.0
        _gap(rx, reorder, 0.0)
        up = [_Sub(1, srtt), _Sub(2, srtt)]
        r = rx.tick(rx.next, up, reorder)
        assert [wire.nack_decode(p) for p in r.payloads] == [[2]]
        retry_at = rx.asked[2][0]
        assert rx.next == retry_at and r.defer >= retry_at  # held until the retry
        reorder.defer(r.defer)
        assert reorder.expire(retry_at - 1e-9) == []
        r2 = rx.tick(retry_at, up, reorder)  # the re-send did not come: ask again
        assert [wire.nack_decode(p) for p in r2.payloads] == [[2]] and rx.nack_again == 1


def test_a_new_gap_is_asked_for_within_the_wait_while_a_retry_is_pending():
    """A round with a re-send pending sets the timer to its retry, a round
    trip away; a gap that opens meanwhile must not wait for it (at 10 ms
    one-way delay, aggregate mode lost 5 % this way)."""
    cfg = SessionConfig()
    rx = NackReceiver(cfg)
    rx.wait = 0.004
    reorder = ReorderBuffer(64, 0.05)
    _gap(rx, reorder, 0.0)
    rx.on_data(2, 1, 0.0, reorder.last)  # member 2 delivers too, behind: no order evidence
    up = [_Sub(1, 0.020), _Sub(2, 0.020)]
    while not rx.tick(rx.next, up, reorder).payloads:
        assert rx.next < 0.010
    assert rx.next >= 0.030  # the retry
    reorder.push(5, 5, 0.010)
    rx.on_data(1, 5, 0.010, reorder.last)  # 4 missing
    assert rx.next <= 0.010 + rx.wait
    r = rx.tick(rx.next, up, reorder)
    assert 4 in wire.nack_decode(r.payloads[0])


def test_copies_puts_a_nack_on_every_subflow():
    """Duplicate mode asks on every subflow (the session passes copies)."""
    rx = NackReceiver(SessionConfig())
    reorder = ReorderBuffer(64, 0.1)
    _gap(rx, reorder, 0.0)
    up = [_Sub(1, 0.01), _Sub(2, 0.02), _Sub(3, 0.03)]
    r = rx.tick(rx.next, list(up), reorder, copies=3)
    assert sorted(s.member for s in r.targets) == [1, 2, 3]


def test_a_failed_carrier_s_whole_tail_is_tracked_and_its_round_may_hold_past_the_cap():
    """A carrier failing under a flow at 5000 packets/s shows the receiver
    one gap of ~900 numbers at once (the data comes over another carrier only
    once the sender suspects the dead one).  Every number is tracked -- the
    peer's send buffer may still hold it (before: 512, the rest given up as
    ``nack_untracked``) -- and a round asking for such a burst holds the line
    past the RTTs' cap by the time its re-sends take one after another, up to
    ``hold_limit`` (before: the tail's end was given up while its re-sends
    were still coming)."""
    cfg = SessionConfig()
    rx = NackReceiver(cfg)
    reorder = ReorderBuffer(4096, 0.05)
    reorder.hold_cap = 0.2
    t = 0.0
    for seq in range(1, 101):  # data every 0.2 ms on member 1
        reorder.push(seq, seq, t)
        rx.on_data(1, seq, t, reorder.last)
        t += 0.0002
    reorder.push(1001, 1001, t)
    rx.on_data(2, 1001, t, reorder.last)  # 101..1000 missing
    assert len(rx.missing) == 900 and rx.nack_untracked == 0
    r = rx.tick(rx.next, [_Sub(2, 0.05), _Sub(3, 0.08)], reorder)
    asked = [s for p in r.payloads for s in wire.nack_decode(p)]
    assert asked == list(range(101, 101 + 8 * wire.NACK_SPAN))  # a round's 8 NACKs; the rest next
    # 512 re-sends one after another at the data's pace (0.2 ms): ~0.1 s more
    assert 0.2 + 0.08 < r.cap < 0.2 + 0.12 and r.cap <= cfg.hold_limit
    reorder.defer(r.defer, r.cap)
    assert r.defer > t + 0.2 and reorder.expire(t + 0.2 + 0.01) == []  # 1001 still held


def test_overlapping_rounds_do_not_add_their_stretches_up():
    """Under steady loss a repair is always on its way, so deferrals
    overlap; each round's stretch of the cap is its own re-sends' serial
    time on top of the RTTs' cap, never on top of the stretch still running
    (else a few ms per round would have grown the cap to hold_limit, and a
    gap whose re-sends were all lost would hold the line for a second)."""
    cfg = SessionConfig()
    rx = NackReceiver(cfg)
    reorder = ReorderBuffer(4096, 0.05)
    reorder.hold_cap = 0.2
    up = [_Sub(2, 0.02), _Sub(3, 0.03)]
    t, seq, caps = 0.0, 1, []
    while t < 2.0:
        for _ in range(50):  # data every 0.2 ms, one in 50 lost
            seq += 1
            reorder.push(seq, seq, t)
            rx.on_data(1, seq, t, reorder.last)
            t += 0.0002
        seq += 1  # lost
        if rx.next is not None and rx.next <= t:
            r = rx.tick(t, up, reorder)
            if r.defer is not None:
                reorder.defer(r.defer, r.cap)
                caps.append(r.cap)
            reorder.expire(t)
    assert len(caps) > 100 and reorder.hold_until > t - 0.05  # the deferrals overlapped
    assert max(c for c in caps if c is not None) < 0.2 + 0.01  # one round's few numbers each
