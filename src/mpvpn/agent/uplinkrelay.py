"""TURN relay use of one uplink: the agent's edge of
:class:`mpvpn.core.relaypath.RelayPath` (issue 15, docs/nat.md).

:class:`UplinkRelay` resolves the ``config relay`` sections (DNS is the
edge's business), shares the uplink's UDP socket with SMPU and STUN (the
receive path hands it every datagram whose source is one of the relay
servers: :meth:`UplinkRelay.takes`), and wraps the subflow datagrams whose
destination is a peer reachable through the relay (:meth:`carries`).

How a pair ends up relayed (both sides run the same rules):

* an uplink starts its relay when a subflow on it has not been established
  for ``base.relay_after`` seconds (default 4; the direct open and the punching failed),
  or when the peer's uplink announces a ``relay`` candidate;
* its relayed address goes to the peer as a ``relay`` candidate (UPDATE),
  and the peer uplink's candidates (relay first, then srflx, host, its
  address) get a permission and a channel on our relay;
* hole punching (:mod:`mpvpn.agent.uplinknat`) sends the subflow's
  datagrams to every candidate of the peer's uplink, and those to a relayed
  address go through our own relay: relay to relay, so each NAT only ever
  sees its uplink talking to its own relay server;
* SMPU follows the source of authenticated datagrams, so the subflow's
  remote becomes the peer's relayed address, which :meth:`carries`.

A relayed subflow that goes down makes the relay suspect
(:meth:`RelayPath.suspect`): a relay that does not answer a refresh within
5.5 s counts as failed, and the next one is allocated and announced.
The functions at the end are the glue the agent calls explicitly.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from mpvpn.core import candidates, turn
from mpvpn.core.relaypath import NoRelay, PeerReady, Received, RelayLost, RelayPath, RelayUp
from mpvpn.core.stun import format_addr
from mpvpn.io.resolve import NameList

log = logging.getLogger("mpvpn")

RELAY_RETRY = 10.0    # a failed relay is tried again after this long (base.relay_retry's default)
LOOKUP_WAIT = 10.0    # a relay that is needed waits this long for its names' lookups, then goes without
UPGRADE_INTERVAL = 15.0  # while relayed: a probe to the peer's direct candidates this often


def _relays(relays, family: int, **kw) -> NameList:
    return NameList(relays, family, address=lambda r: r.address,
                    make=lambda r, ip, port: turn.Relay((ip, port), r.username, r.password),
                    what="relay", **kw)


def resolve_relays(relays, family: int, resolve=socket.getaddrinfo) -> tuple[list, list]:
    """``config relay`` (RelayConf list) as turn.Relay of ``family`` (4 or 6),
    in order, and the problems (one line each) for names that gave none
    (blocking: for tools and tests; the agent looks names up through
    :class:`UplinkRelay`'s ``lookup``)."""
    names = _relays(relays, family, resolve=resolve)
    return names.values(), names.problems


class UplinkRelay:
    """One uplink's relay use (see the module docstring)."""

    def __init__(self, relays, local: tuple[str, int], *, resolve=socket.getaddrinfo,
                 lookup=None, now: float = 0.0, retry_after: float = RELAY_RETRY,
                 path_factory=RelayPath):
        """``lookup(host, port, family, done)`` (mpvpn.io.resolve.Resolver):
        relay names are looked up off the loop and the relay list is made
        when the answers are in (:meth:`want` waits up to LOOKUP_WAIT for
        them); without it, ``resolve`` (getaddrinfo) answers at once."""
        self.local = (str(ipaddress.ip_address(local[0])), int(local[1]))
        family = ipaddress.ip_address(self.local[0]).version
        self._retry_after = retry_after
        self._path_factory = path_factory
        self._since = now
        self.started = False
        self.names = _relays(relays, family, lookup=lookup, resolve=resolve, on_answer=self._looked_up)
        self._make_path()
        self.why: str | None = None   # why it relays (status, logs)
        self._peers: tuple = ()
        self.events: list = []        # RelayUp / RelayLost / NoRelay / PeerReady for the agent

    # -- names ----------------------------------------------------------------------

    def _looked_up(self) -> None:
        """A name lookup's answer came (on the agent's thread)."""
        if self.started:  # went without it (LOOKUP_WAIT): kept for the status only
            log.info("a relay name resolved after relaying had started; used after a restart")
            return
        self._make_path()

    def _make_path(self) -> None:
        resolved = self.names.values()
        self.path = self._path_factory(turn.RelayList(resolved, retry_after=self._retry_after))
        self.sources = frozenset(r.address for r in resolved)  # the demultiplexer's test

    # -- when ----------------------------------------------------------------------

    def want(self, why: str, now: float) -> bool:
        """Start relaying (once); returns whether this call started it.  While
        relay names are being looked up it waits (up to LOOKUP_WAIT from the
        start) so that the configured order holds."""
        if self.started:
            return False
        if self.names.looking_up and now - self._since < LOOKUP_WAIT:
            return False
        if not self.sources:
            return False
        self.started, self.why = True, why
        self.path.start(now)
        self._collect()
        return True

    def start_deadline(self, due: float) -> float | None:
        """When :meth:`want` may next start relaying, for a subflow down
        until ``due`` (its trigger): None once started or when it never can
        (no relay resolved, no lookup pending) -- a deadline left in the
        past would make the agent's loop spin."""
        if self.started:
            return None
        if self.names.looking_up:
            return max(due, self._since + LOOKUP_WAIT)  # an answer wakes the loop sooner
        return due if self.sources else None

    def suspect(self, reason: str, now: float) -> None:
        """A relayed subflow went down: check the relay (RelayPath.suspect)."""
        if self.started:
            self.path.suspect(reason, now)

    def stop(self, now: float) -> None:
        """Release the allocation (the Refresh(0) leaves with :meth:`flush`)."""
        if self.started:
            self.path.stop(now)

    def set_peers(self, peers, now: float) -> None:
        peers = tuple(peers)
        if peers != self._peers:
            self._peers = peers
            self.path.set_peers(peers, now)

    # -- data ------------------------------------------------------------------------

    def takes(self, addr) -> bool:
        return addr[:2] in self.sources

    def wants(self, data) -> bool:
        """Of a datagram from a relay server: the relay's (not a STUN answer for UplinkNat)?"""
        return self.path.wants(data)

    def unwrap(self, datagrams, addr, now: float) -> list:
        """Datagrams from a relay server: [(peer, payload)] of what it relayed."""
        out = []
        for d in datagrams:
            self.path.on_datagram(bytes(d), addr[:2], now)
        for ev in self.path.take_events():
            if isinstance(ev, Received):
                out.append((ev.peer, ev.payload))
            else:
                self.events.append(ev)
        return out

    def carries(self, dest) -> bool:
        """Does a datagram to ``dest`` go through the relay?"""
        return self.path.state == "ready" and self.path.peer_ready(dest)

    def send(self, batch, dgrams, dest, now: float) -> int:
        """Wrap ``dgrams`` for ``dest`` and send them to the relay server with
        ``batch`` (BatchSocket); returns how many the socket refused."""
        for d in dgrams:
            self.path.send(dest, bytes(d), now)
        return self.flush(batch)

    def flush(self, batch) -> int:
        failed = 0
        by_dest: dict = {}
        for data, dest in self.path.take_outgoing():
            by_dest.setdefault(dest, []).append(data)
        for dest, data in by_dest.items():
            failed += batch.send(data, dest)
        return failed

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.path.next_deadline() if self.started else None

    def on_timer(self, now: float) -> None:
        self.path.on_timer(now)
        self._collect()

    def _collect(self) -> None:
        for ev in self.path.take_events():
            if isinstance(ev, Received):   # (only on_datagram makes these)
                continue
            self.events.append(ev)

    def take_events(self) -> list:
        ev, self.events = self.events, []
        return ev

    # -- what the rest of the agent reads ------------------------------------------------

    def candidate(self):
        r = self.path.relayed if self.path.state == "ready" else None
        return candidates.Candidate(candidates.RELAY, r[0], int(r[1])) if r else None

    @property
    def server(self) -> str | None:
        p = self.path
        return format_addr(p.relay.address) if p.relay is not None and p.state in ("allocating", "ready") else None

    def status(self, now: float) -> dict:
        return dict(self.path.status(now), started=self.started, why=self.why,
                    looking_up=self.names.looking_up, problems=list(self.names.problems))


def describe(ev) -> str:
    """One log line for a relay event."""
    if isinstance(ev, RelayUp):
        return (f"relay {format_addr(ev.relay)} allocated {format_addr(ev.relayed)}"
                + (f" (our mapping {format_addr(ev.mapped)})" if ev.mapped else ""))
    if isinstance(ev, RelayLost):
        return f"relay {format_addr(ev.relay)} failed: {ev.reason}"
    if isinstance(ev, NoRelay):
        return f"no relay usable: {ev.reason}"
    if isinstance(ev, PeerReady):
        return f"relay path to {format_addr(ev.peer)} ready" + (f" (channel {ev.channel:#x})" if ev.channel else "")
    return repr(ev)


# -- glue for the agent's sessions --------------------------------------------------------

def relay_peers(peer_uplink, sockaddr) -> list:
    """The peer uplink's relayed addresses: what our relay carries to (relay
    to relay; its other candidates are tried directly by the punching)."""
    return [sockaddr(c.addr, c.port) for c in peer_uplink.candidates if c.kind == candidates.RELAY]


def has_relay_candidate(peer_uplink) -> bool:
    return any(c.kind == candidates.RELAY for c in peer_uplink.candidates)


def link_relay(ds, member: int) -> str | None:
    """``links[].relay``: the relay server carrying subflow ``member``, or None."""
    up = ds.uplink_of.get(member)
    sub = ds.sess.subflows.get(member)
    relay = up.relay if up is not None else None
    if relay is None or sub is None or sub.remote is None or not relay.carries(sub.remote):
        return None
    return relay.server


def relay_reason(ds, member: int) -> str:
    """Why subflow ``member`` is relayed, in words for the status."""
    up = ds.uplink_of.get(member)
    spec = ds.plan.get(member)
    ours = up.nat.nat if up is not None and up.nat is not None else None
    pu = next((u for u in ds.peer.uplinks if spec is not None and u.name == spec.remote), None)
    parts = []
    if ours == "endpoint-dependent":
        parts.append("this end behind symmetric NAT")
    elif ours == "endpoint-independent":
        parts.append("this end behind NAT")
    if pu is not None and any(c.kind == candidates.SRFLX for c in pu.candidates):
        parts.append("the peer's end behind NAT")
    if len(parts) == 2 and ours == "endpoint-dependent":
        return "both ends behind NAT, this one symmetric: the direct path did not open"
    return "the direct path did not open" + (f" ({'; '.join(parts)})" if parts else "")
