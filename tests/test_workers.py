"""The pieces of a hub's data path over several processes (base.workers,
mpvpn.agent.workers) that run in one process: the option and its checks,
the message channel (real socketpair), and what stands in, in one process,
for a session another process holds.  The processes themselves:
tests/test_workers_lab.py."""

from __future__ import annotations

import socket

import pytest
from test_config import NETWORK_B, RELAYS, SITE_A, SITE_B, check, edit, errors, warnings

from mpvpn.agent import workers
from mpvpn.core import linktest


def with_workers(text: str, value: str) -> str:
    return edit(text, "\toption psk", f"\toption workers '{value}'\n\toption psk")


def test_workers_default_one_a_number_or_auto():
    cfg, problems = check(SITE_B, NETWORK_B)
    assert problems == [] and cfg.base.workers == 1
    for value, want in (("4", 4), ("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("64", 64)):
        cfg, problems = check(with_workers(SITE_B, value), NETWORK_B)
        assert problems == [] and cfg.base.workers == want, (value, problems)
    assert workers.resolve_workers("auto", cpus=2) == 2
    assert workers.resolve_workers("auto", cpus=500) == 64
    assert workers.resolve_workers(3) == 3


@pytest.mark.parametrize("value", ["0", "65", "two", "-1", "1.5"])
def test_bad_workers_is_an_error_that_says_what_fits(value):
    cfg, problems = check(with_workers(SITE_B, value), NETWORK_B)
    assert cfg is None
    errs = errors(problems)
    assert errs and all("orayboxvpn.base.workers" in e for e in errs), errs
    assert "auto" in errs[0] and "1 to 64" in errs[0]


def test_workers_is_a_server_option():
    cfg, problems = check(with_workers(SITE_A, "2"))
    assert cfg is not None and cfg.base.workers == 1
    assert any("orayboxvpn.base.workers" in w and "server option" in w for w in warnings(problems))


def test_several_workers_cannot_use_stun_or_relays():
    text = edit(with_workers(SITE_B, "2"), "\toption psk", "\tlist stun '203.0.113.1'\n\toption psk")
    cfg, problems = check(text, NETWORK_B)
    assert cfg is None and any("workers" in e and "stun" in e for e in errors(problems))
    cfg, problems = check(with_workers(SITE_B, "2") + RELAYS, NETWORK_B)
    assert cfg is None and any("workers" in e and "config relay" in e for e in errors(problems))
    cfg, problems = check(SITE_B + RELAYS, NETWORK_B)  # one process: relays as before
    assert cfg is not None, errors(problems)


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return workers.Channel(a), workers.Channel(b)


def test_channel_carries_messages_descriptors_and_packets_in_chunks():
    a, b = pair()
    try:
        r, w = socket.socketpair()
        a.send(("uplink", "telecom"), fds=[r.fileno()])
        pkts = [bytes([i % 256]) * 1400 for i in range(400)]  # 560 kB: several messages
        assert a.send_packets(7, pkts) == 0
        msgs, fds, eof = b.receive()
        assert not eof and msgs[0] == ("uplink", "telecom") and len(fds) == 1
        got = [p for m in msgs[1:] for p in m[2]]
        assert len(msgs) > 2 and all(m[:2] == ("packets", 7) for m in msgs[1:]) and got == pkts
        w.send(b"x")  # the descriptor is the socket's
        assert socket.socket(fileno=fds[0]).recv(1) == b"x"
        r.close()
        w.close()
    finally:
        a.sock.close()
        b.sock.close()


def test_a_full_channel_drops_packets_and_counts_them_and_eof_is_seen():
    a, b = pair()
    try:
        sent = dropped = 0
        while dropped == 0:
            dropped = a.send_packets(1, [b"p" * 60000])
            sent += 1 - dropped
        assert a.drops == dropped == 1 and sent > 1
        msgs, _fds, eof = b.receive()
        assert len(msgs) == sent and not eof
        a.sock.close()
        assert b.receive()[2] is True
        with pytest.raises(workers.WorkerDied):
            b.send(("status",))
    finally:
        b.sock.close()


def test_worker_sealer_passes_key_changes_on_and_mirrors_the_epochs():
    sent = []
    s = workers.WorkerSealer(sent.append, 0x1234, epoch=1)
    s.rotate(b"s" * 32, b"r" * 32, 2, defer_send=True)
    assert (s.epoch, s.prev_epoch, s.send_epoch, s.sealed) == (2, 1, 1, 0)
    s.confirm_send()
    assert s.send_epoch == 2
    s.drop_previous()
    assert s.prev_epoch is None
    s.rotate(b"t" * 32, b"u" * 32, 3)
    assert s.send_epoch == 3
    assert [m[0] for m in sent] == ["rotate", "activate", "retire", "rotate"]
    assert sent[0] == ("rotate", 0x1234, b"s" * 32, b"r" * 32, 2, True)


def test_a_session_held_elsewhere_hands_packets_over_and_has_no_timers():
    handed = []
    ws = workers.WorkerSession(0xabc, 1, lambda sid, p: handed.append((sid, list(p))) or 1)
    ws.send_many([b"a", b"b"], 0.0)
    assert handed == [(0xabc, [b"a", b"b"])] and ws.dropped == 1
    assert ws.get_timer() is None and ws.handle_timer(5.0) == [] and ws.next_event() is None
    assert ws.datagrams_by_member() == {} and not ws.connected
    ws.report(True, (1, 2), (1, 2, 3))
    assert ws.connected and len(ws.up) == 2 and len(ws.subflows) == 3
    with pytest.raises(linktest.LinkTestError, match="worker 1"):
        ws.start_link_test(0.0, 5.0)


def test_a_worker_reports_sealed_volume_to_the_main_process():
    c = workers.ConnInfo(5, "branch")
    assert c.note_sealed(2, 1000, 0.0) is False  # rekeying is the main process's decision
    assert c.sealed == (2, 1000) and c.site == "branch"


def test_the_pairs_a_worker_forwarded_between_reach_the_main_process_for_direct_offers():
    """A worker's hub forwarding is what tells the main process which sites
    talk (agent.directpeers offers them a direct path): the worker reports
    its pairs by session id, the pool maps them to the main process's
    sessions, and ``take_pairs`` hands each out once."""
    from types import SimpleNamespace

    from mpvpn.agent.workers import WorkerPool

    a, b = object(), object()
    agent = SimpleNamespace(sessions={1: a, 2: b}, clock=lambda: 0.0)
    pool = WorkerPool(agent, 2)
    pool._on_message(1, ("pairs", [(1, 2), (2, 1), (1, 99)]))  # 99: a session gone since
    assert pool.take_pairs() == {(a, b), (b, a)}
    assert pool.take_pairs() == set()
