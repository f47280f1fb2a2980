"""NACK: asking for lost packets and re-sending them (docs/scheduler.md).

Sans-I/O and free of callbacks: the session feeds these objects what
happened (DATA arrived, a NACK arrived, the timer fired) and gets decisions
back (which NACK payloads to send on which subflows and how long to hold
the reorder line; whether a requested packet is re-sent), which it carries
out itself.  Nothing here touches a socket, a clock or the session.

Receiver (:class:`NackReceiver`): DATA arriving above the highest number
so far opens a gap; a gap is taken for a loss once every subflow carrying
data has delivered something above it (subflows are FIFO) or after the
NACK wait; :meth:`NackReceiver.tick` then asks for the missing numbers in
rounds (at most ``nack_per_round`` payloads of 64 numbers, at most one round
per NACK interval), and asks again, up to ``nack_retries`` times, for a
number whose re-send did not come.  The NACK wait, its floor and the
interval between rounds follow the path's round trip (the session sets
``wait``, ``wait_min`` and ``interval`` from its subflows' RTTs, between
``nack_floor`` and ``nack_wait_min`` / ``nack_interval``), so a repair fits
in the hold on a 0.1 ms path as on a 300 ms one; a round holds the reorder
line until its re-sends, and the retries after them, can have come.

Sender (:class:`NackSender`): a NACK names sequence numbers; each still in
the send buffer, not re-sent just now (the other copy of the same NACK) and
within the retransmission budget (``retransmit_budget`` per packet sent,
with a burst) is re-sent (:meth:`NackSender.decide`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mpvpn.core import wire
from mpvpn.core.fastpath import LOOPS as _LOOPS


@dataclass
class NackRound:
    """What one :meth:`NackReceiver.tick` decided: send each of ``payloads``
    (NACK payloads) on each of ``targets`` (the fastest subflows), and, if
    ``defer`` is set, hold the reorder line until then (``ReorderBuffer.defer``)."""
    payloads: list
    targets: list
    defer: float | None
    given_up: list | None = None  # missing numbers not asked for (over the ask budget): give them up now
    cap: float | None = None  # with ``defer``: how long it may keep an item (ReorderBuffer.defer)


class NackReceiver:
    """The receiver's side: which sequence numbers are missing, when to ask."""

    LATE = 0.02  # s: how late past the automatic hold a round still asks (see tick)

    def __init__(self, config):
        self.config = config  # mpvpn.core.smpu.SessionConfig (nack_*, hold_max, send_buffer_max)
        self.missing: dict[int, float] = {}  # seq -> when its gap was noticed
        # asked for, re-send not here yet: seq -> [ask again at, gap noticed at, asks left]
        self.asked: dict[int, list] = {}
        self.rx_high = 0  # highest DATA sequence number received
        # member -> [highest seq received on it, when data last came, smoothed gap]
        self.high_by: dict[int, list] = {}
        self.next: float | None = None  # when tick() must run (None: nothing to ask)
        self.last = float("-inf")  # when the last NACK went out (rate limit)
        self.wait = config.nack_wait_min  # NACK wait without order evidence (set by the session)
        # never ask sooner than this after a gap appeared, even with order
        # evidence, and at most one round per interval (set by the session
        # from the RTTs: see Session._update_hold)
        self.wait_min = config.nack_wait_min
        self.interval = config.nack_interval
        self.nacks_sent = 0  # NACK payloads (a round sends up to nack_per_round)
        self.rounds = 0  # NACK rounds
        self.nack_seqs = 0  # sequence numbers asked for
        self.nack_too_late = 0  # missing numbers not asked for: no time left before the hold
        self.nack_untracked = 0  # missing numbers beyond nack_track
        self.nack_again = 0  # numbers asked for again (the first re-send, or the NACK, was lost)
        # Ask budget (duplicate mode; None: none): first asks per packet
        # received, set by the session from what chance explains (see
        # Session._update_ask_budget); numbers over it are given up at once
        self.ask_rate: float | None = None
        self.ask_burst = 16.0
        self._ask_tokens = 16.0
        self._ask_mark = 0  # rx_high when the tokens were last topped up
        self.nack_declined = 0  # missing numbers given up: over the ask budget

    def set_timing(self, wait: float, wait_min: float, interval: float) -> None:
        """The session's timing from the paths' RTTs (Session._update_hold):
        the wait without order evidence, the least wait, one round per interval."""
        if not (0 <= wait_min <= wait) or not interval >= 0:
            raise ValueError(f"bad NACK timing: wait {wait!r}, wait_min {wait_min!r}, interval {interval!r}")
        self.wait, self.wait_min, self.interval = wait, wait_min, interval

    def set_ask_budget(self, rate: float | None, burst: float = 16.0) -> None:
        """First asks per packet received (None: ask for everything), up to ``burst``."""
        if rate is not None and not rate >= 0 or not burst >= 1:
            raise ValueError(f"bad ask budget: rate {rate!r}, burst {burst!r}")
        self.ask_rate, self.ask_burst = rate, burst

    def reset(self) -> None:
        """NACKs were turned off: forget what is missing and asked for."""
        self.missing.clear()
        self.asked.clear()
        self.next = None

    def note_high(self, member: int, seq: int, now: float) -> None:
        """DATA up to ``seq`` came on ``member`` at ``now``: its highest number
        and smoothed inter-arrival gap (``passed_all``)."""
        h = self.high_by.get(member)
        if h is None:
            self.high_by[member] = [seq, now, 0.01]
        else:
            gap = now - h[1]
            h[2] += 0.125 * ((gap if gap < 0.1 else 0.1) - h[2])
            h[1] = now
            if seq > h[0]:
                h[0] = seq

    def _if_passed(self, now: float) -> None:
        """Subflows are FIFO: once every subflow carrying data has delivered
        something above the first missing number, it is lost -- ask soon."""
        missing = self.missing
        head = next(iter(missing))
        if head < self.passed_all(now):
            t = max(now, missing[head] + self.wait_min, self.last + self.interval)
            if self.next is None or t < self.next:
                self.next = t

    def on_data(self, member: int, seq: int, now: float, delivered_up_to: int) -> None:
        """Authentic DATA ``seq`` arrived on ``member`` and was given to the
        reorder buffer, which has now delivered everything up to
        ``delivered_up_to``."""
        self.note_high(member, seq, now)
        missing = self.missing
        if seq > self.rx_high:
            if seq > self.rx_high + 1:
                self._note_gap(seq, now, delivered_up_to)
            self.rx_high = seq
        elif missing:
            missing.pop(seq, None)
        if missing:
            self._if_passed(now)

    def on_data_many(self, member: int, arrivals: list, now: float) -> None:
        """:meth:`on_data_many_py` with its per-packet part in the C loops
        where built (``nack_gaps``: the same numbers missing, in the same
        order, the same highest ones; tests compare them)."""
        if not arrivals:
            return
        if _LOOPS is None or now.__class__ is not float:
            return self.on_data_many_py(member, arrivals, now)
        c = self.config
        self.gaps_noted(member, *_LOOPS.nack_gaps(
            self.missing, self.rx_high, arrivals, c.send_buffer_max, c.nack_track, now), now)

    def gap_state(self) -> tuple:
        """What a C loop that notes gaps itself needs (``nack_gaps``,
        ``receive_new``): ``(missing, rx_high, send_buffer_max, track)``, the
        dict of missing numbers its own; report with :meth:`gaps_noted`."""
        c = self.config
        return self.missing, self.rx_high, c.send_buffer_max, c.nack_track

    def gaps_noted(self, member: int, high: int, top: int, noted: bool, untracked: int,
                   now: float) -> None:
        """A C loop did :meth:`on_data_many_py`'s per-packet part for DATA
        that came on ``member`` at ``now`` (highest number now ``high``, the
        batch's highest ``top``; ``noted``: numbers were noted missing):
        the rest of it, once per batch."""
        self.rx_high = high
        self.nack_untracked += untracked
        if noted:  # what _note_gap does per gap: ``now`` is one value for the batch
            t = max(now + self.wait, self.last + self.interval)
            if self.next is None or t < self.next:
                self.next = t
        self.note_high(member, top, now)
        if self.missing:
            self._if_passed(now)

    def on_data_many_py(self, member: int, arrivals: list, now: float) -> None:
        """:meth:`on_data` for a batch that came on ``member`` at ``now`` (the
        C loop's ``open_new``): ``arrivals`` the ``(seq, delivered_up_to)``
        of each, in order.  The same numbers missing and the same highest
        ones as one call each; the subflow's pace is noted once (as
        :meth:`on_in_order` does for a run) and the evidence checked once."""
        if not arrivals:
            return
        missing = self.missing
        high = self.rx_high
        top = 0
        for seq, delivered_up_to in arrivals:
            if seq > top:
                top = seq
            if seq > high:
                if seq > high + 1:
                    self.rx_high = high
                    self._note_gap(seq, now, delivered_up_to)
                high = seq
            elif missing:
                missing.pop(seq, None)
        self.rx_high = high
        self.note_high(member, top, now)
        if missing:
            self._if_passed(now)

    def on_in_order(self, member: int, first: int, last: int, now: float) -> None:
        """DATA ``first..last`` arrived in order on ``member`` (a C run): what
        :meth:`on_data` does per packet, once."""
        self.note_high(member, last, now)
        if last > self.rx_high:
            self.rx_high = last
        missing = self.missing
        if missing:
            for s in range(first, last + 1):  # repairs arriving in order
                missing.pop(s, None)
            if missing:
                self._if_passed(now)

    def _note_gap(self, seq: int, now: float, delivered_up_to: int) -> None:
        """DATA ``seq`` arrived above the highest so far: the numbers between are missing."""
        lo = max(self.rx_high, delivered_up_to) + 1
        missing = self.missing
        c = self.config
        lo = max(lo, seq - c.send_buffer_max)  # the sender no longer has older ones
        room = c.nack_track - len(missing)
        hi = min(seq, lo + max(0, room))
        if hi < seq:
            self.nack_untracked += seq - hi
        for s in range(lo, hi):
            missing[s] = now
        if hi > lo:
            # (not later than the NACK wait: a round with re-sends pending
            # may have set the timer to its retry, a round trip away)
            t = max(now + self.wait, self.last + self.interval)
            if self.next is None or t < self.next:
                self.next = t

    def passed_all(self, now: float) -> int:
        """The lowest of the highest numbers received on each subflow that
        is delivering data (0: no evidence).  A subflow counts while its data
        keeps coming at its usual pace (within 4 smoothed gaps) or came within
        the NACK wait (the RTT spread: it may still have packets in flight --
        data often arrives in bursts, a GRO batch at one instant, so its
        smoothed gap alone says little); one that went quiet for longer --
        dead, or no longer used -- can hide nothing."""
        low = 0
        slack = self.wait_min
        wait = self.wait
        for h in self.high_by.values():
            quiet = now - h[1]
            if (quiet <= 4 * h[2] + slack or quiet <= wait) and (low == 0 or h[0] < low):
                low = h[0]
        return low

    def tick(self, now: float, up, reorder, copies: int | None = None) -> NackRound:
        """One NACK round: the missing numbers that waited long enough, and
        those asked for before whose re-send is overdue (the NACK or the
        re-send was lost: a lossy path loses those too).  ``up``: the
        established subflows; ``reorder``: the session's ReorderBuffer, only
        asked (``is_stale``, ``hold``, ``hold_cap``); ``copies``: on how many
        of the fastest subflows each NACK goes (default ``nack_copies``).
        Returns what to send and defer."""
        payloads: list[bytes] = []
        targets: list = []
        defer: float | None = None
        defer_cap: float | None = None
        missing = self.missing
        asked = self.asked
        if not missing and not asked:
            self.next = None
            return NackRound(payloads, targets, defer)
        if self.next is not None and now < self.next:
            return NackRound(payloads, targets, defer)
        interval = self.interval
        if now < self.last + interval:
            self.next = self.last + interval
            return NackRound(payloads, targets, defer)
        hold = reorder.hold
        wait = self.wait
        up = [s for s in up if s.rtt.srtt is not None] or list(up)
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
        declined: list[int] = []
        rate = self.ask_rate
        if rate is not None:
            tokens = self._ask_tokens + rate * (self.rx_high - self._ask_mark)
            self._ask_tokens = tokens if tokens < self.ask_burst else self.ask_burst
            self._ask_mark = self.rx_high
        passed = self.passed_all(now)
        wait_min = self.wait_min
        base_cap = reorder.hold_cap if reorder.hold_cap is not None else self.config.hold_max
        held = reorder.hold_until
        cap = base_cap
        if held > now and reorder.defer_cap > cap:  # a burst's repair is under way (below)
            cap = reorder.defer_cap
        late = self.LATE if self.config.hold == -1.0 else 0.0
        again: list[int] = []  # asked for before, due again
        again_next = None
        if asked:
            for s, rec in list(asked.items()):
                if reorder.is_stale(s):  # the re-send came, or the hold gave up
                    del asked[s]
                elif rec[0] <= now:
                    # (a repair defers the hold up to its cap: ReorderBuffer.hold_cap)
                    if hold is not None and rec[1] + cap < now + fastest:
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
            if hold is not None and max(t + hold + late, min(held, t + cap)) < now + fastest:
                # a re-send could not arrive before the hold deadline (or the
                # end of the deferral a round before this one asked for).
                # With the automatic hold, a round that runs late (an event
                # loop that woke late on a busy router) still asks while the
                # line is held -- this round runs before the hold's releases
                # and defers them -- up to ``late`` past the deadline (at 5 ms
                # late wake-ups and a 5 ms hold, simnet lost 6.5 % at 10 %
                # loss per carrier, all "too late")
                del missing[s]
                self.nack_too_late += 1
                continue
            if rate is not None:
                if self._ask_tokens < 1.0:  # more than chance explains: congestion
                    del missing[s]
                    declined.append(s)
                    continue
                self._ask_tokens -= 1.0
            if t < oldest:
                oldest = t
            if not take(s):
                nxt = now
                break
        self.nack_declined += len(declined)
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
            # the fastest first, but not a suspect one (probes unanswered: the
            # carrier that just failed and caused these gaps is still
            # established, and often the fastest)
            up.sort(key=lambda sub: (sub.suspect(now), sub.rtt.srtt if sub.rtt.srtt is not None else 1e9))
            # a burst of losses (a carrier failing under a flow) can need more
            # than one NACK's 64 numbers: they all go in this round, since the
            # next one may come after the hold deadline
            bounds = [0] + chunks + [len(due)]
            for i in range(len(bounds) - 1):
                payloads.append(wire.nack_encode(due[bounds[i]:bounds[i + 1]]))
                self.nacks_sent += 1
            targets = up[: copies or self.config.nack_copies]
            self.nack_seqs += len(due)
            self.rounds += 1
            self.last = now
            # Hold the line until the re-sends can be here: a NACK over the
            # fastest path, the re-sends over the next one, one after the
            # other at the pace data has been arriving (a failed carrier's
            # whole in-flight tail can be a few hundred packets), and, while
            # a number may be asked for again, until that round (which
            # defers again: Session.handle_timer runs it before the hold's
            # releases) -- else the line was released just before the retry
            # and every lost re-send was a lost packet.  Bounded: never past
            # the hold's cap after the oldest of these gaps appeared.
            srtts = sorted(sub.rtt.srtt for sub in up if sub.rtt.srtt is not None) or [0.0]
            second = srtts[1] if len(srtts) > 1 else srtts[0]
            gaps = [h[2] for h in self.high_by.values() if h[2] > 0]
            burst = len(due) * (min(gaps) if gaps else 0.0)
            var = max((sub.rtt.rttvar for sub in up if sub.rtt.rttvar is not None), default=0.0)
            until = now + 1.5 * second + burst + interval
            retries = self.config.nack_retries
            again_at = until + 2 * var  # if the re-send is not here by then (plus the jitter), ask again
            if retries:
                retry = False
                for s in due:
                    rec = asked.get(s)
                    if rec is None:
                        if len(asked) < self.config.nack_track:
                            asked[s] = [again_at, first_seen[s], retries]
                            retry = True
                    elif rec[2] > 1:
                        rec[0] = again_at
                        rec[2] -= 1
                        retry = True
                    else:
                        del asked[s]
                if retry:
                    until = again_at
                    if again_next is None or again_at < again_next:
                        again_next = again_at
            # The cap bounds one repair and a retry by the round trips; the
            # re-sends of a burst come one after the other on top of that,
            # so its deferral may keep the line that much longer (never past
            # hold_limit): with the RTT's cap alone, a failed carrier's tail
            # of ~900 packets at 5000/s was still arriving when the line
            # gave it up.
            # (from the RTTs' cap, not a running burst's: under steady loss
            # the deferrals overlap, and the stretch must not add up)
            limit = min(base_cap + burst, max(base_cap, self.config.hold_limit))  # burst >= 0
            defer = min(until, oldest + max(limit, cap))
            defer_cap = limit if limit > base_cap else None
        if not missing and not asked:
            self.next = None
            return NackRound(payloads, targets, defer, declined, defer_cap)
        if missing and nxt is None:
            nxt = next(iter(missing.values())) + wait
        if again_next is not None and (nxt is None or again_next < nxt):
            nxt = again_next
        if nxt is None:
            self.next = None
        else:
            self.next = max(nxt, now + interval) if due else max(nxt, now)
        return NackRound(payloads, targets, defer, declined, defer_cap)


class NackSender:
    """The sender's side: which requested numbers to re-send, within a budget."""

    def __init__(self, config):
        self.config = config  # mpvpn.core.smpu.SessionConfig (retransmit_*, nack_copies)
        self.nacks_received = 0
        self.nack_retransmits = 0  # sequence numbers re-sent for a NACK
        self.nack_unavailable = 0  # asked for but no longer in the send buffer
        self.nack_budget_drops = 0  # asked for but over the retransmission budget
        self.nack_duplicates = 0  # asked for again right after a re-send
        self._tokens = float(config.retransmit_burst)
        self._mark = 0  # packets sent when the tokens were last topped up
        self._rate_mark = (float("-inf"), 0)  # (time, packets sent) where _send_rate's step began
        self._send_rate = 0.0  # user packets per second (see mark_rate)
        self._dedupe = 0.0

    def mark_rate(self, now: float, sent: int) -> None:
        """Packets sent per second (``sent``: the session's total so far),
        measured over >= 0.5 s steps; quick to rise, slow to fall (it caps
        the retransmission burst)."""
        t0, n0 = self._rate_mark
        dt = now - t0
        if dt >= 0.5:
            inst = (sent - n0) / dt if dt < 5.0 else 0.0
            est = self._send_rate
            self._send_rate = inst if inst > est else 0.7 * est + 0.3 * inst
            self._rate_mark = (now, sent)

    def on_nack(self, payload, now: float, sent: int, up) -> list[int] | None:
        """A NACK arrived (``up``: the established subflows, ``sent``: packets
        sent so far).  Returns the sequence numbers it names (None when no
        subflow is up: nothing to do); ask :meth:`decide` about each, in order."""
        self.nacks_received += 1
        if not up:
            return None
        c = self.config
        # top up the retransmission budget: retransmit_budget per packet sent
        self.mark_rate(now, sent)
        cap = max(float(c.retransmit_burst), c.retransmit_budget * self._send_rate)
        self._tokens = min(cap, self._tokens + c.retransmit_budget * (sent - self._mark))
        self._mark = sent
        # The copies of one NACK arrive within the RTT of the slowest subflow
        # that carries them; our receiver asks again for a number only after
        # a re-send could have come (nack_retries).
        srtts = sorted(s.rtt.srtt for s in up if s.rtt.srtt is not None) or [0.02]
        self._dedupe = srtts[min(c.nack_copies, len(srtts)) - 1]
        return wire.nack_decode(payload)

    def decide(self, seq: int, entry, now: float) -> bool:
        """Re-send ``seq``?  ``entry``: its send-buffer entry ``(seq, stored,
        carried[, resent_at])`` or None.  True: re-send it, and :meth:`spend`
        the budget once it went out (or was queued); False says why in the
        counters."""
        if entry is None or entry[0] != seq:
            self.nack_unavailable += 1
            return False
        if len(entry) > 3 and now - entry[3] < self._dedupe:
            self.nack_duplicates += 1  # the other copy of the same NACK
            return False
        if self._tokens < 1.0:
            self.nack_budget_drops += 1
            return False
        return True

    def spend(self) -> None:
        """A re-send :meth:`decide` allowed went out or was queued."""
        self._tokens -= 1.0

    def resent(self) -> None:
        """A re-send for a NACK went out."""
        self.nack_retransmits += 1
