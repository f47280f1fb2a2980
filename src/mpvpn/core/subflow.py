"""One SMPU subflow: its state machine, timers and statistics.

The state machine is one explicit table (``TRANSITIONS``, in the style of
h11's ``_state.py``): ``(state, event) -> new state``.  A pair that is not in
the table is not allowed and is ignored (counted as ``unexpected``); that is
how a stray CONNECT-ACK or a late CLOSE-ACK is made harmless.

A :class:`Subflow` never touches sockets or clocks.  It is driven by its
:class:`~mpvpn.core.smpu.Session`: ``on_control()`` for each valid control datagram
addressed to it, ``on_timer()`` when its deadline passes.  It produces
control datagrams through the session's ``_emit`` callable.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

from mpvpn.core import wire
from mpvpn.core.linkstats import LossEstimator, ProbeFailure, RttEstimator
from mpvpn.core.wire import Op


class State(Enum):
    CLOSED = "closed"
    CONNECT_SENT = "connect_sent"
    CONNECT_RCVD = "connect_rcvd"
    ESTABLISHED = "established"
    CLOSING = "closing"


class Ev(Enum):
    OPEN = "open"  # local: initiator starts the 3-way open
    RECV_CONNECT = "recv_connect"
    RECV_CONNECT_ACK = "recv_connect_ack"
    RECV_ACK = "recv_ack"
    RECV_TRAFFIC = "recv_traffic"  # KEEPALIVE(/ACK) or DATA from the peer
    RETRY = "retry"  # local: handshake / close retransmission timer
    TIMEOUT = "timeout"  # local: half-open CONNECT_RCVD gave up, or CLOSING gave up
    DEAD = "dead"  # local: too many unanswered probes
    CLOSE = "close"  # local: administrative close
    RECV_CLOSE = "recv_close"
    RECV_CLOSE_ACK = "recv_close_ack"


S, E = State, Ev

#: The whole subflow state machine.  Initiator and responder share it; which
#: transitions each one can reach follows from who sends CONNECT.
TRANSITIONS: dict[tuple[State, Ev], State] = {
    (S.CLOSED, E.OPEN): S.CONNECT_SENT,
    (S.CLOSED, E.RECV_CONNECT): S.CONNECT_RCVD,
    (S.CLOSED, E.RECV_CLOSE): S.CLOSED,  # answer CLOSE-ACK so the peer's close completes
    (S.CONNECT_SENT, E.RECV_CONNECT_ACK): S.ESTABLISHED,
    (S.CONNECT_SENT, E.RETRY): S.CONNECT_SENT,
    (S.CONNECT_SENT, E.OPEN): S.CONNECT_SENT,  # re-open: restart the backoff
    (S.ESTABLISHED, E.OPEN): S.CONNECT_SENT,  # re-open after an endpoint moved (new address)
    (S.CONNECT_SENT, E.CLOSE): S.CLOSED,
    (S.CONNECT_SENT, E.RECV_CLOSE): S.CLOSED,
    (S.CONNECT_RCVD, E.RECV_ACK): S.ESTABLISHED,
    (S.CONNECT_RCVD, E.RECV_TRAFFIC): S.ESTABLISHED,  # our CONNECT-ACK arrived, their ACK was lost
    (S.CONNECT_RCVD, E.RECV_CONNECT): S.CONNECT_RCVD,  # our CONNECT-ACK was lost: answer again
    (S.CONNECT_RCVD, E.TIMEOUT): S.CLOSED,
    (S.CONNECT_RCVD, E.CLOSE): S.CLOSED,
    (S.CONNECT_RCVD, E.RECV_CLOSE): S.CLOSED,
    (S.ESTABLISHED, E.RECV_TRAFFIC): S.ESTABLISHED,
    (S.ESTABLISHED, E.RECV_CONNECT): S.ESTABLISHED,  # peer re-opens (it thought us dead): answer
    (S.ESTABLISHED, E.RECV_CONNECT_ACK): S.ESTABLISHED,  # duplicate CONNECT-ACK: answer ACK again
    (S.ESTABLISHED, E.RECV_ACK): S.ESTABLISHED,  # duplicate ACK
    (S.ESTABLISHED, E.DEAD): S.CONNECT_SENT,  # initiator re-probes; responder -> CLOSED (below)
    (S.ESTABLISHED, E.CLOSE): S.CLOSING,
    (S.ESTABLISHED, E.RECV_CLOSE): S.CLOSED,
    (S.CLOSING, E.RECV_CLOSE_ACK): S.CLOSED,
    (S.CLOSING, E.RECV_CLOSE): S.CLOSED,  # simultaneous close
    (S.CLOSING, E.RETRY): S.CLOSING,
    (S.CLOSING, E.TIMEOUT): S.CLOSED,
}
# The responder never sends CONNECT, so a dead subflow goes quiet and waits.
RESPONDER_OVERRIDES: dict[tuple[State, Ev], State] = {
    (S.ESTABLISHED, E.DEAD): S.CLOSED,
}


@dataclass
class SubflowConfig:
    keepalive_idle: float = 0.75  # probe interval with no user data flowing
    keepalive_active: float = 0.1  # probe interval while user data flows
    # While the link meter is in start-up and the scheduler holds traffic
    # for this subflow (LinkMeter.ramping), probe every half RTT, but not
    # faster than this: each echo may double the rate estimate, so a
    # carrier is learnt in a few round trips instead of a few probe
    # intervals.  Probe scheduling only: the dead verdict keeps counting
    # time by probe_plan's interval.
    keepalive_startup: float = 0.01
    dead_after: int = 3  # consecutive unanswered probes that make a subflow dead
    # On a lossy (or not yet measured) path a few lost probes prove nothing:
    # probes are then sent faster and more must go unanswered, keeping the
    # detection time ((dead_after + 1) * interval) while holding the chance
    # that a live subflow is declared dead to about probe_false_dead per
    # probe interval (see probe_plan).
    probe_false_dead: float = 1e-6
    max_probes: int = 30
    connect_backoff: float = 0.2  # first CONNECT retry; doubles each time
    connect_backoff_max: float | None = None  # None: keepalive_idle (fast rejoin)
    connect_rcvd_timeout: float = 5.0  # half-open responder state gives up
    close_retry: float = 0.2
    close_retries: int = 3
    loss_tau: float = 3.0  # decay time constant of the loss estimator

    def validate(self) -> None:
        if not 0 < self.keepalive_active <= self.keepalive_idle:
            raise ValueError("need 0 < keepalive_active <= keepalive_idle")
        if not self.keepalive_startup > 0:  # (above keepalive_active: no faster probes)
            raise ValueError("need keepalive_startup > 0")
        if self.dead_after < 1:
            raise ValueError("dead_after must be >= 1")
        if not 0 < self.probe_false_dead < 1 or self.max_probes < self.dead_after:
            raise ValueError("need 0 < probe_false_dead < 1 and max_probes >= dead_after")
        if self.connect_backoff <= 0 or self.close_retry <= 0 or self.connect_rcvd_timeout <= 0:
            raise ValueError("retry intervals must be > 0")
        if self.close_retries < 0:
            raise ValueError("close_retries must be >= 0")


def _ts(now: float) -> int:
    """Our clock in microseconds as carried in probes (never 0: 0 means none)."""
    return (int(now * 1_000_000) & 0xFFFFFFFFFFFFFFFF) or 1


class Subflow:
    """State, timers and statistics of one subflow (one member of a session)."""

    def __init__(self, member: int, initiator: bool, config: SubflowConfig, emit, notify,
                 name: str = "", meta: dict | None = None, meter=None):
        if not 1 <= member <= wire.MAX_MEMBER:
            raise ValueError(f"member id {member} out of range 1..{wire.MAX_MEMBER}")
        self.member = member
        self.initiator = initiator
        self.config = config
        self.name = name or f"member{member}"
        self.meta = dict(meta or {})  # carrier type, addresses: for status only
        self.remote = None  # where the I/O layer sends this subflow's datagrams (opaque)
        self.roams = 0  # times an authenticated control datagram moved ``remote``
        self.punches = 0  # NAT punch probes sent (responder, docs/nat.md)
        # mpvpn.core.linkstats.LinkMeter: the session's model of this link's rate
        # and backlog (None for a bare subflow outside a session)
        self.meter = meter
        self._emit = emit  # emit(subflow, opcode, payload_bytes)
        self._notify = notify  # notify(subflow, old_state, new_state, reason)
        self.state = State.CLOSED
        self.rtt = RttEstimator()
        self.loss_in = LossEstimator(config.loss_tau)  # peer -> us, measured here
        self.loss_out_ppm: int | None = None  # us -> peer, reported by the peer
        # timers
        self.deadline: float | None = None  # next time on_timer() wants to run
        self._retry_interval = config.connect_backoff
        self._retries = 0
        self._next_probe: float | None = None
        self._last_probe_tx = 0.0
        self._recheck = False  # _next_probe is the overdue check of the last probe
        # our KEEPALIVEs (their timestamps) that no answer from the peer has
        # covered yet: the unanswered probes dead detection counts
        self._outstanding: deque[int] = deque()
        self._proven = 0  # newest timestamp of ours the peer echoed
        self.probe_fail = ProbeFailure()  # how often a probe round trip fails
        self.probes_sent = 0  # KEEPALIVEs sent while established (probe intervals)
        self.last_answer: float | None = None  # last echo of ours / handshake answer
        self._close_reason = int(wire.CloseReason.NORMAL)
        self.data_tx_at = -1.0  # last time user data went out on this subflow
        # echo state for probes
        self._peer_ts = 0
        self._peer_ts_at = 0.0
        self._peer_connect_ts = 0
        # statistics
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.data_tx = 0
        self.data_rx = 0
        self.duplicates = 0
        self.late = 0
        self.malformed = 0
        self.unexpected = 0
        self.last_rx: float | None = None
        self.established_at: float | None = None
        self.ups = 0
        self.downs = 0
        self.last_down_reason = ""
        self.last_down_at: float | None = None  # when it last left ESTABLISHED
        self.dead_silence: float | None = None  # seconds unanswered when last declared dead

    # -- state machine -----------------------------------------------------

    def _fire(self, event: Ev, now: float, reason: str = "") -> bool:
        key = (self.state, event)
        new = None
        if not self.initiator:
            new = RESPONDER_OVERRIDES.get(key)
        if new is None:
            new = TRANSITIONS.get(key)
        if new is None:
            self.unexpected += 1
            return False
        old = self.state
        if new is not old:
            self.state = new
            if new is S.ESTABLISHED:
                self.ups += 1
                self.established_at = now
                self._outstanding.clear()
                self._proven = 0
                self.last_answer = now
                self._last_probe_tx = now
                self._next_probe = now + self._probe_interval(now)
                self._recheck = False
                self._retries = 0
            elif old is S.ESTABLISHED:
                self.downs += 1
                self.last_down_reason = reason or event.value
                self.last_down_at = now
            self._notify(self, old, new, reason or event.value)
        return True

    @property
    def established(self) -> bool:
        return self.state is S.ESTABLISHED

    # -- local commands ------------------------------------------------------

    def open(self, now: float) -> None:
        """Initiator: start the 3-way open (CONNECT, retried with backoff).

        Also used to re-open an established subflow whose endpoint moved (an
        uplink got a new address): the handshake runs again on the new path.
        """
        if not self.initiator:
            raise RuntimeError("only the initiator opens subflows")
        if self._fire(E.OPEN, now, "endpoint changed"):
            self._next_probe = None
            self._retry_interval = self.config.connect_backoff
            self._send_connect(now)

    def punch(self, now: float) -> None:
        """NAT hole punching (docs/nat.md): send one probe (KEEPALIVE) to the
        peer although the subflow is not established, so that the NATs on
        the way see us talk to the peer and let its CONNECT in.  Changes no
        state; a peer that is not established either ignores it (counted as
        ``unexpected``) but follows its source address."""
        self.punches += 1
        self._send_probe(Op.KEEPALIVE, now)

    def close(self, now: float, reason: int = wire.CloseReason.NORMAL) -> None:
        """Administrative close: 2-way CLOSE / CLOSE-ACK."""
        self._close_reason = int(reason)
        if self._fire(E.CLOSE, now, "closed locally"):
            if self.state is S.CLOSING:
                self._retries = 0
                self._emit(self, Op.CLOSE, wire.CLOSE.pack(self._close_reason))
                self.deadline = now + self.config.close_retry
            else:
                self.deadline = None

    # -- input -------------------------------------------------------------

    def on_receive(self, nbytes: int, now: float, n: int = 1) -> None:
        """``n`` valid datagrams (``nbytes`` in all) for this subflow arrived
        (called by the session)."""
        self.rx_packets += n
        self.rx_bytes += nbytes
        self.last_rx = now

    def on_stale_copy(self, nbytes: int, now: float, late: bool) -> None:
        """A DATA copy of ``nbytes`` arrived that the reorder buffer had
        already delivered (a duplicate) or given up (``late``): counted as
        received and as stale, in one call (the common case in duplicate mode)."""
        self.rx_packets += 1
        self.rx_bytes += nbytes
        self.last_rx = now
        if late:
            self.late += 1
        else:
            self.duplicates += 1

    def on_data_received(self, nbytes: int, now: float) -> None:
        """An authentic new DATA datagram of ``nbytes``: :meth:`on_receive` and
        :meth:`on_data` in one call (the per-packet path)."""
        self.rx_packets += 1
        self.rx_bytes += nbytes
        self.last_rx = now
        self.data_rx += 1
        if self.state is S.CONNECT_RCVD:
            self._fire(E.RECV_TRAFFIC, now)

    def on_data(self, now: float, n: int = 1) -> None:
        """``n`` DATA datagrams were accepted: implicit ACK in CONNECT_RCVD."""
        self.data_rx += n
        if self.state is S.CONNECT_RCVD:
            self._fire(E.RECV_TRAFFIC, now)

    def on_stale(self, duplicates: int, late: int) -> None:
        """DATA copies dropped as already delivered (``duplicates``) or as
        given up by the reorder buffer (``late``)."""
        self.duplicates += duplicates
        self.late += late

    def on_malformed(self) -> None:
        """A datagram on this subflow was malformed (counted, dropped)."""
        self.malformed += 1

    def on_source(self, source) -> None:
        """An authenticated control datagram came from ``source``: send there
        from now on (a NAT rebinding is followed; a change counts as a roam)."""
        if source != self.remote:
            if self.remote is not None:
                self.roams += 1
            self.remote = source

    def on_control(self, opcode: int, payload, now: float) -> None:
        """A valid control datagram for this subflow (payload size already checked)."""
        if opcode == Op.KEEPALIVE or opcode == Op.KEEPALIVE_ACK:
            self._on_probe(opcode, payload, now)
        elif opcode == Op.CONNECT:
            ts, _keepalive_ms = wire.CONNECT.unpack(payload)
            if self.initiator:
                self.unexpected += 1  # responders never send CONNECT
                return
            if self._fire(E.RECV_CONNECT, now):
                self._peer_connect_ts = ts
                self._peer_ts_at = now
                self._emit(self, Op.CONNECT_ACK, wire.CONNECT_ACK.pack(ts, _ts(now)))
                if self.state is S.CONNECT_RCVD:
                    self.deadline = now + self.config.connect_rcvd_timeout
        elif opcode == Op.CONNECT_ACK:
            echo, peer_ts = wire.CONNECT_ACK.unpack(payload)
            if not self.initiator:
                self.unexpected += 1
                return
            if self._fire(E.RECV_CONNECT_ACK, now):
                self._rtt_from_echo(echo, 0, now, provisional=True)
                self._emit(self, Op.ACK, wire.ACK.pack(peer_ts))
        elif opcode == Op.ACK:
            (echo,) = wire.ACK.unpack(payload)
            if self.initiator:
                self.unexpected += 1
                return
            was = self.state
            if self._fire(E.RECV_ACK, now) and was is S.CONNECT_RCVD:
                self._rtt_from_echo(echo, 0, now, provisional=True)
        elif opcode == Op.CLOSE:
            if self._fire(E.RECV_CLOSE, now, "closed by peer"):
                self._emit(self, Op.CLOSE_ACK, b"")
                self.deadline = None
        elif opcode == Op.CLOSE_ACK:
            if self._fire(E.RECV_CLOSE_ACK, now):
                self.deadline = None
        else:  # pragma: no cover - the session only passes control opcodes
            self.unexpected += 1

    def _on_probe(self, opcode: int, payload, now: float) -> None:
        ts, echo, echo_delay, tx_total, loss_ppm = wire.PROBE.unpack(payload)
        if self.state is S.CONNECT_RCVD:
            self._fire(E.RECV_TRAFFIC, now)
        if self.state is not S.ESTABLISHED:
            self.unexpected += 1
            return
        self._peer_ts = ts
        self._peer_ts_at = now
        self.loss_in.observe(tx_total, self.rx_packets, now)
        if loss_ppm != wire.LOSS_UNKNOWN and loss_ppm <= 1_000_000:
            self.loss_out_ppm = loss_ppm
        if echo:
            self._rtt_from_echo(echo, echo_delay, now)
            self._on_echo(echo, now)
        if opcode == Op.KEEPALIVE:
            self._send_probe(Op.KEEPALIVE_ACK, now)

    @property
    def probes_unanswered(self) -> int:
        """Our probes sent after the newest one the peer is known to have heard."""
        return len(self._outstanding)

    def _on_echo(self, echo: int, now: float) -> None:
        """A probe from the peer (its answer to ours, or its own keepalive)
        echoes the newest timestamp of ours it had heard: proof that our
        direction worked then.  Only such an echo proves the path both ways
        (the peer's DATA proves just its own direction: a peer that still
        reaches us but cannot hear us must go dead).  Probes of ours older
        than the echo and not echoed themselves failed their round trip."""
        if echo <= self._proven or echo > _ts(now):
            return  # stale (reordered) or impossible: no new evidence
        self._proven = echo
        self.last_answer = now
        out = self._outstanding
        fail = self.probe_fail
        while out and out[0] < echo:
            out.popleft()
            fail.observe(False)
        if out and out[0] == echo:
            out.popleft()
            fail.observe(True)

    def _rtt_from_echo(self, echo_ts: int, delay_us: int, now: float,
                       provisional: bool = False) -> None:
        rtt = (_ts(now) - echo_ts - delay_us) / 1_000_000
        if 0.0 <= rtt < 60.0:
            self.rtt.sample(rtt, provisional)

    # -- output --------------------------------------------------------------

    def _send_connect(self, now: float) -> None:
        ka_ms = min(0xFFFF, int(self.config.keepalive_idle * 1000))
        self._emit(self, Op.CONNECT, wire.CONNECT.pack(_ts(now), ka_ms))
        self.deadline = now + self._retry_interval
        cap = self.config.connect_backoff_max or self.config.keepalive_idle
        self._retry_interval = min(cap, self._retry_interval * 2)

    def _send_probe(self, opcode: int, now: float) -> None:
        delay_us = 0
        if self._peer_ts:
            delay_us = min(0xFFFFFFFF, max(0, int((now - self._peer_ts_at) * 1_000_000)))
        ppm = self.loss_in.ppm()
        # tx_packets counts this probe too: the session's _emit increments it
        # after we pack, so add one here.
        payload = wire.PROBE.pack(_ts(now), self._peer_ts, delay_us, self.tx_packets + 1,
                                  wire.LOSS_UNKNOWN if ppm is None else ppm)
        self._emit(self, opcode, payload)

    def attach_meter(self, meter):
        """Give a bare subflow (made outside a session) its link meter; a
        session passes one to the constructor.  Returns it."""
        if self.meter is not None:
            raise ValueError(f"{self.name} already has a link meter")
        self.meter = meter
        return meter

    def probe_plan(self, now: float) -> tuple[float, int]:
        """(probe interval, unanswered probes that mean dead) for this moment.

        A probe round trip fails with probability p, taken as the larger of
        1 - (1 - loss_in)(1 - loss_out) (the loss estimators: quick to follow
        a change while data flows) and the share of our last ~200 probes
        that went unanswered (:class:`~mpvpn.core.linkstats.ProbeFailure`:
        counted by probe, so an idle link keeps its evidence, and with a
        prior, so a fresh link counts as lossy until its first probes come
        back: that start is when a fixed 3-probe rule flapped).  Require n
        probes with p**n <= probe_false_dead (at least ``dead_after``, at
        most ``max_probes``) and send n+1 of them to a detection window, so
        the window ((dead_after + 1) x the configured interval) stays the
        same.
        A clean, well-probed path: the configured interval and ``dead_after``.
        """
        c = self.config
        base = c.keepalive_active if now - self.data_tx_at < c.keepalive_idle else c.keepalive_idle
        n = self._need(max(self._measured_fail(), self.probe_fail.rate))
        return base * (c.dead_after + 1) / (n + 1), n

    def suspect(self, now: float) -> bool:
        """Probes unanswered (2 on a clean path, one less than the dead
        threshold on a lossy one, more where several are in flight
        normally) for longer than an RTO plus a fast probe interval: the
        path probably failed, before the dead verdict.  Quick and cheap when
        wrong: the scheduler sends no new traffic here, the NACK receiver
        asks on other subflows first."""
        last = self.last_answer
        unanswered = len(self._outstanding)
        if last is None or unanswered < 2:  # below any threshold (need >= 2)
            return False
        fast = self.config.keepalive_active
        rto = self.rtt.timeout() or 0.2
        need = max(2, self.measured_need() - 1, int(rto / fast) + 2)
        return unanswered >= need and now - last > rto + fast

    def measured_need(self) -> int:
        """Unanswered probes that are unusual at the *measured* loss alone
        (point estimates, no allowance for few samples): what a scheduler's
        suspicion -- quick, and cheap when wrong -- compares against."""
        return self._need(self._measured_fail())

    def _measured_fail(self) -> float:
        lin = self.loss_in.loss or 0.0
        lout = self.loss_out_ppm / 1_000_000 if self.loss_out_ppm else 0.0
        return 1.0 - (1.0 - lin) * (1.0 - lout)

    def _need(self, pf: float) -> int:
        c = self.config
        pf = min(0.9, pf)
        if pf > 0.0:
            need = math.ceil(math.log(c.probe_false_dead) / math.log(pf))
            if need > c.dead_after:
                return min(c.max_probes, need)
        return c.dead_after

    def _probe_interval(self, now: float) -> float:
        return self.probe_plan(now)[0]

    def _ramp_interval(self, interval: float) -> float:
        """The gap to the next probe: ``interval``, or half an RTT (at least
        ``keepalive_startup``) while the meter is ramping up."""
        m = self.meter
        if m is None or not m.ramping:
            return interval
        srtt = self.rtt.srtt
        fast = self.config.keepalive_startup
        if srtt is not None and srtt / 2 > fast:
            fast = srtt / 2
        return fast if fast < interval else interval

    def on_sent(self, nbytes: int) -> None:
        """A control datagram of ``nbytes`` went out on this subflow."""
        self.tx_packets += 1
        self.tx_bytes += nbytes

    def on_data_sent(self, n: int, nbytes: int, now: float) -> None:
        """``n`` DATA datagrams (``nbytes`` in all) went out on this subflow."""
        self.tx_packets += n
        self.tx_bytes += nbytes
        self.data_tx += n
        self.data_tx_at = now  # as note_data_sent (inline: once per datagram)
        nxt = self._next_probe
        if nxt is not None:
            fast = self._last_probe_tx + self.config.keepalive_active
            if nxt > fast + 1e-9:
                self._next_probe = fast if fast > now else now

    def note_data_sent(self, now: float) -> None:
        """User data went out here: switch to the fast probe interval at once."""
        self.data_tx_at = now
        nxt = self._next_probe
        if nxt is not None:
            fast = self._last_probe_tx + self.config.keepalive_active
            if nxt > fast + 1e-9:
                self._next_probe = fast if fast > now else now

    def next_deadline(self) -> float | None:
        if self.state is S.ESTABLISHED:
            return self._next_probe
        return self.deadline

    def on_timer(self, now: float) -> None:
        st = self.state
        if st is S.ESTABLISHED:
            if self._next_probe is None or now < self._next_probe:
                return
            interval, need = self.probe_plan(now)
            if self._recheck:
                self._recheck = False
                if not self._outstanding:  # answered in time: the regular gap
                    due = self._last_probe_tx + self._ramp_interval(interval)
                    if now < due:
                        self._next_probe = due
                        return
            if self.probes_unanswered >= need:
                silent = now - (self.last_answer if self.last_answer is not None else now)
                rto = self.rtt.timeout() or 0.0
                if silent >= max(need * interval, rto):
                    self._go_dead(now)
                    return
            self._send_probe(Op.KEEPALIVE, now)
            self.probes_sent += 1
            out = self._outstanding
            if len(out) >= 4 * self.config.max_probes:
                out.popleft()  # long silence below the RTO: keep a bounded record
                self.probe_fail.observe(False)
            out.append(_ts(now))
            self._last_probe_tx = now
            self._next_probe = now + self._ramp_interval(interval)
            # While user data flows here, a probe (the only one unanswered)
            # still unanswered after an RTO is followed by the next one at
            # once rather than a probe interval later (once: later ones keep
            # the interval): the scheduler suspects a subflow on its second
            # unanswered probe, and every ms a dead carrier stays unsuspected
            # at a high send rate is packets the send buffer (and the
            # receiver's NACK tracking) must cover.  The dead verdict counts
            # time (silence), not probes: it comes no sooner.
            rto = self.rtt.timeout(self.config.keepalive_startup)
            if rto is not None and len(out) == 1 and now - self.data_tx_at < self.config.keepalive_idle \
                    and now + rto < self._next_probe:
                self._next_probe = now + rto
                self._recheck = True
        elif self.deadline is not None and now >= self.deadline:
            if st is S.CONNECT_SENT:
                self._fire(E.RETRY, now)
                self._send_connect(now)
            elif st is S.CONNECT_RCVD:
                self._fire(E.TIMEOUT, now, "handshake timed out")
                self.deadline = None
            elif st is S.CLOSING:
                if self._retries >= self.config.close_retries:
                    self._fire(E.TIMEOUT, now, "close not acknowledged")
                    self.deadline = None
                else:
                    self._retries += 1
                    self._fire(E.RETRY, now)
                    self._emit(self, Op.CLOSE, wire.CLOSE.pack(self._close_reason))
                    self.deadline = now + self.config.close_retry
            else:
                self.deadline = None

    def _go_dead(self, now: float) -> None:
        if self.last_answer is not None:
            self.dead_silence = now - self.last_answer
        self._fire(E.DEAD, now, f"no answer to {self.probes_unanswered} probes")
        self._next_probe = None
        for _ in self._outstanding:
            self.probe_fail.observe(False)
        self._outstanding.clear()
        if self.state is S.CONNECT_SENT:
            # re-probe quickly, capped at the idle keepalive interval
            self._retry_interval = self.config.connect_backoff
            self._send_connect(now)
        else:
            self.deadline = None

    # -- status --------------------------------------------------------------

    @property
    def loss(self) -> float | None:
        """Loss on the direction we send (as reported by the peer)."""
        return None if self.loss_out_ppm is None else self.loss_out_ppm / 1_000_000

    def status(self, now: float) -> dict:
        srtt = self.rtt.srtt
        meter = self.meter
        return {
            "member": self.member,
            "name": self.name,
            **self.meta,
            "state": self.state.value,
            "rtt_ms": None if srtt is None else round(srtt * 1000, 3),
            "rttvar_ms": None if self.rtt.rttvar is None else round(self.rtt.rttvar * 1000, 3),
            "loss": self.loss,
            "loss_in": self.loss_in.loss,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "data_tx": self.data_tx,
            "data_rx": self.data_rx,
            "duplicates": self.duplicates,
            "late": self.late,
            "malformed": self.malformed,
            "unexpected": self.unexpected,
            "last_rx_age": None if self.last_rx is None else round(now - self.last_rx, 3),
            "ups": self.ups,
            "downs": self.downs,
            "roams": self.roams,
            "last_down_reason": self.last_down_reason,
            "last_down_age": None if self.last_down_at is None else round(now - self.last_down_at, 3),
            # the detection time of the last dead verdict: silence until it came
            "dead_after_ms": None if self.dead_silence is None else round(self.dead_silence * 1000, 1),
            # the sender's estimate of this link's upload rate: measured, or
            # (until measured) the configured smpu.upload or the agent's guess
            "rate_kbps": None if meter is None else int(meter.rate * 8 / 1000),
            "rate_measured": meter is not None and meter.bw is not None,
        }
