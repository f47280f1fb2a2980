"""The SMPU session's receive side, in processing order (the send side is
:mod:`mpvpn.core.smpu_send`; :class:`mpvpn.core.smpu.Session` combines both).

The flow of a datagram (in the manner of wireguard-go's device/receive.go)::

    UDP --> Session.receive_many(datagrams, member, now)
      |       runs of sealed DATA that are stale copies or come exactly in
      |       order: the C loops (mpvpn.core.fastpath.open_run), same accounting
      v
    Session.receive_datagram(datagram, member, now)
      |   DATA of this session for this member (wire.parse_data)? -> _receive_data
      |   else wire.decode: malformed / wrong session / unknown member /
      |   not sealed: counted and dropped, never an exception
      v
    control: replay window, open (mpvpn.core.seal), follow the source address,
      |      then the subflow's state machine (mpvpn.core.subflow), probes feed
      |      the link meter and the hold; NACK -> the send side's _on_nack
      v
    _receive_data: a stale copy is dropped before any decryption (N copies
      |            cost one); open; ReorderBuffer.push; NackReceiver.on_data
      v
    user packets, in sequence order --> returned to the caller --> tun

NACKs out: :class:`mpvpn.core.nack.NackReceiver` notes gaps as DATA arrives and
decides, at its timer (``_nack_tick``), which numbers to ask for, on which
subflows, and how long the reorder buffer holds the line for the re-sends.

Sans-I/O: bytes and ``now`` in, user packets out; no sockets, no clock.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from mpvpn.core import wire
from mpvpn.core.fastpath import LOOPS as _LOOPS
from mpvpn.core.subflow import State, Subflow
from mpvpn.core.wire import DecodeError, Op

_HLEN = wire.HEADER_LEN
_DATA = wire.DATA
# the one parser of DATA datagrams (wire.py; C: the same constants)
_parse_data = wire.parse_data
_PROBES = (int(Op.KEEPALIVE), int(Op.KEEPALIVE_ACK))
_NACK = int(Op.NACK)
_TEST = int(Op.TEST)


class ReceivePath:
    """The receive side of :class:`mpvpn.core.smpu.Session` (its state lives there)."""

    # -- 1. datagrams in: in-order and stale runs through the C loops ----------------

    def receive_many(self, datagrams: list, member: int, now: float, source=None) -> list:
        """``receive_datagram`` for a batch that arrived on subflow ``member``.

        Runs of sealed DATA that are stale copies or come exactly in order go
        through the optional C loops (:mod:`mpvpn.core.fastpath`) with the same
        accounting (an in-order run opens no gap: its NACK bookkeeping is done
        once per run); anything else (control, reordering, a rekey being
        confirmed) datagram by datagram through the full path."""
        loops = _LOOPS
        sealer = self.sealer
        sub = self.subflows.get(member)
        if loops is None or sealer is None or sub is None or sealer.send_pending:
            out = []
            for d in datagrams:
                out += self.receive_datagram(d, member, now, source)
            return out
        self._now = now
        reorder = self.reorder
        cur, cur_dec, prev, prev_dec = sealer.data_decryptors()
        out = []
        i = 0
        n = len(datagrams)
        sid = self.session_id
        while i < n:
            state = reorder.in_order_state()
            if state is not None:  # nothing buffered: in-order runs may bypass push()
                last, lo, hi = state
                j, got, last, dup, late, nbytes, bad = loops.open_run(
                    datagrams, i, member, sid, last, lo, hi, cur,
                    cur_dec, -1 if prev is None else prev, prev_dec, InvalidTag)
                if j > i:
                    ok = j - i - bad
                    if ok:
                        sub.on_receive(nbytes, now, ok)
                    if dup or late:
                        reorder.count_stale(dup, late)
                        sub.on_stale(dup, late)
                    if bad:
                        self.auth_failures += bad
                    if got:
                        reorder.took_in_order(last, len(got))
                        sub.on_data(now, len(got))
                        out += got
                        if self.nack_enabled:
                            self.nack_rx.on_in_order(member, last - len(got) + 1, last, now)
                    i = j
                    if i >= n:
                        break
            # a gap is open, or opens here: new copies opened and reordered in C
            j = self._open_new(datagrams, i, member, now, sub, out,
                               cur, cur_dec, prev, prev_dec)
            if j > i:
                i = j
                continue
            out += self.receive_datagram(datagrams[i], member, now, source)
            i += 1
        return out

    def _open_new(self, datagrams, i, member, now, sub, out, cur, cur_dec, prev, prev_dec) -> int:
        """While the reorder buffer holds something: the C loop opens the new
        copies of ``datagrams[i:]`` (stale ones dropped before decryption, as
        ``_receive_data`` does), pushed here one by one with the NACK
        bookkeeping of the per-packet path.  Returns where it stopped."""
        reorder = self.reorder
        state = reorder.push_state() if now.__class__ is float else None
        if state is not None:
            return self._receive_new(datagrams, i, member, now, sub, out, cur, cur_dec, prev, prev_dec,
                                     state)
        last, lo, hi, held = reorder.held_state()
        j, opened, dup, late, nbytes, bad = _LOOPS.open_new(
            datagrams, i, member, self.session_id, last, lo, hi, held, cur, cur_dec,
            -1 if prev is None else prev, prev_dec, InvalidTag)
        if j == i:
            return i
        self._took(sub, j - i, bad, nbytes, now)
        if dup or late:
            reorder.count_stale(dup, late)
        # (seq, delivered up to) of each taken, for the NACK bookkeeping; the
        # stale ones (the same number twice in the batch) counted there
        got, arrivals, d2, late2 = reorder.push_opened(opened, now)
        out += got
        dup += d2
        late += late2
        accepted = len(arrivals)
        if self.nack_enabled:
            self.nack_rx.on_data_many(member, arrivals, now)
        if dup or late:
            sub.on_stale(dup, late)
        if accepted:
            sub.on_data(now, accepted)
        return j

    def _took(self, sub, n: int, bad: int, nbytes: int, now: float) -> None:
        """A C loop took ``n`` datagrams of ``sub`` (``nbytes``), ``bad`` of
        them not authentic (counted, changing nothing else)."""
        ok = n - bad
        if ok:
            sub.on_receive(nbytes, now, ok)
        if bad:
            self.auth_failures += bad

    def _receive_new(self, datagrams, i, member, now, sub, out, cur, cur_dec, prev, prev_dec,
                     state) -> int:
        """``_open_new`` with the reorder buffer's push and the NACK gap
        bookkeeping in the same C loop, datagram by datagram as
        ``_receive_data`` does them (``receive_new``, on the state
        ``ReorderBuffer.push_state`` and ``NackReceiver.gap_state`` hand
        over); the counters once per batch.  Returns where it stopped."""
        nack = self.nack_rx if self.nack_enabled else None
        missing, high, send_buffer, track = nack.gap_state() if nack is not None else (None, 0, 0, 0)
        (j, got, last, tlast, dup, late, nbytes, bad, accepted, high, top, noted,
         untracked) = _LOOPS.receive_new(
            datagrams, i, member, self.session_id, cur, cur_dec, -1 if prev is None else prev, prev_dec,
            InvalidTag, *state, now, missing, high, send_buffer, track)
        if j == i:
            return i
        self._took(sub, j - i, bad, nbytes, now)
        self.reorder.took_pushed(last, tlast, dup, late)
        out += got
        if accepted:
            if nack is not None:
                nack.gaps_noted(member, high, top, noted, untracked, now)
            sub.on_data(now, accepted)
        if dup or late:
            sub.on_stale(dup, late)
        return j

    # -- 2. one datagram: DATA fast path, else classify, authenticate, dispatch -------

    def receive_datagram(self, data: bytes, member: int, now: float, source=None) -> list:
        """Process one datagram that arrived on subflow ``member``.

        Returns the user packets now deliverable, in order.  Never raises for
        any ``data``: bad datagrams are dropped and counted.

        ``source`` (opaque, e.g. the UDP source address) updates the
        subflow's ``remote`` -- where its datagrams are sent -- but only
        from an authenticated control datagram, so a NAT rebinding is
        followed and a spoofed or replayed datagram can move nothing.
        """
        self._now = now
        # Fast path for well-formed DATA of this session (most traffic, and
        # in duplicate mode mostly copies that are dropped right here, before
        # any decryption).  Anything unusual takes the full path below, which
        # classifies and counts it.
        seq = _parse_data(data, member, self.session_id, self._data_flags)
        if seq is not None:
            sub = self.subflows.get(member)
            if sub is not None:
                return self._receive_data(data, seq, sub, now)
        hdr = wire.decode(data)
        sub = self.subflows.get(member)
        if hdr.__class__ is DecodeError:
            return self._drop_malformed(hdr.name.lower(), sub)
        if hdr.session != self.session_id:
            self.wrong_session += 1
            return []
        if sub is None:
            self.unknown_member += 1
            return []
        if hdr.member != member:
            self.wrong_member += 1
            sub.on_malformed()
            return []
        sealer = self.sealer
        if sealer is None:
            if hdr.flags & wire.F_SEALED:  # sealed datagrams need keys
                return self._drop_malformed("sealed", sub)
        elif not hdr.flags & wire.F_SEALED:
            self.auth_failures += 1
            return []
        if hdr.opcode == _DATA:
            return self._receive_data(data, hdr.seq, sub, now)
        window = self._ctrl_replay[member]
        if not window.check(hdr.seq):
            self.replays += 1
            return []
        if sealer is None:
            payload = memoryview(data)[_HLEN:]
        else:
            payload = sealer.open(data)
            if payload is None:
                self.auth_failures += 1
                return []
        window.update(hdr.seq)
        if source is not None:
            sub.on_source(source)
        op = hdr.opcode
        if op == _TEST:  # link test: out of the subflow's counters (see emit_test)
            if sub.state is State.ESTABLISHED:
                self.linktest.on_message(payload, member, now)
            return []
        sub.on_receive(len(data), now)
        if op == _NACK:
            self._on_nack(payload, now)
            return []
        samples = sub.rtt.samples
        sub.on_control(op, payload, now)
        if sub.rtt.samples != samples:
            sub.meter.note_rtt(sub.rtt.latest)  # the handshake's too: before any queue
        if op in _PROBES and sub.state is State.ESTABLISHED:
            _ts, echo, delay_us, _tx, _loss = wire.PROBE.unpack(payload)
            if sub.loss_out_ppm is not None:
                sub.meter.loss = sub.loss_out_ppm / 1_000_000
            if echo:
                sub.meter.on_echo(echo, delay_us / 1_000_000, now, sub.rtt.min_rtt)
        if op in (Op.KEEPALIVE, Op.KEEPALIVE_ACK, Op.CONNECT_ACK, Op.ACK):
            self._update_hold()
            self._update_ask_budget()  # the carriers' loss moved
        if sub.state is State.CLOSED and member in self._closing:
            self._reap(member)
        if self._queueing and self._sched.pending:
            self._pump(now)  # a re-measured backlog or a subflow that came up may free room
        return []

    def _drop_malformed(self, why: str, sub: Subflow | None) -> list:
        self.malformed[why] = self.malformed.get(why, 0) + 1
        if sub is not None:
            sub.on_malformed()
        return []

    # -- 3. DATA: drop stale copies before decrypting, open, reorder, note gaps -------

    def _receive_data(self, data: bytes, seq: int, sub: Subflow, now: float) -> list:
        """A header-valid DATA datagram for ``sub``: drop stale copies before
        any decryption (N copies cost one), authenticate, reorder."""
        reorder = self.reorder
        stale = reorder.check_copy(seq)  # counted there if stale
        if stale:
            sub.on_stale_copy(len(data), now, stale == 2)
            return []
        sealer = self.sealer
        if sealer is None:
            payload = data[_HLEN:]
        else:
            payload = sealer.open(data)
            if payload is None:
                # Not authentic: counted, changes nothing else (not even
                # the subflow's last_rx; the C loops agree)
                self.auth_failures += 1
                return []
        sub.on_data_received(len(data), now)
        out = reorder.push(seq, payload, now)
        if self.nack_enabled:
            self.nack_rx.on_data(sub.member, seq, now, reorder.last)
        return out

    # -- 4. ask for what is missing (decided by mpvpn.core.nack) ---------------------------

    def _nack_tick(self, now: float) -> list:
        """Send the NACK round the receiver side decides (mpvpn.core.nack);
        returns the user packets that giving up what it will not ask for
        released."""
        # duplicate mode: every subflow carries the NACK, as it carries the
        # data (a NACK lost on two of three carriers at 20 % loss each was
        # one repair round in 25 lost)
        up = list(self._up)
        r = self.nack_rx.tick(now, up, self.reorder, len(up) if self._dup_all else None)
        for payload in r.payloads:
            for sub in r.targets:
                self._emit(sub, Op.NACK, payload)
        if r.defer is not None:
            self.reorder.defer(r.defer, r.cap)
        return self.reorder.give_up(r.given_up) if r.given_up else []
