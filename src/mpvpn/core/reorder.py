"""The receiver's reorder buffer (seed 001 "Receiving", docs/protocol.md
"Receive rule").

Sans-I/O: time is passed in as ``now`` (float seconds, non-decreasing); the
buffer never reads a clock and never blocks.

``X`` (attribute :attr:`ReorderBuffer.last`) is the last accepted sequence
number, ``Y`` the arriving one.  The first packet of a session is
``start + 1``.

* ``Y <= X``: dropped.  Counted as *late* if ``Y`` lies in a range that was
  given up (skipped) by a flush or a deadline release, else as a *duplicate*.
* ``Y == X + 1``: released, ``X = Y``, then ``X + 1`` is released from the
  buffer while present.
* ``Y > X + 1``: if ``Y`` is already buffered it is a duplicate (the first
  copy is kept).  Otherwise, if the buffer already holds ``capacity`` items,
  everything buffered plus ``Y`` is released in order, the buffer is emptied
  and ``X`` becomes the highest released (a *flush*).  Otherwise ``Y`` is
  buffered with its arrival time.
* Hold deadline (our addition): a buffered item waits at most ``hold``
  seconds after its arrival.  :meth:`ReorderBuffer.expire` releases the
  expired items, giving up every gap below them (a *deadline release*).

Every sequence number in ``start + 1 .. X`` is therefore either released
exactly once or *skipped* (given up); nothing is ever released twice and the
released stream is strictly increasing.
"""

from __future__ import annotations

from collections import deque

from mpvpn.core.fastpath import LOOPS as _LOOPS

__all__ = ["ReorderBuffer"]

# How many given-up ranges are remembered to tell "late" from "duplicate".
SKIP_MEMORY = 64

_MISSING = object()


class ReorderBuffer:
    """Reorder buffer with an optional hold deadline.

    :param capacity: most items held at once (>= 1).  A new out-of-order
        item arriving at a full buffer triggers a flush.
    :param hold: longest time (seconds, >= 0) an item may stay buffered, or
        ``None`` for the seed's rule without a deadline.  A plain attribute:
        the engine may change it at any time; deadlines always use the
        current value (``arrival + hold``).
    :param start: initial ``X``; the first expected sequence number is
        ``start + 1``.

    Counters (plain ints, never reset by :meth:`reset`):

    ``delivered``          items released by any path
    ``duplicates``         copies dropped because already released or buffered
    ``late``               copies dropped because their number was given up
    ``flushes``            flush events (buffer full)
    ``flushed``            items released by flushes (including the trigger)
    ``deadline_releases``  :meth:`expire` calls that released something
    ``skipped``            sequence numbers given up (sum of gap sizes)

    Only the last :data:`SKIP_MEMORY` given-up ranges are remembered; a copy
    below ``X`` that falls in an older, forgotten range counts as a
    duplicate.  Every copy of a given-up number counts as late.
    """

    __slots__ = (
        "capacity",
        "hold",
        "last",
        "_buf",
        "_arrivals",
        "_arrivals_limit",
        "_tlast",
        "_skips",
        "delivered",
        "duplicates",
        "late",
        "flushes",
        "flushed",
        "deadline_releases",
        "skipped",
        "hold_until",
        "hold_cap",
        "defer_cap",
        "deferrals",
        "given_up",
        "_given",
    )

    def __init__(self, capacity: int, hold: float | None, start: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if hold is not None and not hold >= 0:  # also rejects NaN
            raise ValueError(f"hold must be None or >= 0, got {hold!r}")
        self.capacity = capacity
        self.hold = hold
        # (arrival time, seq) in arrival order.  An entry is live while
        # seq > last: a buffered seq leaves the buffer only by being released,
        # which moves last to >= seq, and a released seq is never buffered
        # again.  Dead entries are dropped lazily, and the deque is compacted
        # when it grows past twice the capacity, so it stays O(capacity).
        self._arrivals_limit = 2 * capacity
        self.delivered = 0
        self.duplicates = 0
        self.late = 0
        self.flushes = 0
        self.flushed = 0
        self.deadline_releases = 0
        self.skipped = 0
        self.deferrals = 0  # defer() calls that moved the floor
        self.given_up = 0  # numbers give_up() gave up
        # A deferral never keeps an item longer than this after its arrival
        # (None: no cap).  Deferrals overlap: under steady loss a repair is
        # always on its way for some gap, so one whose re-send was lost would
        # otherwise hold everything behind it until the buffer overflowed.
        self.hold_cap: float | None = None
        self.reset(start)

    def set_hold(self, hold: float | None, cap: float | None = None) -> None:
        """The session's hold (seconds a gap may hold later packets; None:
        none) and its cap for NACK deferrals (None: leave it), checked here."""
        if hold is not None and not hold >= 0:  # also rejects NaN
            raise ValueError(f"hold must be None or >= 0, got {hold!r}")
        if cap is not None and not cap >= 0:
            raise ValueError(f"hold cap must be >= 0, got {cap!r}")
        self.hold = hold
        if cap is not None:
            self.hold_cap = cap

    def reset(self, start: int = 0) -> None:
        """Forget all buffered items and given-up ranges; ``X = start``.

        Counters are statistics and are kept.
        """
        self.last = start
        self._buf: dict = {}
        self._arrivals: deque = deque()
        self._tlast = float("-inf")  # latest arrival time stored
        self._skips: deque = deque(maxlen=SKIP_MEMORY)  # (lo, hi), ascending
        self.hold_until = float("-inf")  # see defer()
        self.defer_cap = 0.0  # the running deferral's own cap, if above hold_cap (see defer())
        self._given: set = set()  # numbers give_up() gave up ahead of the line

    def __len__(self) -> int:
        return len(self._buf)

    def is_stale(self, seq: int) -> bool:
        """Would :meth:`push` drop ``seq`` without storing it?

        True for ``seq <= X`` and for a ``seq`` already buffered.  Meant to be
        asked before decrypting so later copies cost no decryption.  Changes
        nothing (no counters).  Since push never stores a stale copy, the
        caller may count it with ``push(seq, None, now)``.
        """
        return seq <= self.last or seq in self._buf

    # -- batches delivered outside push() (mpvpn.core.fastpath's open_run) --------

    def in_order_state(self) -> tuple[int, int, int] | None:
        """``(X, lo, hi)`` while nothing is buffered, else None.  Then a caller
        may deliver ``X + 1, X + 2, ...`` itself (reporting them with
        :meth:`took_in_order`) and classify a copy ``<= X`` as late when it
        lies in ``lo..hi``, the newest given-up range ((0, 0): none)."""
        if self._buf:
            return None
        skips = self._skips
        lo, hi = skips[-1] if skips else (0, 0)
        return self.last, lo, hi

    def held_state(self) -> tuple:
        """``(X, lo, hi, held)`` for a caller that opens copies itself while
        something is buffered (``open_new``): a copy ``<= X`` or in ``held``
        (the buffered numbers: a mapping to test membership in, read only)
        is stale, late when it lies in ``lo..hi`` (as in_order_state); any
        other it opens and hands to :meth:`check_copy` and :meth:`push`."""
        skips = self._skips
        lo, hi = skips[-1] if skips else (0, 0)
        return self.last, lo, hi, self._buf

    def took_in_order(self, last: int, n: int) -> None:
        """The caller delivered the ``n`` numbers up to ``last`` in order (see
        :meth:`in_order_state`): ``X = last``.  Raises ValueError unless they
        are exactly ``X + 1 .. X + n`` with nothing buffered."""
        if self._buf or n < 0 or last - n != self.last:
            raise ValueError(f"not an in-order run after {self.last}: {n} up to {last}")
        self.last = last
        self.delivered += n

    def count_stale(self, duplicates: int, late: int) -> None:
        """Count stale copies the caller dropped without :meth:`push`."""
        self.duplicates += duplicates
        self.late += late

    # -- a batch of datagrams opened and pushed in C (fastpath's receive_new) ------

    def push_state(self) -> tuple | None:
        """What a C loop that pushes new copies itself needs (``receive_new``:
        :meth:`check_copy` and :meth:`push` per datagram, on this buffer's
        own dict and deque), or None while numbers given up ahead of the
        line wait (``push``'s other path): ``(buf, arrivals, arrivals limit,
        X, lo, hi, tlast, capacity)``, ``lo..hi`` the newest given-up range
        ((1, 0): none).  Report what it did with :meth:`took_pushed`."""
        if self._given:
            return None
        skips = self._skips
        lo, hi = skips[-1] if skips else (1, 0)
        return self._buf, self._arrivals, self._arrivals_limit, self.last, lo, hi, self._tlast, self.capacity

    def took_pushed(self, last: int, tlast: float, duplicates: int, late: int) -> None:
        """A C loop pushed into the state :meth:`push_state` handed over: ``X``
        is ``last`` (what it released counted as delivered), the latest
        arrival stored ``tlast``; the stale copies it dropped are counted.
        Compacts the arrivals deque past its limit, as ``push`` does."""
        if last < self.last or tlast < self._tlast:
            raise ValueError(f"not a push after {self.last}: {last}")
        self.delivered += last - self.last
        self.last = last
        self._tlast = tlast
        self.duplicates += duplicates
        self.late += late
        if len(self._arrivals) > self._arrivals_limit:
            self._compact()

    # -- a batch of opened copies (mpvpn.core.fastpath's open_new) ---------------

    def push_opened(self, pairs: list, now: float) -> tuple:
        """:meth:`push_opened_py` through the C loops where built (the same
        released items, state and counters: tests compare them); the C loop
        hands back what needs this class's other paths (a flush, a copy in an
        older given-up range, compacting the arrivals), done here."""
        loops = _LOOPS
        if loops is None or self._given or now.__class__ is not float:
            return self.push_opened_py(pairs, now)
        out: list = []
        accepted: list = []
        dup = late = 0
        i, n = 0, len(pairs)
        while i < n:
            skips = self._skips
            lo, hi = skips[-1] if skips else (1, 0)
            j, got, last, tlast, d, lt, acc, handover = loops.reorder_push(
                pairs, i, self._buf, self._arrivals, self._arrivals_limit, self.last, lo, hi,
                self._tlast, self.capacity, now)
            self.delivered += last - self.last
            self.last = last
            self._tlast = tlast
            self.duplicates += d
            self.late += lt
            dup += d
            late += lt
            out += got
            accepted += acc
            if handover:  # the pair the C loop left: the Python path
                o, a, d, lt = self.push_opened_py(pairs[j:j + 1], now)
                out += o
                accepted += a
                dup += d
                late += lt
                j += 1
            elif len(self._arrivals) > self._arrivals_limit:
                self._compact()
            i = j
        return out, accepted, dup, late

    def push_opened_py(self, pairs: list, now: float) -> tuple:
        """:meth:`check_copy` and :meth:`push` for each ``(seq, item)`` pair
        (copies opened in arrival order).  Returns ``(released, accepted,
        duplicates, late)``: the items released, in order; the ``(seq, X
        after it)`` of each pair taken (for the NACK bookkeeping); the stale
        copies, counted here as :meth:`check_copy` counts them."""
        out: list = []
        accepted = []
        dup = late = 0
        push = self.push
        for seq, item in pairs:
            stale = self.check_copy(seq)
            if stale:
                if stale == 2:
                    late += 1
                else:
                    dup += 1
                continue
            out += push(seq, item, now)
            accepted.append((seq, self.last))
        return out, accepted, dup, late

    # -- the per-packet path -------------------------------------------------

    def check_copy(self, seq: int) -> int:
        """Before decrypting a copy of ``seq``: 0 if it is new (then
        :meth:`push` it), else count it as :meth:`push` would and say what
        it was: 1 a duplicate (delivered or buffered already), 2 late (in a
        range given up).  One call instead of ``is_stale`` + ``push``."""
        if seq <= self.last:
            if self._was_skipped(seq):
                self.late += 1
                return 2
            self.duplicates += 1
            return 1
        if seq in self._buf:
            self.duplicates += 1
            return 1
        return 0

    def push(self, seq: int, item, now: float) -> list:
        """Offer one copy of ``seq``; return the items released, in order."""
        last = self.last
        if seq == last + 1:  # in order: the common case
            buf = self._buf
            if not buf:
                self.last = seq
                self.delivered += 1
                return [item]
            out = [item]
            pop = buf.pop
            seq += 1
            nxt = pop(seq, _MISSING)
            while nxt is not _MISSING:
                out.append(nxt)
                seq += 1
                nxt = pop(seq, _MISSING)
            self.last = seq - 1
            self.delivered += len(out)
            if self._given:
                self._skip_given(out)
            if not buf:
                self._arrivals.clear()
            return out
        if seq <= last:
            if self._was_skipped(seq):
                self.late += 1
            else:
                self.duplicates += 1
            return []
        buf = self._buf
        if seq in buf:
            self.duplicates += 1
            return []
        if len(buf) >= self.capacity:
            return self._flush(seq, item)
        buf[seq] = item
        if now < self._tlast:  # keep arrival times monotone
            now = self._tlast
        self._tlast = now
        arrivals = self._arrivals
        arrivals.append((now, seq))
        if len(arrivals) > self._arrivals_limit:
            self._compact()
        return []

    # -- deadlines ---------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Earliest ``now`` at which :meth:`expire` would release something.

        ``None`` if nothing is buffered or ``hold`` is None.  O(1) amortised.
        """
        hold = self.hold
        if hold is None or not self._buf:
            return None
        arrivals = self._arrivals
        last = self.last
        while arrivals[0][1] <= last:  # a live entry exists: buffer non-empty
            arrivals.popleft()
        t0 = arrivals[0][0]
        t = t0 + hold
        if t >= self.hold_until:
            return t
        cap = self.deferral_cap
        if cap is not None and t0 + cap < self.hold_until:
            return t0 + cap if t0 + cap > t else t
        return self.hold_until

    @property
    def deferral_cap(self) -> float | None:
        """How long a deferral may keep an item: ``hold_cap``, or the running
        deferral's own cap if that is longer (None: no cap)."""
        cap = self.hold_cap
        return cap if cap is None or cap >= self.defer_cap else self.defer_cap

    def defer(self, until: float, cap: float | None = None) -> None:
        """No deadline release before ``until`` (a repair for a gap is on its
        way: the engine asked for it), except of items that waited
        ``hold_cap`` -- or ``cap``, if given and longer, until this deferral
        ends: the repair of a burst (a failed carrier's whole in-flight tail)
        comes one re-send after another, and the engine bounds how much
        longer that may take.  Items still wait at least ``hold``; in-order
        delivery and flushes are unaffected."""
        if cap is not None and not cap >= 0:
            raise ValueError(f"deferral cap must be >= 0, got {cap!r}")
        if until > self.hold_until:
            self.hold_until = until
            self.deferrals += 1
        if cap is not None and cap > self.defer_cap:
            self.defer_cap = cap

    def give_up(self, seqs) -> list:
        """Give up missing numbers at once (the engine will not ask for them:
        a congestion loss, TCP's signal): each is skipped when the line
        reaches it -- now if it is next -- unless a copy arrived by then.
        Returns the items this releases now."""
        last = self.last
        buf = self._buf
        given = self._given
        for s in seqs:
            if s > last and s not in buf:
                given.add(s)
        out: list = []
        self._skip_given(out)
        if len(given) > 4 * self.capacity:  # numbers the line passed otherwise
            self._given = {s for s in given if s > self.last}
        return out

    def _skip_given(self, out: list) -> None:
        """Skip given-up numbers next in line, releasing what waited behind them."""
        given = self._given
        buf = self._buf
        while self.last + 1 in given:
            s = self.last + 1
            given.discard(s)
            skips = self._skips
            if skips and skips[-1][1] == s - 1:
                skips[-1] = (skips[-1][0], s)
            else:
                skips.append((s, s))
            self.skipped += 1
            self.given_up += 1
            seq = s + 1
            nxt = buf.pop(seq, _MISSING)
            while nxt is not _MISSING:
                out.append(nxt)
                seq += 1
                nxt = buf.pop(seq, _MISSING)
            self.delivered += seq - 1 - s
            self.last = seq - 1
        if not buf:
            self._arrivals.clear()

    def expire(self, now: float) -> list:
        """Release items whose hold deadline has passed (a deadline release).

        Let ``s*`` be the highest buffered seq with ``arrival + hold <= now``.
        Every buffered item ``<= s*`` is released in order, the gaps below
        ``s*`` are given up, ``X = s*``, and then ``X + 1, X + 2, ...`` are
        released from the buffer while contiguous.  Returns ``[]`` if nothing
        has expired or ``hold`` is None.
        """
        hold = self.hold
        buf = self._buf
        if now >= self.hold_until:
            self.defer_cap = 0.0  # the deferral is over (a new one brings its own)
        if hold is None or not buf:
            return []
        if now < self.hold_until:  # a repair is on its way: wait, up to the cap
            cap = self.deferral_cap
            if cap is None:
                return []
            if cap > hold:
                hold = cap
        arrivals = self._arrivals
        last = self.last
        top = None
        while arrivals:
            t, s = arrivals[0]
            if s > last:
                if t + hold > now:
                    break
                if top is None or s > top:
                    top = s
            arrivals.popleft()
        if top is None:
            return []
        out = self._release_sorted(sorted(s for s in buf if s <= top))
        # Continue with whatever is now contiguous.
        seq = self.last + 1
        nxt = buf.pop(seq, _MISSING)
        while nxt is not _MISSING:
            out.append(nxt)
            seq += 1
            nxt = buf.pop(seq, _MISSING)
        self.delivered += seq - 1 - self.last
        self.last = seq - 1
        if self._given:
            self._skip_given(out)
        if not buf:
            arrivals.clear()
        self.deadline_releases += 1
        return out

    # -- internals -----------------------------------------------------------

    def _flush(self, seq: int, item) -> list:
        """Buffer full and ``seq`` new: release everything plus ``seq``."""
        buf = self._buf
        buf[seq] = item
        out = self._release_sorted(sorted(buf))
        buf.clear()
        self._arrivals.clear()
        self.flushes += 1
        self.flushed += len(out)
        return out

    def _release_sorted(self, seqs: list) -> list:
        """Release buffered ``seqs`` (ascending, all > X), giving up gaps.

        Removes them from the buffer, records the gaps, sets ``X`` to the last
        one and counts them as delivered.
        """
        buf = self._buf
        skips = self._skips
        expect = self.last + 1
        out = []
        for s in seqs:
            if s != expect:
                skips.append((expect, s - 1))
                self.skipped += s - expect
            out.append(buf.pop(s))
            expect = s + 1
        self.last = expect - 1
        self.delivered += len(out)
        return out

    def _was_skipped(self, seq: int) -> bool:
        """Is ``seq`` (<= X) in a remembered given-up range?"""
        skips = self._skips
        if not skips or seq > skips[-1][1] or seq < skips[0][0]:
            return False
        for lo, hi in reversed(skips):
            if seq > hi:
                return False
            if seq >= lo:
                return True
        return False

    def _compact(self) -> None:
        last = self.last
        self._arrivals = deque(e for e in self._arrivals if e[1] > last)
