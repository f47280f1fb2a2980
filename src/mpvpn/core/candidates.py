"""NAT traversal candidates and hole punching for one subflow (issue 15,
docs/nat.md).

A *candidate* is an address and port where an uplink may be reached:
``host`` (the uplink's own socket address), ``srflx`` (its public mapping
as a STUN server saw it: server-reflexive) or ``relay`` (an address on a
TURN relay).  Each side announces, per uplink, at most
:data:`MAX_CANDIDATES` of them inside the authenticated control exchange
(HELLO / WELCOME / UPDATE, :mod:`mpvpn.core.controlmsg`), so a candidate
is only ever learnt from the proven peer.

:class:`Punch` is the hole-punching plan of one subflow: while the subflow
is not established and NAT is involved on either end, every datagram the
subflow sends (the initiator's CONNECTs, the responder's punch probes) goes
to *every* candidate of the peer's uplink at once, so both NATs see
outgoing traffic towards the other and let the answer in.  The first
candidate that answers with an authenticated datagram becomes the
subflow's remote address (:meth:`mpvpn.core.subflow.Subflow.on_source`);
from then on only that address is used.  The responder, which never sends
CONNECT, sends punch probes paced with a doubling backoff
(``backoff`` .. ``backoff_max``), from the start again when the targets
change or the subflow goes down.

An established pair whose peer announces new candidates (a NAT on its end
rebooted and STUN saw a new mapping) :meth:`Punch.rush` es: for a few
seconds both ends, initiator too, send punch probes to every target
although established, so the NATs open towards the new mappings and the
subflow moves there (SMPU follows the source of authenticated datagrams)
without waiting for a dead verdict, which takes (dead_after + 1) idle
keepalives -- 100 s with a 25 s ``nat_keepalive``.

Sans-I/O: addresses are opaque tuples chosen by the caller (the agent
passes socket addresses); no sockets, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

HOST, SRFLX, RELAY = "host", "srflx", "relay"
KINDS = (HOST, SRFLX, RELAY)
MAX_CANDIDATES = 4  # per uplink, on the wire


@dataclass(frozen=True)
class Candidate:
    """One way to reach an uplink: ``kind`` (host / srflx / relay), ``addr``, ``port``."""

    kind: str
    addr: str
    port: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"candidate kind must be one of {KINDS}")
        ip = ipaddress.ip_address(self.addr)
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{ip} is not a unicast address")
        if not 1 <= self.port <= 65535:
            raise ValueError("port must be 1..65535")

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.addr, self.port)

    def to_json(self) -> dict:
        return {"kind": self.kind, "addr": self.addr, "port": self.port}


def check_candidates(cands) -> tuple:
    """``cands`` as a tuple, or ValueError: at most MAX_CANDIDATES, no
    address and port twice."""
    out = tuple(cands)
    if len(out) > MAX_CANDIDATES:
        raise ValueError(f"at most {MAX_CANDIDATES} candidates per uplink")
    eps = [c.endpoint for c in out]
    if len(set(eps)) != len(eps):
        raise ValueError("two candidates share one address and port")
    return out


def behind_nat(public, local) -> bool:
    """Does a STUN mapping ``public`` ((ip, port) or None) show a NAT in
    front of the socket bound to ``local`` ((ip, port))?"""
    return public is not None and tuple(public) != tuple(local)


def local_candidates(addr: str, port: int, public) -> tuple:
    """What an uplink announces: nothing when no NAT is known (the uplink's
    ``addr``/``port`` already say where it is), else its host address and
    its public mapping ``public`` (a srflx candidate)."""
    if not behind_nat(public, (addr, port)):
        return ()
    return (Candidate(HOST, addr, port), Candidate(SRFLX, public[0], int(public[1])))


class Punch:
    """Hole punching for one subflow (see the module docstring)."""

    def __init__(self, initiator: bool, backoff: float = 0.2, backoff_max: float = 1.0):
        if not 0 < backoff <= backoff_max:
            raise ValueError("need 0 < backoff <= backoff_max")
        self.initiator = initiator
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.active = False  # NAT involved on either end: punch while not established
        self.targets: tuple = ()  # where to send while not established, in order
        self._next: float | None = None  # responder: next punch probe
        self._interval = backoff
        self.probes = 0  # punch probes sent (responder; either role while rushing)
        self.rounds = 0  # times punching (re)started: plan change or subflow down
        self.rushes = 0  # times an established pair punched again (new peer candidates)
        self._rush_until: float | None = None  # established: punch probes until then

    def update(self, targets, active: bool, now: float) -> bool:
        """New candidates of the peer's uplink (``targets``: its host
        endpoint first, then its candidates; duplicates are dropped) and
        whether NAT is involved (``active``).  Returns whether anything
        changed; a change restarts the punch pacing."""
        seen, out = set(), []
        for t in targets:
            if t not in seen:
                seen.add(t)
                out.append(t)
        new = tuple(out)
        if new == self.targets and bool(active) == self.active:
            return False
        self.targets, self.active = new, bool(active)
        self.restart(now)
        return True

    def restart(self, now: float) -> None:
        """Punch again from the fastest pace (targets changed, subflow went down)."""
        self._interval = self.backoff
        self._next = now if self.active and not self.initiator else None
        if self.active:
            self.rounds += 1

    def rush(self, now: float, span: float) -> None:
        """The peer's candidates changed while established: punch probes (from
        either role) go out for ``span`` seconds from the fastest pace, to
        every target (:meth:`rushing`), although the subflow is established."""
        if not self.active or span <= 0:
            return
        self.rushes += 1
        self._rush_until = now + span
        self._interval = self.backoff
        self._next = now

    def rushing(self, now: float) -> bool:
        """Is an established pair punching again (see :meth:`rush`)?"""
        return self._rush_until is not None and now < self._rush_until

    def destinations(self, remote, established: bool) -> tuple:
        """Where a datagram of the subflow goes: ``remote`` only once
        established (or when not punching), else ``remote`` and every target."""
        if established or not self.active:
            return (remote,) if remote is not None else ()
        if remote is None or remote in self.targets:
            return self.targets
        return (remote,) + self.targets

    def next_deadline(self, established: bool) -> float | None:
        """When :meth:`due` wants to run (responder, not established; either
        role while rushing)."""
        if established:
            ru = self._rush_until
            return self._next if ru is not None and self._next is not None and self._next < ru else None
        return self._next

    def due(self, now: float, established: bool) -> bool:
        """Is a punch probe due now?  (Then the caller sends one and it is
        counted; the next one comes after the doubled interval.)"""
        if self._next is None or now < self._next:
            return False
        if established and not self.rushing(now):
            return False
        self.probes += 1
        self._next = now + self._interval
        self._interval = min(self.backoff_max, self._interval * 2)
        return True
