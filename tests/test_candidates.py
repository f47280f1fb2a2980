"""mpvpn.core.candidates: candidates and the hole-punching plan of one subflow."""

import pytest

from mpvpn.core.candidates import (MAX_CANDIDATES, Candidate, Punch, behind_nat, check_candidates,
                                   local_candidates)

A, B, C = ("10.200.0.2", 7000), ("203.0.113.10", 7000), ("203.0.113.10", 40001)


def test_candidate_checks_its_fields():
    assert Candidate("srflx", "203.0.113.10", 1).endpoint == ("203.0.113.10", 1)
    for bad in (("prflx", "1.2.3.4", 1), ("host", "0.0.0.0", 1), ("host", "224.0.0.1", 1),
                ("host", "1.2.3.4", 0), ("host", "1.2.3.4", 65536), ("host", "nope", 1)):
        with pytest.raises(ValueError):
            Candidate(*bad)
    with pytest.raises(ValueError, match="at most"):
        check_candidates([Candidate("host", f"10.0.0.{i}", 1) for i in range(MAX_CANDIDATES + 1)])
    with pytest.raises(ValueError, match="share"):
        check_candidates([Candidate("host", "10.0.0.1", 1), Candidate("srflx", "10.0.0.1", 1)])


def test_local_candidates_only_behind_nat():
    assert not behind_nat(None, A) and not behind_nat(A, A) and behind_nat(B, A)
    assert local_candidates(*A, None) == ()
    assert local_candidates(*A, A) == ()  # STUN saw our own address: no NAT
    assert local_candidates(*A, B) == (Candidate("host", *A), Candidate("srflx", *B))


def test_inactive_punch_sends_to_the_remote_only():
    p = Punch(initiator=True)
    assert p.destinations(A, established=False) == (A,)
    assert p.destinations(None, established=False) == ()
    assert p.update([A], active=False, now=0.0) and not p.update([A], active=False, now=1.0)
    assert p.destinations(A, established=False) == (A,) and p.rounds == 0


def test_active_punch_sends_everywhere_until_established():
    p = Punch(initiator=True)
    assert p.update([A, B, A], active=True, now=0.0)
    assert p.targets == (A, B)
    assert p.destinations(A, established=False) == (A, B)
    assert p.destinations(C, established=False) == (C, A, B)  # a learnt source comes first
    assert p.destinations(C, established=True) == (C,)
    assert p.next_deadline(False) is None  # the initiator's CONNECT retries are the pace
    assert not p.update([A, B], active=True, now=1.0)


def test_responder_punch_probes_back_off_and_restart():
    p = Punch(initiator=False, backoff=0.2, backoff_max=1.0)
    assert p.next_deadline(False) is None
    p.update([A, B], active=True, now=10.0)
    times = []
    t = 10.0
    while len(times) < 6:
        if p.due(t, established=False):
            times.append(round(t, 3))
        t = p.next_deadline(False)
    assert times == [10.0, 10.2, 10.6, 11.4, 12.4, 13.4]  # 0.2, 0.4, 0.8, then 1.0 (the cap)
    assert not p.due(13.5, established=False)
    assert p.next_deadline(True) is None and not p.due(100.0, established=True)
    p.restart(20.0)  # the subflow went down: fast again
    assert p.due(20.0, False) and p.next_deadline(False) == pytest.approx(20.2)
    assert p.probes == 7 and p.rounds == 2
    p.update([A], active=False, now=30.0)
    assert p.next_deadline(False) is None and not p.due(31.0, False)


def test_punch_checks_its_backoff():
    with pytest.raises(ValueError):
        Punch(True, backoff=0)
    with pytest.raises(ValueError):
        Punch(True, backoff=2, backoff_max=1)


def test_rush_punches_an_established_pair_for_a_while_in_either_role():
    for initiator in (True, False):
        p = Punch(initiator=initiator, backoff=0.2, backoff_max=25.0)
        p.update([A, B], active=True, now=0.0)
        assert p.next_deadline(True) is None and not p.due(0.0, established=True)
        p.rush(100.0, span=5.0)
        assert p.rushing(100.0) and p.rushes == 1
        times, t = [], 100.0
        while t is not None:
            if p.due(t, established=True):
                times.append(round(t, 3))
            t = p.next_deadline(True)
        assert times == [100.0, 100.2, 100.6, 101.4, 103.0]  # doubling from the fast pace, for 5 s
        assert not p.rushing(105.0) and not p.due(200.0, established=True)
        # datagrams still go to the remote only: the caller sends the probes everywhere
        assert p.destinations(C, established=True) == (C,)
    idle = Punch(initiator=False)
    idle.rush(0.0, span=5.0)  # no NAT involved: nothing to punch
    assert not idle.rushing(0.0) and idle.rushes == 0
