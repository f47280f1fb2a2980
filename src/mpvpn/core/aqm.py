"""Active queue management for the agent's own queues (issue 17 item 1):
the vNIC's ring and the uplinks' socket buffers.  Both are experiments the
agent runs only when asked (``MPVPN_TUN_AQM=1``, ``MPVPN_RX_AQM=1``): the
first shortened the queue under load but gave back throughput where the
agent's CPU is the bottleneck, the second gained nothing measurable
(docs/performance.md "Latency").

Bulk TCP entering the tunnel fills whatever queue sits in front of the
slowest stage.  When that stage is the sending agent (sealing three copies of
every packet on a small CPU), the queue is the tun's ring: a FIFO the kernel
fills until it overflows (500 frames, each up to a 64 KB super-segment), so a
ping or a VoIP frame waits behind milliseconds of bulk data before the agent
even sees it.  Nothing drops there early, so TCP keeps it full.

:class:`StandingQueue` applies CoDel's control law (RFC 8289, section 5) to
that ring.  The agent cannot timestamp what waits in the ring, but it knows
whether one turn's reads emptied it: a turn that stopped at its batch budget
left packets waiting.  A ring that no turn has emptied for ``interval`` holds
a standing queue (CoDel: the minimum sojourn stayed above the target, here
"one turn"); then one bulk packet of the turn is dropped, the next after
``interval / sqrt(count)``, until a turn empties the ring.  TCP halves (cubic:
x0.7) its window per loss and the standing queue drains, while the ring
never runs dry for long (that would cost throughput): the drop rate grows
only as long as the queue stands.

The same state machine watches the uplinks' socket buffers when asked to:
there the kernel's receive stamp gives the sojourn, and a receive that
waited at most :data:`TARGET` counts as "drained" (CoDel's own test).

Sans-I/O: whether the queue was drained and ``now`` in, drop decisions out.
"""

from __future__ import annotations

from math import sqrt

INTERVAL = 0.010  # s: how long a standing queue may last before the first drop
TARGET = 0.001  # s: a socket buffer's sojourn (the kernel's receive stamp) above this is standing
BULK_MIN = 512  # bytes: shorter packets (ACKs, pings, VoIP, DNS) are never dropped here


class StandingQueue:
    """CoDel's state machine over "did this turn empty the queue?".

    ``on_turn(drained, now)`` after each turn that read the queue: True when
    one bulk packet of this turn should be dropped (counted in ``drops``).
    For a queue whose sojourn is known (a UDP socket buffer, from the
    kernel's receive stamps) ``drained`` is "the sojourn was at most
    TARGET", which is CoDel's own test (RFC 8289 section 4.2)."""

    __slots__ = ("interval", "first_above", "dropping", "count", "last_count", "drop_next", "drops")

    def __init__(self, interval: float = INTERVAL):
        if not interval > 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.first_above: float | None = None  # standing since then + interval
        self.dropping = False
        self.count = 0  # drops in this dropping state (the control law's n)
        self.last_count = 0  # count when the previous dropping state began
        self.drop_next = 0.0
        self.drops = 0  # total

    def on_turn(self, drained: bool, now: float) -> bool:
        if drained:
            self.first_above = None
            self.dropping = False
            return False
        if self.dropping:
            if now < self.drop_next:
                return False
            self.count += 1
            self.drop_next = max(self.drop_next + self.interval / sqrt(self.count), now)
            self.drops += 1
            return True
        if self.first_above is None:
            self.first_above = now + self.interval
            return False
        if now < self.first_above:
            return False
        # enter the dropping state; soon after the last one, resume near its rate (RFC 8289 5.4)
        self.dropping = True
        delta = self.count - self.last_count
        self.count = delta if delta > 1 and now - self.drop_next < 16 * self.interval else 1
        self.last_count = self.count
        self.drop_next = now + self.interval / sqrt(self.count)
        self.drops += 1
        return True


def drop_one_bulk(batches, bulk_min: int = BULK_MIN) -> bool:
    """Remove the oldest packet of at least ``bulk_min`` bytes from the lists
    in ``batches`` (each in read order; CoDel drops at the head, so the
    sender hears of it soonest); False if there is none."""
    for batch in batches:
        for i, p in enumerate(batch):
            if len(p) >= bulk_min:
                del batch[i]
                return True
    return False
