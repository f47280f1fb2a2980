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
from mpvpn.nack import NackReceiver, NackSender
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
        self.nack_rx = NackReceiver(c)  # what is missing, when to ask (mpvpn.nack)
        self.nack_tx = NackSender(c)  # what to re-send for the peer's NACKs
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
            self.nack_rx.reset()
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
                            self.nack_tx.resent()
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
                            self.nack_rx.on_in_order(member, last - len(got) + 1, last, now)
                    i = j
                    if i >= n:
                        break
            out += self.receive_datagram(datagrams[i], member, now, source)
            i += 1
        return out

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
            self.nack_rx.on_data(sub.member, seq, now, reorder.last)
        return out

    # -- NACK ---------------------------------------------------------------------

    def _nack_tick(self, now: float) -> None:
        """Send the NACK round the receiver side decides (mpvpn.nack)."""
        r = self.nack_rx.tick(now, list(self._up), self.reorder)
        for payload in r.payloads:
            for sub in r.targets:
                self._emit(sub, Op.NACK, payload)
        if r.defer is not None:
            self.reorder.defer(r.defer)

    def _on_nack(self, payload, now: float) -> None:
        """The peer is missing these sequence numbers: re-send them on other
        subflows, as the sender side decides (mpvpn.nack)."""
        up = self._up
        tx = self.nack_tx
        seqs = tx.on_nack(payload, now, self.sent, up)
        if seqs is None:
            return
        sched = self._sched
        queueing = self._queueing
        sendbuf, mask = self._sendbuf, self._sendmask
        for seq in seqs:
            entry = sendbuf[seq & mask]
            if not tx.decide(seq, entry, now):
                continue
            carried = entry[2]
            if len(carried) == 1:
                carried[0].meter.note_nack(now)  # evidence against that subflow
            if queueing:
                # paced like everything else, but ahead of it (see _pump)
                sched.queue_retransmit(seq, carried, len(entry[1]), now)
                sendbuf[seq & mask] = (seq, entry[1], carried, now)
                tx.spend()
                continue
            subs = sched.retransmit_targets(carried, up, now, len(entry[1]))
            if self._retransmit_entry(entry, [s.member for s in subs], now):
                tx.spend()
                tx.resent()
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
        for member, sub in list(self.subflows.items()):
            d = sub.next_deadline()
            if d is not None and d <= now:
                sub.on_timer(now)
                if sub.state is State.CLOSED and member in self._closing:
                    self._reap(member)
        out = self.reorder.expire(now)
        nxt = self.nack_rx.next
        if nxt is not None and nxt <= now:
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
            self.nack_rx.wait = c.nack_wait_min
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
        self.nack_rx.wait = max(c.nack_wait_min, min(hold / 2, spread + 4 * var))

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
