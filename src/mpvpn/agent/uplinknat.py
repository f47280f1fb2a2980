"""NAT state of one uplink and the agent's hole-punching glue (issue 15,
docs/nat.md).

:class:`UplinkNat` is the I/O edge of :class:`mpvpn.core.stun.BindingClient`
for one uplink: it resolves ``base.stun`` (DNS is the edge's business, not
the core's), shares the uplink's UDP socket with SMPU (the receive path
hands it what :meth:`UplinkNat.takes` claims: a datagram from a configured
STUN server that :func:`mpvpn.core.stun.looks_like_stun`), and keeps the
public mapping and NAT kind the status shows and the candidates announce.

The functions below wire :class:`mpvpn.core.candidates.Punch` into the
agent's sessions: which subflows punch, where to, and the responder's
punch probes.  The agent calls them explicitly; nothing here reaches into
a session's or subflow's private state.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket

from mpvpn.core import candidates, stun
from mpvpn.core.candidates import Punch
from mpvpn.io.resolve import NameList
from mpvpn.io.udp import sockaddr

log = logging.getLogger("mpvpn")

RECHECK_INTERVAL = 300.0  # seconds between STUN rounds (also on SIGHUP, hotplug, a punched link down)
MIN_RECHECK_GAP = 2.0  # a subflow going down asks again, at most this often per uplink
# A NAT reboot (new public port) must not wait for the dead verdict,
# (dead_after + 1) idle keepalives: where that is longer than this, an uplink
# with an established punched pair asks STUN again with each of its idle
# keepalives (at most every MIN_RECHECK_GAP), and new peer candidates make
# an established pair punch again (Punch.rush) for REPUNCH_SPAN seconds.
RECOVER_WITHIN = 3.0
REPUNCH_SPAN = 5.0
# A pair that nothing shows to be behind NAT (no candidates from the peer, no
# base.stun here) but that did not open in this long punches anyway: a side
# behind NAT without STUN cannot be reached at the address it announces, but
# its punch probes reach the other end, which follows their source.
PUNCH_ANYWAY_AFTER = 2.0


LOOKUP_WAIT = 10.0  # STUN waits this long for server names being looked up, then asks the others


def _servers(servers, family: int, **kw) -> NameList:
    return NameList(servers, family, address=lambda hp: hp, make=lambda hp, ip, port: (ip, port),
                    what="STUN server", **kw)


def _unique(addrs) -> list:
    seen, uniq = set(), []
    for a in addrs:
        if a not in seen:
            seen.add(a)
            uniq.append(a)
    return uniq


def resolve_servers(servers, family: int, resolve=socket.getaddrinfo) -> tuple[list, list]:
    """``base.stun`` (HostPort list) as (ip, port) of ``family`` (4 or 6),
    and the problems (one line each) for the names that gave none
    (blocking: for tests and tools; the agent passes UplinkNat a ``lookup``)."""
    names = _servers(servers, family, resolve=resolve)
    return _unique(names.values()), names.problems


class UplinkNat:
    """Discovery (STUN) on one uplink's socket: public mapping and NAT kind."""

    def __init__(self, servers, local: tuple[str, int], now: float, *,
                 resolve=socket.getaddrinfo, lookup=None, recheck_interval: float = RECHECK_INTERVAL):
        """``lookup(host, port, family, done)`` (mpvpn.io.resolve.Resolver):
        server names are looked up off the loop and the first round starts
        when the answers are in (at most LOOKUP_WAIT later); without it,
        ``resolve`` (getaddrinfo) answers at once."""
        self.local = (str(ipaddress.ip_address(local[0])), int(local[1]))
        family = ipaddress.ip_address(self.local[0]).version
        self._recheck_interval = recheck_interval
        self._start_due: float | None = None  # a (new) client's first round, when due
        self.names = _servers(servers, family, lookup=lookup, resolve=resolve, on_answer=self._looked_up)
        self._make_client()
        self.not_stun = 0  # datagrams from a STUN server that are not STUN (to SMPU)
        self.changes = 0  # times the public mapping changed after the first one
        self.send_errors = 0  # requests the socket refused (no route to the server, ...)
        self._announced = None  # the public mapping the candidates were last built from
        self._last_recheck = now
        # A non-forced recheck that came too soon or during a round is not
        # dropped but due here: the event that asked (a punched subflow
        # down) may have come just after the round's requests left, so that
        # round saw the old mapping and nothing else would ask again.
        self._recheck_due: float | None = None
        if self.names.looking_up:
            self._start_due = now + LOOKUP_WAIT  # or when the answers come
        else:
            self.client.start(now)

    # -- server names ----------------------------------------------------------------

    def _looked_up(self) -> None:
        """A name lookup's answer (on the agent's thread): when it was the
        last one, a client with every server asks at the next timer."""
        if self._start_due is None:  # LOOKUP_WAIT passed: asking the others already
            log.info("a STUN server name resolved late; used after a restart")
            return
        if not self.names.looking_up:
            self._make_client()
            self._start_due = -math.inf  # due at once

    def _make_client(self) -> None:
        servers = _unique(self.names.values())
        self.client = stun.BindingClient(servers, self.local, recheck_interval=self._recheck_interval)
        self.sources = frozenset(self.client.servers)  # the demultiplexer's first test

    # -- the receive path's demultiplexer --------------------------------------------

    def takes(self, data, addr) -> bool:
        """Is this datagram (from ``addr``) for STUN?  From a configured
        server and shaped like STUN; anything else is SMPU's."""
        if addr[:2] in self.sources and stun.looks_like_stun(data):
            return True
        if addr[:2] in self.sources:
            self.not_stun += 1
        return False

    def on_datagram(self, data, addr, now: float) -> None:
        self.client.on_datagram(bytes(data), addr[:2], now)

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self._start_due is not None:
            return self._start_due
        t = self.client.next_deadline()
        if self._recheck_due is not None and not self.client.busy:  # (after the running round)
            t = self._recheck_due if t is None else min(t, self._recheck_due)
        return t

    def on_timer(self, now: float) -> None:
        if self._start_due is not None:
            if now < self._start_due:
                return
            self._start_due = None
            self._last_recheck = now
            self.client.start(now)
            return
        self.client.on_timer(now)
        if self._recheck_due is not None and now >= self._recheck_due and not self.client.busy:
            self.recheck(now)

    def take_outgoing(self) -> list:
        return self.client.take_outgoing()

    def send(self, batch) -> None:
        """Send what the STUN client wants to through the uplink's
        BatchSocket ``batch``; refusals (e.g. no route to that server from
        this uplink) count in ``send_errors``."""
        for data, dest in self.client.take_outgoing():
            self.send_errors += batch.send([data], sockaddr(*dest))

    def recheck(self, now: float, force: bool = True) -> bool:
        """Start a STUN round now (SIGHUP, hotplug); ``force=False`` (a
        punched subflow went down) at most every MIN_RECHECK_GAP seconds
        and not while a round runs: then the round starts when both allow
        (the timers, next_deadline).  Returns whether a round started now."""
        if self._start_due is not None:
            return False  # the first round waits for the server names
        if not force and (self.client.busy or now - self._last_recheck < MIN_RECHECK_GAP):
            self._recheck_due = self._last_recheck + MIN_RECHECK_GAP
            return False
        self._recheck_due = None
        self._last_recheck = now
        self.client.recheck(now)
        return True

    def mapping_changed(self) -> bool:
        """Did a finished round change the public mapping since the last
        call?  (Then the candidates must go to the peer in an UPDATE.)"""
        events = self.client.take_events()
        if not events:
            return False
        public = self.public_addr
        if public == self._announced:
            return False
        if self._announced is not None:
            self.changes += 1
            log.info("uplink %s:%d: public mapping %s -> %s (NAT %s)", *self.local,
                     stun.format_addr(self._announced), stun.format_addr(public) if public else "none",
                     self.nat)
        else:
            log.info("uplink %s:%d: public mapping %s, NAT %s", *self.local,
                     stun.format_addr(public) if public else "none", self.nat)
        self._announced = public
        return True

    # -- what the rest of the agent reads --------------------------------------------------

    @property
    def public_addr(self) -> tuple | None:
        r = self.client.result
        return tuple(r.public) if r is not None and r.public is not None else None

    @property
    def nat(self) -> str:
        r = self.client.result
        return r.nat if r is not None else stun.NAT_UNKNOWN

    @property
    def behind_nat(self) -> bool:
        return candidates.behind_nat(self.public_addr, self.local)

    def candidates(self) -> tuple:
        """The candidates to announce (none when no NAT is known)."""
        return candidates.local_candidates(self.local[0], self.local[1], self.public_addr)

    def status(self) -> dict:
        return dict(self.client.status(), not_stun=self.not_stun, changes=self.changes,
                    send_errors=self.send_errors, looking_up=self.names.looking_up,
                    problems=list(self.names.problems))


# -- what the agent calls -------------------------------------------------------------------

def run_timers(uplinks, now: float) -> bool:
    """STUN timers and output of every uplink (UplinkIO with ``nat`` and
    ``batch``); True when a round changed a public mapping (then the
    candidates must go to the peers and into the punch plans)."""
    changed = False
    for up in uplinks:
        nat = up.nat
        if nat is None or up.batch is None:
            continue
        t = nat.next_deadline()
        if t is not None and t <= now:
            nat.on_timer(now)
        nat.send(up.batch)
        changed = nat.mapping_changed() or changed
    return changed


def recheck_all(uplinks, now: float) -> None:
    """SIGHUP / hotplug: every uplink asks its STUN servers again."""
    for up in uplinks:
        if up.nat is not None and up.batch is not None:
            up.nat.recheck(now)
            up.nat.send(up.batch)


def punch_again(ds, member: int, now: float) -> None:
    """Subflow ``member`` of session ``ds`` went down: if it punches, maybe
    a NAT mapping changed (NAT reboot, new CGNAT port): punch again from the
    fast pace and ask STUN again (at most every MIN_RECHECK_GAP); a new
    mapping then goes to the peer as an UPDATE (run_timers)."""
    p = ds.punch.get(member)
    if p is None or not p.active:
        return
    p.restart(now)
    up = ds.uplink_of.get(member)
    if up is not None and up.nat is not None and up.batch is not None \
            and up.nat.recheck(now, force=False):
        up.nat.send(up.batch)


# -- hole punching in the agent's sessions ------------------------------------------------

def punch_targets(peer_uplink) -> list:
    """Where the peer's uplink may be reached: its address, then its candidates."""
    out = [(peer_uplink.addr, peer_uplink.port)]
    out += [c.endpoint for c in peer_uplink.candidates]
    return out


def update_punch(ds, now: float) -> None:
    """Bring ``ds.punch`` (member -> Punch) in line with the plan and the
    candidates of both sides: a pair punches when either end is behind NAT
    (our uplink's STUN mapping differs from its address, or the peer
    announced candidates).  The responder's punch probes take the pace of
    the initiator's CONNECT retries (the subflow's backoff)."""
    sc = ds.sess.config.subflow
    backoff = sc.connect_backoff
    backoff_max = max(backoff, sc.connect_backoff_max or sc.keepalive_idle)
    peer_ups = {u.name: u for u in ds.peer.uplinks}
    for member in [m for m in ds.punch if m not in ds.plan]:
        del ds.punch[member]
    for member, spec in ds.plan.items():
        pu = peer_ups.get(spec.remote)
        if pu is None:
            continue
        up = ds.uplink_of.get(member)
        nat = up.nat if up is not None else None
        active = bool(pu.candidates) or (nat is not None and nat.behind_nat) or member in ds.punch_anyway
        p = ds.punch.get(member)
        if p is None:
            if not active:
                continue
            p = ds.punch[member] = Punch(ds.sess.initiator, backoff, backoff_max)
        before = p.targets
        targets = [sockaddr(a, port) for a, port in punch_targets(pu)]
        if p.update(targets, active, now) and active:
            log.info("%s: subflow %d (%s) punches towards %s", ds.peer.name, member, spec.type,
                     ", ".join(f"{t[0]}:{t[1]}" for t in p.targets))
            sub = ds.sess.subflows.get(member)
            if before and p.targets != before and sub is not None and sub.established:
                _peer_moved(ds, member, p, up, now)


def _peer_moved(ds, member: int, p: Punch, up, now: float) -> None:
    """The peer announced new candidates for an established punched pair
    (its NAT rebooted?): punch again at once from both ends (the peer does
    when our answer or our own new mapping reaches it), and ask STUN whether
    our mapping moved too (the same event may have hit both ends)."""
    p.rush(now, REPUNCH_SPAN)
    if up is not None and up.nat is not None and up.batch is not None \
            and up.nat.recheck(now, force=False):
        up.nat.send(up.batch)


def punch_when_stuck(ds, now: float) -> float | None:
    """Pairs that did not open within PUNCH_ANYWAY_AFTER although nothing
    says NAT is involved punch from then on (``ds.punch_anyway``): the
    responder's punch probes go to the peer's uplink, whose subflow follows
    their source -- our public mapping, unknown to us without base.stun --
    and its next CONNECT passes our NAT.  Returns the next time to look."""
    due = None
    stuck = ds.stuck_since
    for member in ds.plan:
        sub = ds.sess.subflows.get(member)
        if sub is None or sub.established:
            stuck.pop(member, None)
            continue
        if member in ds.punch_anyway:
            continue
        since = stuck.setdefault(member, now)
        if now - since >= PUNCH_ANYWAY_AFTER:
            ds.punch_anyway[member] = sub.ups  # opened before? (link_path)
            log.info("%s: subflow %d did not open in %g s; punching anyway (a NAT without "
                     "base.stun on either end?)", ds.peer.name, member, PUNCH_ANYWAY_AFTER)
            update_punch(ds, now)
        elif due is None or since + PUNCH_ANYWAY_AFTER < due:
            due = since + PUNCH_ANYWAY_AFTER
    return due


def punch_deadline(ds) -> float | None:
    """The earliest responder punch probe due in session ``ds``."""
    t = None
    for member, p in ds.punch.items():
        sub = ds.sess.subflows.get(member)
        if sub is None:
            continue
        d = p.next_deadline(sub.established)
        if d is not None and (t is None or d < t):
            t = d
    return t


def punch_timers(ds, now: float) -> None:
    """Send the punch probes due now (they leave with the next flush: a
    rushing established pair's to every target, through ``ds.upgrade``), and
    on uplinks where a NAT reboot would otherwise wait for a slow dead
    verdict, ask STUN again with each idle keepalive of a punched pair."""
    for member, p in ds.punch.items():
        sub = ds.sess.subflows.get(member)
        if sub is None:
            continue
        established = sub.established
        if p.due(now, established):
            ds.sess.punch(member, now)
            if established:
                ds.upgrade.add(member)  # this flush also goes to every target
        if established and p.active:
            seen = ds.keepalives_seen.get(member)
            ds.keepalives_seen[member] = sub.probes_sent
            interval, need = sub.probe_plan(now)
            if seen is not None and sub.probes_sent != seen and interval * (need + 1) > RECOVER_WITHIN:
                up = ds.uplink_of.get(member)
                if up is not None and up.nat is not None and up.batch is not None \
                        and up.nat.recheck(now, force=False):
                    up.nat.send(up.batch)


def link_path(ds, member: int) -> str:
    """``links[].path``: ``punched`` when the pair punches through NAT, else
    ``direct`` -- also for a pair that had opened directly and punched
    anyway after an outage, but came back at the address the peer announced."""
    p = ds.punch.get(member)
    if p is None or not p.active:
        return "direct"
    ups_before = ds.punch_anyway.get(member)
    if ups_before:
        sub, spec = ds.sess.subflows.get(member), ds.plan.get(member)
        if sub is not None and spec is not None and sub.remote == sockaddr(spec.remote_addr, spec.remote_port):
            return "direct"
    return "punched"
