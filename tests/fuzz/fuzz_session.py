"""Fuzz target: the SMPU receive path, ``Session.receive_datagram``.

A session pair (``mpvpn.tools.simnet.SimPair``, 2 subflows) is built once at
import and driven through its handshake.  Its receiver ``b`` is kept as a
snapshot; every input starts from a deep copy of it, so an input's outcome
never depends on the inputs before it (a crash file reproduces on its own).
A pool of *genuine* datagrams is recorded from the sender ``a``: every
datagram of the handshake (already seen by ``b``: replays), then user
packets, keepalive probes, a retransmission and a subflow CLOSE sent after
the snapshot (fresh for ``b``).

Input layout (first byte ``b0``):

* ``b0 & 0x40``: use the *plain* (unsealed) pair instead of the sealed one.
  Sealed is what the agent runs; plain lets malformed-but-"authentic"
  control payloads reach the subflow state machine.
* ``b0 & 0x80``: the rest of the input is one raw datagram, delivered on
  member ``b0 & 3`` (0 and 3 are not subflows of the session), from the
  attacker's address if ``b0 & 0x20``.
* otherwise the rest is a script of at most :data:`MAX_OPS` operations;
  each op byte is ``kind = op & 7``, ``msel = (op >> 3) & 3`` (0: the
  member the datagram's header names, else member ``msel``), ``op & 0x40``
  a flag, ``op & 0x80``: the datagram comes from the attacker's address
  (``source`` argument; else from the member's usual one), and takes its
  arguments from the following bytes:

  ====  =====================================================================
  0     deliver pool[idx] unchanged (repeat an idx: replay; any order: reorder)
  1     deliver pool[idx] with one bit flipped (u16 bit position)
  2     deliver pool[idx] truncated (u16 length)
  3     deliver pool[idx] + n following input bytes (n = 255: + 70000 bytes)
  4     deliver pool[idx] with one byte overwritten (header byte, or u16
        position with the flag)
  5     deliver n raw input bytes (with the flag: u16 n)
  6     advance the clock (u8 * 2 ms, with the flag u8 * 200 ms) and run
        ``handle_timer`` if due
  7     deliver pool[idx] with its member byte (header byte 2) replaced
  ====  =====================================================================

Asserts, for every datagram: ``receive_datagram`` never raises; exactly one
rejection counter moves (``counters()``: malformed [incl. wrong_member],
auth_failures, replays, wrong_session, unknown_member, duplicates, late)
unless the datagram is one the oracle accepts, and then none moves; a
rejected datagram makes ``b`` send nothing; a subflow's remote endpoint
(``source``) moves only on a genuine fresh control datagram of that subflow;
everything ``b`` delivers (from
``receive_datagram`` or ``handle_timer``) is a payload that was genuinely
sent (sealed) or that ``b`` accepted (plain), and is delivered at most once.

The oracle accepts (sealed): a datagram byte-equal to a genuine one (for
DATA, whose member byte is outside the AEAD, with any member byte), arriving
on the member its header names, that member being a subflow of ``b``, and
fresh: DATA sequence not yet accepted and above the reorder point; control
(member, sequence) not yet accepted.  (Plain: any datagram that decodes,
names ``b``'s session and the arrival member, and is fresh by the same rules,
control sequences checked against a reference 8192-wide replay window.)
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

try:
    import atheris
except ImportError:  # the plain (non-atheris) tests import this module too
    atheris = None

_INSTRUMENT = atheris is not None and __name__ == "__main__"

with atheris.instrument_imports(include=["mpvpn"]) if _INSTRUMENT else contextlib.nullcontext():
    from mpvpn.core import wire
    from mpvpn.tools.simnet import SimPair

NAME = "session"
MAX_OPS = 64
SESSION_ID = 0x5E55
WINDOW = 8192  # Session's control replay window
_DATA = wire.DATA
SPOOFED = ("198.51.100.66", 4242)  # an attacker's address

_REJECT_KEYS = ("malformed", "auth_failures", "replays", "wrong_session", "unknown_member",
                "duplicates", "late")


def _rejections(sess) -> int:
    c = sess.counters()
    return sum(c[k] for k in _REJECT_KEYS)


class _World:
    """One snapshot of an established receiver and the genuine datagrams of its peer."""

    def __init__(self, sealed: bool):
        self.sealed = sealed
        pair = SimPair(0, sealed=True, seed=1, session_id=SESSION_ID) if sealed else \
            SimPair(0, seed=1, session_id=SESSION_ID)
        recorded: list[tuple[int, bytes]] = []
        take = pair.a.datagrams_to_send

        def recording(now=None):
            items = take(now)
            recorded.extend(items)
            return items

        pair.a.datagrams_to_send = recording
        pair.add_subflow(1)
        pair.add_subflow(2)
        if not pair.handshake():
            raise RuntimeError("fuzz_session: the simulated handshake did not complete")
        pair.run(0.05)  # deliver whatever is still in flight
        self.now = pair.now
        b = pair.b
        # The AEAD objects hold no per-message state and cannot be deep-copied:
        # every copy shares them.
        self._memo = {}
        if b.sealer is not None:
            for obj in (b.sealer._send, b.sealer._recv):
                self._memo[id(obj)] = obj
        self.snapshot = copy.deepcopy(b, dict(self._memo))
        handshake_dgrams = list(recorded)
        recorded.clear()
        # Fresh traffic for the snapshot: user packets, probes, a retransmit, a CLOSE.
        a, now = pair.a, pair.now
        self.payloads: list[bytes] = []
        for i in range(12):
            p = b"genuine %02d " % i + bytes([i]) * (3 + 40 * (i % 3))
            self.payloads.append(p)
            assert a.send(p, now)
            a.datagrams_to_send(now)
            now += 0.003
            if i in (4, 9):
                t = a.get_timer()
                if t is not None:
                    now = max(now, t)
                    a.handle_timer(now)
                    a.datagrams_to_send(now)
        a.retransmit(3, [2], now)
        a.remove_subflow(2, now)
        a.datagrams_to_send(now)
        fresh = list(recorded)
        self.pool: list[tuple[int, bytes]] = fresh + handshake_dgrams
        # Oracle tables.  DATA keys have the member byte zeroed.
        self.genuine_data: dict[bytes, int] = {}
        self.genuine_ctrl: dict[bytes, tuple[int, int]] = {}
        for _m, d in self.pool:
            h = wire.decode(d)
            assert isinstance(h, wire.Header), h
            if h.opcode == _DATA:
                self.genuine_data[d[:2] + b"\x00" + d[3:]] = h.seq
            else:
                self.genuine_ctrl[d] = (h.member, h.seq)
        # Control datagrams the snapshot has already accepted (its replay windows
        # saw nothing but the handshake, all of it recorded above).
        self.seen_ctrl = {}
        for m, win in self.snapshot._ctrl_replay.items():
            self.seen_ctrl[m] = (win.last, frozenset(
                s for mm, s in self.genuine_ctrl.values() if mm == m and not win.check(s)))

    def fresh_receiver(self):
        return copy.deepcopy(self.snapshot, dict(self._memo))


_WORLDS: dict[bool, _World] = {}


def world(sealed: bool) -> _World:
    w = _WORLDS.get(sealed)
    if w is None:
        w = _WORLDS[sealed] = _World(sealed)
    return w


class _Run:
    """State of one input: the receiver copy and the oracle's bookkeeping."""

    def __init__(self, w: _World):
        self.w = w
        self.b = w.fresh_receiver()
        self.now = w.now
        self.accepted_data: set[int] = set()  # DATA sequence numbers accepted
        # payload -> how many more deliveries of it are allowed
        self.allowed = Counter(w.payloads) if w.sealed else Counter()
        # reference control replay windows: member -> [last, seen set]
        self.ctrl = {m: [last, set(seen)] for m, (last, seen) in w.seen_ctrl.items()}
        self.b.datagrams_to_send()

    # -- the oracle -----------------------------------------------------------------
    def _expect(self, data: bytes, member: int):
        """``(accept, info)`` for a datagram about to be received: whether it must
        be accepted, and ``(kind, seq, plain payload or None)`` for a genuine one."""
        b = self.b
        if self.w.sealed:
            if len(data) >= 3 and data[1] == _DATA:
                seq = self.w.genuine_data.get(data[:2] + b"\x00" + data[3:])
                if seq is None or data[2] != member or member not in b.subflows:
                    return False, None
                ok = seq not in self.accepted_data and seq > b.reorder.last
                return ok, ("data", seq, None)
            hit = self.w.genuine_ctrl.get(data)
            if hit is None or hit[0] != member or member not in b.subflows:
                return False, None
            return self._ctrl_fresh(member, hit[1]), ("ctrl", hit[1], None)
        h = wire.decode(data)
        if not isinstance(h, wire.Header) or h.session != SESSION_ID or h.member != member \
                or member not in b.subflows or h.flags & wire.F_SEALED:
            return False, None
        if h.opcode == _DATA:
            ok = h.seq not in self.accepted_data and h.seq > b.reorder.last
            return ok, ("data", h.seq, bytes(data[wire.HEADER_LEN:]))
        return self._ctrl_fresh(member, h.seq), ("ctrl", h.seq, None)

    def _ctrl_fresh(self, member: int, seq: int) -> bool:
        last, seen = self.ctrl.setdefault(member, [0, set()])
        if seq > last:
            return seq < 2**64
        return seq > 0 and last - seq < WINDOW and seq not in seen

    def _note_ctrl(self, member: int, seq: int) -> None:
        st = self.ctrl.setdefault(member, [0, set()])
        st[0] = max(st[0], seq)
        st[1].add(seq)

    def _check_delivered(self, out) -> None:
        for p in out:
            p = bytes(p)
            assert self.allowed[p] > 0, \
                f"delivered a packet that was never sent, or more often than sent: {p[:40]!r}"
            self.allowed[p] -= 1

    # -- driving ----------------------------------------------------------------------
    def deliver(self, data: bytes, member: int, spoofed: bool = False) -> None:
        b = self.b
        accept, info = self._expect(data, member)
        before = _rejections(b)
        remotes = {m: s.remote for m, s in b.subflows.items()}
        source = SPOOFED if spoofed else (f"192.0.2.{member}", 7000)
        out = b.receive_datagram(data, member, self.now, source)  # must never raise
        moved = _rejections(b) - before
        for m, s in b.subflows.items():
            if m in remotes and s.remote != remotes[m]:
                assert accept and info[0] == "ctrl" and m == member and s.remote == source, \
                    f"subflow {m}'s remote endpoint moved to {s.remote} on a datagram " \
                    f"that was not a genuine fresh control datagram of that subflow"
        if accept:
            assert moved == 0, f"genuine fresh datagram counted as rejected ({info})"
            kind, seq, payload = info
            if kind == "data":
                self.accepted_data.add(seq)
                if payload is not None:  # plain: the payload is what was accepted
                    self.allowed[payload] += 1
            else:
                self._note_ctrl(member, seq)
        else:
            assert moved == 1, (f"a rejected datagram moved {moved} rejection counters "
                                f"(member {member}, {len(data)} bytes, {data[:24].hex()})")
            assert not out, "a rejected datagram delivered something"
            assert not b.datagrams_to_send(self.now), "a rejected datagram made b send"
        self._check_delivered(out)
        b.datagrams_to_send(self.now)
        while b.next_event() is not None:
            pass

    def advance(self, dt: float) -> None:
        self.now += dt
        b = self.b
        t = b.get_timer()
        if t is not None and t <= self.now:
            out = b.handle_timer(self.now)
            self._check_delivered(out)
        b.datagrams_to_send(self.now)
        while b.next_event() is not None:
            pass


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.u8() << 8) | self.u8()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    b0 = data[0]
    w = world(sealed=not b0 & 0x40)
    run = _Run(w)
    if b0 & 0x80:
        run.deliver(data[1:], b0 & 3, bool(b0 & 0x20))
        return
    r = _Reader(data, 1)
    pool = w.pool
    for _ in range(MAX_OPS):
        if r.left() <= 0:
            break
        op = r.u8()
        kind, msel, flag, spoofed = op & 7, (op >> 3) & 3, op & 0x40, bool(op & 0x80)
        if kind == 6:
            step = r.u8()
            run.advance(step * (0.2 if flag else 0.002))
            continue
        if kind == 5:
            n = r.u16() if flag else r.u8()
            dgram = r.take(n)
            hm = dgram[2] if len(dgram) > 2 else 0
            run.deliver(dgram, msel or hm, spoofed)
            continue
        own, dgram = pool[r.u8() % len(pool)]
        if kind == 1:
            bit = r.u16() % (len(dgram) * 8)
            dgram = bytearray(dgram)
            dgram[bit >> 3] ^= 1 << (bit & 7)
            dgram = bytes(dgram)
        elif kind == 2:
            dgram = dgram[:r.u16() % len(dgram)]
        elif kind == 3:
            n = r.u8()
            dgram = dgram + (bytes(70000) if n == 255 else r.take(n))
        elif kind == 4:
            pos = r.u16() % len(dgram) if flag else r.u8() % wire.HEADER_LEN
            val = r.u8()
            dgram = dgram[:pos] + bytes([val]) + dgram[pos + 1:]
        elif kind == 7:
            dgram = dgram[:2] + bytes([r.u8()]) + dgram[3:]
        hm = dgram[2] if len(dgram) > 2 else own
        run.deliver(dgram, msel or hm, spoofed)
    run.advance(1.0)  # let hold deadlines release what is buffered


# --- seed corpus ------------------------------------------------------------------------

def seed_corpus() -> list[bytes]:
    """Scripts over the genuine pool: in order, reversed, replayed, altered; raw junk."""
    seeds = []
    for mode in (0x00, 0x40):  # sealed, plain
        n = len(world(not mode).pool)
        fresh = min(n, 24)
        seeds.append(bytes([mode]) + b"".join(bytes([0, i]) for i in range(fresh)))
        seeds.append(bytes([mode]) + b"".join(bytes([0, i]) for i in reversed(range(fresh))))
        seeds.append(bytes([mode]) + b"".join(bytes([0, i, 0, i]) for i in range(fresh)))
        seeds.append(bytes([mode]) + b"".join(bytes([0, i]) for i in range(n)))
        seeds.append(bytes([mode, 0, 0, 1, 0, 0, 0x10, 2, 1, 0, 30, 3, 2, 5, 0xAA, 0xBB, 0xCC,
                            0xDD, 0xEE, 4, 3, 1, 0x55, 7, 4, 9, 6, 50, 0x46, 20, 0, 5]))
        seeds.append(bytes([mode, 0x08, 0, 0x10, 1, 0x18, 2, 0x47, 200, 0, 6]))
        seeds.append(bytes([mode]) + b"".join(bytes([0, i, 6, 3]) for i in range(fresh)))
        seeds.append(bytes([mode, 3, 0, 255]))  # oversized
        ka = [i for i, (_m, d) in enumerate(world(not mode).pool) if d[1] == wire.Op.KEEPALIVE]
        seeds.append(bytes([mode, 0x80, ka[0], 0x80, ka[0], 0, ka[1], 0x80, 0, 0x81, ka[1], 3]))
    seeds.append(bytes([0x81]) + world(True).pool[0][1])
    seeds.append(bytes([0xC1]) + world(False).pool[0][1])
    seeds.append(bytes([0x80]) + b"\x01\x10\x01\x01" + bytes(16))
    return seeds


def main(argv=None) -> None:
    from target import fuzz_main  # tests/fuzz is sys.path[0] when run as a script

    fuzz_main(TestOneInput, argv, setup=(lambda: world(True), lambda: world(False)))


if __name__ == "__main__":
    main()
