"""What the session asks of a scheduler: the interface every scheduling mode
implements (in the shape of aioquic's ``congestion/base.py``).

:class:`mpvpn.core.smpu.Session` talks to its scheduler only through
:class:`PacketScheduler`.  Two implementations:

* :class:`DuplicateAll` -- duplicate mode, seed 001: every established
  subflow carries every packet; no queue, no NACKs.  The session's default.
* :class:`mpvpn.core.scheduler.Scheduler` -- the configurable modes (duplicate
  with policies, aggregate, adaptive), optionally with a paced queue
  (``queueing``) and NACK-driven re-sends.

A plain function ``hook(packet, up, now) -> subflows`` (tests, experiments)
is adapted by :func:`as_scheduler`; it may carry ``nack`` /
``duplicates_everything`` attributes, read when it is assigned.

Sans-I/O: every call gets ``now``; nothing here reads a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class PacketScheduler(ABC):
    """Chooses the established subflows that carry each user packet."""

    #: ``offer``/``pull``/``next_release`` are used: packets may wait here
    queueing: bool = False
    #: the receiver asks for missing packets (NACK) and the sender re-sends
    nack: bool = False

    @property
    def duplicates_everything(self) -> bool:
        """Every packet goes on every established subflow: the session may
        then batch without asking per packet (the C loops)."""
        return False

    @property
    def initial_rate(self) -> float | None:
        """Bytes/s a new subflow's meter assumes before it is measured (None:
        the meter's default)."""
        return None

    @property
    def pending(self) -> int:
        """Packets (and re-sends) waiting here (a queueing scheduler)."""
        return 0

    @property
    def dropped(self) -> int:
        """User packets this scheduler dropped (overflow, too old)."""
        return 0

    # -- the immediate decision ------------------------------------------------

    @abstractmethod
    def __call__(self, packet: bytes, up, now: float):
        """The subflows (a subset of ``up``) that carry ``packet`` now; empty:
        none (the packet is dropped and counted by the session)."""

    # -- the queue (``queueing`` only) --------------------------------------------

    def offer(self, packet: bytes, up, now: float):
        """Decide now (subflows), queue (None) or drop (False)."""
        raise NotImplementedError("not a queueing scheduler")

    def offer_many(self, packets: list, start: int, up, now: float, overhead: int):
        """``offer`` for ``packets[start:]`` in order, each packet sent at once
        recorded on its subflows' meters (``meter.on_send(len(packet) +
        overhead, now)``) before the next is offered; stops after the first
        packet not sent at once.  Returns ``(end, decided, last)``:
        ``decided[k]`` the subflows for ``packets[start + k]``; if ``end >
        start + len(decided)``, ``packets[end - 1]`` was queued (``last``
        None) or dropped (False).  This is the reference; a scheduler may do
        the same with less work per packet."""
        decided = []
        i = start
        while i < len(packets):
            p = packets[i]
            i += 1
            targets = self.offer(p, up, now)
            if not targets:
                return i, decided, targets
            dlen = len(p) + overhead
            for sub in targets:
                sub.meter.on_send(dlen, now)
            decided.append(targets)
        return i, decided, True

    def offer_blocked(self, packets: list, start: int, up, now: float) -> tuple:
        """After ``pull`` returned None: ``offer`` for ``packets[start:]``
        while nothing may leave now whatever is queued (then each ``pull``
        the session makes after an ``offer`` returns None, and is accounted
        as ``pull`` accounts it, here).  Returns ``(end, queued, pump)``:
        ``queued`` how many of ``packets[start:end]`` were queued (the rest
        dropped); ``pump`` True when the session must pull after
        ``packets[end - 1]`` (it may leave now).  The reference takes
        nothing: ``(start, 0, False)``."""
        return start, 0, False

    def pull(self, up, now: float):
        """The next queued ``(packet, subflows)`` that may leave now, or None."""
        return None

    def next_release(self) -> float | None:
        """When ``pull`` may release something (None: nothing queued)."""
        return None

    # -- re-sends (NACK) -------------------------------------------------------------

    def retransmit_pending(self) -> bool:
        """Queued re-sends are waiting (``pull_retransmit`` has something)."""
        return False

    def queue_retransmit(self, seq: int, carried, size: int, now: float, up=()) -> None:
        """Queue a re-send of ``seq`` (a queueing scheduler paces re-sends;
        ``up``: the established subflows, whose pace says how long the
        re-sends queued ahead of it take)."""
        raise NotImplementedError("not a queueing scheduler")

    def pull_retransmit(self, up, now: float):
        """The next queued re-send ``(seq, subflows)`` that may leave now, or None."""
        return None

    def retransmit_targets(self, carried, up, now: float, size: int = 0):
        """Subflows for a re-send of a packet that ``carried`` carried: the
        first established one that did not, else the first one."""
        carried_m = {s.member for s in carried}
        return [s for s in up if s.member not in carried_m][:1] or list(up[:1])

    # -- status ------------------------------------------------------------------------

    def status(self, up, now: float) -> dict | None:
        """The scheduler's part of the status document (None: nothing to say)."""
        return None

    def weights(self, up, now: float) -> dict:
        """member -> seed 000's normalised utility u_i of each subflow in ``up``
        (the status document's ``quality``); empty where the scheduler keeps none."""
        return {}


class DuplicateAll(PacketScheduler):
    """Duplicate mode (seed 001): every established subflow carries every packet."""

    @property
    def duplicates_everything(self) -> bool:
        return True

    def __call__(self, packet, up, now):
        return up

    def __repr__(self):
        return "duplicate_all"


class FunctionScheduler(PacketScheduler):
    """A plain ``hook(packet, up, now)`` as a :class:`PacketScheduler`; its
    ``nack`` and ``duplicates_everything`` attributes (if any) are read once,
    here."""

    def __init__(self, hook):
        if not callable(hook):
            raise TypeError("a scheduler must be a PacketScheduler or a callable")
        self.hook = hook
        self.nack = bool(getattr(hook, "nack", False))
        self._dup_all = bool(getattr(hook, "duplicates_everything", False))

    @property
    def duplicates_everything(self) -> bool:
        return self._dup_all

    def __call__(self, packet, up, now):
        return self.hook(packet, up, now)


def as_scheduler(value) -> PacketScheduler:
    """``value`` itself if it implements the interface, else a plain hook adapted."""
    return value if isinstance(value, PacketScheduler) else FunctionScheduler(value)
