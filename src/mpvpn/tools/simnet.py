"""An in-memory network for SMPU sessions: two endpoints joined by N simulated
subflows that can drop, duplicate, delay, jitter and reorder datagrams, on a
fake clock.  Used by the tests, the demo and the core benchmark.

Each subflow direction is a :class:`SimLink`.  :class:`SimPair` runs a
discrete-event loop: datagrams in flight sit in a heap keyed by arrival time,
and each session's ``handle_timer`` runs at its ``get_timer()``.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from mpvpn.core.smpu import Session, SessionConfig


@dataclass
class SimLink:
    """One direction of one subflow."""

    loss: float = 0.0  # probability a datagram is dropped
    delay: float = 0.010  # one-way delay, seconds
    jitter: float = 0.0  # uniform extra delay in [0, jitter]
    duplicate: float = 0.0  # probability a datagram is delivered twice
    up: bool = True  # False: everything is dropped (carrier down)
    fifo: bool = True  # True: jitter never reorders within this link
    # Bottleneck (a rate-limited uplink, like tbf): None = unlimited, else
    # bytes per second; datagrams wait in a FIFO queue of at most ``queue``
    # bytes (None: unbounded) and a datagram that does not fit is dropped.
    rate: float | None = None
    queue: int | None = None
    sent: int = 0
    dropped: int = 0  # by loss, down, or a full queue
    qdropped: int = 0  # of those, by a full queue
    sent_bytes: int = 0
    _last_arrival: float = 0.0
    _busy_until: float = 0.0

    def backlog(self, now: float) -> float:
        """Bytes waiting in the bottleneck queue at ``now`` (0 without a rate)."""
        if self.rate is None:
            return 0.0
        return max(0.0, self._busy_until - now) * self.rate

    def transit(self, now: float, rng: random.Random, size: int = 0) -> list[float]:
        """Arrival times for one datagram of ``size`` bytes sent now (empty if dropped)."""
        self.sent += 1
        if not self.up:
            self.dropped += 1
            return []
        depart = now
        if self.rate is not None:
            start = self._busy_until if self._busy_until > now else now
            if self.queue is not None and (start - now) * self.rate + size > self.queue:
                self.dropped += 1
                self.qdropped += 1
                return []
            depart = start + size / self.rate
            self._busy_until = depart
        self.sent_bytes += size
        if self.loss and rng.random() < self.loss:
            self.dropped += 1
            return []
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        out = []
        for _ in range(copies):
            t = depart + self.delay + (rng.random() * self.jitter if self.jitter else 0.0)
            if self.fifo and t < self._last_arrival:
                t = self._last_arrival
            self._last_arrival = max(self._last_arrival, t)
            out.append(t)
        return out


class SimPair:
    """Two sessions (``a`` initiator, ``b`` responder) over simulated subflows."""

    def __init__(self, n_subflows: int = 3, *, loss: float = 0.0, delay: float = 0.010,
                 jitter: float = 0.0, duplicate: float = 0.0, fifo: bool = True,
                 config: SessionConfig | None = None, config_b: SessionConfig | None = None,
                 seed: int = 1, session_id: int = 0x5E55, start: float = 1000.0,
                 sealed: bool = False, sealers: tuple | None = None):
        """``sealed``: AEAD with random keys; ``sealers``: (a's, b's) Sealer
        with keys of the caller's choosing."""
        self.rng = random.Random(seed)
        self.now = start
        sa, sb = sealers if sealers is not None else (None, None)
        if sealed and sealers is None:  # AEAD on every datagram, as the agent runs it
            from mpvpn.core.seal import Sealer
            k1, k2 = self.rng.randbytes(32), self.rng.randbytes(32)
            sa, sb = Sealer(k1, k2, 1), Sealer(k2, k1, 1)
        self.a = Session(session_id, initiator=True, config=config, sealer=sa)
        self.b = Session(session_id, initiator=False, config=config_b or config, sealer=sb)
        # links[(side, member)] carries datagrams sent by `side` on `member`
        self.links: dict[tuple[str, int], SimLink] = {}
        self._heap: list = []
        self._n = 0
        self.delivered = {"a": [], "b": []}  # user packets handed up, per receiving side
        self.delivered_at = {"a": [], "b": []}  # when each of them was handed up
        self.events = {"a": [], "b": []}
        for m in range(1, n_subflows + 1):
            self.add_subflow(m, loss=loss, delay=delay, jitter=jitter,
                             duplicate=duplicate, fifo=fifo)

    def add_subflow(self, member: int, **link) -> None:
        self.links[("a", member)] = SimLink(**link)
        self.links[("b", member)] = SimLink(**link)
        self.b.add_subflow(member, self.now, name=f"sub{member}")
        self.a.add_subflow(member, self.now, name=f"sub{member}")
        self._flush("a")
        self._flush("b")

    def link(self, member: int, direction: str | None = None) -> list[SimLink]:
        """The link(s) of a subflow: direction 'a' (a->b), 'b' (b->a) or both."""
        sides = ("a", "b") if direction is None else (direction,)
        return [self.links[(s, member)] for s in sides]

    def set(self, member: int, direction: str | None = None, **attrs) -> None:
        for lk in self.link(member, direction):
            for k, v in attrs.items():
                setattr(lk, k, v)

    def session(self, side: str) -> Session:
        return self.a if side == "a" else self.b

    def _flush(self, side: str) -> None:
        sess = self.session(side)
        other = "b" if side == "a" else "a"
        for member, dgram in sess.datagrams_to_send(self.now):
            lk = self.links.get((side, member))
            if lk is None:
                continue
            for t in lk.transit(self.now, self.rng, len(dgram)):
                self._n += 1
                heapq.heappush(self._heap, (t, self._n, other, member, dgram))

    def _collect(self, side: str) -> None:
        sess = self.session(side)
        ev = sess.next_event()
        while ev is not None:
            self.events[side].append((self.now, ev))
            ev = sess.next_event()

    def _deliver(self, side: str, packets: list) -> None:
        self.delivered[side].extend(packets)
        self.delivered_at[side].extend([self.now] * len(packets))

    def send(self, side: str, packet: bytes) -> bool:
        ok = self.session(side).send(packet, self.now)
        self._flush(side)
        return ok

    def inject(self, side: str, member: int, datagram: bytes) -> list:
        """Hand a raw datagram to ``side`` as if it arrived on ``member``."""
        out = self.session(side).receive_datagram(datagram, member, self.now)
        self._deliver(side, out)
        self._flush(side)
        self._collect(side)
        return out

    def run_until(self, t_end: float) -> None:
        """Advance the clock to ``t_end``, delivering datagrams and firing timers."""
        heap = self._heap
        a, b = self.a, self.b
        self._flush("a")  # anything queued by direct calls on the sessions
        self._flush("b")
        while True:
            t = heap[0][0] if heap else None
            for s in (a, b):
                d = s.get_timer()
                if d is not None and (t is None or d < t):
                    t = d
            if t is None or t > t_end:
                break
            if t > self.now:
                self.now = t
            while heap and heap[0][0] <= self.now:
                _, _, side, member, dgram = heapq.heappop(heap)
                out = self.session(side).receive_datagram(dgram, member, self.now)
                if out:
                    self._deliver(side, out)
                self._flush(side)
            for side, s in (("a", a), ("b", b)):
                d = s.get_timer()
                if d is not None and d <= self.now:
                    out = s.handle_timer(self.now)
                    if out:
                        self._deliver(side, out)
                    self._flush(side)
            self._collect("a")
            self._collect("b")
        self.now = max(self.now, t_end)

    def run(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def handshake(self, timeout: float = 5.0) -> bool:
        """Run until every subflow is established on both sides (or timeout)."""
        end = self.now + timeout
        while self.now < end:
            self.run(0.01)
            if (all(s.established for s in self.a.subflows.values())
                    and all(s.established for s in self.b.subflows.values())):
                return True
        return False

    def stream(self, side: str, count: int, rate_pps: float, size: int = 200,
               tag: int = 0, first: int = 0) -> list[bytes]:
        """Send ``count`` numbered packets from ``side`` at ``rate_pps``; returns them.

        Each packet starts with its 4-byte index and 1-byte tag, so receivers
        can check order and content.
        """
        gap = 1.0 / rate_pps
        pkts = []
        for i in range(first, first + count):
            p = i.to_bytes(4, "big") + bytes([tag]) + bytes(max(0, size - 5))
            pkts.append(p)
            self.send(side, p)
            self.run(gap)
        return pkts
