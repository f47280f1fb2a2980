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
established subflows ``up`` carry the packet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mpvpn import wire
from mpvpn.reorder import ReorderBuffer
from mpvpn.replay import ReplayWindow
from mpvpn.subflow import State, Subflow, SubflowConfig
from mpvpn.wire import DecodeError, Op

_pack = wire.HEADER.pack
_unpack = wire.HEADER.unpack_from
_HLEN = wire.HEADER_LEN
_DATA = wire.DATA
_VERSION = wire.VERSION
_MEMBER = [bytes((i,)) for i in range(256)]


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


def duplicate_all(packet, up, now):
    """Duplicate mode (seed 001): every established subflow carries every packet."""
    return up


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
        self.scheduler = duplicate_all
        self._seq = 0
        self._sendbuf: list = [None] * c.send_buffer
        self._sendmask = c.send_buffer - 1
        hold = c.hold_initial if c.hold == -1.0 else c.hold
        self.reorder = ReorderBuffer(c.reorder_capacity, hold)
        self._out: deque = deque()
        self._events: deque = deque()
        # session counters
        self.sent = 0  # user packets accepted by send()
        self.tx_no_subflow = 0  # user packets dropped: no established subflow
        self.tx_too_big = 0
        self.tx_queue_full = 0
        self.retransmits = 0
        self.malformed: dict[str, int] = {}
        self.auth_failures = 0  # datagrams whose AEAD tag did not verify (or not sealed)
        self.replays = 0  # control datagrams rejected by the replay window
        self.wrong_session = 0
        self.wrong_member = 0
        self.unknown_member = 0

    # -- subflow management ---------------------------------------------------

    def add_subflow(self, member: int, now: float, name: str = "", meta: dict | None = None) -> Subflow:
        """Add a subflow; the initiator starts its 3-way open at once."""
        if member in self.subflows:
            raise ValueError(f"member {member} already in session")
        sub = Subflow(member, self.initiator, self.config.subflow, self._emit, self._on_state,
                      name=name, meta=meta)
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

    def _emit(self, sub: Subflow, opcode: int, payload: bytes) -> None:
        """Queue a control datagram for ``sub`` (called by subflows)."""
        m = sub.member
        self._ctrl_seq[m] = seq = self._ctrl_seq.get(m, 0) + 1
        if self.sealer is not None:
            dgram = self.sealer.seal(opcode, m, self.session_id, seq, payload)
        else:
            dgram = _pack(_VERSION, opcode, m, 0, self.session_id, len(payload), 0, 0, seq) + payload
        sub.tx_packets += 1
        sub.tx_bytes += len(dgram)
        self._out.append((sub.member, dgram))

    def send(self, packet: bytes, now: float) -> bool:
        """Send one user packet on the subflows the scheduler picks.

        Returns False (and counts why) if it could not be sent at all.
        """
        up = self._up
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
        targets = self.scheduler(packet, up, now)
        if not targets:
            self.tx_no_subflow += 1
            return False
        self._seq = seq = self._seq + 1
        self.sent += 1
        out = self._out
        if self.sealer is not None:
            # Sealed once; the copies differ only in the header's member byte.
            sealed = self.sealer.seal_data(self.session_id, seq, packet)
            self._sendbuf[seq & self._sendmask] = (seq, sealed)
            head, tail = sealed[:2], sealed[3:]
            for sub in targets:
                dgram = head + _MEMBER[sub.member] + tail
                out.append((sub.member, dgram))
                sub.tx_packets += 1
                sub.tx_bytes += len(dgram)
                sub.data_tx += 1
                sub.note_data_sent(now)
            return True
        self._sendbuf[seq & self._sendmask] = (seq, packet)
        sid = self.session_id
        for sub in targets:
            dgram = _pack(_VERSION, _DATA, sub.member, 0, sid, n, 0, 0, seq) + packet
            out.append((sub.member, dgram))
            sub.tx_packets += 1
            sub.tx_bytes += len(dgram)
            sub.data_tx += 1
            sub.note_data_sent(now)
        return True

    def retransmit(self, seq: int, members, now: float) -> bool:
        """Send ``seq`` again from the send buffer on the given established subflows."""
        entry = self._sendbuf[seq & self._sendmask]
        if entry is None or entry[0] != seq:
            return False
        stored = entry[1]  # sealed datagram (resent as is: never sealed twice) or plaintext
        sent = False
        for m in members:
            sub = self.subflows.get(m)
            if sub is None or sub.state is not State.ESTABLISHED:
                continue
            if self.sealer is not None:
                dgram = stored[:2] + _MEMBER[m] + stored[3:]
            else:
                dgram = _pack(_VERSION, _DATA, m, 0, self.session_id, len(stored), 0, 0, seq) + stored
            self._out.append((m, dgram))
            sub.tx_packets += 1
            sub.tx_bytes += len(dgram)
            sub.data_tx += 1
            sent = True
        if sent:
            self.retransmits += 1
        return sent

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[int, bytes]]:
        """Everything queued since the last call: ``(member, datagram)`` pairs."""
        out = self._out
        if not out:
            return []
        items = list(out)
        out.clear()
        return items

    # -- receiving ----------------------------------------------------------------

    def _drop_malformed(self, why: str, sub: Subflow | None) -> list:
        self.malformed[why] = self.malformed.get(why, 0) + 1
        if sub is not None:
            sub.malformed += 1
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
        # Fast path for well-formed DATA of this session (most traffic, and
        # in duplicate mode mostly copies that are dropped right here, before
        # any decryption).  Anything unusual takes the full path below, which
        # classifies and counts it.
        n = len(data)
        if n >= _HLEN and data[1] == _DATA:
            ver, _op, m, flags, sid, length, _ep, rsv, seq = _unpack(data)
            if (m == member and sid == self.session_id and ver == _VERSION and not rsv
                    and flags == self._data_flags and n == _HLEN + length + self._tag_len):
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
            sub.malformed += 1
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
        if source is not None and source != sub.remote:
            if sub.remote is not None:
                sub.roams += 1
            sub.remote = source
        sub.on_receive(len(data), now)
        sub.on_control(hdr.opcode, payload, now)
        if hdr.opcode in (Op.KEEPALIVE, Op.KEEPALIVE_ACK, Op.CONNECT_ACK, Op.ACK):
            self._update_hold()
        if sub.state is State.CLOSED and member in self._closing:
            self._reap(member)
        return []

    def _receive_data(self, data: bytes, seq: int, sub: Subflow, now: float) -> list:
        """A header-valid DATA datagram for ``sub``: drop stale copies before
        any decryption (N copies cost one), authenticate, reorder."""
        reorder = self.reorder
        sub.rx_packets += 1
        sub.rx_bytes += len(data)
        sub.last_rx = now
        if reorder.is_stale(seq):
            # push() never stores a stale copy; it only counts it.
            late = reorder.late
            reorder.push(seq, None, now)
            if reorder.late != late:
                sub.late += 1
            else:
                sub.duplicates += 1
            return []
        sealer = self.sealer
        if sealer is None:
            payload = data[_HLEN:]
        else:
            payload = sealer.open(data)
            if payload is None:
                # Not authentic: undo the receive accounting, change nothing.
                sub.rx_packets -= 1
                sub.rx_bytes -= len(data)
                self.auth_failures += 1
                return []
        sub.on_data(now)
        return reorder.push(seq, payload, now)

    # -- timers -----------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` must run (None: nothing scheduled)."""
        t = self.reorder.next_deadline()
        for sub in self.subflows.values():
            d = sub.next_deadline()
            if d is not None and (t is None or d < t):
                t = d
        return t

    def handle_timer(self, now: float) -> list:
        """Run due timers; returns user packets released by the hold deadline."""
        for member, sub in list(self.subflows.items()):
            d = sub.next_deadline()
            if d is not None and d <= now:
                sub.on_timer(now)
                if sub.state is State.CLOSED and member in self._closing:
                    self._reap(member)
        return self.reorder.expire(now)

    def next_event(self):
        """The next event (SubflowUp, SubflowDown, ...) or None."""
        return self._events.popleft() if self._events else None

    # -- hold deadline ------------------------------------------------------------

    def _update_hold(self) -> None:
        """Automatic hold: RTT spread across established subflows + 4 * max rttvar."""
        c = self.config
        if c.hold != -1.0:
            return
        srtts = [s.rtt.srtt for s in self._up if s.rtt.srtt is not None]
        if not srtts:
            self.reorder.hold = c.hold_initial
            return
        spread = max(srtts) - min(srtts)
        var = max(s.rtt.rttvar for s in self._up if s.rtt.rttvar is not None)
        self.reorder.hold = min(c.hold_max, max(c.hold_min, spread + 4 * var))

    # -- status -------------------------------------------------------------------

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
            "tx_no_subflow": self.tx_no_subflow,
            "tx_too_big": self.tx_too_big,
            "tx_queue_full": self.tx_queue_full,
            "malformed": sum(self.malformed.values()) + self.wrong_member,
            "malformed_by_reason": dict(self.malformed),
            "auth_failures": self.auth_failures,
            "replays": self.replays,
            "wrong_session": self.wrong_session,
            "unknown_member": self.unknown_member,
        }

    def status(self, now: float) -> dict:
        return {
            "session_id": self.session_id,
            "state": "connected" if self.connected else "disconnected",
            "initiator": self.initiator,
            "hold_ms": None if self.reorder.hold is None else round(self.reorder.hold * 1000, 3),
            "links": [s.status(now) for s in self.subflows.values()],
            "counters": self.counters(),
        }
