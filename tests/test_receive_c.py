"""The receiver's out-of-order bookkeeping in the C loops (issue 17 item 3)
against the pure-Python reference it replaces, on random batches:
``ReorderBuffer.push_opened`` vs ``push_opened_py`` (same released items in
the same order, same buffer, arrivals, counters and given-up ranges) and
``NackReceiver.on_data_many`` vs ``on_data_many_py`` (same numbers missing,
in the same order, same highest numbers, timer and counters)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import fastpath
from mpvpn.core.nack import NackReceiver
from mpvpn.core.reorder import ReorderBuffer
from mpvpn.core.smpu import SessionConfig

needs_c = pytest.mark.skipif(fastpath.LOOPS is None, reason=f"C loops {fastpath.WHY}: run `make fastpath`")


def reorder_state(rb: ReorderBuffer) -> dict:
    """What a ReorderBuffer's behaviour depends on (dead arrival entries, which
    it drops lazily, left out)."""
    return {"last": rb.last, "buf": list(rb._buf.items()), "tlast": rb._tlast,
            "arrivals": [e for e in rb._arrivals if e[1] > rb.last], "skips": list(rb._skips),
            "given": sorted(rb._given), "hold_until": rb.hold_until, "len": len(rb),
            **{k: getattr(rb, k) for k in ("delivered", "duplicates", "late", "flushes", "flushed",
                                             "deadline_releases", "skipped", "given_up")},
            "next_deadline": rb.next_deadline()}


# one step: a batch of opened copies (numbers near the line), or one of the
# buffer's other paths between batches (expire, give_up, defer), time moving on
step = st.one_of(
    st.tuples(st.just("batch"), st.lists(st.integers(-6, 30), max_size=40), st.floats(0, 0.01)),
    st.tuples(st.just("expire"), st.floats(0, 0.05)),
    st.tuples(st.just("give_up"), st.lists(st.integers(1, 12), max_size=4)),
    st.tuples(st.just("defer"), st.floats(0, 0.05)),
)


@needs_c
@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 24), hold=st.sampled_from([None, 0.0, 0.005, 0.02]),
       steps=st.lists(step, max_size=25))
def test_push_opened_in_c_releases_and_keeps_what_the_python_reference_does(capacity, hold, steps):
    py, c = ReorderBuffer(capacity, hold), ReorderBuffer(capacity, hold)
    now = 1.0
    for s in steps:
        if s[0] == "batch":
            _, offsets, dt = s
            now += dt
            pairs = [(py.last + k if py.last + k > 0 else 1, f"p{py.last + k}") for k in offsets]
            assert c.push_opened(pairs, now) == py.push_opened_py(pairs, now)
        elif s[0] == "expire":
            now += s[1]
            assert c.expire(now) == py.expire(now)
        elif s[0] == "give_up":
            seqs = [py.last + k for k in s[1]]
            assert c.give_up(seqs) == py.give_up(seqs)
        else:
            c.defer(now + s[1])
            py.defer(now + s[1])
        assert reorder_state(c) == reorder_state(py)


@needs_c
def test_push_opened_hands_a_flush_and_older_given_up_ranges_to_the_python_path(monkeypatch):
    """A new number at a full buffer flushes; a copy in an older given-up
    range counts as late: the Python path does both in the middle of a C
    batch, the C loop the rest."""
    calls = []
    inner = fastpath.LOOPS.reorder_push

    def counting(*args):
        calls.append(args[1])
        return inner(*args)

    monkeypatch.setattr(fastpath.LOOPS, "reorder_push", counting)
    py, c = ReorderBuffer(4, 0.01), ReorderBuffer(4, 0.01)
    for rb in (py, c):
        rb.push(3, "3", 0.0)
        rb.expire(0.02)  # 1..2 given up
        rb.push(6, "6", 0.03)
        rb.expire(0.05)  # 4..5 given up: now the newest range
    pairs = [(k, str(k)) for k in (9, 10, 11, 12, 13, 1, 4, 7)]
    got = c.push_opened(pairs, 0.06)
    assert got == py.push_opened_py(pairs, 0.06)
    assert reorder_state(c) == reorder_state(py)
    # 13 flushed 9..13 (7..8 given up); 1 and 4 late in older ranges, 7 in the newest
    assert got == (["9", "10", "11", "12", "13"], [(9, 6), (10, 6), (11, 6), (12, 6), (13, 13)], 0, 3)
    assert c.flushes == 1 and c.late == 3
    assert calls == [0, 5, 6, 7]  # the C loop took up again after each hand-over


def nack_state(rx: NackReceiver) -> dict:
    return {"missing": list(rx.missing.items()), "rx_high": rx.rx_high, "next": rx.next,
            "high_by": {k: tuple(v) for k, v in rx.high_by.items()},
            "untracked": rx.nack_untracked}


@needs_c
@settings(max_examples=300, deadline=None)
@given(track=st.integers(1, 40), send_buffer=st.sampled_from([8, 64, 1024]),  # the peer's most: send_buffer_max
       batches=st.lists(st.tuples(st.integers(1, 3), st.lists(st.tuples(st.integers(-10, 40), st.integers(-5, 0)),
                                                              max_size=30), st.floats(0, 0.01)), max_size=20))
def test_on_data_many_in_c_notes_the_gaps_the_python_reference_notes(track, send_buffer, batches):
    cfg = SessionConfig(nack_track=track, send_buffer=send_buffer, send_buffer_max=send_buffer)
    py, c = NackReceiver(cfg), NackReceiver(cfg)
    now = 1.0
    for member, arrivals, dt in batches:
        now += dt
        base = py.rx_high
        arr = [(max(1, base + k), max(0, base + k + d)) for k, d in arrivals]
        c.on_data_many(member, arr, now)
        py.on_data_many_py(member, arr, now)
        assert nack_state(c) == nack_state(py)


@needs_c
@pytest.mark.parametrize("nack", [False, True])
def test_spread_packets_stay_in_the_c_loops_and_deliver_like_receive_datagram(nack):
    """Aggregate mode's arrivals: each packet on one subflow (packet k on
    member k % 3 + 1, as spreading does), so every subflow's batch is out of
    order; some lost.  receive_many delivers, counts and notes gaps as the
    per-packet path does, and one C loop opens, reorders and notes the gaps
    of the batches (``receive_new``; before session 6 every packet went
    through ReorderBuffer.push in Python, before session 8 three C calls
    per batch with Python between them)."""
    import random

    from test_fastpath import carry_per_member, counters, pair_of_sessions, taken_by_receive_new

    py, c = pair_of_sessions()
    py.b.nack_enabled = c.b.nack_enabled = nack
    rng = random.Random(7)

    def spread(m, d):  # packet k on member k % 3 + 1 only; 2 % lost
        return m == int.from_bytes(d[12:20], "big") % 3 + 1 and rng.random() >= 0.02

    with taken_by_receive_new() as taken:
        got_py, got_c = carry_per_member(py, c, 40, 48, 200, spread, tick=0.001)
    assert got_c == got_py and len(got_c) > 0.95 * 48 * 40
    assert counters(py.b) == counters(c.b)
    assert sum(taken) > 0.6 * len(got_c)
