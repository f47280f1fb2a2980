"""Carrier matching: which local uplink talks to which remote uplink.

Seed 001 opens one SMPU subflow per *carrier-matched* pair of uplinks (A's
telecom uplink <-> B's telecom uplink, ...).  This module turns the two
sides' uplink lists into a *subflow plan*: a list of :class:`SubflowSpec`,
each with a member ID (1..255) that both sides must agree on.

Rules (documented in ``docs/control.md``):

1. Only uplinks of the same address family can pair (an IPv4 socket cannot
   reach an IPv6 address).
2. Same-carrier pairs first.  Per carrier type (in sorted order) and family,
   the i-th local uplink of that type pairs with the i-th remote one, in each
   side's configured order.
3. Uplinks left over stay idle, unless ``pair_unmatched`` is set: then the
   leftovers are paired cross-carrier, again i-th with i-th in configured
   order (same family only).
4. Stability across updates: given the ``previous`` plan, a pair whose two
   uplinks still exist (and still qualify) is kept before anything new is
   paired, and keeps its member ID; an uplink whose address changed keeps its
   pair and member (the diff reports it as *changed*).  New pairs get the
   lowest member IDs not in use.  (An ID freed by this update may be reused
   at once; the diff lists it as removed and added, and the data plane checks
   every datagram's member against its subflow's endpoints, so stale
   datagrams of the old pair cannot land on the new one.)

Every rule is symmetric: ``plan(A, B)`` and ``plan(B, A)`` describe the same
pairs with the same member IDs, only mirrored (see :func:`mirror`).  The
server computes the plan and sends it in WELCOME/UPDATE; the client recomputes
it and refuses a plan that differs.

Pure functions; no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MAX_MEMBER = 255


@dataclass(frozen=True)
class Uplink:
    """One local or remote uplink: ``name`` (unique per side), carrier
    ``type``, and the UDP endpoint ``addr``:``port`` its subflows use;
    ``candidates``: other ways to reach it when it is behind NAT
    (:class:`mpvpn.core.candidates.Candidate`; they never change the plan)."""

    name: str
    type: str
    addr: str
    port: int
    candidates: tuple = ()

    @property
    def family(self) -> int:
        try:
            return ipaddress.ip_address(self.addr).version
        except ValueError:
            return 0

    def to_json(self) -> dict:
        d = {"name": self.name, "type": self.type, "addr": self.addr, "port": self.port}
        if self.candidates:  # (only then: peers before issue 15 refuse unknown fields)
            d["candidates"] = [c.to_json() for c in self.candidates]
        return d


@dataclass(frozen=True)
class SubflowSpec:
    """One planned subflow, seen from the side that holds it."""

    member: int
    local: str  # local uplink name
    type: str  # local uplink's carrier type
    local_addr: str
    local_port: int
    remote: str  # remote uplink name
    remote_type: str
    remote_addr: str
    remote_port: int

    @property
    def cross_carrier(self) -> bool:
        return self.type != self.remote_type

    @property
    def pair(self) -> tuple[str, str]:
        return (self.local, self.remote)


@dataclass
class PlanDiff:
    """What changed between two plans, keyed by member ID.

    ``changed`` holds ``(old, new)`` pairs: same member ID, different
    endpoints (e.g. a DHCP uplink got a new address); the data plane should
    re-point or re-open that subflow.
    """

    added: list[SubflowSpec] = field(default_factory=list)
    removed: list[SubflowSpec] = field(default_factory=list)
    changed: list[tuple[SubflowSpec, SubflowSpec]] = field(default_factory=list)
    kept: list[SubflowSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def _spec(member: int, lu: Uplink, ru: Uplink) -> SubflowSpec:
    return SubflowSpec(member, lu.name, lu.type, lu.addr, lu.port, ru.name, ru.type, ru.addr, ru.port)


def _check_side(uplinks, what: str) -> list[Uplink]:
    ups = list(uplinks)
    names = [u.name for u in ups]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} uplink names are not unique: {names}")
    return ups


def plan(local_uplinks, remote_uplinks, pair_unmatched: bool = False,
         previous: list[SubflowSpec] | None = None, *,
         local_is_client: bool = True) -> list[SubflowSpec]:
    """Compute the subflow plan (sorted by member ID).

    ``previous`` is the plan in force before (same orientation: its ``local``
    names are ours); pass it on UPDATE so surviving pairs keep their member
    IDs.  ``local_is_client`` only breaks ties when numbering new pairs (in
    the client's uplink order, then the server's), so that the two sides
    number a perfectly symmetric configuration the same way.  Raises
    ``ValueError`` only for duplicate uplink names (callers validate peer
    input before calling).
    """
    local = _check_side(local_uplinks, "local")
    remote = _check_side(remote_uplinks, "remote")
    lpos = {u.name: i for i, u in enumerate(local)}
    rpos = {u.name: i for i, u in enumerate(remote)}
    lby = {u.name: u for u in local}
    rby = {u.name: u for u in remote}
    used_l: set[str] = set()
    used_r: set[str] = set()
    kept: list[tuple[int, Uplink, Uplink]] = []  # (member, local, remote)
    new: list[tuple[Uplink, Uplink]] = []

    def ok(lu: Uplink, ru: Uplink, cross: bool) -> bool:
        if lu.family != ru.family or lu.family == 0:
            return False
        return cross or lu.type == ru.type

    prev = sorted(previous or [], key=lambda s: s.member)

    # Phase 1: same-carrier.  Sticky pairs from the previous plan first...
    for s in prev:
        lu, ru = lby.get(s.local), rby.get(s.remote)
        if lu and ru and lu.type == ru.type and ok(lu, ru, False) \
                and lu.name not in used_l and ru.name not in used_r:
            kept.append((s.member, lu, ru))
            used_l.add(lu.name)
            used_r.add(ru.name)
    # ...then the rest in order, per (carrier, family).
    groups = sorted({(u.type, u.family) for u in local} & {(u.type, u.family) for u in remote})
    for typ, fam in groups:
        ls = [u for u in local if u.type == typ and u.family == fam and u.name not in used_l]
        rs = [u for u in remote if u.type == typ and u.family == fam and u.name not in used_r]
        for lu, ru in zip(ls, rs):
            new.append((lu, ru))
            used_l.add(lu.name)
            used_r.add(ru.name)

    # Phase 2: leftovers cross-carrier, if asked.
    if pair_unmatched:
        for s in prev:
            lu, ru = lby.get(s.local), rby.get(s.remote)
            if lu and ru and lu.type != ru.type and ok(lu, ru, True) \
                    and lu.name not in used_l and ru.name not in used_r:
                kept.append((s.member, lu, ru))
                used_l.add(lu.name)
                used_r.add(ru.name)
        for fam in (4, 6):
            ls = [u for u in local if u.family == fam and u.name not in used_l]
            rs = [u for u in remote if u.family == fam and u.name not in used_r]
            for lu, ru in zip(ls, rs):
                new.append((lu, ru))
                used_l.add(lu.name)
                used_r.add(ru.name)

    # Member IDs: kept pairs keep theirs; new pairs, in an order both sides
    # agree on (same-carrier before cross-carrier, then by carrier types, then
    # by the client uplink's position, then the server uplink's), take the
    # lowest free IDs.
    in_use = {m for m, _, _ in kept}
    if len(kept) + len(new) > MAX_MEMBER:  # cannot happen with <= 16 uplinks a side
        raise ValueError("too many subflows")

    def order(p):
        lu, ru = p
        a, b = lpos[lu.name], rpos[ru.name]
        ct, st = (lu.type, ru.type) if local_is_client else (ru.type, lu.type)
        ca, sa = (a, b) if local_is_client else (b, a)
        return (lu.type != ru.type, ct, st, ca, sa)

    new.sort(key=order)
    specs = [_spec(m, lu, ru) for m, lu, ru in kept]
    nxt = 0
    for lu, ru in new:
        nxt += 1
        while nxt in in_use:
            nxt += 1
        specs.append(_spec(nxt, lu, ru))
    specs.sort(key=lambda s: s.member)
    return specs


def mirror(specs: list[SubflowSpec]) -> list[SubflowSpec]:
    """The same plan seen from the other side."""
    return [SubflowSpec(s.member, s.remote, s.remote_type, s.remote_addr, s.remote_port,
                        s.local, s.type, s.local_addr, s.local_port) for s in specs]


def diff(old: list[SubflowSpec], new: list[SubflowSpec]) -> PlanDiff:
    """Compare two plans member by member (for UPDATE)."""
    o = {s.member: s for s in old}
    n = {s.member: s for s in new}
    d = PlanDiff()
    for m in sorted(o.keys() | n.keys()):
        a, b = o.get(m), n.get(m)
        if a is None:
            d.added.append(b)
        elif b is None:
            d.removed.append(a)
        elif a == b:
            d.kept.append(b)
        else:
            d.changed.append((a, b))
    return d


def to_wire(specs: list[SubflowSpec], local_is_client: bool) -> list[dict]:
    """Plan as carried in WELCOME/UPDATE: ``{"member", "client", "server"}``
    (uplink names; the endpoints follow from the uplink lists)."""
    out = []
    for s in specs:
        c, sv = (s.local, s.remote) if local_is_client else (s.remote, s.local)
        out.append({"member": s.member, "client": c, "server": sv})
    return out


def same_pairs(specs: list[SubflowSpec], wire: list[dict], local_is_client: bool) -> bool:
    """Does a plan received on the wire describe exactly ``specs``?"""
    mine = sorted((d["member"], d["client"], d["server"]) for d in to_wire(specs, local_is_client))
    theirs = sorted((d["member"], d["client"], d["server"]) for d in wire)
    return mine == theirs
