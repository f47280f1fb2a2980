"""One uplink's use of TURN relays (issue 15, seed 003's "next node"), sans-I/O.

A :class:`RelayPath` belongs to one uplink and its UDP socket.  It takes the
first usable relay of a :class:`~mpvpn.core.turn.RelayList`, allocates on it
with a :class:`~mpvpn.core.turn.TurnClient`, installs a permission and a
channel for each peer transport address it is given (the peer uplink's
``relay`` candidate, or any address the peer's datagrams come from), and then
carries opaque payloads -- the subflow's already sealed SMPU datagrams -- to
and from those peers:

* :meth:`send` wraps one payload for a peer (ChannelData, 4 bytes, once the
  channel is bound; a Send indication before that); the bytes come out of
  :meth:`take_outgoing`, always addressed to the relay server.
* :meth:`on_datagram` takes what arrived on the uplink socket from the relay
  server (:meth:`owns` tells the I/O edge which source that is) and yields
  :class:`Received` events with the peer and the payload.  The relay sees
  only ciphertext; authenticating the payload stays SMPU's job.
* A relay that fails -- allocation refused (401, 486, 508, ...), no answer,
  a refresh that fails, or :meth:`path_dead` from the caller when the
  subflow through it stopped answering -- is recorded in the list and the
  next one is allocated at once.  When every relay has failed, the path waits
  for the list's retry time.  Each switch produces :class:`RelayLost` and,
  once the new allocation stands, :class:`RelayUp` with the new relayed
  address (which the agent must announce to the peer again).
* :meth:`stop` releases the allocation (Refresh with LIFETIME 0); the
  release is driven to its end through the same :meth:`on_datagram` /
  :meth:`on_timer` calls.

Nothing here touches a socket or a clock: bytes, events and ``now`` in; bytes
to send, events and the next deadline out.  Datagrams that do not belong are
counted drops (``drops``), never exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from mpvpn.core import turn
from mpvpn.core.stun import (DATA, INDICATION, Addr, came_from, format_addr, looks_like_stun,
                             normalize_addr, split_type)

# Allocation retransmissions for a fallback path: sends at 0, 0.5, 1.5, 3.5 s,
# given up at 5.5 s (RFC 8489's 39.5 s default would keep a dead relay's
# carrier down for that long before the next relay is tried).
RTO, RC, RM = 0.5, 4, 4
SUSPECT_TIMEOUT = RTO * (2 ** (RC - 1) - 1) + RM * RTO   # 5.5 s: the relay must answer a refresh
MAX_PEERS = 8          # per uplink: the peer's candidates, a few moves


@dataclass(frozen=True)
class RelayUp:
    relay: Addr             # the relay server
    relayed: Addr           # our relayed transport address (announce it to the peer)
    mapped: Addr | None     # our uplink's public mapping as the relay saw it


@dataclass(frozen=True)
class RelayLost:
    relay: Addr
    reason: str             # words, e.g. "allocation failed: allocation quota reached (486 ...)"


@dataclass(frozen=True)
class NoRelay:
    reason: str             # every configured relay failed (or none is configured)
    retry_at: float | None


@dataclass(frozen=True)
class PeerReady:
    peer: Addr
    channel: int | None


@dataclass(frozen=True)
class Received:
    peer: Addr
    payload: bytes


class RelayPath:
    """One uplink's relay use.  See the module docstring.

    ``client_factory(server, username, password)`` makes the TURN client
    (tests pass fakes); states: ``idle``, ``allocating``, ``ready``,
    ``waiting`` (no relay usable until ``retry_at``), ``stopped``."""

    def __init__(self, relays: turn.RelayList, *,
                 client_factory: Callable[..., turn.TurnClient] | None = None,
                 lifetime: int = 600):
        self.relays = relays
        self._factory = client_factory or (
            lambda server, user, password: turn.TurnClient(
                server, user, password, lifetime=lifetime, rto=RTO, rc=RC, rm=RM))
        self.state = "idle"
        self.relay: turn.Relay | None = None
        self._client: turn.TurnClient | None = None
        self._closing: list[turn.TurnClient] = []
        self._peers: list[Addr] = []
        self._ready: set[Addr] = set()
        self._events: list = []
        self._out: list[tuple[bytes, Addr]] = []
        self.relayed: Addr | None = None
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self.switches = 0
        self.drops: dict[str, int] = {}
        self.counters = {"sent": 0, "received": 0}
        self._old_client_drops: dict[str, int] = {}
        self._suspect: tuple | None = None     # (deadline, expires_at before, reason)

    # ---- control ---------------------------------------------------------

    def start(self, now: float) -> None:
        if self.state != "idle":
            raise RuntimeError(f"start() in state {self.state}")
        self._allocate(now)

    def set_peers(self, peers: Sequence, now: float) -> None:
        """The peer transport addresses to relay to (the peer uplink's relay
        candidate(s)); added ones get a permission and a channel.  Bad
        addresses are counted and ignored."""
        for p in peers:
            try:
                addr = normalize_addr(p)
            except (ValueError, TypeError, IndexError):
                self._drop("bad_peer")
                continue
            if addr in self._peers:
                continue
            if len(self._peers) >= MAX_PEERS:
                self._drop("too_many_peers")
                continue
            self._peers.append(addr)
            if self._client is not None and self.state in ("allocating", "ready"):
                self._client.add_peer(addr, now)

    def path_dead(self, reason: str, now: float) -> None:
        """The subflow through the current relay stopped answering: count the
        relay as failed and move to the next one."""
        if self.state in ("allocating", "ready") and self._client is not None:
            self._fail_current(reason, now, release=False)

    def suspect(self, reason: str, now: float) -> None:
        """The subflow through the relay went down, which may be the relay or
        anything else on the way (the carrier, the peer's side): refresh the
        allocation now; if the relay does not answer within
        SUSPECT_TIMEOUT, it counts as failed (``reason`` + why) and the next
        one is taken.  A relay that answers stays."""
        if self.state != "ready" or self._client is None or self._suspect is not None:
            return
        if self._client.refresh_now(now):
            self._client.on_timer(now)
            self._suspect = (now + SUSPECT_TIMEOUT, self._client.expires_at, reason)

    def stop(self, now: float) -> None:
        """Release the allocation; the path stays stopped."""
        if self.state == "stopped":
            return
        if self._client is not None:
            self._retire(self._client, now, release=True)
        self._client = None
        self.state = "stopped"
        self.relayed = None
        self._ready.clear()

    # ---- data ------------------------------------------------------------

    def owns(self, src: Sequence) -> bool:
        """Whether a datagram from ``src`` is the relay's (current or being
        released): the I/O edge hands those to :meth:`on_datagram`."""
        return any(came_from(src, c.server) for c in self._clients())

    def wants(self, data: bytes) -> bool:
        """Of a datagram from a relay server (:meth:`owns`): is it ours?
        ChannelData, Data indications and answers to our own transactions
        are; other STUN (a Binding answer when the relay is also a
        configured STUN server) is not."""
        if turn.is_channel_data(data):
            return True
        if not looks_like_stun(data):
            return True                  # junk: ours to count
        method, cls = split_type((data[0] << 8) | data[1])
        if cls == INDICATION:
            return method == DATA
        txid = bytes(data[8:20])
        return any(c.has_transaction(txid) for c in self._clients())

    def send(self, peer: Sequence, payload: bytes, now: float) -> bool:
        """Queue a sealed datagram for ``peer`` through the relay.  False
        (counted) while there is no allocation or no permission yet."""
        if self.state != "ready" or self._client is None:
            self._drop("send_no_relay")
            return False
        if self._client.send(peer, payload, now):
            self.counters["sent"] += 1
            return True
        return False

    def on_datagram(self, data: bytes, src: Sequence, now: float) -> None:
        for c in self._clients():
            if came_from(src, c.server):
                c.on_datagram(data, src, now)
                self._pump(c, now)
                return
        self._drop("not_a_relay")

    def on_timer(self, now: float) -> None:
        for c in self._clients():
            c.on_timer(now)
            self._pump(c, now)
        if self._suspect is not None and self._client is not None:
            deadline, before, reason = self._suspect
            if self._client.expires_at != before:
                self._suspect = None                 # it answered: the relay is fine
            elif now >= deadline:
                self._suspect = None
                self._fail_current(f"{reason}; relay {format_addr(self._client.server)} did not "
                                   f"answer a refresh in {SUSPECT_TIMEOUT:g} s", now, release=False)
                return
        if self.state == "waiting" and self.retry_at is not None and now >= self.retry_at:
            self._allocate(now)

    def next_deadline(self) -> float | None:
        times = [t for t in (c.next_deadline() for c in self._clients()) if t is not None]
        if self.state == "waiting" and self.retry_at is not None:
            times.append(self.retry_at)
        if self._suspect is not None:
            times.append(self._suspect[0])
        return min(times) if times else None

    def take_outgoing(self) -> list[tuple[bytes, Addr]]:
        for c in self._clients():
            self._out.extend(c.take_outgoing())
        out, self._out = self._out, []
        return out

    def take_events(self) -> list:
        ev, self._events = self._events, []
        return ev

    def peer_ready(self, peer: Sequence) -> bool:
        try:
            return normalize_addr(peer) in self._ready
        except (ValueError, TypeError, IndexError):
            return False

    def status(self, now: float) -> dict:
        """For the status document (never a password)."""
        drops = dict(self._old_client_drops)
        for c in self._clients():
            for k, v in c.drops.items():
                drops[k] = drops.get(k, 0) + v
        for k, v in self.drops.items():
            drops[k] = drops.get(k, 0) + v
        return {"state": self.state,
                "relay": format_addr(self.relay.address) if self.relay and self.state != "waiting" else None,
                "relayed": format_addr(self.relayed) if self.relayed else None,
                "last_error": self.last_error, "switches": self.switches,
                "retry_at": self.retry_at if self.state == "waiting" else None,
                "drops": drops, **self.counters,
                "relays": self.relays.status(now)}

    # ---- internals -------------------------------------------------------

    def _clients(self) -> list[turn.TurnClient]:
        return ([self._client] if self._client is not None else []) + self._closing

    def _allocate(self, now: float) -> None:
        relay = self.relays.pick(now)
        if relay is None:
            self.state = "waiting"
            self.relay = None
            self.retry_at = self.relays.next_retry()
            reason = ("no relay configured" if not self.relays.relays
                      else "every relay failed; last: " + (self.last_error or "?"))
            self._events.append(NoRelay(reason, self.retry_at))
            return
        self.relay = relay
        self.state = "allocating"
        self.retry_at = None
        self._client = self._factory(relay.address, relay.username, relay.password)
        self._client.start(now)
        for p in self._peers:
            self._client.add_peer(p, now)

    def _pump(self, c: turn.TurnClient, now: float) -> None:
        for ev in c.take_events():
            if c is not self._client:
                if isinstance(ev, (turn.Closed, turn.Failed)):
                    self._forget(c)
                continue
            if isinstance(ev, turn.Allocated):
                self.state = "ready"
                self.relayed = ev.relayed
                self.relays.succeeded(self.relay)
                self._events.append(RelayUp(c.server, ev.relayed, ev.mapped))
            elif isinstance(ev, turn.PeerReady):
                self._ready.add(ev.peer)
                self._events.append(PeerReady(ev.peer, ev.channel))
            elif isinstance(ev, turn.Data):
                self.counters["received"] += 1
                self._events.append(Received(ev.peer, ev.payload))
            elif isinstance(ev, turn.PeerFailed):
                self.last_error = f"peer {format_addr(ev.peer)}: {ev.reason}"
            elif isinstance(ev, turn.Failed):
                self._fail_current(ev.reason, now, release=False)
                return
            elif isinstance(ev, turn.Closed):
                self._fail_current(ev.reason, now, release=False)
                return

    def _fail_current(self, reason: str, now: float, release: bool) -> None:
        c, relay = self._client, self.relay
        self._client = None
        self._suspect = None
        self.relayed = None
        self._ready.clear()
        self.last_error = reason
        self.switches += 1
        if c is not None:
            self._retire(c, now, release=release)
        if relay is not None:
            self.relays.failed(relay, reason, now)
            self._events.append(RelayLost(relay.address, reason))
        self._allocate(now)

    def _retire(self, c: turn.TurnClient, now: float, release: bool) -> None:
        if release and c.state == "allocated":
            c.close(now)                 # its Refresh(0) leaves through take_outgoing
            self._closing.append(c)
        else:
            c.take_outgoing()            # a failed relay: nothing more goes to it
            self._forget(c)

    def _forget(self, c: turn.TurnClient) -> None:
        if c in self._closing:
            self._closing.remove(c)
        for k, v in c.drops.items():
            self._old_client_drops[k] = self._old_client_drops.get(k, 0) + v

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
