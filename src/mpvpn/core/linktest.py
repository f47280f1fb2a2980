"""Link tests between two agents (``mpvpn test-links``; seed 002), sans-I/O.

A run measures each established subflow alone, then all of them together,
in both directions: phases ``(link, up)``, ``(link, down)`` ... then
``(all, up)``, ``(all, down)``.  "up" is from the side that runs the test to
its peer.  No external tool is involved: the load is SMPU ``TEST``
datagrams (sealed like every control datagram) that the receiver counts and
drops.  They are kept out of the subflows' packet counters, so a test does
not disturb loss estimates, dead detection or the scheduler's rates.

A phase lasts ``duration`` seconds in two halves, per subflow:

* **ramp**: the sender starts at ``START_RATE`` and doubles its paced rate
  each time the receiver's reports (every ``REPORT_INTERVAL``) show the last
  rate got through (at least ``KEEP_UP`` of it); when it does not, the rate
  follows what was delivered.  The best delivered rate is the capacity.
* **measure**: paced at ``MEASURE_SHARE`` of that capacity, so the loss seen
  is the link's own, not the overflow of a queue we filled.  The figures
  reported are the measure half's: goodput (bytes received over the time
  the sender sent), loss (1 - received / sent) and the subflow's smoothed
  RTT at the end (under load, so bufferbloat shows).

Messages (``wire.TEST_HEAD`` then a body):

* LOAD   ``part`` (0 ramp, 1 measure), ``index``; padded to ``size``.
* REPORT ``part`` (| ``FINAL``), packets, bytes, span_us (first to last LOAD
  of that part here): receiver -> sender, every ``REPORT_INTERVAL`` while
  load arrives and at once in answer to END.
* PULL   duration_ms, max_rate (kB/s), n, members: "send me a phase".
* END    packets, bytes, measure_us: what the sender sent in the measure half.

The side that runs the test drives everything (it re-sends a PULL until load
arrives), so a lost message costs at most that phase's figures, never a
stuck run: every phase ends by its deadline.  A peer busy with its own run
ignores PULLs; that phase then fails with "no load from the peer".

Bounds: one run at a time per side, ``duration`` <= ``MAX_DURATION``, rate
<= ``max_rate``, at most ``MAX_BURST`` datagrams per timer tick; receiver
state is one phase's counters per member.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from mpvpn.core import wire

LOAD, REPORT, PULL, END = 1, 2, 3, 4
FINAL = 0x80

LOAD_BODY = struct.Struct("!BI")
REPORT_BODY = struct.Struct("!BIQQ")
PULL_BODY = struct.Struct("!IIB")
END_BODY = struct.Struct("!IQQ")
_HEAD = wire.TEST_HEAD

START_RATE = 1_000_000.0  # bytes/s (8 Mbit/s) at the start of a ramp
MIN_RATE = 12_500.0  # never paced below 100 kbit/s
DEFAULT_MAX_RATE = 125_000_000.0  # 1 Gbit/s
REPORT_INTERVAL = 0.05
KEEP_UP = 0.7
MEASURE_SHARE = 0.9
MAX_DURATION = 10.0
MIN_DURATION = 0.5
DEFAULT_DURATION = 3.0
MAX_BURST = 256  # datagrams per member per tick
TICK = 0.002  # pacing granularity
PULL_RETRY = 0.2
GRACE = 1.0  # after a phase's load: time for the final reports / END
END_COPIES = 3


CAP_WINDOW = 0.2  # capacity = best rate over any window this long (bursts average out)


class _CapMeter:
    """Best rate over sliding windows of at least CAP_WINDOW: a token bucket's
    burst or a report arriving early cannot inflate it much."""

    __slots__ = ("points", "cap")

    def __init__(self):
        self.points: list = []
        self.cap = 0.0

    def add(self, t: float, nbytes: int) -> None:
        pts = self.points
        if pts and t < pts[-1][0]:
            pts.clear()
        pts.append((t, nbytes))
        while len(pts) > 2 and t - pts[1][0] >= CAP_WINDOW:
            pts.pop(0)
        t0, b0 = pts[0]
        if t - t0 >= CAP_WINDOW:
            self.cap = max(self.cap, (nbytes - b0) / (t - t0))


class LinkTestError(Exception):
    """Why a test cannot start (no session, one already running, bad duration)."""


@dataclass
class _Flow:
    """Sender side, one member."""
    member: int
    rate: float = START_RATE
    credit: float = 0.0
    cap: float = 0.0
    changed: float = 0.0  # when the rate was last raised
    ref: tuple | None = None  # (bytes, span) of the report the current interval started at
    sent: list = field(default_factory=lambda: [0, 0])  # packets per part
    sent_bytes: list = field(default_factory=lambda: [0, 0])
    index: int = 0
    final: tuple | None = None  # (packets, bytes) in the measure half, from the FINAL report
    meter: _CapMeter = field(default_factory=_CapMeter)
    last_report: tuple | None = None  # latest (part, packets, bytes) seen


class Sender:
    """Generates one phase's load on ``members`` and follows the receiver's reports."""

    def __init__(self, test_id: int, phase: int, members, duration: float, now: float,
                 size: int, max_rate: float, srtt):
        self.test_id = test_id
        self.phase = phase
        self.flows = {m: _Flow(m, changed=now) for m in members}
        self.start = now
        self.half = now + duration / 2
        self.end = now + duration
        self.size = max(_HEAD.size + LOAD_BODY.size, size)
        self.max_rate = max_rate
        self.srtt = srtt  # member -> smoothed RTT or None
        self.last_tick = now
        self.part = 0
        self.ends_sent = 0
        self.next_end = self.end
        self.measure_s = 0.0
        self.finished = False

    @property
    def done(self) -> bool:
        """The load is over and the final reports came (or the last END went unanswered)."""
        return self.finished

    def deadline(self) -> float:
        if self.last_tick < self.end:
            return min(self.last_tick + TICK, self.end)
        return self.next_end

    def tick(self, now: float, emit) -> None:
        """Send what the pace allows since the last tick; ``emit(member, payload)``."""
        if now < self.end:
            if self.part == 0 and now >= self.half:
                self.part = 1
                for f in self.flows.values():
                    cap = min(f.cap, f.meter.cap) if f.meter.cap else f.cap
                    if cap > 0:
                        f.rate = max(MIN_RATE, MEASURE_SHARE * cap)
            dt = max(0.0, now - self.last_tick)
            self.last_tick = now
            size = self.size
            pad = bytes(size - _HEAD.size - LOAD_BODY.size)
            part = self.part
            for f in self.flows.values():
                f.credit = min(f.credit + f.rate * dt, size * MAX_BURST)
                n = int(f.credit // size)
                if n <= 0:
                    continue
                f.credit -= n * size
                head = _HEAD.pack(LOAD, self.test_id, self.phase, f.member)
                for _ in range(n):
                    f.index += 1
                    emit(f.member, head + LOAD_BODY.pack(part, f.index & 0xFFFFFFFF) + pad)
                f.sent[part] += n
                f.sent_bytes[part] += n * size
            return
        if self.last_tick < self.end:  # the load just ended
            self.measure_s = max(0.0, self.end - max(self.half, self.start))
            self.last_tick = self.end
        if self.finished or now < self.next_end:
            return
        if self.ends_sent and all(f.final is not None for f in self.flows.values()):
            self.finished = True
            return
        if self.ends_sent >= END_COPIES:
            self.finished = True  # the last END went unanswered: figures without loss
            return
        self.ends_sent += 1
        self.next_end = now + max(0.1, 2 * max([t or 0.0 for t in self.srtt.values()] or [0.0]))
        for f in self.flows.values():
            body = END_BODY.pack(f.sent[1] & 0xFFFFFFFF, f.sent_bytes[1], int(self.measure_s * 1e6))
            emit(f.member, _HEAD.pack(END, self.test_id, self.phase, f.member) + body)

    def on_report(self, about: int, part: int, packets: int, nbytes: int, span: float, now: float) -> None:
        f = self.flows.get(about)
        if f is None:
            return
        final = bool(part & FINAL)
        part &= 1
        if final:
            f.final = (packets, nbytes)
            if all(x.final is not None for x in self.flows.values()):
                self.next_end = now  # done at the next tick
            return
        f.last_report = (part, packets, nbytes)
        if part != 0 or self.part != 0:
            return
        f.meter.add(span, nbytes)
        if f.ref is None or span < f.ref[1]:
            f.ref = (nbytes, span)
            return
        dspan = span - f.ref[1]
        if dspan < REPORT_INTERVAL * 0.8:
            return
        delivered = (nbytes - f.ref[0]) / dspan
        f.ref = (nbytes, span)
        f.cap = max(f.cap, delivered)
        rtt = self.srtt.get(about) or 0.0
        if now - f.changed < rtt + REPORT_INTERVAL:
            return  # this interval still reflects the previous rate
        if delivered >= KEEP_UP * f.rate:
            f.rate = min(self.max_rate, f.rate * 2)
        else:
            f.rate = max(MIN_RATE, delivered * 1.1)
        f.changed = now


@dataclass
class _Count:
    packets: list = field(default_factory=lambda: [0, 0])
    nbytes: list = field(default_factory=lambda: [0, 0])
    first: list = field(default_factory=lambda: [None, None])
    last: list = field(default_factory=lambda: [0.0, 0.0])
    part: int = 0
    reported: tuple = (-1, -1)
    next_report: float = 0.0
    end: tuple | None = None  # (packets, bytes, measure_s) from the sender's END
    meter: _CapMeter = field(default_factory=_CapMeter)  # the ramp as seen here (down phases)


class Receiver:
    """Counts one phase's load per member and reports back."""

    def __init__(self, test_id: int, phase: int):
        self.key = (test_id, phase)
        self.counts: dict[int, _Count] = {}
        self.first_load: float | None = None

    def on_load(self, about: int, part: int, n: int, now: float) -> None:
        c = self.counts.get(about)
        if c is None:
            c = self.counts[about] = _Count(next_report=now + REPORT_INTERVAL)
        part &= 1
        if self.first_load is None:
            self.first_load = now
        c.packets[part] += 1
        c.nbytes[part] += n
        if c.first[part] is None:
            c.first[part] = now
        c.last[part] = now
        c.part = part

    def report(self, about: int, final: bool = False) -> bytes:
        c = self.counts.get(about) or _Count()
        part = 1 if final else c.part
        first = c.first[part]
        span = 0.0 if first is None else c.last[part] - first
        return (_HEAD.pack(REPORT, self.key[0], self.key[1], about)
                + REPORT_BODY.pack(part | (FINAL if final else 0), c.packets[part] & 0xFFFFFFFF,
                                   c.nbytes[part], int(span * 1e6)))

    def due(self, now: float) -> list[int]:
        out = []
        for m, c in self.counts.items():
            mark = (c.packets[0], c.packets[1])
            if now >= c.next_report and mark != c.reported:
                c.reported = mark
                if c.part == 0:  # the receiver's own view of the ramp (down phases)
                    c.meter.add(c.last[0], c.nbytes[0])
                c.next_report = now + REPORT_INTERVAL
                out.append(m)
        return out

    def deadline(self) -> float | None:
        t = None
        for c in self.counts.values():
            if (c.packets[0], c.packets[1]) != c.reported and (t is None or c.next_report < t):
                t = c.next_report
        return t


@dataclass
class Phase:
    name: str
    direction: str  # "up" | "down"
    members: tuple


class Run:
    """The test as seen by the side that runs it: phases in order, results."""

    def __init__(self, test_id: int, phases: list, duration: float, now: float):
        self.id = test_id
        self.phases = phases
        self.duration = duration
        self.started = now
        self.index = -1
        self.state = "running"
        self.error: str | None = None
        self.results: list[dict] = []
        self.phase_start = now
        self.pull_next = 0.0


class LinkTester:
    """Both roles of a session's link tests.  ``session`` provides:
    ``emit_test(member, payload)``, ``subflows``, ``up`` and ``config.max_payload``."""

    def __init__(self, session, max_rate: float = DEFAULT_MAX_RATE, load_size: int = 1400):
        self.session = session
        self.max_rate = max_rate
        self.load_size = load_size  # a LOAD's payload: the agent sets its tun MTU
        self.run: Run | None = None
        self.sender: Sender | None = None
        self.receiver: Receiver | None = None
        self._next_id = 0
        self.pulls_ignored = 0
        self.stray = 0  # test messages for no phase we know

    # -- starting -------------------------------------------------------------

    def start(self, now: float, duration: float = DEFAULT_DURATION) -> int:
        if self.run is not None and self.run.state == "running":
            raise LinkTestError("a link test is already running")
        if self.sender is not None and not self.sender.done:
            raise LinkTestError("the peer is running a link test")
        try:
            duration = float(duration)
        except (TypeError, ValueError):
            raise LinkTestError("duration must be a number of seconds") from None
        if not MIN_DURATION <= duration <= MAX_DURATION:
            raise LinkTestError(f"duration must be {MIN_DURATION:g}..{MAX_DURATION:g} seconds")
        up = list(self.session.up)
        if not up:
            raise LinkTestError("no established subflow to test")
        phases = []
        for s in up:
            name = s.name or f"member {s.member}"
            phases += [Phase(name, "up", (s.member,)), Phase(name, "down", (s.member,))]
        if len(up) > 1:
            name = "+".join(s.name or str(s.member) for s in up)
            ms = tuple(s.member for s in up)
            phases += [Phase(name, "up", ms), Phase(name, "down", ms)]
        self._next_id = (self._next_id % 0xFFFFFFFF) + 1
        self.run = Run(self._next_id, phases, duration, now)
        self._next_phase(now)
        return self.run.id

    def _size(self) -> int:
        return min(self.session.config.max_payload, self.load_size)

    def _srtt(self, members) -> dict:
        subs = self.session.subflows
        return {m: (subs[m].rtt.srtt if m in subs else None) for m in members}

    def _next_phase(self, now: float) -> None:
        run = self.run
        run.index += 1
        if run.index >= len(run.phases):
            run.state = "done"
            self.sender = None
            self.receiver = None
            return
        ph = run.phases[run.index]
        run.phase_start = now
        self.sender = None
        self.receiver = None
        if ph.direction == "up":
            self.sender = Sender(run.id, run.index, ph.members, run.duration, now,
                                 self._size(), self.max_rate, self._srtt(ph.members))
        else:
            self.receiver = Receiver(run.id, run.index)
            run.pull_next = now

    def _finish_phase(self, now: float) -> None:
        run = self.run
        ph = run.phases[run.index]
        subs = self.session.subflows
        rtts = [subs[m].rtt.srtt for m in ph.members if m in subs and subs[m].rtt.srtt is not None]
        res = {"name": ph.name, "direction": ph.direction, "members": list(ph.members),
               "mbps": None, "goodput_mbps": None, "rtt_ms": round(1000 * sum(rtts) / len(rtts), 2) if rtts else None,
               "loss": None, "packets": 0, "bytes": 0}
        if ph.direction == "up":
            s = self.sender
            sent = sum(f.sent[1] for f in s.flows.values())
            got = [f.final for f in s.flows.values()]
            if all(g is not None for g in got):
                res["packets"] = sum(g[0] for g in got)
                res["bytes"] = sum(g[1] for g in got)
                if sent:
                    res["loss"] = round(max(0.0, 1 - res["packets"] / sent), 5)
            else:  # final reports lost: the last running report, loss unknown
                for f in s.flows.values():
                    if f.last_report and f.last_report[0] == 1:
                        res["packets"] += f.last_report[1]
                        res["bytes"] += f.last_report[2]
            span = s.measure_s or run.duration / 2
            cap = sum(f.meter.cap for f in s.flows.values())
        else:
            r = self.receiver
            counts = [r.counts.get(m) for m in ph.members]
            res["packets"] = sum(c.packets[1] for c in counts if c)
            res["bytes"] = sum(c.nbytes[1] for c in counts if c)
            ends = [c.end if c else None for c in counts]
            cap = sum(c.meter.cap for c in counts if c)
            span = run.duration / 2
            if all(e is not None for e in ends):
                sent = sum(e[0] for e in ends)
                span = max(e[2] for e in ends) or span
                if sent:
                    res["loss"] = round(max(0.0, 1 - res["packets"] / sent), 5)
            if r.first_load is None:
                run.error = f"no load from the peer in phase {ph.name} {ph.direction}"
        if res["bytes"] and span > 0:
            res["goodput_mbps"] = round(res["bytes"] * 8 / span / 1e6, 3)
        # throughput: the best rate the ramp got through (at least the goodput)
        best = max(cap * 8 / 1e6, res["goodput_mbps"] or 0.0)
        res["mbps"] = round(best, 3) if best > 0 else None
        run.results.append(res)
        self._next_phase(now)

    def abort(self, why: str) -> None:
        if self.run is not None and self.run.state == "running":
            self.run.state = "failed"
            self.run.error = why
        self.sender = None
        self.receiver = None

    # -- timers ---------------------------------------------------------------

    def deadline(self) -> float | None:
        ts = []
        if self.sender is not None and not self.sender.done:
            ts.append(self.sender.deadline())
        if self.receiver is not None:
            d = self.receiver.deadline()
            if d is not None:
                ts.append(d)
        run = self.run
        if run is not None and run.state == "running":
            ts.append(self._phase_deadline())
            ph = run.phases[run.index]
            if ph.direction == "down" and self.receiver is not None and self.receiver.first_load is None:
                ts.append(run.pull_next)
        return min(ts) if ts else None

    def _phase_deadline(self) -> float:
        run = self.run
        return run.phase_start + run.duration + GRACE

    def on_timer(self, now: float) -> None:
        emit = self.session.emit_test
        s = self.sender
        if s is not None and not s.done:
            s.tick(now, emit)
        r = self.receiver
        if r is not None:
            for m in r.due(now):
                self._send_report(r, m, False)
        run = self.run
        if run is None or run.state != "running":
            if s is not None and s.done:
                self.sender = None
            return
        if not self.session.up:
            self.abort("the session lost its subflows")
            return
        ph = run.phases[run.index]
        if ph.direction == "up" and s is not None and s.done:
            self._finish_phase(now)
        elif ph.direction == "down":
            c = [r.counts.get(m) for m in ph.members] if r is not None else []
            if c and all(x is not None and x.end is not None for x in c):
                self._finish_phase(now)
                return
            if r is not None and r.first_load is None and now >= run.pull_next:
                run.pull_next = now + PULL_RETRY
                body = PULL_BODY.pack(int(run.duration * 1000), int(self.max_rate / 1000), len(ph.members))
                payload = _HEAD.pack(PULL, run.id, run.index, 0) + body + bytes(ph.members)
                for sub in self.session.up[:2]:
                    emit(sub.member, payload)
        if run.state == "running" and now >= self._phase_deadline():
            self._finish_phase(now)

    def _send_report(self, r: Receiver, about: int, final: bool) -> None:
        payload = r.report(about, final)
        up = self.session.up
        members = {about} if not final else {about} | {s.member for s in up[:1]}
        for m in members:
            if m in self.session.subflows:
                self.session.emit_test(m, payload)

    # -- receiving ------------------------------------------------------------

    def on_message(self, payload, member: int, now: float) -> None:
        """An authenticated TEST payload that arrived on ``member``."""
        n = len(payload)
        if n < _HEAD.size:
            self.stray += 1
            return
        kind, test_id, phase, about = _HEAD.unpack_from(payload)
        body = memoryview(payload)[_HEAD.size:]
        if kind == LOAD and len(body) >= LOAD_BODY.size:
            r = self.receiver
            if r is None or r.key != (test_id, phase):
                if self.run is not None and self.run.state == "running":
                    self.stray += 1  # ours is running: not a phase we asked for
                    return
                r = self.receiver = Receiver(test_id, phase)  # the peer's run
            part, _index = LOAD_BODY.unpack_from(body)
            r.on_load(member, part, n, now)
        elif kind == REPORT and len(body) == REPORT_BODY.size:
            s = self.sender
            if s is None or (s.test_id, s.phase) != (test_id, phase):
                self.stray += 1
                return
            part, packets, nbytes, span_us = REPORT_BODY.unpack(body)
            s.on_report(about, part, packets, nbytes, span_us / 1e6, now)
        elif kind == END and len(body) == END_BODY.size:
            r = self.receiver
            if r is None or r.key != (test_id, phase):
                self.stray += 1
                return
            packets, nbytes, measure_us = END_BODY.unpack(body)
            c = r.counts.get(about)
            if c is None:
                c = r.counts[about] = _Count()
            c.end = (packets, nbytes, measure_us / 1e6)
            self._send_report(r, about, True)
        elif kind == PULL and len(body) >= PULL_BODY.size:
            self._on_pull(test_id, phase, body, now)
        else:
            self.stray += 1

    def _on_pull(self, test_id: int, phase: int, body, now: float) -> None:
        duration_ms, max_rate_k, count = PULL_BODY.unpack_from(body)
        members = bytes(body[PULL_BODY.size:PULL_BODY.size + count])
        if len(members) != count or not count:
            self.stray += 1
            return
        s = self.sender
        if s is not None and (s.test_id, s.phase) == (test_id, phase):
            return  # a re-sent PULL for the phase we are sending
        if (self.run is not None and self.run.state == "running") or (s is not None and not s.done):
            self.pulls_ignored += 1
            return
        up = {sub.member for sub in self.session.up}
        if not set(members) <= up:
            self.pulls_ignored += 1
            return
        duration = min(MAX_DURATION, max(MIN_DURATION, duration_ms / 1000))
        rate = min(self.max_rate, max(MIN_RATE, max_rate_k * 1000.0))
        self.sender = Sender(test_id, phase, tuple(members), duration, now,
                             self._size(), rate, self._srtt(members))

    # -- status ---------------------------------------------------------------

    def status(self) -> dict | None:
        run = self.run
        if run is None:
            return None
        return {"id": run.id, "state": run.state, "error": run.error, "started": run.started,
                "phase": run.index if run.state == "running" else None,
                "phases": len(run.phases), "duration": run.duration,
                "plan": [{"name": ph.name, "direction": ph.direction} for ph in run.phases],
                "results": [dict(r) for r in run.results]}
