"""The receive path: SMPU datagrams from the peer become packets written
into the tun vNIC, in processing order (as wireguard-go's
``device/receive.go``)::

    BatchSocket.recv()               one recvmsg: datagrams (split by UDP GRO) and their source
      -> STUN demultiplexer          from a configured STUN server and shaped like STUN (magic
                                     cookie where SMPU has its session id, which never takes
                                     that value): to the uplink's UplinkNat (docs/nat.md)
      (before the STUN demultiplexer: a relay may also be a STUN server)
      -> relay demultiplexer         from one of the uplink's TURN relays, and ChannelData, a
                                     Data indication or an answer to a TURN transaction (or
                                     junk): to its UplinkRelay, which gives back the relayed
                                     payloads (sealed SMPU datagrams) and the peer each came from
      -> length check                shorter than an SMPU header: counted drop (``malformed``)
      -> session_of()                session id in the header -> the session; none: counted
                                     drop (``unknown_session``), no state kept, no reply
      -> uplink check                the member must arrive on the uplink that carries it
                                     (``wrong_uplink``)
      -> Session.receive_many()      a GRO batch of one session and member at once (C loops),
         Session.receive_datagram()  otherwise one by one: open, replay window, reorder
      -> deliver(packets, session)   released packets, per session they came from, to the
                                     agent: the tun (tun.write_packets, in batches of up to
                                     DELIVER_BATCH: consecutive TCP segments make one
                                     super-segment) or, on a hub, another site's session
                                     (mpvpn.core.hubforward decides by destination)
      -> (agent) registry.touch, send.flush  the ACKs / NACKs the sessions answered with

Everything here trusts nothing in a datagram before :class:`mpvpn.core.smpu.Session`
has authenticated it: the header fields read here only pick the session,
and a wrong pick fails authentication there.
"""

from __future__ import annotations

import errno
import logging

from mpvpn.core import wire
from mpvpn.io.udp import sockaddr

log = logging.getLogger("mpvpn")

BATCH = 256  # receive calls per uplink per wake-up before looking at the others
DELIVER_BATCH = 128  # packets delivered to the tun in one go (coalesced into super-segments)

# Where the receive path looks in an SMPU header (wire.HEADER, "!BBBBIHBBQ":
# version, opcode, member, flags, session id, ...; docs/protocol.md).
MEMBER = wire.OFF_MEMBER  # byte offset of the member id
SESSION_ID = slice(wire.OFF_SESSION, wire.OFF_SESSION + 4)  # the 32-bit session id
SESSION_KEY = slice(MEMBER, SESSION_ID.stop)  # member, flags, session id: same key, same session
SESSION_KEY_LEN = SESSION_KEY.stop - SESSION_KEY.start  # 6
MIN_DATAGRAM = wire.HEADER_LEN  # anything shorter is not SMPU

# (ICMP errors of earlier sends surface on recv: skip them, keep reading)
_ICMP_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


def session_id_of(datagram) -> int:
    """The session id of a datagram at least MIN_DATAGRAM long."""
    return int.from_bytes(datagram[SESSION_ID], "big")


def _to_stun(nat, data, addr, now: float) -> bool:
    """Hand a STUN datagram to the uplink's STUN client; False: it is SMPU's."""
    if nat.takes(data, addr):
        nat.on_datagram(data, addr, now)
        return True
    return False


def _receive_one(data, source, up, sessions: dict, counters: dict, now: float):
    """One datagram that came through a relay: (its session or None, packets)."""
    if len(data) < MIN_DATAGRAM:
        counters["malformed"] += 1
        return None, []
    ds = sessions.get(session_id_of(data))
    if ds is None:
        counters["unknown_session"] += 1
        return None, []
    if ds.uplink_of.get(data[MEMBER]) is not up:
        counters["wrong_uplink"] += 1
        return None, []
    return ds, ds.sess.receive_datagram(data, data[MEMBER], now, source=source)


def read_uplink(up, sessions: dict, counters: dict, deliver, now: float, budget: int = BATCH) -> set:
    """Up to ``budget`` receives from uplink ``up`` (``up.batch``: a BatchSocket),
    each datagram to its session (``sessions``: id -> DataSession), released
    packets to ``deliver(list, session they came from)``: those of the first
    receive before the second, the rest in batches.  Returns the sessions
    that took datagrams."""
    touched = set()
    out = []  # written in batches: consecutive TCP segments go as one super-segment
    out_ds = None  # the session the packets in ``out`` came from
    recv = up.batch.recv
    nat = up.nat  # uplinknat.UplinkNat, or None without base.stun
    relay = up.relay  # uplinkrelay.UplinkRelay, or None without config relay
    # the session lookup of the previous datagram (same key: same result)
    last_key = cur = member = None
    for i in range(budget):
        if i == 1 and out:
            # the first receive's packets go to the tun at once: a lone packet
            # does not wait for the receive that finds the socket empty
            deliver(out, out_ds)
            out = []
        try:
            datagrams, addr = recv()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            if e.errno in _ICMP_ERRORS:
                continue
            log.debug("uplink %s recv: %s", up.name, e)
            break
        up.rx_datagrams += len(datagrams)
        if relay is not None and addr[:2] in relay.sources:
            # (first: a relay may also be a configured STUN server; its
            # Binding answers are left for the STUN client)
            mine = [d for d in datagrams if relay.wants(d)]
            for peer, payload in relay.unwrap(mine, addr, now):
                ds, pkts = _receive_one(payload, sockaddr(*peer), up, sessions, counters, now)
                if ds is not None:
                    touched.add(ds)
                    out += pkts
            if len(mine) == len(datagrams):
                continue
            datagrams = [d for d in datagrams if not any(d is m for m in mine)]
        if nat is not None and addr[:2] in nat.sources:  # (one set lookup per receive call)
            datagrams = [d for d in datagrams if not _to_stun(nat, d, addr, now)]
        if len(datagrams) > 1:
            key = datagrams[0][SESSION_KEY]
            if len(key) == SESSION_KEY_LEN and all(d[SESSION_KEY] == key for d in datagrams):
                if key != last_key:  # the usual: one session and subflow per batch
                    first = datagrams[0]
                    ds = sessions.get(session_id_of(first))
                    if ds is not None and ds.uplink_of.get(first[MEMBER]) is up:
                        cur, member, last_key = ds, first[MEMBER], key
                        touched.add(ds)
                if key == last_key and len(datagrams[0]) >= MIN_DATAGRAM:
                    if cur is not out_ds and out:
                        deliver(out, out_ds)
                        out = []
                    out_ds = cur
                    out += cur.sess.receive_many(datagrams, member, now, source=addr)
                    if len(out) >= DELIVER_BATCH:
                        deliver(out, out_ds)
                        out = []
                    continue
        for data in datagrams:
            if len(data) < MIN_DATAGRAM:
                counters["malformed"] += 1
                continue
            key = data[SESSION_KEY]
            if key != last_key:
                ds = sessions.get(session_id_of(data))
                if ds is None:
                    counters["unknown_session"] += 1  # no state, no reply
                    continue
                if ds.uplink_of.get(data[MEMBER]) is not up:
                    counters["wrong_uplink"] += 1
                    continue
                cur, member, last_key = ds, data[MEMBER], key
                touched.add(ds)
            if cur is not out_ds and out:
                deliver(out, out_ds)
                out = []
            out_ds = cur
            out += cur.sess.receive_datagram(data, member, now, source=addr)
        if len(out) >= DELIVER_BATCH:
            deliver(out, out_ds)
            out = []
    if out:
        deliver(out, out_ds)
    return touched
