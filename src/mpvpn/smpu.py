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
:func:`mpvpn.scheduler.make_scheduler` may also *queue* (``queueing``): then
``send`` hands the packet to ``scheduler.enqueue`` and the session transmits
whatever ``scheduler.pull`` releases, now or at a later timer; and it may
turn on NACKs (``nack``): the receiver asks for sequence numbers missing
from its reorder buffer before their hold deadline and the sender re-sends
them from its send buffer on another subflow (docs/scheduler.md).

Each subflow carries ``sub.meter`` (:class:`mpvpn.linkstats.LinkMeter`),
the session's model of its delivery rate and backlog, fed here from the
datagrams sent and the probes echoed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from mpvpn import linktest, wire
from mpvpn.fastpath import LOOPS as _LOOPS
from mpvpn.linktest import LinkTester
from mpvpn.linkstats import LinkMeter
from mpvpn.reorder import ReorderBuffer
from mpvpn.replay import ReplayWindow
from mpvpn.schedbase import DuplicateAll, PacketScheduler, as_scheduler
from mpvpn.subflow import State, Subflow, SubflowConfig
from mpvpn.wire import DecodeError, Op

_pack = wire.HEADER.pack
_HLEN = wire.HEADER_LEN
_DATA = wire.DATA
_VERSION = wire.VERSION
# the one builder and parser of DATA datagrams (wire.py; C: the same constants)
_data_datagram = wire.data_datagram
_data_payload = wire.data_payload
_parse_data = wire.parse_data
_with_member = wire.with_member
_PROBES = (int(Op.KEEPALIVE), int(Op.KEEPALIVE_ACK))
_NACK = int(Op.NACK)
_TEST = int(Op.TEST)


@dataclass
class SessionConfig:
    subflow: SubflowConfig = field(default_factory=SubflowConfig)
    reorder_capacity: int = 1024  # packets the receiver holds while waiting for a gap
    hold: float | None = -1.0  # -1: automatic from RTT spread; None: seed rule (no deadline)
    hold_min: float = 0.005
    hold_max: float = 0.200
    hold_initial: float = 0.050  # automatic hold before any RTT is measured
    send_buffer: int = 1024  # recent packets kept for retransmission (power of two)
    max_payload: int = 65535 - 8 - 40 - wire.HEADER_LEN - wire.TAG_LEN
    max_queue: int = 65536  # outgoing datagrams not yet collected by the I/O layer
    # NACK (on when the scheduler says so: ``scheduler.nack``)
    nack_interval: float = 0.005  # at most one NACK round per interval
    nack_copies: int = 2  # a NACK goes out on this many (fastest) subflows
    nack_track: int = 512  # missing sequence numbers remembered at once
    nack_wait_min: float = 0.003  # never ask sooner than this after a gap appears
    nack_per_round: int = 8  # NACK payloads (64 numbers each) one round may send
    nack_retries: int = 2  # a number whose re-send did not come is asked for again, this often
    retransmit_budget: float = 0.25  # retransmissions per packet sent, on average...
    retransmit_burst: int = 128  # ...with this burst, or a second's worth of the budget if more
    # (a carrier failing under a fast flow loses its whole in-flight tail at once)

    def validate(self) -> None:
        self.subflow.validate()
        if self.reorder_capacity < 1:
            raise ValueError("reorder_capacity must be >= 1")
        if self.hold is not None and self.hold != -1.0 and self.hold < 0:
            raise ValueError("hold must be None, -1 (auto) or >= 0")
        if not 0 <= self.hold_min <= self.hold_max:
            raise ValueError("need 0 <= hold_min <= hold_max")
        if self.send_buffer < 1 or self.send_buffer & (self.send_buffer - 1):
            raise ValueError("send_buffer must be a power of two")
        if not 0 < self.max_payload <= wire.MAX_PAYLOAD:
            raise ValueError("max_payload out of range")
        if (self.nack_interval < 0 or self.nack_copies < 1 or self.nack_track < 1
                or self.nack_wait_min < 0 or self.nack_per_round < 1 or self.retransmit_budget < 0
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


class Session:
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
        # mpvpn.seal.Sealer: every datagram authenticated, DATA encrypted.
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
        self._closing: set[int] = set()
        self.connected = False
        self._hook = duplicate_all  # what was assigned to ``scheduler``
        self._sched: PacketScheduler = duplicate_all  # the same, as the interface
        self._queueing = False
        self._dup_all = True  # the scheduler sends every packet on every subflow
        self.nack_enabled = False  # receiver: ask for missing packets (set by the scheduler)
        self._now = 0.0  # the latest `now` seen (for datagrams emitted by subflows)
        self._seq = 0
        self._sendbuf: list = [None] * c.send_buffer
        self._sendmask = c.send_buffer - 1
        hold = c.hold_initial if c.hold == -1.0 else c.hold
        self.reorder = ReorderBuffer(c.reorder_capacity, hold)
        self.reorder.hold_cap = c.hold_max  # NACK deferrals end there
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
        # NACK, receiver side
        self._missing: dict[int, float] = {}  # seq -> when its gap was noticed
        # asked for, re-send not here yet: seq -> [ask again at, gap noticed at, asks left]
        self._asked: dict[int, list] = {}
        self._rx_high = 0  # highest DATA sequence number received
        # member -> [highest seq received on it, when data last came, smoothed gap]
        self._high_by: dict[int, list] = {}
        self._nack_next: float | None = None
        self._nack_last = float("-inf")  # when the last NACK went out (rate limit)
        self._nack_wait = c.nack_wait_min
        self.nacks_sent = 0
        self.nack_seqs = 0  # sequence numbers asked for
        self.nack_too_late = 0  # missing numbers not asked for: no time left before the hold
        self.nack_untracked = 0  # missing numbers beyond nack_track
        self.nack_again = 0  # numbers asked for again (the first re-send, or the NACK, was lost)
        # NACK, sender side
        self.nacks_received = 0
        self.nack_retransmits = 0  # sequence numbers re-sent for a NACK
        self.nack_unavailable = 0  # asked for but no longer in the send buffer
        self.nack_budget_drops = 0  # asked for but over the retransmission budget
        self.nack_duplicates = 0  # asked for again right after a re-send
        self._retx_tokens = float(c.retransmit_burst)
        self._retx_mark = 0  # self.sent when the tokens were last topped up
        self._rate_mark = (float("-inf"), 0)  # (time, self.sent) where _send_rate's step began
        self._send_rate = 0.0  # user packets per second (see _mark_rate)
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
        """The scheduler choosing subflows: a :class:`mpvpn.schedbase.PacketScheduler`
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
            self._missing.clear()
            self._asked.clear()
            self._nack_next = None
        bw0 = sched.initial_rate
        if bw0:
            for sub in self.subflows.values():
                sub.meter.bw0 = bw0
        if old is not sched:
            # packets queued in the old one are gone; its drops stay counted
            self._sched_drops += old.pending + old.dropped
        self._update_hold()

    def _pump(self, now: float) -> None:
        """Transmit what a queueing scheduler releases now."""
        up = self._up
        if not up:
            return
        sched = self._sched
        pull = sched.pull
        transmit = self._transmit
        out = self._out
        limit = self.config.max_queue
        while len(out) < limit:
            if sched.retransmit_pending():
                r = sched.pull_retransmit(up, now)
                if r is not None:  # stage 3: re-sends first
                    entry = self._sendbuf[r[0] & self._sendmask]
                    if entry is not None and entry[0] == r[0]:
                        if self._retransmit_entry(entry, [s.member for s in r[1]], now):
                            self.nack_retransmits += 1
                    continue
            item = pull(up, now)
            if item is None:
                break
            transmit(item[0], item[1], now)

    # -- subflow management ---------------------------------------------------

    def add_subflow(self, member: int, now: float, name: str = "", meta: dict | None = None) -> Subflow:
        """Add a subflow; the initiator starts its 3-way open at once."""
        if member in self.subflows:
            raise ValueError(f"member {member} already in session")
        self._now = now
        sub = Subflow(member, self.initiator, self.config.subflow, self._emit, self._on_state,
                      name=name, meta=meta)
        sub.meter = LinkMeter(bw0=self._sched.initial_rate or 125_000.0)
        self.subflows[member] = sub
        self._ctrl_replay.setdefault(member, ReplayWindow(8192))
        if self.initiator:
            sub.open(now)
        return sub

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

    def _refresh_up(self, reason: str) -> None:
        self._up = tuple(s for s in self.subflows.values() if s.state is State.ESTABLISHED)
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

    # -- sending ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.sealer.send_epoch if self.sealer is not None else 0

    def _ctrl_datagram(self, m: int, opcode: int, payload: bytes) -> bytes:
        """A control datagram for member ``m`` under its next control counter."""
        self._ctrl_seq[m] = seq = self._ctrl_seq.get(m, 0) + 1
        if self.sealer is not None:
            return self.sealer.seal(opcode, m, self.session_id, seq, payload)
        return _pack(_VERSION, opcode, m, 0, self.session_id, len(payload), 0, 0, seq) + payload

    def _emit(self, sub: Subflow, opcode: int, payload: bytes) -> None:
        """Queue a control datagram for ``sub`` (called by subflows)."""
        dgram = self._ctrl_datagram(sub.member, opcode, payload)
        sub.on_sent(len(dgram))
        meter = sub.meter
        meter.on_send(len(dgram), self._now)
        if opcode in _PROBES:
            meter.on_probe_sent(int.from_bytes(payload[:8], "big"), self._now)
        self._out.append((sub.member, dgram))

    def _emit_test(self, member: int, payload: bytes) -> None:
        """Queue a link-test datagram (mpvpn.linktest): sealed like control
        datagrams, but kept out of the subflow's counters and meter, so a test
        does not move loss estimates, dead detection or the scheduler's rates."""
        sub = self.subflows.get(member)
        if sub is None or sub.state is not State.ESTABLISHED:
            return
        if len(self._out) >= self.config.max_queue:
            self.test_queue_full += 1
            return
        self._out.append((member, self._ctrl_datagram(member, _TEST, payload)))

    def start_link_test(self, now: float, duration: float = linktest.DEFAULT_DURATION) -> int:
        """Start ``mpvpn test-links`` (see mpvpn.linktest); raises LinkTestError."""
        self._now = now
        return self.linktest.start(now, duration)

    def send(self, packet: bytes, now: float) -> bool:
        """Send one user packet on the subflows the scheduler picks.

        Returns False (and counts why) if it could not be sent at all.  With a
        queueing scheduler True means accepted: it leaves when released.
        """
        up = self._up
        self._now = now
        if not up:
            self.tx_no_subflow += 1
            return False
        n = len(packet)
        if n > self.config.max_payload or n == 0:
            self.tx_too_big += 1
            return False
        if len(self._out) >= self.config.max_queue:
            self.tx_queue_full += 1
            return False
        if self._queueing:
            targets = self._sched.offer(packet, up, now)
            if targets:
                self._transmit(packet, targets, now)
                return True
            self._pump(now)  # time went by: what is queued may leave now
            return targets is None
        targets = self._sched(packet, up, now)
        if not targets:
            self.tx_no_subflow += 1
            return False
        self._transmit(packet, targets, now)
        return True

    def send_many(self, packets: list, now: float) -> int:
        """``send`` for a batch of user packets; returns how many were accepted.

        In duplicate mode with sealing, the per-packet work (seal once, one
        copy per subflow, send buffer) runs in the optional C loops
        (:mod:`mpvpn.fastpath`) and the per-subflow bookkeeping once per
        batch; the datagrams are the same as ``send`` makes.  Anything else
        takes ``send`` packet by packet."""
        loops = _LOOPS
        up = self._up
        if (loops is None or not (self._dup_all or self._queueing) or self.sealer is None or not up
                or len(self._out) + self._bulk_n + len(packets) * len(up) > self.config.max_queue):
            send = self.send
            return sum(1 for p in packets if send(p, now))
        maxp = self.config.max_payload
        for p in packets:
            if not 0 < len(p) <= maxp:
                send = self.send
                return sum(1 for p in packets if send(p, now))
        if not self._dup_all:
            return self._send_many_queueing(packets, now, loops)
        self._now = now
        seq0 = self._seq + 1
        n = len(packets)
        encrypt, epoch = self.sealer.reserve_data(seq0, n)  # nonce guard, counted for rekeying
        targets = up
        runs, nbytes = loops.seal_dup(encrypt, self.session_id, epoch, seq0,
                                      packets, bytes(s.member for s in up), self._sendbuf,
                                      self._sendmask, targets)
        self._seq = seq0 + n - 1
        self.sent += n
        bulk = self._bulk
        for sub, run in zip(up, runs):
            m = sub.member
            q = bulk.get(m)
            if q is None:
                bulk[m] = run
            else:
                q += run
            sub.on_data_sent(n, nbytes, now)
            sub.meter.on_send_many(n, nbytes, now)
        self._bulk_n += n * len(up)
        return n

    def _send_many_queueing(self, packets: list, now: float, loops) -> int:
        """``send_many`` with a queueing scheduler (aggregate, adaptive): the
        scheduler decides packet by packet as ``send`` has it do (each
        decision sees the backlog the previous ones added, a queued packet
        pumps the queue), and the packets decided at once are sealed by the C
        loops, one call per run of packets for the same subflows; the
        datagrams, their order and the scheduler's state are ``send``'s."""
        self._now = now
        up = self._up
        sched = self._sched
        offer = sched.offer
        over = _HLEN + self._tag_len  # a sealed datagram's bytes beyond the packet
        runs: list = []  # [packets, targets] in order, consecutive packets with the same targets
        accepted = 0
        for p in packets:
            targets = offer(p, up, now)
            if not targets:
                accepted += targets is None  # None: queued; False: dropped
                if runs:
                    self._seal_runs(runs, now, loops)
                    runs = []
                self._pump(now)  # as send does: what is queued may leave now
                continue
            accepted += 1
            dlen = len(p) + over
            for sub in targets:
                sub.meter.on_send(dlen, now)  # before the next decision, as _transmit does
            if runs and runs[-1][1] == targets:
                runs[-1][0].append(p)
            else:
                runs.append(([p], targets))
        if runs:
            self._seal_runs(runs, now, loops)
        return accepted

    def _seal_runs(self, runs: list, now: float, loops) -> None:
        """Seal ``[(packets, targets), ...]`` with the next sequence numbers
        (C loops), queue the datagrams in order, count them; the meters were
        fed when the packets were decided."""
        seq = self._seq + 1
        total = sum(len(r[0]) for r in runs)
        encrypt, epoch = self.sealer.reserve_data(seq, total)  # nonce guard, counted for rekeying
        sid = self.session_id
        sendbuf, mask, out = self._sendbuf, self._sendmask, self._out
        for pkts, targets in runs:
            n = len(pkts)
            dgrams, nbytes = loops.seal_dup(encrypt, sid, epoch, seq, pkts,
                                            bytes(t.member for t in targets), sendbuf, mask, targets)
            if len(targets) == 1:
                m = targets[0].member
                out += [(m, d) for d in dgrams[0]]
            else:
                members = [t.member for t in targets]
                for k in range(n):
                    for j, m in enumerate(members):
                        out.append((m, dgrams[j][k]))
            for sub in targets:
                sub.on_data_sent(n, nbytes, now)
            seq += n
        self._seq = seq - 1
        self.sent += total

    def _transmit(self, packet: bytes, targets, now: float) -> None:
        """Give ``packet`` the next sequence number and send it on ``targets``."""
        n = len(packet)
        self._seq = seq = self._seq + 1
        self.sent += 1
        out = self._out
        if self.sealer is not None:
            # Sealed once; the copies differ only in the header's member byte.
            sealed = self.sealer.seal_data(self.session_id, seq, packet)
            self._sendbuf[seq & self._sendmask] = (seq, sealed, targets)
            dlen = len(sealed)
            for sub in targets:
                m = sub.member
                out.append((m, _with_member(sealed, m)))
                sub.on_data_sent(1, dlen, now)
                sub.meter.on_send(dlen, now)
            return
        self._sendbuf[seq & self._sendmask] = (seq, packet, targets)
        sid = self.session_id
        dlen = n + _HLEN
        for sub in targets:
            m = sub.member
            out.append((m, _data_datagram(m, sid, seq, packet)))
            sub.on_data_sent(1, dlen, now)
            sub.meter.on_send(dlen, now)

    def retransmit(self, seq: int, members, now: float) -> bool:
        """Send ``seq`` again from the send buffer on the given established subflows."""
        entry = self._sendbuf[seq & self._sendmask]
        if entry is None or entry[0] != seq:
            return False
        return self._retransmit_entry(entry, members, now)

    def _retransmit_entry(self, entry, members, now: float) -> bool:
        seq = entry[0]
        stored = entry[1]  # sealed datagram (resent as is: never sealed twice) or plaintext
        sent = False
        for m in members:
            sub = self.subflows.get(m)
            if sub is None or sub.state is not State.ESTABLISHED:
                continue
            if self.sealer is not None:
                dgram = _with_member(stored, m)
            else:
                dgram = _data_datagram(m, self.session_id, seq, stored)
            self._out.append((m, dgram))
            sub.on_data_sent(1, len(dgram), now)
            sub.meter.on_send(len(dgram), now)
            sent = True
        if sent:
            self.retransmits += 1
            self._sendbuf[seq & self._sendmask] = (seq, stored, entry[2], now)
        return sent

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[int, bytes]]:
        """Everything queued since the last call: ``(member, datagram)`` pairs."""
        out = self._out
        items = list(out)
        out.clear()
        if self._bulk:
            for m, run in self._bulk.items():
                items += [(m, d) for d in run]
            self._bulk = {}
            self._bulk_n = 0
        return items

    def datagrams_by_member(self) -> dict[int, list]:
        """Everything queued since the last call, as ``member -> [datagram, ...]``
        (each member's in the order queued; what an I/O layer sends per socket)."""
        runs = self._bulk
        self._bulk = {}
        self._bulk_n = 0
        out = self._out
        if out:
            for m, d in out:
                run = runs.get(m)
                if run is None:
                    runs[m] = [d]
                else:
                    run.append(d)
            out.clear()
        return runs

    # -- receiving ----------------------------------------------------------------

    def _drop_malformed(self, why: str, sub: Subflow | None) -> list:
        self.malformed[why] = self.malformed.get(why, 0) + 1
        if sub is not None:
            sub.on_malformed()
        return []

    def receive_datagram(self, data: bytes, member: int, now: float, source=None) -> list:
        """Process one datagram that arrived on subflow ``member``.

        Returns the user packets now deliverable, in order.  Never raises for
        any ``data``: bad datagrams are dropped and counted.

        ``source`` (opaque, e.g. the UDP source address) updates the
        subflow's ``remote`` -- where its datagrams are sent -- but only
        from an authenticated control datagram, so a NAT rebinding is
        followed and a spoofed or replayed datagram can move nothing.
        """
        self._now = now
        # Fast path for well-formed DATA of this session (most traffic, and
        # in duplicate mode mostly copies that are dropped right here, before
        # any decryption).  Anything unusual takes the full path below, which
        # classifies and counts it.
        seq = _parse_data(data, member, self.session_id, self._data_flags)
        if seq is not None:
            sub = self.subflows.get(member)
            if sub is not None:
                return self._receive_data(data, seq, sub, now)
        hdr = wire.decode(data)
        sub = self.subflows.get(member)
        if hdr.__class__ is DecodeError:
            return self._drop_malformed(hdr.name.lower(), sub)
        if hdr.session != self.session_id:
            self.wrong_session += 1
            return []
        if sub is None:
            self.unknown_member += 1
            return []
        if hdr.member != member:
            self.wrong_member += 1
            sub.on_malformed()
            return []
        sealer = self.sealer
        if sealer is None:
            if hdr.flags & wire.F_SEALED:  # sealed datagrams need keys
                return self._drop_malformed("sealed", sub)
        elif not hdr.flags & wire.F_SEALED:
            self.auth_failures += 1
            return []
        if hdr.opcode == _DATA:
            return self._receive_data(data, hdr.seq, sub, now)
        window = self._ctrl_replay[member]
        if not window.check(hdr.seq):
            self.replays += 1
            return []
        if sealer is None:
            payload = memoryview(data)[_HLEN:]
        else:
            payload = sealer.open(data)
            if payload is None:
                self.auth_failures += 1
                return []
        window.update(hdr.seq)
        if source is not None:
            sub.on_source(source)
        op = hdr.opcode
        if op == _TEST:  # link test: out of the subflow's counters (see _emit_test)
            if sub.state is State.ESTABLISHED:
                self.linktest.on_message(payload, member, now)
            return []
        sub.on_receive(len(data), now)
        if op == _NACK:
            self._on_nack(payload, now)
            return []
        samples = sub.rtt.samples
        sub.on_control(op, payload, now)
        if sub.rtt.samples != samples:
            sub.meter.note_rtt(sub.rtt.latest)  # the handshake's too: before any queue
        if op in _PROBES and sub.state is State.ESTABLISHED:
            _ts, echo, delay_us, _tx, _loss = wire.PROBE.unpack(payload)
            if sub.loss_out_ppm is not None:
                sub.meter.loss = sub.loss_out_ppm / 1_000_000
            if echo:
                sub.meter.on_echo(echo, delay_us / 1_000_000, now, sub.rtt.min_rtt)
        if op in (Op.KEEPALIVE, Op.KEEPALIVE_ACK, Op.CONNECT_ACK, Op.ACK):
            self._update_hold()
        if sub.state is State.CLOSED and member in self._closing:
            self._reap(member)
        if self._queueing and self._sched.pending:
            self._pump(now)  # a re-measured backlog or a subflow that came up may free room
        return []

    def receive_many(self, datagrams: list, member: int, now: float, source=None) -> list:
        """``receive_datagram`` for a batch that arrived on subflow ``member``.

        Runs of sealed DATA that are stale copies or come exactly in order go
        through the optional C loops (:mod:`mpvpn.fastpath`) with the same
        accounting (an in-order run opens no gap: its NACK bookkeeping is done
        once per run); anything else (control, reordering, a rekey being
        confirmed) datagram by datagram through the full path."""
        loops = _LOOPS
        sealer = self.sealer
        sub = self.subflows.get(member)
        if loops is None or sealer is None or sub is None or sealer.send_pending:
            out = []
            for d in datagrams:
                out += self.receive_datagram(d, member, now, source)
            return out
        self._now = now
        reorder = self.reorder
        cur, cur_dec, prev, prev_dec = sealer.data_decryptors()
        out = []
        i = 0
        n = len(datagrams)
        sid = self.session_id
        while i < n:
            state = reorder.in_order_state()
            if state is not None:  # nothing buffered: in-order runs may bypass push()
                last, lo, hi = state
                j, got, last, dup, late, nbytes, bad = loops.open_run(
                    datagrams, i, member, sid, last, lo, hi, cur,
                    cur_dec, -1 if prev is None else prev, prev_dec, InvalidTag)
                if j > i:
                    ok = j - i - bad
                    if ok:
                        sub.on_receive(nbytes, now, ok)
                    if dup or late:
                        reorder.count_stale(dup, late)
                        sub.on_stale(dup, late)
                    if bad:
                        self.auth_failures += bad
                    if got:
                        reorder.took_in_order(last, len(got))
                        sub.on_data(now, len(got))
                        out += got
                        if self.nack_enabled:
                            self._nack_in_order(member, last - len(got) + 1, last, now)
                    i = j
                    if i >= n:
                        break
            out += self.receive_datagram(datagrams[i], member, now, source)
            i += 1
        return out

    def _note_high(self, member: int, seq: int, now: float) -> None:
        """DATA up to ``seq`` came on ``member`` at ``now``: its highest number
        and smoothed inter-arrival gap (``_passed_all``)."""
        h = self._high_by.get(member)
        if h is None:
            self._high_by[member] = [seq, now, 0.01]
        else:
            gap = now - h[1]
            h[2] += 0.125 * ((gap if gap < 0.1 else 0.1) - h[2])
            h[1] = now
            if seq > h[0]:
                h[0] = seq

    def _nack_if_passed(self, now: float) -> None:
        """Subflows are FIFO: once every subflow carrying data has delivered
        something above the first missing number, it is lost -- ask soon."""
        missing = self._missing
        head = next(iter(missing))
        if head < self._passed_all(now):
            c = self.config
            t = max(now, missing[head] + c.nack_wait_min, self._nack_last + c.nack_interval)
            if self._nack_next is None or t < self._nack_next:
                self._nack_next = t

    def _nack_in_order(self, member: int, first: int, last: int, now: float) -> None:
        """NACK bookkeeping for DATA ``first..last`` that arrived in order on
        ``member`` (a C run): what ``_receive_data`` does per packet, once."""
        self._note_high(member, last, now)
        if last > self._rx_high:
            self._rx_high = last
        missing = self._missing
        if missing:
            for s in range(first, last + 1):  # repairs arriving in order
                missing.pop(s, None)
            if missing:
                self._nack_if_passed(now)

    def _receive_data(self, data: bytes, seq: int, sub: Subflow, now: float) -> list:
        """A header-valid DATA datagram for ``sub``: drop stale copies before
        any decryption (N copies cost one), authenticate, reorder."""
        reorder = self.reorder
        sub.on_receive(len(data), now)
        if reorder.is_stale(seq):
            # push() never stores a stale copy; it only counts it.
            late = reorder.late
            reorder.push(seq, None, now)
            if reorder.late != late:
                sub.on_stale(0, 1)
            else:
                sub.on_stale(1, 0)
            return []
        sealer = self.sealer
        if sealer is None:
            payload = _data_payload(data)
        else:
            payload = sealer.open(data)
            if payload is None:
                # Not authentic: undo the receive accounting, change nothing.
                sub.retract_receive(len(data))
                self.auth_failures += 1
                return []
        sub.on_data(now)
        out = reorder.push(seq, payload, now)
        if self.nack_enabled:
            self._note_high(sub.member, seq, now)
            missing = self._missing
            if seq > self._rx_high:
                if seq > self._rx_high + 1:
                    self._note_gap(seq, now)
                self._rx_high = seq
            elif missing:
                missing.pop(seq, None)
            if missing:
                self._nack_if_passed(now)
        return out

    # -- NACK ---------------------------------------------------------------------

    def _note_gap(self, seq: int, now: float) -> None:
        """DATA ``seq`` arrived above the highest so far: the numbers between are missing."""
        lo = max(self._rx_high, self.reorder.last) + 1
        missing = self._missing
        c = self.config
        lo = max(lo, seq - c.send_buffer)  # the sender no longer has older ones
        room = c.nack_track - len(missing)
        hi = min(seq, lo + max(0, room))
        if hi < seq:
            self.nack_untracked += seq - hi
        for s in range(lo, hi):
            missing[s] = now
        if hi > lo and self._nack_next is None:
            self._nack_next = max(now + self._nack_wait, self._nack_last + c.nack_interval)

    def _passed_all(self, now: float) -> int:
        """The lowest of the highest numbers received on each subflow that
        is delivering data (0: no evidence).  A subflow counts while its data
        keeps coming at its usual pace (within 4 smoothed gaps) or came within
        the NACK wait (the RTT spread: it may still have packets in flight --
        data often arrives in bursts, a GRO batch at one instant, so its
        smoothed gap alone says little); one that went quiet for longer --
        dead, or no longer used -- can hide nothing."""
        low = 0
        slack = self.config.nack_wait_min
        wait = self._nack_wait
        for h in self._high_by.values():
            quiet = now - h[1]
            if (quiet <= 4 * h[2] + slack or quiet <= wait) and (low == 0 or h[0] < low):
                low = h[0]
        return low

    def _nack_tick(self, now: float) -> None:
        """Send one NACK round: the missing numbers that waited long enough, and
        those asked for before whose re-send is overdue (the NACK or the
        re-send was lost: a lossy path loses those too)."""
        missing = self._missing
        asked = self._asked
        if not missing and not asked:
            self._nack_next = None
            return
        if self._nack_next is not None and now < self._nack_next:
            return
        if now < self._nack_last + self.config.nack_interval:
            self._nack_next = self._nack_last + self.config.nack_interval
            return
        reorder = self.reorder
        hold = reorder.hold
        wait = self._nack_wait
        up = [s for s in self._up if s.rtt.srtt is not None] or list(self._up)
        fastest = min((s.rtt.srtt for s in up if s.rtt.srtt is not None), default=0.0)
        due: list[int] = []
        chunks: list[int] = []  # where each NACK payload after the first starts in ``due``
        per_round = self.config.nack_per_round

        def take(s: int) -> bool:
            """Add ``s`` to this round (a NACK payload names NACK_SPAN
            consecutive numbers); False when the round has no payload left."""
            if due and s - due[chunks[-1] if chunks else 0] >= wire.NACK_SPAN:
                if len(chunks) + 1 >= per_round:
                    return False
                chunks.append(len(due))  # the next NACK payload starts here
            due.append(s)
            return True

        oldest = now  # when the oldest gap asked for now appeared
        nxt = None
        passed = self._passed_all(now)
        wait_min = self.config.nack_wait_min
        again: list[int] = []  # asked for before, due again
        again_next = None
        if asked:
            for s, rec in list(asked.items()):
                if reorder.is_stale(s):  # the re-send came, or the hold gave up
                    del asked[s]
                elif rec[0] <= now:
                    # (a repair defers the hold up to hold_max: ReorderBuffer.hold_cap)
                    if hold is not None and rec[1] + self.config.hold_max < now + fastest:
                        del asked[s]
                        self.nack_too_late += 1
                    else:
                        again.append(s)
                elif again_next is None or rec[0] < again_next:
                    again_next = rec[0]
        for s, t in list(missing.items()):
            if reorder.is_stale(s):  # arrived meanwhile, or given up
                del missing[s]
                continue
            if t + wait > now and not (s < passed and t + wait_min <= now):
                nxt = t + wait if s >= passed else t + wait_min
                break
            if hold is not None and t + hold < now + fastest:
                del missing[s]  # a re-send could not arrive before the hold deadline
                self.nack_too_late += 1
                continue
            if t < oldest:
                oldest = t
            if not take(s):
                nxt = now
                break
        first_seen = {s: missing[s] for s in due}  # when each gap was noticed
        if again and up:
            # merged in order (a NACK payload covers 64 consecutive numbers);
            # the ones that do not fit this round wait for the next
            for s in again:
                first_seen[s] = asked[s][1]
                if asked[s][1] < oldest:
                    oldest = asked[s][1]
            merged = sorted(set(due) | set(again))
            due.clear()
            chunks.clear()
            for s in merged:
                if not take(s):
                    nxt = now
                    break
            self.nack_again += sum(1 for s in due if s in asked)
        if due and up:
            for s in due:
                missing.pop(s, None)
            up.sort(key=lambda sub: sub.rtt.srtt if sub.rtt.srtt is not None else 1e9)
            # a burst of losses (a carrier failing under a flow) can need more
            # than one NACK's 64 numbers: they all go in this round, since the
            # next one may come after the hold deadline
            bounds = [0] + chunks + [len(due)]
            for i in range(len(bounds) - 1):
                payload = wire.nack_encode(due[bounds[i]:bounds[i + 1]])
                for sub in up[: self.config.nack_copies]:
                    self._emit(sub, Op.NACK, payload)
                self.nacks_sent += 1
            self.nack_seqs += len(due)
            self._nack_last = now
            # Hold the line until the re-sends can be here: a NACK over the
            # fastest path, the re-sends over the next one, one after the
            # other at the pace data has been arriving (a failed carrier's
            # whole in-flight tail can be a few hundred packets).  Bounded:
            # never past hold_max after the oldest of these gaps appeared.
            srtts = sorted(sub.rtt.srtt for sub in up if sub.rtt.srtt is not None) or [0.0]
            second = srtts[1] if len(srtts) > 1 else srtts[0]
            gaps = [h[2] for h in self._high_by.values() if h[2] > 0]
            burst = len(due) * (min(gaps) if gaps else 0.0)
            until = min(now + 1.5 * second + burst + self.config.nack_interval,
                        oldest + self.config.hold_max)
            reorder.defer(until)
            # If the re-send is not here by then (plus the jitter), ask again.
            retries = self.config.nack_retries
            if retries:
                var = max((sub.rtt.rttvar for sub in up if sub.rtt.rttvar is not None), default=0.0)
                again_at = now + 1.5 * second + burst + self.config.nack_interval + 2 * var
                for s in due:
                    rec = asked.get(s)
                    if rec is None:
                        if len(asked) < self.config.nack_track:
                            asked[s] = [again_at, first_seen[s], retries]
                    elif rec[2] > 1:
                        rec[0] = again_at
                        rec[2] -= 1
                    else:
                        del asked[s]
                if again_next is None or again_at < again_next:
                    again_next = again_at
        if not missing and not asked:
            self._nack_next = None
            return
        if missing and nxt is None:
            nxt = next(iter(missing.values())) + wait
        if again_next is not None and (nxt is None or again_next < nxt):
            nxt = again_next
        if nxt is None:
            self._nack_next = None
        else:
            self._nack_next = max(nxt, now + self.config.nack_interval) if due else max(nxt, now)

    def _on_nack(self, payload, now: float) -> None:
        """The peer is missing these sequence numbers: re-send them on other subflows."""
        self.nacks_received += 1
        up = self._up
        if not up:
            return
        c = self.config
        # top up the retransmission budget: retransmit_budget per packet sent
        self._mark_rate(now)
        cap = max(float(c.retransmit_burst), c.retransmit_budget * self._send_rate)
        self._retx_tokens = min(cap, self._retx_tokens + c.retransmit_budget * (self.sent - self._retx_mark))
        self._retx_mark = self.sent
        sched = self._sched
        queueing = self._queueing
        # The copies of one NACK arrive within the RTT of the slowest subflow
        # that carries them; our receiver asks again for a number only after
        # a re-send could have come (nack_retries).
        srtts = sorted(s.rtt.srtt for s in up if s.rtt.srtt is not None) or [0.02]
        dedupe = srtts[min(c.nack_copies, len(srtts)) - 1]
        for seq in wire.nack_decode(payload):
            entry = self._sendbuf[seq & self._sendmask]
            if entry is None or entry[0] != seq:
                self.nack_unavailable += 1
                continue
            if len(entry) > 3 and now - entry[3] < dedupe:
                self.nack_duplicates += 1  # the other copy of the same NACK
                continue
            if self._retx_tokens < 1.0:
                self.nack_budget_drops += 1
                continue
            carried = entry[2]
            if len(carried) == 1:
                carried[0].meter.note_nack(now)  # evidence against that subflow
            if queueing:
                # paced like everything else, but ahead of it (see _pump)
                sched.queue_retransmit(seq, carried, len(entry[1]), now)
                self._sendbuf[seq & self._sendmask] = (seq, entry[1], carried, now)
                self._retx_tokens -= 1.0
                continue
            subs = sched.retransmit_targets(carried, up, now, len(entry[1]))
            if self._retransmit_entry(entry, [s.member for s in subs], now):
                self._retx_tokens -= 1.0
                self.nack_retransmits += 1
        if queueing:
            self._pump(now)

    # -- timers -----------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` must run (None: nothing scheduled)."""
        t = self.reorder.next_deadline()
        for sub in self.subflows.values():
            d = sub.next_deadline()
            if d is not None and (t is None or d < t):
                t = d
        d = self._nack_next
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

    def _mark_rate(self, now: float) -> None:
        """Packets sent per second, measured over >= 0.5 s steps; quick to
        rise, slow to fall (it caps the retransmission burst)."""
        t0, n0 = self._rate_mark
        dt = now - t0
        if dt >= 0.5:
            inst = (self.sent - n0) / dt if dt < 5.0 else 0.0
            est = self._send_rate
            self._send_rate = inst if inst > est else 0.7 * est + 0.3 * inst
            self._rate_mark = (now, self.sent)

    def handle_timer(self, now: float) -> list:
        """Run due timers; returns user packets released by the hold deadline."""
        self._now = now
        self._mark_rate(now)
        for member, sub in list(self.subflows.items()):
            d = sub.next_deadline()
            if d is not None and d <= now:
                sub.on_timer(now)
                if sub.state is State.CLOSED and member in self._closing:
                    self._reap(member)
        out = self.reorder.expire(now)
        if self._nack_next is not None and self._nack_next <= now:
            self._nack_tick(now)
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
        (at least ``nack_wait_min``).
        """
        c = self.config
        up = [s for s in self._up if s.rtt.srtt is not None]
        if not up:
            self._nack_wait = c.nack_wait_min
            if c.hold == -1.0:
                self.reorder.hold = c.hold_initial
            return
        srtts = [s.rtt.srtt for s in up]
        spread = max(srtts) - min(srtts)
        var = max(s.rtt.rttvar for s in up)
        base = spread + 4 * var
        hold = base
        if self.nack_enabled:
            # a repair: the loss shows once the slowest subflow overtook it
            # (half the spread); the NACK crosses a fast subflow and the
            # re-send another one, behind its queue: with the fastest one
            # lost, about 1.5 RTTs of the second fastest (srtt includes the
            # queue, which is all on the data's way)
            srtts.sort()
            second = srtts[1] if len(srtts) > 1 else srtts[0]
            repair = spread / 2 + 1.5 * second + 4 * var + c.nack_interval
            hold = max(hold, repair)
        if c.hold == -1.0:
            self.reorder.hold = hold = min(c.hold_max, max(c.hold_min, hold))
        elif c.hold is not None:
            hold = c.hold
        # Without evidence from the subflows' order (see _nack_tick), a gap is
        # taken for a loss after about the RTT spread, at most half the hold.
        self._nack_wait = max(c.nack_wait_min, min(hold / 2, spread + 4 * var))

    # -- status -------------------------------------------------------------------

    @property
    def tx_sched_drops(self) -> int:
        """User packets a queueing scheduler dropped (overflow, too old, replaced)."""
        return self._sched_drops + self._sched.dropped

    def counters(self) -> dict:
        r = self.reorder
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
            "nacks_sent": self.nacks_sent,
            "nack_seqs": self.nack_seqs,
            "nack_too_late": self.nack_too_late,
            "nack_untracked": self.nack_untracked,
            "nack_again": self.nack_again,
            "nacks_received": self.nacks_received,
            "nack_retransmits": self.nack_retransmits,
            "nack_unavailable": self.nack_unavailable,
            "nack_budget_drops": self.nack_budget_drops,
            "nack_duplicates": self.nack_duplicates,
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
