"""Per-subflow link estimators: RTT (RFC 6298 smoothing) and loss from
echoed packet counters (after angt/mud).  Sans-I/O: callers pass ``now``.
"""

from __future__ import annotations

import math
from collections import deque

from mpvpn.core.fastpath import LOOPS as _LOOPS


class RttEstimator:
    """Smoothed RTT and RTT variance, RFC 6298 section 2 (alpha 1/8, beta 1/4)."""

    __slots__ = ("srtt", "rttvar", "latest", "min_rtt", "samples", "_provisional")

    ALPHA = 0.125
    BETA = 0.25

    def __init__(self):
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.latest: float | None = None
        self.min_rtt: float | None = None
        self.samples = 0
        self._provisional = False

    def sample(self, rtt: float, provisional: bool = False) -> None:
        """Feed one RTT measurement in seconds (ignored if not finite or < 0).

        A ``provisional`` sample (the handshake's: it may include ARP or
        neighbour discovery on a fresh path) is replaced by the first
        ordinary one instead of being averaged with it.
        """
        if not (rtt >= 0.0 and math.isfinite(rtt)):
            return
        if self._provisional:
            self.srtt = self.rttvar = self.min_rtt = None
            self._provisional = False
        if provisional and self.srtt is None:
            self._provisional = True
        self.latest = rtt
        self.samples += 1
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar += self.BETA * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += self.ALPHA * (rtt - self.srtt)

    def timeout(self, floor: float = 0.0) -> float | None:
        """srtt + 4*rttvar (None before the first sample), at least ``floor``."""
        if self.srtt is None:
            return None
        return max(floor, self.srtt + 4 * self.rttvar)


class LossEstimator:
    """Loss of one direction of a subflow, from the peer's echoed counters.

    Every probe from the peer says how many datagrams the peer has sent on this
    subflow so far (``tx_total``); we know how many of them arrived
    (``rx_total``).  Between two probes, ``dtx - drx`` datagrams were lost.
    Both sums decay with time constant ``tau`` seconds so that a link that
    recovers is trusted again, however bad it was; and their mass is capped
    at ``window`` datagrams so that a big burst (a bulk transfer on a clean
    link) cannot hide a link that turns bad right after it.
    """

    __slots__ = ("tau", "window", "_last_tx", "_last_rx", "_last_t", "_sent", "_lost", "probes")

    def __init__(self, tau: float = 3.0, window: int = 200):
        if tau <= 0 or window < 1:
            raise ValueError("need tau > 0 and window >= 1")
        self.tau = tau
        self.window = window
        self._last_tx: int | None = None
        self._last_rx = 0
        self._last_t = 0.0
        self._sent = 0.0
        self._lost = 0.0
        self.probes = 0

    def observe(self, tx_total: int, rx_total: int, now: float) -> None:
        """A probe arrived: the peer had sent ``tx_total``, we received ``rx_total``."""
        self.probes += 1
        if self._last_tx is None or tx_total < self._last_tx:
            # first probe, or the peer's counter restarted: re-base only
            self._last_tx, self._last_rx, self._last_t = tx_total, rx_total, now
            return
        dtx = tx_total - self._last_tx
        if dtx == 0:
            return
        drx = rx_total - self._last_rx
        decay = math.exp(-max(0.0, now - self._last_t) / self.tau)
        self._sent = self._sent * decay + dtx
        self._lost = self._lost * decay + (dtx - drx)
        if self._sent > self.window:
            f = self.window / self._sent
            self._sent *= f
            self._lost *= f
        self._last_tx, self._last_rx, self._last_t = tx_total, rx_total, now

    @property
    def loss(self) -> float | None:
        """Loss rate in [0, 1], or None before two probes with traffic between."""
        if self._sent <= 0.0:
            return None
        return min(1.0, max(0.0, self._lost / self._sent))

    def ppm(self) -> int | None:
        v = self.loss
        return None if v is None else int(round(v * 1_000_000))


class ProbeFailure:
    """How often one of our probes goes unanswered (the round trip of a probe
    and its answer fails): the number dead detection sizes its count of
    missed probes with.  Sans-I/O; fed one outcome per probe.

    Counted over the last ``window`` probes (exponentially weighted by count,
    not by time, so that an idle link keeps its evidence).  :attr:`rate` is
    the mean of a Beta posterior with ``PRIOR_FAIL`` failed and ``PRIOR_OK``
    answered pseudo probes: a third -- about a round trip at 20 % loss each
    way (36 %) -- weighing a sixth of a probe, so a link nothing has been
    learnt about counts as lossy until its first probes came back (below
    1 % after 5 answered), and a lossy link's own probes say how lossy.
    """

    __slots__ = ("window", "n", "failed", "rate")

    PRIOR_FAIL = 0.05
    PRIOR_OK = 0.1

    def __init__(self, window: int = 200):
        if window < 1:
            raise ValueError("need window >= 1")
        self.window = window
        self.n = 0.0  # weighted probes observed
        self.failed = 0.0  # of which unanswered
        self.rate = self.PRIOR_FAIL / (self.PRIOR_FAIL + self.PRIOR_OK)

    def observe(self, answered: bool) -> None:
        """One probe's outcome is known: answered, or given up (a later probe
        was answered first, or the subflow went dead)."""
        keep = 1.0 - 1.0 / self.window
        self.n = self.n * keep + 1.0
        self.failed = self.failed * keep + (0.0 if answered else 1.0)
        self.rate = (self.failed + self.PRIOR_FAIL) / (self.n + self.PRIOR_FAIL + self.PRIOR_OK)


class LinkMeter:
    """Sender-side model of one subflow's bottleneck: delivery rate and backlog.

    Sans-I/O, fed by the session with what it already does:

    * ``on_send(nbytes, now)`` for every datagram sent on the subflow;
    * ``on_probe_sent(ts_us, now)`` for every probe (KEEPALIVE / KEEPALIVE_ACK)
      we send, right after its ``on_send``;
    * ``on_echo(echo_ts_us, echo_delay, now, min_rtt)`` when a probe from the
      peer echoes one of ours.

    Idea (BBR's delivery-rate sampling, with our probes as the acks): a probe
    sits in the same bottleneck queue as the data sent before it.  When the
    peer's answer arrives we know when the probe left the bottleneck,
    ``t_pass = now - echo_delay - min_rtt`` (the bottleneck being the local
    uplink, the usual case), and that every byte sent before it had left by
    then.  Two such probes ``a``, ``b`` give a delivery-rate sample
    ``(tx_b - tx_a) / (t_pass_b - t_pass_a)``.

    ``min_rtt`` is the smallest round trip seen since the subflow was
    (re-)established, the handshake's included (``note_rtt``): the one taken
    before any data queued on the path.

    ``bw`` (bytes/s) follows the samples: a sample above the estimate is taken
    at once; a lower one moves it only if the link was *busy* -- both probes
    met a queue (``t_pass - t_sent > busy_delay``): half-way -- or the sender
    kept it loaded (the model queue never ran empty in between): by
    ``smooth``; otherwise the sample only says what the application offered.
    So an idle or lightly used link keeps its capacity estimate, a link that
    got slower is re-measured within a few probes, and one that got faster is
    found when the scheduler pushes it: ``held`` (the scheduler queued
    traffic for it) and kept loaded since the probe (the model queue never ran
    empty) while the probe met no queue multiplies the estimate by
    ``gain_up`` (by 2 in *startup*, until the first busy sample, as BBR's
    start-up does).

    ``backlog(now)``: bytes waiting at the bottleneck, a token-bucket model
    drained at ``rate`` (``bw``, or ``bw0`` before any sample) and
    re-anchored on every fresh echo to the queue actually measured: bytes
    sent after the probe minus what drained since it passed.
    """

    __slots__ = ("bw", "bw0", "q", "t", "tx", "held", "busy_delay", "gain_up", "smooth", "span", "noise", "loss",
                 "samples", "last_sample", "last_echo", "probe_qdelay", "min_rtt", "startup",
                 "_probes", "_marks", "_empties", "_last_echo_ts", "_last_tpass", "_grown_at", "_was_held",
                 "_bucket", "_sent_b", "_nack_b")

    MAX_PROBES = 64  # sent probes remembered (echoes of older ones are ignored)
    MAX_MARKS = 32
    FRESH_ECHO = 0.05  # an echo that waited longer at the peer does not re-anchor the queue

    STARTUP_GAIN = 2.0
    STARTUP_DRAIN = 0.5  # start-up: a probe meeting at most this share of the modelled queue -> grow
    STARTUP_FULL = 0.75  # start-up ends only on a queue of at least this share of the modelled one
    MAX_NOISE = 0.0125  # the jitter allowance never exceeds 2 * this

    def __init__(self, bw0: float = 125_000.0, busy_delay: float = 0.003, gain_up: float = 1.25,
                 smooth: float = 0.25, span: float = 0.08):
        if bw0 <= 0 or busy_delay < 0 or gain_up < 1 or not 0 < smooth <= 1 or span <= 0:
            raise ValueError("bad LinkMeter parameters")
        self.bw: float | None = None  # measured delivery rate, bytes/s
        self.bw0 = bw0  # the guess used until the first sample
        self.q = 0.0  # model backlog at time t, bytes
        self.t = 0.0
        self.tx = 0  # bytes sent on the subflow (every datagram)
        self.held = False  # set by a scheduler that held traffic because this link was full
        self.busy_delay = busy_delay
        self.gain_up = gain_up
        self.smooth = smooth
        self.span = span
        self.samples = 0
        self.last_sample: float | None = None
        self.last_echo: float | None = None  # when the last usable echo arrived
        self.probe_qdelay: float | None = None  # queueing delay the last echoed probe met
        self.min_rtt: float | None = None
        self.startup = True
        # Queueing delay that idle probes (sent with nothing of ours queued)
        # meet anyway: the path's jitter.  A probe counts as having met a
        # queue only above busy_delay + 2 * noise (capped at MAX_NOISE), so a
        # jittery path does not make a lightly used link look busy -- which
        # would drag its capacity estimate down to what it was offered.
        self.noise = 0.0
        # Loss the peer reports on this direction (set by the session): bytes
        # that were dropped at or before the bottleneck never took its time,
        # so a delivery-rate sample counts only the share that got through --
        # otherwise a tbf/queue that drops looks faster than it is, and the
        # scheduler keeps overfilling it.
        self.loss = 0.0
        self._probes: dict = {}  # ts_us -> (t_sent, tx incl. the probe, _empties then, idle)
        self._marks: deque = deque()  # (t_pass, tx, qdelay, _empties) of echoed probes
        self._empties = 0  # times the model queue ran empty (app-limited moments)
        self._last_echo_ts = 0
        self._last_tpass = float("-inf")
        self._grown_at = float("-inf")  # when start-up last grew the estimate on a drained queue
        self._was_held = False  # held between the last two echoes
        # datagrams sent and NACKed (sent only here), per 100 ms: [previous, current]
        self._bucket = 0
        self._sent_b = [0, 0]
        self._nack_b = [0, 0]

    BUCKET = 0.1

    def seed(self, bw0: float) -> None:
        """The rate (bytes/s) assumed until the first sample: a configured
        upload speed, or the scheduler's start rate."""
        if not bw0 > 0:
            raise ValueError(f"bw0 must be > 0, got {bw0!r}")
        self.bw0 = bw0

    def _roll(self, now: float) -> None:
        b = int(now / self.BUCKET)
        if b != self._bucket:
            if b == self._bucket + 1:
                self._sent_b = [self._sent_b[1], 0]
                self._nack_b = [self._nack_b[1], 0]
            else:
                self._sent_b = [0, 0]
                self._nack_b = [0, 0]
            self._bucket = b

    def note_nack(self, now: float) -> None:
        """The peer asked again for a packet sent only on this subflow."""
        self._roll(now)
        self._nack_b[1] += 1

    def nack_ratio(self, now: float) -> float:
        """NACKed / sent over the last 100-200 ms (0 when nothing was sent)."""
        self._roll(now)
        sent = self._sent_b[0] + self._sent_b[1]
        nacked = self._nack_b[0] + self._nack_b[1]
        return nacked / sent if sent else 0.0

    def nacked_recently(self, now: float) -> int:
        self._roll(now)
        return self._nack_b[0] + self._nack_b[1]

    @property
    def ramping(self) -> bool:
        """Still in start-up and the scheduler held traffic for this link
        since the echo before last: faster probes would find its rate
        sooner.  (``held`` alone is cleared by every echo, and a probe
        falling due right after one would not count.)"""
        return self.startup and (self.held or self._was_held)

    @property
    def rate(self) -> float:
        """The drain rate the model uses: ``bw`` once measured, else ``bw0``."""
        bw = self.bw
        return bw if bw is not None else self.bw0

    def _advance(self, now: float) -> None:
        dt = now - self.t
        if dt > 0.0:
            bw = self.bw
            q = self.q - (bw if bw is not None else self.bw0) * dt
            if q <= 0.0:
                if self.q > 0.0:
                    self._empties += 1
                q = 0.0
            self.q = q
            self.t = now

    def on_send(self, nbytes: int, now: float) -> None:
        """A datagram of ``nbytes`` went out on the subflow."""
        if int(now / self.BUCKET) != self._bucket:
            self._roll(now)
        self._sent_b[1] += 1
        dt = now - self.t
        if dt > 0.0:
            bw = self.bw
            q0 = self.q
            q = q0 - (bw if bw is not None else self.bw0) * dt
            if q <= 0.0:
                if q0 > 0.0:
                    self._empties += 1
                q = 0.0
            self.t = now
            self.q = q + nbytes
        else:
            self.q += nbytes
        self.tx += nbytes

    def on_send_seq(self, sizes: list, now: float) -> None:
        """Datagrams of ``sizes`` bytes went out one after the other at ``now``:
        the same state as :meth:`on_send` for each (the backlog added to one
        datagram at a time, as those calls round it)."""
        self.on_send(sizes[0], now)
        if _LOOPS is not None:  # the loop below, in C
            self.q, rest = _LOOPS.add_seq(self.q, sizes, 1)
            self.tx += rest
        else:
            q = self.q
            for n in sizes[1:]:
                q += n
            self.q = q
            self.tx += sum(sizes) - sizes[0]
        self._sent_b[1] += len(sizes) - 1

    def on_send_many(self, count: int, nbytes: int, now: float) -> None:
        """``count`` datagrams of ``nbytes`` in all went out together at ``now``."""
        if int(now / self.BUCKET) != self._bucket:
            self._roll(now)
        self._sent_b[1] += count
        self._advance(now)
        self.t = now
        self.q += nbytes
        self.tx += nbytes

    def backlog(self, now: float) -> float:
        """Bytes the model says still wait at the bottleneck at ``now``."""
        bw = self.bw
        q = self.q - (bw if bw is not None else self.bw0) * (now - self.t)
        return q if q > 0.0 else 0.0

    def qdelay(self, now: float) -> float:
        """Seconds a datagram sent now would wait at the bottleneck (model)."""
        bw = self.bw
        rate = bw if bw is not None else self.bw0
        q = self.q - rate * (now - self.t)
        return (q if q > 0.0 else 0.0) / rate

    def note_rtt(self, rtt: float | None) -> None:
        """An RTT sample of the subflow (handshake or probe), seconds."""
        if rtt is not None and rtt >= 0.0 and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt

    def reset_queue(self, now: float) -> None:
        """Forget the backlog, pending probes and the path's minimum RTT (the
        subflow was re-established, perhaps over another path)."""
        self.min_rtt = None
        self._last_tpass = float("-inf")
        self.q = 0.0
        self.t = now
        self._probes.clear()
        self._marks.clear()
        self._empties += 1
        self.held = self._was_held = False

    def on_probe_sent(self, ts_us: int, now: float) -> None:
        self._advance(now)
        probes = self._probes
        # idle: only the probe itself in the model queue
        # (the model's queueing delay ahead of the probe: in start-up, what
        # the probe really met is compared with it)
        probes[ts_us] = (now, self.tx, self._empties, self.q <= 1500.0, self.q / self.rate)
        if len(probes) > self.MAX_PROBES:
            del probes[next(iter(probes))]

    def on_echo(self, echo_ts_us: int, echo_delay: float, now: float,
                min_rtt: float | None) -> float | None:
        """A probe from the peer echoed ``echo_ts_us``; returns the rate sample, if any."""
        if echo_ts_us == self._last_echo_ts:
            return None
        rec = self._probes.get(echo_ts_us)
        if rec is None:
            return None
        self._last_echo_ts = echo_ts_us
        t0, tx0, empties, idle, mqd = rec
        self.note_rtt(now - echo_delay - t0)
        base = self.min_rtt
        if min_rtt is not None and (base is None or min_rtt < base):
            base = min_rtt
        t_pass = now - echo_delay - (base or 0.0)
        if t_pass < t0:
            t_pass = t0
        if t_pass > now:
            t_pass = now
        if t_pass < self._last_tpass:  # keep marks monotone (jitter)
            t_pass = self._last_tpass
        self._last_tpass = t_pass
        qd = t_pass - t0
        self.probe_qdelay = qd
        if idle:
            self.noise += 0.125 * (min(qd, self.MAX_NOISE) - self.noise)
        busy_delay = self.busy_delay + 2.0 * self.noise
        self.last_echo = now
        rate = self.rate
        # -- re-anchor the backlog on what was measured --------------------------
        if echo_delay <= self.FRESH_ECHO:
            self._advance(now)
            real = self.tx - tx0 - rate * (now - t_pass)
            if real < 0.0:
                real = 0.0
            # (the strict threshold here: with the jitter allowance a real
            # queue of up to 2 * noise would read as none and the estimate
            # would keep growing past the link's rate)
            if (self.held and (empties == self._empties or self.bw is None) and t0 >= self._grown_at
                    and (qd <= self.busy_delay and real <= rate * self.busy_delay
                         or self.startup and qd <= self.STARTUP_DRAIN * mqd)):
                # The scheduler held traffic for this link and kept it loaded
                # (the model queue never ran empty since the probe left), yet
                # the probe met no queue (measured, not modelled: a rate
                # guessed too high would make the model look empty): it
                # drains faster than we think.  Probe upwards.  (Held once is
                # not enough: a far link that the scheduler fills last is
                # "held" at the instant every link is full, while it ran
                # empty most of the interval -- a probe then meets no queue
                # and the estimate doubled past the carrier's rate.  A link
                # never measured has no estimate to protect: held is enough,
                # so a spare carrier is ready when the busy one fails.)
                # In start-up the scheduler keeps queue_target of backlog
                # at the estimated rate, so even a link twice as fast as
                # the estimate shows a few ms of queue right after each
                # burst: there, a probe that waited at most STARTUP_DRAIN
                # of the queue the model put ahead of it saw the link drain
                # at least that much faster than the estimate.
                # (a probe sent before the last growth measured the old rate:
                # one growth per round trip, as probes come every half RTT
                # in start-up)
                self.bw = rate * (self.STARTUP_GAIN if self.startup else self.gain_up)
                self._grown_at = now
            self._was_held = self.held
            self.held = False
            if real <= 0.0 < self.q:
                self._empties += 1
            self.q = real
        # -- delivery-rate sample ------------------------------------------------
        marks = self._marks
        sample = None
        ref = None
        for m in reversed(marks):
            if t_pass - m[0] >= self.span:
                ref = m
                break
        if ref is not None and tx0 > ref[1]:
            sample = (tx0 - ref[1]) * (1.0 - min(self.loss, 0.9)) / (t_pass - ref[0])
            app_limited = empties != ref[3]
            busy = qd > busy_delay and ref[2] > busy_delay
            if busy and not app_limited and (not self.startup or qd > self.STARTUP_FULL * mqd
                                             and ref[2] > self.STARTUP_FULL * ref[4]):
                # Start-up ends when a link we kept loaded met a queue.  Both:
                # on a jittery path a lightly used link's probes look "busy"
                # before the jitter is learned (noise), and ending start-up
                # there left a far link at a fraction of its rate for seconds.
                # And the queue met was about what the model put there
                # (STARTUP_FULL of it): a link faster than its estimate
                # drains our own bursts sooner, and that is no sign of a
                # full bottleneck.
                self.startup = False
            bw = self.bw
            if bw is None:
                # The first sample replaces the guess if it is higher, or if
                # the link was kept loaded (then it is the capacity); an
                # app-limited sample only says what we happened to send.
                if not app_limited or sample > self.bw0:
                    self.bw = sample
            elif sample >= bw:
                # At once in start-up; after it half-way, since on a jittery
                # path two probes that bunch up give one sample too high.
                self.bw = sample if self.startup else bw + 0.5 * (sample - bw)
            elif busy:
                self.bw = bw + 0.5 * (sample - bw)
            elif not app_limited:
                self.bw = bw + self.smooth * (sample - bw)
            self.samples += 1
            self.last_sample = sample
        marks.append((t_pass, tx0, qd, empties, mqd))
        if len(marks) > self.MAX_MARKS:
            marks.popleft()
        return sample
