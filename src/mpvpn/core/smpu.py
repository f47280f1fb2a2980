"""The SMPU session engine: one logical connection over N UDP subflows.

Sans-I/O, in the shape of aioquic's connection API::

    sess = Session(session_id, initiator=True)
    sess.add_subflow(member, now)           # one per carrier-matched uplink pair
    sess.send(packet, now)                  # a user packet (from the tun)
    for member, datagram in sess.datagrams_to_send(now): ...   # -> UDP
    delivered = sess.receive_datagram(datagram, member, now)   # UDP ->
    delivered += sess.handle_timer(now)     # at sess.get_timer()
    while (ev := sess.next_event()) is not None: ...

``receive_datagram`` and ``handle_timer`` return the user packets that are
ready for the tun, in sequence order (a list, often empty).  Events report
every state change (subflow up/down, session up/down).

Sending is duplicate mode by default: every user packet goes out on every
established subflow.  ``Session.scheduler`` is the hook a scheduler replaces:
``scheduler(packet, up, now) -> sequence of Subflow`` chooses which of the
established subflows ``up`` carry the packet.  A scheduler from
:func:`mpvpn.core.scheduler.make_scheduler` may also *queue* (``queueing``): then
``send`` hands the packet to ``scheduler.enqueue`` and the session transmits
whatever ``scheduler.pull`` releases, now or at a later timer; and it may
turn on NACKs (``nack``): the receiver asks for sequence numbers missing
from its reorder buffer before their hold deadline and the sender re-sends
them from its send buffer on another subflow (docs/scheduler.md).

Each subflow carries ``sub.meter`` (:class:`mpvpn.core.linkstats.LinkMeter`),
the session's model of its delivery rate and backlog, fed here from the
datagrams sent and the probes echoed.

Where things are: :class:`Session` is the façade and keeps the subflows,
the scheduler, timers, the hold deadline and status; its send side, in
processing order, is :mod:`mpvpn.core.smpu_send` and its receive side
:mod:`mpvpn.core.smpu_receive` (each with the flow at the top).  The DATA layout
is :mod:`mpvpn.core.wire`'s, NACK decisions :mod:`mpvpn.core.nack`'s, the scheduler
interface :mod:`mpvpn.core.schedbase`'s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from mpvpn.core import linktest, wire
from mpvpn.core.linkstats import LinkMeter
from mpvpn.core.linktest import LinkTester
from mpvpn.core.nack import NackReceiver, NackSender
from mpvpn.core.reorder import ReorderBuffer
from mpvpn.core.replay import ReplayWindow
from mpvpn.core.schedbase import DuplicateAll, PacketScheduler, as_scheduler
from mpvpn.core.sendbuf import SendBufferSizer
from mpvpn.core.smpu_receive import ReceivePath
from mpvpn.core.smpu_send import SendPath
from mpvpn.core.subflow import State, Subflow, SubflowConfig


@dataclass
class SessionConfig:
    subflow: SubflowConfig = field(default_factory=SubflowConfig)
    # packets the receiver holds while waiting for a gap: a repair's round
    # trip at the packet rate (TCP at ~500 Mbit/s through agents whose queues
    # put 10-20 ms on the RTT: ~1000-2000 packets; 1024 overflowed and gave
    # up every gap it held)
    reorder_capacity: int = 4096
    hold: float | None = -1.0  # -1: automatic from RTT spread; None: seed rule (no deadline)
    hold_min: float = 0.005
    hold_max: float = 0.200  # the hold's cap; with NACKs stretched to fit a repair and a retry...
    hold_limit: float = 1.0  # ...but never past this (RTT 300 ms: ~0.5 s for one repair)
    hold_initial: float = 0.050  # automatic hold before any RTT is measured
    # recent packets kept for re-sends (powers of two): the packets of the
    # last keep time at the send rate -- the dead-detection window plus the
    # hold's cap (mpvpn.core.sendbuf) -- at least send_buffer, at most
    # send_buffer_max (the memory bound: ~12 MB of 1400-byte datagrams)
    send_buffer: int = 1024
    send_buffer_max: int = 8192
    max_payload: int = 65535 - 8 - 40 - wire.HEADER_LEN - wire.TAG_LEN
    max_queue: int = 65536  # outgoing datagrams not yet collected by the I/O layer
    # NACK (on when the scheduler says so: ``scheduler.nack``)
    nack_interval: float = 0.005  # at most one NACK round per interval (less on short paths)...
    nack_floor: float = 0.0005  # ...never below this; nor the NACK waits (timer granularity)
    nack_copies: int = 2  # a NACK goes out on this many (fastest) subflows
    nack_track: int = 8192  # missing sequence numbers remembered at once (what the peer's send buffer may hold)
    nack_wait_min: float = 0.003  # never ask sooner than this after a gap appears (less on short paths)
    nack_per_round: int = 8  # NACK payloads (64 numbers each) one round may send
    nack_retries: int = 2  # a number whose re-send did not come is asked for again, this often
    retransmit_budget: float = 0.25  # retransmissions per packet sent, on average...
    retransmit_burst: int = 128  # ...with this burst, or a second's worth of the budget if more
    # Duplicate mode: a packet lost on every carrier at once is either bad
    # luck (the product of the carriers' loss: 0.8 % at 20 % on three) or
    # congestion (the same queue full on every carrier: TCP's signal to slow
    # down).  The receiver asks for this many times what luck explains, plus
    # a floor (per packet received, burst dup_ask_burst), and gives up the
    # rest at once: repairing a bulk flow's own overflows kept cubic's queue
    # full (+28 ms median RTT, +22 % bytes at 100 Mbit/s).
    dup_ask_factor: float = 2.0
    dup_ask_floor: float = 0.001
    dup_ask_burst: int = 16
    # (a carrier failing under a fast flow loses its whole in-flight tail at once)

    def validate(self) -> None:
        self.subflow.validate()
        if self.reorder_capacity < 1:
            raise ValueError("reorder_capacity must be >= 1")
        if self.hold is not None and self.hold != -1.0 and self.hold < 0:
            raise ValueError("hold must be None, -1 (auto) or >= 0")
        if not 0 <= self.hold_min <= self.hold_max or self.hold_limit < 0:
            raise ValueError("need 0 <= hold_min <= hold_max and hold_limit >= 0")
        if self.send_buffer < 1 or self.send_buffer & (self.send_buffer - 1):
            raise ValueError("send_buffer must be a power of two")
        if self.send_buffer_max < self.send_buffer or self.send_buffer_max & (self.send_buffer_max - 1):
            raise ValueError("send_buffer_max must be a power of two, at least send_buffer")
        if not 0 < self.max_payload <= wire.MAX_PAYLOAD:
            raise ValueError("max_payload out of range")
        if self.dup_ask_factor < 0 or self.dup_ask_floor < 0 or self.dup_ask_burst < 1:
            raise ValueError("bad duplicate-mode ask budget")
        if (self.nack_interval < 0 or self.nack_copies < 1 or self.nack_track < 1
                or self.nack_wait_min < 0 or self.nack_per_round < 1 or self.nack_floor < 0 or self.retransmit_budget < 0
                or self.retransmit_burst < 0 or self.nack_retries < 0):
            raise ValueError("bad NACK settings")


# -- events ------------------------------------------------------------------

@dataclass(frozen=True)
class SubflowUp:
    member: int


@dataclass(frozen=True)
class SubflowDown:
    member: int
    reason: str


@dataclass(frozen=True)
class SubflowClosed:
    """A subflow finished closing and was removed from the session."""
    member: int


@dataclass(frozen=True)
class SessionUp:
    pass


@dataclass(frozen=True)
class SessionDown:
    reason: str


# Duplicate mode (seed 001): every established subflow carries every packet.
duplicate_all = DuplicateAll()


class Session(SendPath, ReceivePath):
    """One SMPU connection: a group of subflows sharing one sequence space."""

    def __init__(self, session_id: int, initiator: bool, config: SessionConfig | None = None,
                 sealer=None):
        if not 0 < session_id <= 0xFFFFFFFF:
            raise ValueError("session id must be 1..2**32-1")
        self.config = config or SessionConfig()
        self.config.validate()
        c = self.config
        self.session_id = session_id
        self.initiator = initiator
        # mpvpn.core.seal.Sealer: every datagram authenticated, DATA encrypted.
        # None = plaintext (tests and the in-memory demo only).  Chosen for
        # the session's life (a rekey rotates keys inside the same sealer).
        self.sealer = sealer
        self._data_flags = wire.F_SEALED if sealer is not None else 0
        self._tag_len = wire.TAG_LEN if sealer is not None else 0
        # Control datagrams carry a per-member counter that never restarts in
        # a session (it is the AEAD nonce), and are checked against a replay
        # window per member before decryption, updated only after it.
        self._ctrl_seq: dict[int, int] = {}
        self._ctrl_replay: dict[int, ReplayWindow] = {}
        self.subflows: dict[int, Subflow] = {}
        self._up: tuple[Subflow, ...] = ()
        self._up_members: tuple[int, ...] = ()  # their member IDs, in the same order
        self._closing: set[int] = set()
        self.connected = False
        self._hook = duplicate_all  # what was assigned to ``scheduler``
        self._sched: PacketScheduler = duplicate_all  # the same, as the interface
        self._queueing = False
        self._dup_all = True  # the scheduler sends every packet on every subflow
        self.nack_enabled = False  # receiver: ask for missing packets (set by the scheduler)
        # Does the peer send every packet on every subflow (its base.mode is
        # duplicate)?  None: assume it does what we do.  Decides the ask
        # budget (_update_ask_budget).
        self.peer_duplicates: bool | None = None
        self.nack_rx = NackReceiver(c)  # what is missing, when to ask (mpvpn.core.nack)
        self.nack_tx = NackSender(c)  # what to re-send for the peer's NACKs
        self._now = 0.0  # the latest `now` seen (for datagrams emitted by subflows)
        self._seq = 0
        self._sendbuf: list = [None] * c.send_buffer
        self._sendmask = c.send_buffer - 1
        self._sendsizer = SendBufferSizer(c.send_buffer, c.send_buffer_max)
        hold = c.hold_initial if c.hold == -1.0 else c.hold
        self.reorder = ReorderBuffer(c.reorder_capacity, hold)
        self.reorder.set_hold(hold, c.hold_max)  # NACK deferrals end at the cap
        self._out: deque = deque()
        self._bulk: dict[int, list] = {}  # member -> sealed DATA from send_many (C loops)
        self._bulk_n = 0
        self._events: deque = deque()
        # session counters
        self.sent = 0  # user packets accepted by send()
        self.tx_no_subflow = 0  # user packets dropped: no established subflow
        self.tx_too_big = 0
        self.tx_queue_full = 0
        self.retransmits = 0
        self._sched_drops = 0  # packets lost with a replaced queueing scheduler
        self.malformed: dict[str, int] = {}
        self.auth_failures = 0  # datagrams whose AEAD tag did not verify (or not sealed)
        self.replays = 0  # control datagrams rejected by the replay window
        self.wrong_session = 0
        self.wrong_member = 0
        self.unknown_member = 0
        self.test_queue_full = 0  # link-test datagrams not queued: the output queue was full
        self.linktest = LinkTester(self)

    # -- the scheduler -----------------------------------------------------------

    @property
    def scheduler(self):
        """The scheduler choosing subflows: a :class:`mpvpn.core.schedbase.PacketScheduler`
        (or a plain ``hook(packet, up, now)``, adapted).  Assigning one whose
        ``queueing`` / ``nack`` is set turns those on."""
        return self._hook

    @scheduler.setter
    def scheduler(self, value) -> None:
        old = self._sched
        sched = as_scheduler(value)
        self._hook = value
        self._sched = sched
        self._queueing = bool(sched.queueing)
        self._dup_all = bool(sched.duplicates_everything)
        self.nack_enabled = bool(sched.nack)
        if not self.nack_enabled:
            self.nack_rx.reset()
        bw0 = sched.initial_rate
        if bw0:
            for sub in self.subflows.values():
                sub.meter.seed(bw0)
        if old is not sched:
            # packets queued in the old one are gone; its drops stay counted
            self._sched_drops += old.pending + old.dropped
        self._update_hold()
        self._update_ask_budget()

    # -- subflow management ---------------------------------------------------

    def add_subflow(self, member: int, now: float, name: str = "", meta: dict | None = None) -> Subflow:
        """Add a subflow; the initiator starts its 3-way open at once."""
        if member in self.subflows:
            raise ValueError(f"member {member} already in session")
        self._now = now
        sub = Subflow(member, self.initiator, self.config.subflow, self._emit, self._on_state,
                      name=name, meta=meta,
                      meter=LinkMeter(bw0=self._sched.initial_rate or 125_000.0))
        self.subflows[member] = sub
        self._ctrl_replay.setdefault(member, ReplayWindow(8192))
        if self.initiator:
            sub.open(now)
        return sub

    def punch(self, member: int, now: float) -> None:
        """Send one NAT punch probe on subflow ``member`` (Subflow.punch)."""
        sub = self.subflows.get(member)
        if sub is not None and sub.state is not State.CLOSING:
            self._now = now
            sub.punch(now)

    def remove_subflow(self, member: int, now: float) -> None:
        """Close a subflow gracefully (2-way close); it leaves when closed."""
        sub = self.subflows.get(member)
        if sub is None:
            return
        self._closing.add(member)
        sub.close(now)
        if sub.state is State.CLOSED:
            self._reap(member)

    def close(self, now: float) -> None:
        """Close every subflow (the session is ending)."""
        for member in list(self.subflows):
            sub = self.subflows[member]
            self._closing.add(member)
            sub.close(now, wire.CloseReason.SHUTDOWN)
            if sub.state is State.CLOSED:
                self._reap(member)

    def forget_subflow(self, member: int) -> None:
        """Remove a subflow at once, without waiting for its close to finish
        (its member ID is being given to a new subflow)."""
        self._reap(member)

    def _reap(self, member: int) -> None:
        self._closing.discard(member)
        if self.subflows.pop(member, None) is not None:
            self._events.append(SubflowClosed(member))
            self._refresh_up("subflow removed")

    def _on_state(self, sub: Subflow, old: State, new: State, reason: str) -> None:
        if new is State.ESTABLISHED:
            sub.meter.reset_queue(self._now)
            self._events.append(SubflowUp(sub.member))
        elif old is State.ESTABLISHED:
            self._events.append(SubflowDown(sub.member, reason))
        if new is State.ESTABLISHED or old is State.ESTABLISHED:
            self._refresh_up(reason)
            self._update_hold()
            self._update_ask_budget()

    def _refresh_up(self, reason: str) -> None:
        self._up = tuple(s for s in self.subflows.values() if s.state is State.ESTABLISHED)
        self._up_members = tuple(s.member for s in self._up)
        if self._up and not self.connected:
            self.connected = True
            self._events.append(SessionUp())
        elif not self._up and self.connected:
            self.connected = False
            self._events.append(SessionDown(reason))

    @property
    def up(self) -> tuple[Subflow, ...]:
        """The established subflows."""
        return self._up

    def start_link_test(self, now: float, duration: float = linktest.DEFAULT_DURATION) -> int:
        """Start ``mpvpn test-links`` (see mpvpn.core.linktest); raises LinkTestError."""
        self._now = now
        return self.linktest.start(now, duration)

    # -- timers -----------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` must run (None: nothing scheduled)."""
        t = self.reorder.next_deadline()
        for sub in self.subflows.values():
            d = sub.next_deadline()
            if d is not None and (t is None or d < t):
                t = d
        d = self.nack_rx.next
        if d is not None and (t is None or d < t):
            t = d
        if self._queueing and self._up:
            d = self._sched.next_release()
            if d is not None and (t is None or d < t):
                t = d
        lt = self.linktest
        if lt.run is not None or lt.sender is not None or lt.receiver is not None:
            d = lt.deadline()
            if d is not None and (t is None or d < t):
                t = d
        return t

    def handle_timer(self, now: float) -> list:
        """Run due timers; returns user packets released by the hold deadline."""
        self._now = now
        self.nack_tx.mark_rate(now, self.sent)
        self._fit_send_buffer(now)
        for member, sub in list(self.subflows.items()):
            d = sub.next_deadline()
            if d is not None and d <= now:
                sub.on_timer(now)
                if sub.state is State.CLOSED and member in self._closing:
                    self._reap(member)
        # the NACK round first: it may defer the hold's releases (a retry
        # for a re-send that did not come is due when the last deferral ends)
        nxt = self.nack_rx.next
        out = self._nack_tick(now) if nxt is not None and nxt <= now else []
        out += self.reorder.expire(now)
        if self._queueing and self._sched.pending:
            self._pump(now)
        lt = self.linktest
        if lt.run is not None or lt.sender is not None or lt.receiver is not None:
            d = lt.deadline()
            if d is not None and d <= now:
                lt.on_timer(now)
        return out

    def next_event(self):
        """The next event (SubflowUp, SubflowDown, ...) or None."""
        return self._events.popleft() if self._events else None

    # -- hold deadline ------------------------------------------------------------

    def _update_hold(self) -> None:
        """Automatic hold: RTT spread across established subflows + 4 * max rttvar.

        With NACKs on, the hold is stretched, if needed, to leave room for one
        repair (see below), and a gap that no subflow's order has proven lost
        yet is asked for after ``wait = min(hold/2, spread + 4 * rttvar)``
        (at least ``wait_min``).  The NACK timing follows the path: on a
        short one (RTT 0.1 ms) the fixed 3 ms wait and 5 ms between rounds
        were longer than the whole 5 ms hold, and most repairs came too late
        (aggregate at 10 % loss per carrier: 1.4-2 % delivered loss); on a
        long one (RTT 300 ms) one repair takes longer than ``hold_max``, so
        the cap stretches to fit a repair and one retry, up to ``hold_limit``.
        """
        c = self.config
        nrx = self.nack_rx
        up = [s for s in self._up if s.rtt.srtt is not None]
        if not up:
            nrx.set_timing(c.nack_wait_min, c.nack_wait_min, c.nack_interval)
            self.reorder.set_hold(c.hold_initial if c.hold == -1.0 else self.reorder.hold, c.hold_max)
            return
        srtts = sorted(s.rtt.srtt for s in up)
        spread = srtts[-1] - srtts[0]
        var = max(s.rtt.rttvar for s in up)
        base = spread + 4 * var
        hold = base
        cap = c.hold_max
        # Never ask sooner than the reordering this path shows (spread + 4
        # rttvar), at most nack_wait_min, at least the timer granularity; at
        # most one round per fastest round trip, within the same bounds.
        floor = c.nack_floor
        wait_min = max(floor, min(c.nack_wait_min, base))
        interval = max(floor, min(c.nack_interval, srtts[0]))
        if self.nack_enabled:
            # a repair: the loss shows once the slowest subflow overtook it
            # (half the spread) and the order evidence is in (wait_min); the
            # NACK crosses a fast subflow and the re-send another one, behind
            # its queue: with the fastest one lost, about 1.5 RTTs of the
            # second fastest (srtt includes the queue, which is all on the
            # data's way)
            second = srtts[1] if len(srtts) > 1 else srtts[0]
            repair = spread / 2 + wait_min + 1.5 * second + 4 * var + interval
            hold = max(hold, repair)
            cap = max(cap, min(c.hold_limit, 2 * repair))  # a repair and a retry fit
        if c.hold == -1.0:
            hold = min(cap, max(c.hold_min, hold))
            self.reorder.set_hold(hold, cap)
        else:
            self.reorder.set_hold(self.reorder.hold, cap)
            if c.hold is not None:
                hold = c.hold
        # Without evidence from the subflows' order (see _nack_tick), a gap is
        # taken for a loss after about the RTT spread, at most half the hold.
        nrx.set_timing(max(wait_min, min(hold / 2, base)), wait_min, interval)

    def retune(self, *, keepalive_idle: float, keepalive_active: float, dead_after: int,
               hold_max: float) -> None:
        """Live options changed (the agent's reload): keepalive timing, dead
        detection and the hold's cap, checked as SessionConfig checks them."""
        sub = self.config.subflow
        trial = replace(self.config, hold_max=hold_max,
                        subflow=replace(sub, keepalive_idle=keepalive_idle,
                                        keepalive_active=keepalive_active, dead_after=dead_after))
        trial.validate()
        sub.keepalive_idle, sub.keepalive_active, sub.dead_after = keepalive_idle, keepalive_active, dead_after
        self.config.hold_max = hold_max
        self.reorder.set_hold(self.reorder.hold, hold_max)

    def _update_ask_budget(self) -> None:
        """Duplicate mode: every carrier carried every packet, so one missing
        was lost on all of them; ask for what chance explains --
        ``dup_ask_factor`` x the product of the carriers' inbound loss, plus
        ``dup_ask_floor`` -- and give up the rest at once (correlated loss: a
        queue full on every carrier, for the sender's congestion control).
        Other modes ask for everything (None)."""
        c = self.config
        nrx = self.nack_rx
        if not (self._dup_all if self.peer_duplicates is None else self.peer_duplicates):
            nrx.set_ask_budget(None)
            return
        luck = 1.0 if self._up else 0.0
        for s in self._up:
            lost = s.loss_in.loss
            luck *= 0.0 if lost is None else lost
        nrx.set_ask_budget(c.dup_ask_factor * luck + c.dup_ask_floor, float(c.dup_ask_burst))

    # -- status -------------------------------------------------------------------

    @property
    def tx_sched_drops(self) -> int:
        """User packets a queueing scheduler dropped (overflow, too old, replaced)."""
        return self._sched_drops + self._sched.dropped

    def counters(self) -> dict:
        r = self.reorder
        nrx, ntx = self.nack_rx, self.nack_tx
        return {
            "sent": self.sent,
            "delivered": r.delivered,
            "duplicates": r.duplicates,
            "late": r.late,
            "buffered": len(r),
            "reorder_flushes": r.flushes,
            "deadline_releases": r.deadline_releases,
            "skipped": r.skipped,
            "retransmits": self.retransmits,
            "nacks_sent": nrx.nacks_sent,
            "nack_seqs": nrx.nack_seqs,
            "nack_too_late": nrx.nack_too_late,
            "nack_untracked": nrx.nack_untracked,
            "nack_again": nrx.nack_again,
            "nack_declined": nrx.nack_declined,
            "nacks_received": ntx.nacks_received,
            "nack_retransmits": ntx.nack_retransmits,
            "nack_unavailable": ntx.nack_unavailable,
            "nack_budget_drops": ntx.nack_budget_drops,
            "nack_duplicates": ntx.nack_duplicates,
            "tx_sched_drops": self.tx_sched_drops,  # dropped by the scheduler's queue
            "tx_no_subflow": self.tx_no_subflow,
            "tx_too_big": self.tx_too_big,
            "tx_queue_full": self.tx_queue_full,
            "malformed": sum(self.malformed.values()) + self.wrong_member,
            "malformed_by_reason": dict(self.malformed),
            "auth_failures": self.auth_failures,
            "replays": self.replays,
            "wrong_session": self.wrong_session,
            "unknown_member": self.unknown_member,
            "test_queue_full": self.test_queue_full,
            "test_stray": self.linktest.stray,
        }

    def status(self, now: float) -> dict:
        doc = {
            "session_id": self.session_id,
            "state": "connected" if self.connected else "disconnected",
            "initiator": self.initiator,
            "hold_ms": None if self.reorder.hold is None else round(self.reorder.hold * 1000, 3),
            "links": [s.status(now) for s in self.subflows.values()],
            "counters": self.counters(),
        }
        sched_status = self._sched.status(self._up, now)
        if sched_status is not None:
            doc["scheduler"] = sched_status
        return doc
