"""Sliding anti-replay window (RFC 6479 style, as in wireguard-go's replay
package), for 64-bit sequence numbers.

Sans-I/O and not thread-safe.  The intended use on the receive path is::

    if not window.check(seq):      # cheap, before decryption
        drop
    decrypt / authenticate
    if not window.update(seq):     # only after authentication
        drop                       # replayed or fell out of the window

The window remembers the ``size`` sequence numbers ``last - size + 1 ..
last`` (``last`` = highest accepted).  A number is acceptable if it is in
``1 .. 2**64 - 1``, above ``last - size`` and not yet seen.  Bits are kept
in a ring of 64-bit words with one spare word, so moving the window forward
clears at most ``size / 64 + 1`` words however far it jumps.
"""

from __future__ import annotations

__all__ = ["ReplayWindow", "SEQ_LIMIT"]

SEQ_LIMIT = 1 << 64  # sequence numbers are u64; 0 is never valid


class ReplayWindow:
    """Anti-replay filter over the last ``size`` sequence numbers.

    :param size: window length in sequence numbers; a multiple of 64, >= 64.
    """

    __slots__ = ("size", "last", "_ring", "_words")

    def __init__(self, size: int = 8192):
        if not isinstance(size, int) or size < 64 or size % 64:
            raise ValueError(f"size must be a multiple of 64 and >= 64, got {size!r}")
        self.size = size
        self._words = size // 64 + 1  # one spare word: the window need not be word-aligned
        self.reset()

    def reset(self) -> None:
        """Forget everything seen; ``last = 0``."""
        self.last = 0
        self._ring = [0] * self._words

    def check(self, seq: int) -> bool:
        """Could ``seq`` be new?  (In range, inside the window, not seen.)

        Does not change state; a True answer must still be confirmed by
        :meth:`update` after authentication.
        """
        if seq > self.last:
            return seq < SEQ_LIMIT
        if seq <= 0 or self.last - seq >= self.size:
            return False
        return not (self._ring[(seq >> 6) % self._words] >> (seq & 63)) & 1

    def update(self, seq: int) -> bool:
        """Mark ``seq`` as seen.  False (and no change) if it is out of range,
        too old for the window, or already seen."""
        last = self.last
        ring = self._ring
        words = self._words
        index = seq >> 6
        if seq > last:
            if seq >= SEQ_LIMIT:
                return False
            current = last >> 6
            gap = index - current
            if gap >= words:
                ring[:] = [0] * words
            else:
                for i in range(current + 1, index + 1):
                    ring[i % words] = 0
            self.last = seq
        elif seq <= 0 or last - seq >= self.size:
            return False
        index %= words
        bit = 1 << (seq & 63)
        old = ring[index]
        if old & bit:
            return False
        ring[index] = old | bit
        return True
