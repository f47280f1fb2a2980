"""Carrier matching (mpvpn.core.pairing): seed rule, options, symmetry, stability."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core.pairing import SubflowSpec, Uplink, diff, mirror, plan, same_pairs, to_wire

# Seed 001's example: A 120.22.100.2 -> B 120.61.20.12 (telecom),
# A 220.36.120.46 -> B 180.22.154.31 (unicom), A 61.120.78.230 -> B 61.35.11.10 (mobile).
A = [Uplink("wan1", "telecom", "120.22.100.2", 7000),
     Uplink("wan2", "unicom", "220.36.120.46", 7000),
     Uplink("wan3", "mobile", "61.120.78.230", 7000)]
B = [Uplink("t", "telecom", "120.61.20.12", 7000),
     Uplink("u", "unicom", "180.22.154.31", 7000),
     Uplink("m", "mobile", "61.35.11.10", 7000)]


def pairs(specs):
    return {(s.local, s.remote) for s in specs}


def test_seed_example_pairs_same_carriers():
    p = plan(A, B)
    assert pairs(p) == {("wan1", "t"), ("wan2", "u"), ("wan3", "m")}
    assert sorted(s.member for s in p) == [1, 2, 3]
    assert all(not s.cross_carrier for s in p)
    s = next(s for s in p if s.local == "wan1")
    assert (s.local_addr, s.remote_addr, s.remote_port) == ("120.22.100.2", "120.61.20.12", 7000)


def test_plan_is_identical_on_both_sides():
    client = plan(A, B, local_is_client=True)
    server = plan(B, A, local_is_client=False)
    assert mirror(server) == client
    assert same_pairs(client, to_wire(server, local_is_client=False), local_is_client=True)


def test_several_of_one_type_pair_in_order_and_leftovers_stay_idle():
    a = [Uplink("t1", "telecom", "1.0.0.1", 1), Uplink("t2", "telecom", "1.0.0.2", 1),
         Uplink("t3", "telecom", "1.0.0.3", 1), Uplink("x", "mobile", "1.0.0.4", 1)]
    b = [Uplink("s1", "telecom", "2.0.0.1", 1), Uplink("s2", "telecom", "2.0.0.2", 1),
         Uplink("y", "unicom", "2.0.0.3", 1)]
    p = plan(a, b)
    assert pairs(p) == {("t1", "s1"), ("t2", "s2")}  # t3, x, y idle (seed behaviour)


def test_pair_unmatched_pairs_leftovers_cross_carrier():
    a = [Uplink("t1", "telecom", "1.0.0.1", 1), Uplink("x", "mobile", "1.0.0.4", 1),
         Uplink("z", "cable", "1.0.0.5", 1)]
    b = [Uplink("s1", "telecom", "2.0.0.1", 1), Uplink("y", "unicom", "2.0.0.3", 1)]
    p = plan(a, b, pair_unmatched=True)
    assert pairs(p) == {("t1", "s1"), ("x", "y")}
    cross = [s for s in p if s.cross_carrier]
    assert len(cross) == 1 and (cross[0].type, cross[0].remote_type) == ("mobile", "unicom")
    # same-carrier pairs are numbered before cross-carrier ones
    assert next(s for s in p if s.local == "t1").member < cross[0].member


def test_address_families_never_mix():
    a = [Uplink("t4", "telecom", "1.0.0.1", 1), Uplink("t6", "telecom", "2001:db8::1", 1)]
    b = [Uplink("s6", "telecom", "2001:db8:1::1", 1)]
    assert pairs(plan(a, b)) == {("t6", "s6")}
    b4 = [Uplink("m6", "mobile", "2001:db8:1::2", 1)]
    assert plan(a[:1], b4, pair_unmatched=True) == []


def test_duplicate_names_raise():
    with pytest.raises(ValueError):
        plan([A[0], A[0]], B)


def test_update_keeps_surviving_pairs_and_members():
    a = [Uplink("t1", "telecom", "1.0.0.1", 1), Uplink("t2", "telecom", "1.0.0.2", 1)]
    b = [Uplink("s1", "telecom", "2.0.0.1", 1), Uplink("s2", "telecom", "2.0.0.2", 1)]
    p0 = plan(a, b)
    m_t2 = next(s.member for s in p0 if s.local == "t2")
    p1 = plan(a[1:], b, previous=p0)  # t1 went away: t2 keeps s2 (no reshuffle)
    assert pairs(p1) == {("t2", "s2")}
    assert p1[0].member == m_t2
    d = diff(p0, p1)
    assert [s.local for s in d.removed] == ["t1"] and [s.local for s in d.kept] == ["t2"]
    assert not d.added and not d.changed
    # Without the previous plan the pure rule would have reshuffled.
    assert pairs(plan(a[1:], b)) == {("t2", "s1")}


def test_address_change_is_a_changed_member():
    p0 = plan(A, B)
    a2 = [Uplink("wan1", "telecom", "120.22.100.99", 7000)] + A[1:]
    p1 = plan(a2, B, previous=p0)
    d = diff(p0, p1)
    assert len(d.changed) == 1
    old, new = d.changed[0]
    assert old.member == new.member and new.local_addr == "120.22.100.99"
    assert len(d.kept) == 2 and not d.added and not d.removed and not d.empty


def test_new_pairs_take_the_lowest_free_members():
    p0 = plan(A, B)
    p1 = plan(A[1:], B, previous=p0)  # wan1 (member of telecom) went away
    gone = next(s for s in p0 if s.local == "wan1").member
    assert gone not in {s.member for s in p1}
    extra = Uplink("wan4", "telecom", "120.22.100.4", 7000)
    p2 = plan(A[1:] + [extra], B, previous=p1)
    d = diff(p1, p2)
    assert [(s.local, s.member) for s in d.added] == [("wan4", gone)]
    assert len(d.kept) == 2


def test_kept_members_survive_beside_new_ones():
    p0 = [SubflowSpec(200, "wan1", "telecom", "120.22.100.2", 7000, "t", "telecom",
                      "120.61.20.12", 7000)]
    p = plan(A, B, previous=p0)
    assert sorted(s.member for s in p) == [1, 2, 200]
    assert next(s for s in p if s.local == "wan1").member == 200


_types = st.sampled_from(["telecom", "unicom", "mobile", "cable"])


@st.composite
def _side(draw, prefix):
    n = draw(st.integers(0, 16))
    ups = []
    for i in range(n):
        v6 = draw(st.booleans()) and draw(st.booleans())
        addr = f"2001:db8:{prefix}::{i + 1:x}" if v6 else f"10.{prefix}.0.{i + 1}"
        ups.append(Uplink(f"{'ab'[prefix - 1]}{i}", draw(_types), addr, 7000 + i))
    return ups


@settings(max_examples=150, deadline=None)
@given(_side(1), _side(2), st.booleans(), st.data())
def test_plan_properties(a, b, pu, data):
    p = plan(a, b, pu, local_is_client=True)
    q = plan(b, a, pu, local_is_client=False)
    assert mirror(q) == p  # symmetric: both sides agree on pairs and members
    members = [s.member for s in p]
    assert len(set(members)) == len(members) and all(1 <= m <= 255 for m in members)
    assert len({s.local for s in p}) == len(p) and len({s.remote for s in p}) == len(p)
    for s in p:
        assert pu or not s.cross_carrier
    # Stable under a random edit with the previous plan.
    a2 = data.draw(st.permutations(a)).copy()
    if a2 and data.draw(st.booleans()):
        a2.pop()
    p2 = plan(a2, b, pu, previous=p, local_is_client=True)
    q2 = plan(b, a2, pu, previous=q, local_is_client=False)
    assert mirror(q2) == p2
    d = diff(p, p2)
    for s in d.kept:
        assert s in p and s in p2
