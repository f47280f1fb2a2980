"""The C loops (mpvpn.core._fastpath) against the pure-Python path they replace:
same datagrams on the wire, same deliveries, same counters."""

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import fastpath
from mpvpn.core.seal import Sealer
from mpvpn.core.smpu import Session
from mpvpn.tools.simnet import SimPair

needs_c = pytest.mark.skipif(fastpath.LOOPS is None, reason=f"C loops {fastpath.WHY}: run `make fastpath`")

K1, K2 = bytes(range(32)), bytes(range(32, 64))


def pair_of_sessions(cipher="chacha20-poly1305"):
    """Two established sender sessions with the same keys and subflows (one
    per path), and their receivers."""
    pairs = []
    for _ in range(2):
        p = SimPair(3, delay=0.001,
                    sealers=(Sealer(K1, K2, 1, cipher=cipher), Sealer(K2, K1, 1, cipher=cipher)))
        assert p.handshake()
        pairs.append(p)
    return pairs


def counters(sess: Session):
    c = sess.counters()
    links = {m: {k: v for k, v in s.status(0.0).items()
                 if k in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "data_tx", "data_rx",
                          "duplicates", "late")}
             for m, s in sess.subflows.items()}
    return c, links


def sendbuf_entries(sess: Session):
    """The send buffer as NACK re-sends find it: sealed bytes and the members that carried them."""
    return [None if e is None else (e[0], e[1], [s.member for s in e[2]]) for e in sess._sendbuf]


@needs_c
@pytest.mark.parametrize("cipher", ["chacha20-poly1305", "aes-256-gcm"])
def test_send_many_makes_the_same_datagrams_as_send(cipher):
    py, c = pair_of_sessions(cipher)
    rng = random.Random(1)
    for _ in range(20):
        batch = [rng.randbytes(rng.randint(1, 1400)) for _ in range(rng.randint(1, 40))]
        now = py.now
        for p in batch:
            assert py.a.send(p, now)
        assert c.a.send_many(batch, now) == len(batch)
        assert sorted(py.a.datagrams_to_send()) == sorted(c.a.datagrams_to_send())
    assert counters(py.a) == counters(c.a)
    assert sendbuf_entries(py.a) == sendbuf_entries(c.a)
    # the C loops' packets count towards the key's rekey budget as send's do
    assert c.a.sealer.sealed == py.a.sealer.sealed >= py.a.sent > 0


@needs_c
@pytest.mark.parametrize("mode", ["aggregate", "adaptive"])
def test_send_many_with_a_queueing_scheduler_makes_send_s_datagrams_in_send_s_order(mode):
    """The scheduler decides per packet in both; the C loops seal runs of
    packets bound for the same subflows.  Same datagrams, same order, same
    send buffer, same scheduler queue; TCP runs and small (urgent, copied)
    packets mixed, some batches overflowing the links so packets queue."""
    from mpvpn.core.scheduler import make_scheduler

    py, c = pair_of_sessions()
    for p in (py, c):
        p.a.scheduler = make_scheduler(mode, initial_rate=2e6)
    rng = random.Random(3)
    queued_behind = []  # packets queued by offer_blocked (no room: the pump skipped)
    inner = c.a.scheduler.offer_blocked

    def counting(packets, start, up, now):
        r = inner(packets, start, up, now)
        queued_behind.append(r[0] - start)
        return r

    c.a.scheduler.offer_blocked = counting

    def pkt(sport, size, flags=0x10):
        ip = bytes([0x45, 0]) + size.to_bytes(2, "big") + bytes(4) + bytes([64, 6, 0, 0]) \
            + bytes([192, 168, 10, 2, 192, 168, 20, 2])
        tcp = sport.to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(8) + bytes([0x50, flags]) + bytes(6)
        return ip + tcp + rng.randbytes(size - 40)

    for round_ in range(40):
        batch = []
        for _ in range(rng.randint(1, 50)):
            r = rng.random()
            batch.append(pkt(40000 + rng.randint(0, 3), 40, 0x10) if r < 0.1 else  # pure ACK: urgent
                         pkt(40000 + rng.randint(0, 3), rng.randint(200, 1400)))
        now = py.now + round_ * 0.002
        acc_py = sum(1 for p in batch if py.a.send(p, now))
        acc_c = c.a.send_many(batch, now)
        assert acc_c == acc_py
        assert c.a.datagrams_to_send() == py.a.datagrams_to_send()
        assert c.a.scheduler.pending == py.a.scheduler.pending
        for p in (py, c):  # time passes: queued packets leave
            p.a.handle_timer(now + 0.001)
        assert c.a.datagrams_to_send() == py.a.datagrams_to_send()
    assert counters(py.a) == counters(c.a)
    assert c.a.scheduler.c == py.a.scheduler.c
    assert sum(queued_behind) > 50
    assert sendbuf_entries(py.a) == sendbuf_entries(c.a)
    assert c.a.sealer.sealed == py.a.sealer.sealed >= py.a.sent > 0


@needs_c
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_receive_many_delivers_and_counts_like_receive_datagram(data):
    """Copies on three paths, dropped, reordered, duplicated and corrupted at
    random; with or without NACK bookkeeping (base.nack 1 in duplicate mode)."""
    py, c = pair_of_sessions()
    nack = data.draw(st.booleans())
    py.b.nack_enabled = c.b.nack_enabled = nack
    n = data.draw(st.integers(1, 120))
    for i in range(n):
        py.a.send(i.to_bytes(4, "big") + bytes(data.draw(st.integers(0, 60))), py.now)
    sent = py.a.datagrams_to_send()
    arrivals = []
    for m, d in sent:
        r = data.draw(st.integers(0, 9))
        if r == 0:
            continue  # lost
        if r == 1:
            d = d[:-1] + bytes([d[-1] ^ 1])  # corrupted tag
        arrivals.append((m, d))
        if r == 2:
            arrivals.append((m, d))  # duplicated
    perm = data.draw(st.permutations(range(len(arrivals))))
    if data.draw(st.booleans()):
        arrivals = [arrivals[k] for k in perm]  # reordered
    # batches per member as a socket would hand them over
    got_py, got_c = [], []
    i = 0
    while i < len(arrivals):
        m = arrivals[i][0]
        j = i
        while j < len(arrivals) and arrivals[j][0] == m:
            j += 1
        batch = [d for _, d in arrivals[i:j]]
        for d in batch:
            got_py += py.b.receive_datagram(d, m, py.now)
        got_c += c.b.receive_many(batch, m, c.now)
        i = j
        # the same numbers missing (asked for), the same highest seen
        crx, pyrx = c.b.nack_rx, py.b.nack_rx
        assert list(crx.missing) == list(pyrx.missing)
        assert crx.rx_high == pyrx.rx_high
        assert {k: v[0] for k, v in crx.high_by.items()} == {k: v[0] for k, v in pyrx.high_by.items()}
    got_py += py.b.handle_timer(py.now + 10)
    got_c += c.b.handle_timer(c.now + 10)
    assert got_c == got_py
    assert counters(py.b) == counters(c.b)
    assert c.b.sealer.bad_tag <= py.b.sealer.bad_tag  # C counts a bad tag in auth_failures only


@needs_c
def test_stale_copy_below_the_newest_given_up_range_takes_the_full_path():
    py, c = pair_of_sessions()
    for s in (py, c):
        for i in range(30):
            s.a.send(bytes([i]) * 20, s.now)
    dg = {p: [d for m, d in p.a.datagrams_to_send() if m == 1] for p in (py, c)}
    for p, receive in ((py, lambda b, d: [x for x in d for x in b.receive_datagram(x, 1, py.now)]),
                       (c, lambda b, d: c.b.receive_many(d, 1, c.now))):
        d = dg[p]
        receive(p.b, d[:5] + d[10:20])  # 6..10 missing
        p.b.handle_timer(p.now + 10)  # given up: 6..10 skipped
        receive(p.b, d[20:30] + [d[3], d[7]] + d[25:26])  # dup below the range, late, dup
    assert counters(py.b) == counters(c.b)
    assert c.b.reorder.late == 1 and c.b.reorder.duplicates == 2


def test_datagrams_by_member_hands_everything_out_once():
    py, c = pair_of_sessions()
    for s in (py, c):
        s.a.send_many([b"x" * 100, b"y" * 100], s.now)
        s.a.subflows[1].on_timer(s.now + 30)  # a keepalive into the control queue
    for s in (py, c):
        first = s.a.datagrams_by_member()
        assert sorted(first) == [1, 2, 3] and len(first[1]) == 3 and len(first[2]) == 2
        assert s.a.datagrams_by_member() == {} and s.a.datagrams_to_send() == []


LAYOUT = ("HLEN", "TAG", "OP_DATA", "F_SEALED", "VERSION", "OFF_VERSION", "OFF_OPCODE",
          "OFF_MEMBER", "OFF_FLAGS", "OFF_SESSION", "OFF_LENGTH", "OFF_EPOCH", "OFF_RESERVED",
          "OFF_SEQ")


@needs_c
def test_the_c_loops_use_wire_py_s_datagram_layout():
    """_fastpath.c compiles the DATA layout in as #defines; each must equal
    wire.py's (the source of truth), so an edit to one side alone fails here."""
    from mpvpn.core import wire
    expected = {"HLEN": wire.HEADER_LEN, "TAG": wire.TAG_LEN, "OP_DATA": wire.DATA,
                "F_SEALED": wire.F_SEALED, "VERSION": wire.VERSION}
    expected.update({k: getattr(wire, k) for k in LAYOUT if k.startswith("OFF_")})
    assert set(expected) == set(LAYOUT)
    got = {k: getattr(fastpath.LOOPS, k) for k in LAYOUT}
    assert got == expected


@contextlib.contextmanager
def taken_by_receive_new():
    """While inside: a list of what each call of the C loop ``receive_new``
    took (datagrams accepted)."""
    taken = []
    inner = fastpath.LOOPS.receive_new

    def counting(*args):
        r = inner(*args)
        taken.append(r[8])
        return r

    fastpath.LOOPS.receive_new = counting
    try:
        yield taken
    finally:
        fastpath.LOOPS.receive_new = inner


def carry_per_member(py, c, rounds, per_round, size, keep, tick=None):
    """Send ``rounds`` x ``per_round`` numbered packets of ``size`` + 4 bytes
    with ``py.a``; of its datagrams keep those ``keep(member, datagram)``
    says, and hand each member's batch to ``py.b`` datagram by datagram and to
    ``c.b`` at once (``receive_many``), checking after each batch that both
    miss the same numbers (NACK state), and after each round run both
    receivers' timers ``tick`` seconds on, if given.  Returns what each
    delivered, after a last timer 10 s on."""
    got_py, got_c = [], []
    for k in range(rounds):
        for i in range(per_round):
            py.a.send((per_round * k + i).to_bytes(4, "big") + bytes(size), py.now)
        by_member = {}
        for m, d in py.a.datagrams_to_send():
            if keep(m, d):
                by_member.setdefault(m, []).append(d)
        for m, batch in by_member.items():
            for d in batch:
                got_py += py.b.receive_datagram(d, m, py.now)
            got_c += c.b.receive_many(batch, m, c.now)
            assert list(c.b.nack_rx.missing.items()) == list(py.b.nack_rx.missing.items())
            assert c.b.nack_rx.next == py.b.nack_rx.next
        if tick is not None:
            got_py += py.b.handle_timer(py.now + tick)
            got_c += c.b.handle_timer(c.now + tick)
    got_py += py.b.handle_timer(py.now + 10)
    got_c += c.b.handle_timer(c.now + 10)
    return got_py, got_c


@needs_c
@pytest.mark.parametrize("nack", [False, True])
def test_while_a_gap_is_open_the_c_loop_opens_new_copies_like_receive_datagram(nack):
    """20 % loss on each of three paths: a gap is open nearly all the time
    (copies come per path, batch after batch), and the C loop carries the
    batches (receive_new: open, reorder, NACK gaps; before session 6 the
    per-packet Python path did, at about twice the CPU of a clean run).
    Same deliveries, counters and NACK state as the per-packet path."""
    py, c = pair_of_sessions()
    py.b.nack_enabled = c.b.nack_enabled = nack
    rng = random.Random(5)
    with taken_by_receive_new() as calls:
        got_py, got_c = carry_per_member(py, c, 30, 64, 100, lambda m, d: rng.random() >= 0.2)
    assert got_c == got_py and len(got_c) > 0.98 * 64 * 30
    assert counters(py.b) == counters(c.b)
    assert len(calls) > 10


@needs_c
@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 12), nack=st.booleans(), loss=st.sampled_from([0.0, 0.05, 0.3]),
       seed=st.integers(0, 2**32 - 1))
def test_a_small_reorder_buffer_flushes_compacts_and_gives_up_like_receive_datagram(capacity, nack,
                                                                                    loss, seed):
    """Spread packets (each on one path), lost at random, into a reorder buffer
    of a few places: the C loop stops before a flush and after its arrivals
    deque passes its limit, and NACK rounds give numbers up ahead of the line
    (open_new's path): same deliveries, counters and NACK state as the
    per-packet path, batch after batch."""
    from mpvpn.core.smpu import SessionConfig

    pairs = []
    for _ in range(2):
        p = SimPair(3, delay=0.001, config=SessionConfig(reorder_capacity=capacity),
                    sealers=(Sealer(K1, K2, 1), Sealer(K2, K1, 1)))
        assert p.handshake()
        p.b.nack_enabled = nack
        pairs.append(p)
    py, c = pairs
    rng = random.Random(seed)

    def keep(m, d):
        return m == int.from_bytes(d[12:20], "big") % 3 + 1 and rng.random() >= loss

    with taken_by_receive_new() as taken:
        got_py, got_c = carry_per_member(py, c, 8, 40, 30, keep, tick=0.002)
    assert got_c == got_py
    assert counters(py.b) == counters(c.b)
    assert c.b.reorder.flushes == py.b.reorder.flushes
    assert sum(taken) > len(got_c) / 4  # the C loop took batches between its stops


@needs_c
def test_receive_new_compacts_the_arrivals_and_leaves_given_up_numbers_to_open_new(monkeypatch):
    """Arrivals 2, 4, 1, 6, 3, 8, 5, ... keep the reorder buffer from running
    empty while released entries pile up in its arrivals deque (the C loop
    stops after it passes its limit; the buffer compacts it); numbers given
    up ahead of the line make the batch take open_new and push's Python path.
    Same deliveries and counters as the per-packet path."""
    from mpvpn.core.smpu import SessionConfig

    calls = {"open_new": 0, "receive_new": 0}
    for name in calls:
        inner = getattr(fastpath.LOOPS, name)

        def counting(*args, inner=inner, name=name):
            calls[name] += 1
            return inner(*args)

        monkeypatch.setattr(fastpath.LOOPS, name, counting)
    sessions = []
    for _ in range(2):
        p = SimPair(1, delay=0.001, config=SessionConfig(reorder_capacity=4),
                    sealers=(Sealer(K1, K2, 1), Sealer(K2, K1, 1)))
        assert p.handshake()
        for i in range(60):
            assert p.a.send(bytes([i]) * 30, p.now)
        sessions.append(p)
    py, c = sessions
    dg = {s: {int.from_bytes(d[12:20], "big"): d for _, d in s.a.datagrams_to_send()} for s in sessions}
    base = min(dg[py])
    order = [2, 4, 1]
    for k in range(3, 25):
        order += [2 * k, 2 * k - 3]
    got_py = [x for s in order for x in py.b.receive_datagram(dg[py][base - 1 + s], 1, py.now)]
    got_c = c.b.receive_many([dg[c][base - 1 + s] for s in order], 1, c.now)
    assert got_c == got_py and len(got_c) > 40
    assert counters(py.b) == counters(c.b)
    assert calls["open_new"] == 0 and calls["receive_new"] >= 3  # it stopped to compact
    assert len(c.b.reorder._arrivals) <= 2 * 4
    for s in sessions:
        assert s.b.reorder.give_up([base + 49, base + 51]) == []
    rest = [51, 53, 47, 54, 49, 56, 55, 58, 57, 60, 59]  # 50, 52 never come
    got_py = [x for s in rest for x in py.b.receive_datagram(dg[py][base - 1 + s], 1, py.now)]
    got_c = c.b.receive_many([dg[c][base - 1 + s] for s in rest], 1, c.now)
    assert got_c == got_py and len(got_c) > 5
    assert counters(py.b) == counters(c.b)
    assert py.b.reorder.given_up == c.b.reorder.given_up > 0
    assert calls["open_new"] > 0


@needs_c
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=8)), max_size=60),
       st.dictionaries(st.integers(0, 5), st.lists(st.binary(max_size=4), max_size=3), max_size=3))
def test_group_pairs_groups_like_datagrams_by_member_s_loop(pairs, runs):
    """datagrams_by_member's per-datagram loop (aggregate/adaptive queue
    (member, datagram) pairs) in C: the same runs, in the same order, from a
    deque as the session holds them, onto runs already there (send_many's)."""
    from collections import deque

    ref = {m: list(r) for m, r in runs.items()}
    for m, d in pairs:
        ref.setdefault(m, []).append(d)
    got = {m: list(r) for m, r in runs.items()}
    assert fastpath.LOOPS.group_pairs(deque(pairs), got) is None
    assert got == ref and list(got) == list(ref)
