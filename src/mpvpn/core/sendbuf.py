"""How many recent packets the send buffer keeps for re-sends (docs/scheduler.md).

A re-send is only possible while the packet is still in the sender's send
buffer, a ring indexed by sequence number.  How long a packet must stay
there is a time, not a count: when a carrier fails under a flow, the
sender keeps sending onto it until its probes go unanswered long enough
(at most the dead-detection window, ``(dead_after + 1) x keepalive_active``),
the receiver only sees the gap once data comes over another carrier, and
its NACK, the re-send and a retry must fit in the reorder hold's cap.  At
5000 packets/s a fixed 1024-packet ring held 0.2 s -- less than that --
and a failover lost the oldest part of the dead carrier's tail
(``nack_unavailable``).

:class:`SendBufferSizer` turns the send rate into a ring size: at least
the packets sent in the last ``keep`` seconds (counted from marks a
step apart, never fewer: a shrink never drops one a repair may still ask
for) and what the current
rate sends in ``keep`` seconds (a burst is covered from its first step),
rounded up to a power of two, between the configured floor
(``SessionConfig.send_buffer``) and the memory bound (``send_buffer_max``).
It shrinks only when a quarter of the ring would do, so it does not flap.

Sans-I/O: sequence numbers and ``now`` in, a capacity out; the session
owns the ring and resizes it (:meth:`mpvpn.core.smpu_send.SendPath._fit_send_buffer`).
"""

from __future__ import annotations

from collections import deque


def _pow2_at_least(n: float) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


class SendBufferSizer:
    """The send buffer's wanted capacity from the recent send rate and the keep time."""

    STEP = 0.05  # s: the rate is measured over at least this long

    def __init__(self, floor: int, ceiling: int):
        if floor < 1 or floor & (floor - 1) or ceiling < floor or ceiling & (ceiling - 1):
            raise ValueError(f"send buffer bounds must be powers of two, floor <= ceiling: "
                             f"{floor!r}, {ceiling!r}")
        self.floor = floor
        self.ceiling = ceiling
        self.rate = 0.0  # packets per second over the last step
        self._marks: deque = deque()  # (time, sequence number), one per step at most
        self._now = float("-inf")
        self._seq = 0

    def note(self, now: float, seq: int) -> bool:
        """The session has numbered ``seq`` packets by ``now``.  True when
        that took a new mark (a step passed): only then can :meth:`wanted`
        say something new."""
        self._now, self._seq = now, seq
        marks = self._marks
        if marks:
            t0, s0 = marks[-1]
            dt = now - t0
            if dt < self.STEP:
                return False
            self.rate = (seq - s0) / dt
        marks.append((now, seq))
        return True

    def wanted(self, keep: float, current: int) -> int:
        """The capacity to use now, given the ``current`` one: the packets of
        the last ``keep`` seconds and of the next ones at the current rate,
        within the bounds; ``current`` unless that needs more, or a quarter
        of it would do."""
        since = self._now - keep
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= since:  # older than needed
            marks.popleft()
        # from the newest mark at or before ``since`` (else the oldest): never fewer
        recent = self._seq - marks[0][1] if marks else 0
        ahead = self.rate * keep
        need = _pow2_at_least(recent if recent > ahead else ahead)
        need = self.floor if need < self.floor else (self.ceiling if need > self.ceiling else need)
        if need > current or need * 4 <= current:
            return need
        return current
