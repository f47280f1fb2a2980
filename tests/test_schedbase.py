"""The scheduler interface (mpvpn.core.schedbase): what Session asks of every
scheduling mode, duplicate mode included."""

import pytest

from mpvpn.core.schedbase import DuplicateAll, FunctionScheduler, PacketScheduler, as_scheduler
from mpvpn.core.scheduler import Scheduler, make_scheduler
from mpvpn.core.smpu import duplicate_all
from mpvpn.tools.simnet import SimPair


def test_every_mode_implements_the_interface():
    assert isinstance(duplicate_all, DuplicateAll)
    for mode in ("duplicate", "aggregate", "adaptive"):
        s = make_scheduler(mode)
        assert isinstance(s, PacketScheduler) and isinstance(s, Scheduler)
        assert as_scheduler(s) is s
    with pytest.raises(TypeError):
        PacketScheduler()  # __call__ is abstract


def test_duplicate_all_answers_every_question_the_session_asks():
    d = DuplicateAll()
    up = ("a", "b")
    assert d(b"x", up, 0.0) == up
    assert d.duplicates_everything and not d.queueing and not d.nack
    assert (d.pending, d.dropped, d.initial_rate, d.status(up, 0.0)) == (0, 0, None, None)
    assert not d.retransmit_pending() and d.pull_retransmit(up, 0.0) is None
    assert d.next_release() is None


class _Sub:
    def __init__(self, member):
        self.member = member


def test_default_retransmit_targets_avoid_the_carrier():
    d = DuplicateAll()
    s1, s2, s3 = _Sub(1), _Sub(2), _Sub(3)
    assert d.retransmit_targets([s1], [s1, s2, s3], 0.0) == [s2]
    assert d.retransmit_targets([s1, s2, s3], [s1, s2, s3], 0.0) == [s1]  # all carried it


def test_a_plain_hook_is_adapted_with_its_flags_read_once():
    def hook(packet, up, now):
        return up[:1]
    hook.nack = True
    f = as_scheduler(hook)
    assert isinstance(f, FunctionScheduler) and f.nack and not f.duplicates_everything
    assert f(b"x", [1, 2], 0.0) == [1]
    with pytest.raises(TypeError):
        as_scheduler(42)


def test_the_session_returns_what_was_assigned_and_uses_its_interface():
    pair = SimPair(2)
    assert pair.handshake()
    s = make_scheduler("aggregate")
    pair.a.scheduler = s
    assert pair.a.scheduler is s and pair.a.nack_enabled
    assert pair.a.status(pair.now)["scheduler"]["mode"] == "aggregate"
    pair.a.scheduler = duplicate_all
    assert "scheduler" not in pair.a.status(pair.now)  # DuplicateAll has nothing to say
    assert not pair.a.nack_enabled
