"""The SMPU session's send side, in processing order (the receive side is
:mod:`mpvpn.core.smpu_receive`; :class:`mpvpn.core.smpu.Session` combines both with
subflow management, timers and status, and is what callers use).

The flow of a user packet (in the manner of wireguard-go's device/send.go)::

    Session.send(packet, now)                 one packet from the tun
      | or Session.send_many(packets, now)    a batch: duplicate mode runs in
      |                                       the C loops (mpvpn.core.fastpath)
      v
    scheduler chooses subflows                mpvpn.core.schedbase.PacketScheduler:
      |                                       at once (__call__ / offer), or
      |                                       queued and released by _pump
      v
    _transmit: next sequence number; seal once (mpvpn.core.seal); one copy per
      |        chosen subflow (wire.with_member); keep it in the send buffer
      v
    _out / _bulk queues  -->  datagrams_to_send() / datagrams_by_member()  --> UDP

Re-sends: a NACK from the peer (``_on_nack``) names sequence numbers;
:class:`mpvpn.core.nack.NackSender` decides which to re-send (in the send buffer,
not just re-sent, within the budget) and the scheduler where; the stored
datagram goes out again unchanged (never sealed twice).

Control datagrams (subflow handshakes, probes, NACKs, link tests) leave
through ``_emit`` under a per-member counter that never repeats (the AEAD
nonce).  DATA datagrams are built by :mod:`mpvpn.core.wire` only.

Sans-I/O: bytes and ``now`` in, datagrams out; no sockets, no clock.
"""

from __future__ import annotations

from mpvpn.core import wire
from mpvpn.core.fastpath import LOOPS as _LOOPS
from mpvpn.core.subflow import State, Subflow
from mpvpn.core.wire import Op

_HLEN = wire.HEADER_LEN
_VERSION = wire.VERSION
_pack = wire.HEADER.pack
# the one builder of DATA datagrams (wire.py; C: the same constants)
_data_datagram = wire.data_datagram
_with_member = wire.with_member
_with_members = wire.with_members
_PROBES = (int(Op.KEEPALIVE), int(Op.KEEPALIVE_ACK))
_TEST = int(Op.TEST)


class SendPath:
    """The send side of :class:`mpvpn.core.smpu.Session` (its state lives there)."""

    # -- 1. a user packet in: number it, choose subflows (the scheduler) ----------

    def send(self, packet: bytes, now: float) -> bool:
        """Send one user packet on the subflows the scheduler picks.

        Returns False (and counts why) if it could not be sent at all.  With a
        queueing scheduler True means accepted: it leaves when released.
        """
        up = self._up
        self._now = now
        if not up:
            self.tx_no_subflow += 1
            return False
        n = len(packet)
        if n > self.config.max_payload or n == 0:
            self.tx_too_big += 1
            return False
        if len(self._out) >= self.config.max_queue:
            self.tx_queue_full += 1
            return False
        if self._queueing:
            targets = self._sched.offer(packet, up, now)
            if targets:
                self._transmit(packet, targets, now)
                return True
            self._pump(now)  # time went by: what is queued may leave now
            return targets is None
        if self._dup_all:  # the scheduler's promise: every established subflow
            self._transmit(packet, up, now)
            return True
        targets = self._sched(packet, up, now)
        if not targets:
            self.tx_no_subflow += 1
            return False
        self._transmit(packet, targets, now)
        return True

    def send_many(self, packets: list, now: float) -> int:
        """``send`` for a batch of user packets; returns how many were accepted.

        In duplicate mode with sealing, the per-packet work (seal once, one
        copy per subflow, send buffer) runs in the optional C loops
        (:mod:`mpvpn.core.fastpath`) and the per-subflow bookkeeping once per
        batch; the datagrams are the same as ``send`` makes.  Anything else
        takes ``send`` packet by packet."""
        loops = _LOOPS
        up = self._up
        if (loops is None or not (self._dup_all or self._queueing) or self.sealer is None or not up
                or len(self._out) + self._bulk_n + len(packets) * len(up) > self.config.max_queue):
            send = self.send
            return sum(1 for p in packets if send(p, now))
        maxp = self.config.max_payload
        for p in packets:
            if not 0 < len(p) <= maxp:
                send = self.send
                return sum(1 for p in packets if send(p, now))
        if not self._dup_all:
            return self._send_many_queueing(packets, now, loops)
        self._now = now
        seq0 = self._seq + 1
        n = len(packets)
        encrypt, epoch = self.sealer.reserve_data(seq0, n)  # nonce guard, counted for rekeying
        targets = up
        runs, nbytes = loops.seal_dup(encrypt, self.session_id, epoch, seq0,
                                      packets, bytes(s.member for s in up), self._sendbuf,
                                      self._sendmask, targets)
        self._seq = seq0 + n - 1
        self.sent += n
        bulk = self._bulk
        for sub, run in zip(up, runs):
            m = sub.member
            q = bulk.get(m)
            if q is None:
                bulk[m] = run
            else:
                q += run
            sub.on_data_sent(n, nbytes, now)
            sub.meter.on_send_many(n, nbytes, now)
        self._bulk_n += n * len(up)
        return n

    def _send_many_queueing(self, packets: list, now: float, loops) -> int:
        """``send_many`` with a queueing scheduler (aggregate, adaptive): the
        scheduler decides packet by packet as ``send`` has it do (each
        decision sees the backlog the previous ones added, a queued packet
        pumps the queue) but a batch at a time (``offer_many``), and the
        packets decided at once are sealed by the C loops; the datagrams,
        their order and the scheduler's state are ``send``'s."""
        self._now = now
        up = self._up
        offer_many = self._sched.offer_many
        blocked = self._sched.offer_blocked
        over = _HLEN + self._tag_len  # a sealed datagram's bytes beyond the packet
        n = len(packets)
        i = accepted = 0
        while i < n:
            j, decided, last = offer_many(packets, i, up, now, over)
            k = len(decided)
            if k:
                accepted += k
                self._seal_decided(packets[i:i + k] if i or k < n else packets, decided, now, loops)
            if j > i + k:  # packets[j - 1] was queued (None) or dropped (False)
                accepted += last is None
                self._pump(now)  # as send does: what is queued may leave now
                # while nothing may leave (no room), the rest queues behind
                # it: the scheduler offers it and accounts each pump's pull
                j2, queued, pump = blocked(packets, j, up, now)
                if j2 > j:
                    accepted += queued
                    j = j2
                    if pump:
                        self._pump(now)
            i = j
        return accepted

    def _seal_decided(self, packets: list, decided: list, now: float, loops) -> None:
        """Seal ``packets[k]`` for the subflows ``decided[k]`` with the next
        sequence numbers (one C call), queue the datagrams in order and count
        them; the scheduler recorded the sends on the meters."""
        seq = self._seq + 1
        total = len(packets)
        encrypt, epoch = self.sealer.reserve_data(seq, total)  # nonce guard, counted for rekeying
        items, per_subflow = loops.seal_each(encrypt, self.session_id, epoch, seq, packets, decided,
                                             self._sendbuf, self._sendmask)
        self._out += items
        for sub, count, nbytes in per_subflow:
            sub.on_data_sent(count, nbytes, now)
        self._seq = seq + total - 1
        self.sent += total

    # -- 2. a queueing scheduler releases what may leave now ---------------------

    def _pump(self, now: float) -> None:
        """Transmit what a queueing scheduler releases now."""
        up = self._up
        if not up:
            return
        sched = self._sched
        pull = sched.pull
        out = self._out
        limit = self.config.max_queue
        loops = _LOOPS
        if loops is not None and self.sealer is not None:
            self._pump_sealing(now, loops)
            return
        transmit = self._transmit
        while len(out) < limit:
            if sched.retransmit_pending():
                r = sched.pull_retransmit(up, now)
                if r is not None:  # stage 3: re-sends first
                    if self.retransmit(r[0], [s.member for s in r[1]], now):
                        self.nack_tx.resent()
                    continue
            item = pull(up, now)
            if item is None:
                break
            transmit(item[0], item[1], now)

    def _pump_sealing(self, now: float, loops) -> None:
        """``_pump`` with the C loops: what ``pull`` releases is recorded on
        the meters as it leaves (the next ``pull`` sees it, as after
        ``_transmit``) and sealed in one C call (``seal_each``) before a
        re-send is queued and at the end: the same datagrams in the same order."""
        up = self._up
        sched = self._sched
        pull = sched.pull
        out = self._out
        limit = self.config.max_queue
        over = _HLEN + self._tag_len
        packets: list = []
        decided: list = []
        pending = 0  # datagrams pulled, not yet in out
        while len(out) + pending < limit:
            if sched.retransmit_pending():
                r = sched.pull_retransmit(up, now)
                if r is not None:  # stage 3: re-sends first
                    if packets:  # what was pulled before it goes out before it
                        self._seal_decided(packets, decided, now, loops)
                        packets, decided, pending = [], [], 0
                    if self.retransmit(r[0], [s.member for s in r[1]], now):
                        self.nack_tx.resent()
                    continue
            item = pull(up, now)
            if item is None:
                break
            packet, targets = item
            dlen = len(packet) + over
            for sub in targets:
                sub.meter.on_send(dlen, now)
            packets.append(packet)
            decided.append(targets)
            pending += len(targets)
        if packets:
            self._seal_decided(packets, decided, now, loops)

    # -- 3. seal once, one copy per chosen subflow, keep for re-sends ---------------

    def _transmit(self, packet: bytes, targets, now: float) -> None:
        """Give ``packet`` the next sequence number and send it on ``targets``."""
        n = len(packet)
        self._seq = seq = self._seq + 1
        self.sent += 1
        out = self._out
        if self.sealer is not None:
            # Sealed once; the copies differ only in the header's member byte.
            sealed = self.sealer.seal_data(self.session_id, seq, packet)
            self._sendbuf[seq & self._sendmask] = (seq, sealed, targets)
            dlen = len(sealed)
            members = self._up_members if targets is self._up else [s.member for s in targets]
            for sub, d in zip(targets, _with_members(sealed, members)):
                out.append((sub.member, d))
                sub.on_data_sent(1, dlen, now)
                sub.meter.on_send(dlen, now)
            return
        self._sendbuf[seq & self._sendmask] = (seq, packet, targets)
        sid = self.session_id
        dlen = n + _HLEN
        for sub in targets:
            m = sub.member
            out.append((m, _data_datagram(m, sid, seq, packet)))
            sub.on_data_sent(1, dlen, now)
            sub.meter.on_send(dlen, now)

    # -- 4. re-sends for the peer's NACKs (decided by mpvpn.core.nack) -------------------

    def _on_nack(self, payload, now: float) -> None:
        """The peer is missing these sequence numbers: re-send them on other
        subflows, as the sender side decides (mpvpn.core.nack)."""
        up = self._up
        tx = self.nack_tx
        seqs = tx.on_nack(payload, now, self.sent, up)
        if seqs is None:
            return
        sched = self._sched
        queueing = self._queueing
        sendbuf, mask = self._sendbuf, self._sendmask
        for seq in seqs:
            entry = sendbuf[seq & mask]
            if not tx.decide(seq, entry, now):
                continue
            carried = entry[2]
            if len(carried) == 1:
                carried[0].meter.note_nack(now)  # evidence against that subflow
            if queueing:
                # paced like everything else, but ahead of it (see _pump)
                sched.queue_retransmit(seq, carried, len(entry[1]), now, up)
                sendbuf[seq & mask] = (seq, entry[1], carried, now)
                tx.spend()
                continue
            # duplicate mode: the re-send goes where the packet went, on every
            # subflow (it was lost on all of them; one copy on a 20 % lossy
            # carrier failed one repair in five, for p^N of the packets)
            subs = up if self._dup_all else sched.retransmit_targets(carried, up, now, len(entry[1]))
            if self._retransmit_entry(entry, [s.member for s in subs], now):
                tx.spend()
                tx.resent()
        if queueing:
            self._pump(now)

    def _fit_send_buffer(self, now: float) -> None:
        """Size the send buffer for the packets of the keep time at the send
        rate (mpvpn.core.sendbuf): a failed carrier's whole tail -- what went
        onto it until the scheduler stopped using it, at most the
        dead-detection window -- must still be here when the NACKs for it
        come, and they may come as late as the hold's cap after that."""
        sizer = self._sendsizer
        if not sizer.note(now, self._seq):  # (timers fire far more often than a step)
            return
        sub = self.config.subflow
        cap = self.reorder.hold_cap
        keep = (sub.dead_after + 1) * sub.keepalive_active + (cap if cap is not None else self.config.hold_max)
        old = self._sendbuf
        n = sizer.wanted(keep, len(old))
        if n == len(old):
            return
        omask, mask = self._sendmask, n - 1
        ring = [None] * n
        last = self._seq
        for seq in range(max(0, last - min(n, len(old)) + 1), last + 1):  # the newest ones move
            entry = old[seq & omask]
            if entry is not None and entry[0] == seq:
                ring[seq & mask] = entry
        self._sendbuf, self._sendmask = ring, mask

    def retransmit(self, seq: int, members, now: float) -> bool:
        """Send ``seq`` again from the send buffer on the given established subflows."""
        entry = self._sendbuf[seq & self._sendmask]
        if entry is None or entry[0] != seq:
            return False
        return self._retransmit_entry(entry, members, now)

    def _retransmit_entry(self, entry, members, now: float) -> bool:
        seq = entry[0]
        stored = entry[1]  # sealed datagram (resent as is: never sealed twice) or plaintext
        sent = False
        for m in members:
            sub = self.subflows.get(m)
            if sub is None or sub.state is not State.ESTABLISHED:
                continue
            if self.sealer is not None:
                dgram = _with_member(stored, m)
            else:
                dgram = _data_datagram(m, self.session_id, seq, stored)
            self._out.append((m, dgram))
            sub.on_data_sent(1, len(dgram), now)
            sub.meter.on_send(len(dgram), now)
            sent = True
        if sent:
            self.retransmits += 1
            self._sendbuf[seq & self._sendmask] = (seq, stored, entry[2], now)
        return sent

    # -- 5. control datagrams (subflow handshakes, probes, NACKs, link tests) -------

    @property
    def epoch(self) -> int:
        return self.sealer.send_epoch if self.sealer is not None else 0

    def _ctrl_datagram(self, m: int, opcode: int, payload: bytes) -> bytes:
        """A control datagram for member ``m`` under its next control counter."""
        self._ctrl_seq[m] = seq = self._ctrl_seq.get(m, 0) + 1
        if self.sealer is not None:
            return self.sealer.seal(opcode, m, self.session_id, seq, payload)
        return _pack(_VERSION, opcode, m, 0, self.session_id, len(payload), 0, 0, seq) + payload

    def _emit(self, sub: Subflow, opcode: int, payload: bytes) -> None:
        """Queue a control datagram for ``sub`` (called by subflows)."""
        dgram = self._ctrl_datagram(sub.member, opcode, payload)
        sub.on_sent(len(dgram))
        meter = sub.meter
        meter.on_send(len(dgram), self._now)
        if opcode in _PROBES:
            meter.on_probe_sent(int.from_bytes(payload[:8], "big"), self._now)
        self._out.append((sub.member, dgram))

    def emit_test(self, member: int, payload: bytes) -> None:
        """Queue a link-test datagram (mpvpn.core.linktest): sealed like control
        datagrams, but kept out of the subflow's counters and meter, so a test
        does not move loss estimates, dead detection or the scheduler's rates."""
        sub = self.subflows.get(member)
        if sub is None or sub.state is not State.ESTABLISHED:
            return
        if len(self._out) >= self.config.max_queue:
            self.test_queue_full += 1
            return
        self._out.append((member, self._ctrl_datagram(member, _TEST, payload)))

    # -- 6. out: what the I/O layer collects ------------------------------------------

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[int, bytes]]:
        """Everything queued since the last call: ``(member, datagram)`` pairs."""
        out = self._out
        items = list(out)
        out.clear()
        if self._bulk:
            for m, run in self._bulk.items():
                items += [(m, d) for d in run]
            self._bulk = {}
            self._bulk_n = 0
        return items

    def datagrams_by_member(self) -> dict[int, list]:
        """Everything queued since the last call, as ``member -> [datagram, ...]``
        (each member's in the order queued; what an I/O layer sends per socket)."""
        runs = self._bulk
        self._bulk = {}
        self._bulk_n = 0
        out = self._out
        if out:
            if _LOOPS is not None:
                _LOOPS.group_pairs(out, runs)  # the loop below, in C
            else:
                for m, d in out:
                    run = runs.get(m)
                    if run is None:
                        runs[m] = [d]
                    else:
                        run.append(d)
            out.clear()
        return runs
