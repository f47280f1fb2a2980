"""The send path: packets the kernel routed into the tun vNIC go out to the
peer as SMPU datagrams, in processing order (as wireguard-go's
``device/send.go``)::

    tun.read_packets()            one packet, or the segments of a TCP super-segment
      -> clamp_syn()              a TCP SYN gets an MSS that fits the vNIC (base.mss_clamp)
      -> RouteTable.lookup()      the session whose peer owns the destination; none: counted drop
      -> (batched per session, in order, up to BATCH packets per wake-up;
          sparse packets (a ping, a VoIP frame, an ACK) ahead of the bulk)
      -> StandingQueue            (agent) no read emptied the tun for a while: drop
                                  one bulk packet (mpvpn.core.aqm, CoDel's control law)
      -> Session.send_many()      sequence, seal (C loops where built), schedule onto subflows
      -> flush()                  Session.datagrams_by_member(): each member's datagrams
      -> BatchSocket.send()       to the member's remote address through its uplink (UDP GSO)
      -> note_sealed()            the volume sealed, for the control connection's rekey

:func:`flush` is also how everything else a session wants to send (ACKs,
probes, NACK answers, timers' output) leaves.  The agent owns the tun, the
uplinks and the sessions; this module only moves packets between them and
counts what it drops in the agent's ``counters``.
"""

from __future__ import annotations


from mpvpn.core import mss
from mpvpn.core.hubforward import network

BATCH = 256  # packets taken from one fd per wake-up before looking at the others

# IP and TCP header layout (RFC 791, RFC 8200, RFC 9293) for the two looks at
# a packet the send path takes: its destination and "could this be a SYN?"
IPV4_NO_OPTIONS = 0x45  # version 4, IHL 5: a 20-byte header
IPV4_HLEN = 20
IPV4_PROTOCOL = 9
IPV4_DST = slice(16, 20)
IPV6_HLEN = 40
IPV6_NEXT_HEADER = 6
IPV6_DST = slice(24, 40)
TCP_PROTOCOL = 6
UDP_PROTOCOL = 17
TCP_HLEN = 20
TCP_DATA_OFFSET = 12  # offset in the TCP header (high nibble: header length in words)
TCP_FLAGS = 13  # offset in the TCP header
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04
SPARSE_PROTOCOLS = frozenset({1, 17, 58})  # ICMP, UDP, ICMPv6
SPARSE_MAX = 300  # bytes: a packet this small may overtake the bulk of its turn (overtakes())
MSS_OPTION_LEN = 4
MIN_SYN4 = IPV4_HLEN + TCP_HLEN + MSS_OPTION_LEN  # 44: an IPv4 SYN that can carry an MSS option
MIN_SYN6 = IPV6_HLEN + TCP_HLEN + MSS_OPTION_LEN  # 64


# ---------------------------------------------------------------- 1. MSS clamp

def may_be_syn(p) -> bool:
    """Cheap pre-filter run on every single packet read (every ACK we
    forward): True for what :func:`mpvpn.core.mss.clamp` must look at (a TCP SYN
    without IP options, IPv4 or IPv6, and any IPv4 packet with options)."""
    if len(p) < MIN_SYN4:
        return False
    first = p[0]
    if first == IPV4_NO_OPTIONS:
        return p[IPV4_PROTOCOL] == TCP_PROTOCOL and bool(p[IPV4_HLEN + TCP_FLAGS] & TCP_SYN)
    if first >> 4 == 6:
        return (p[IPV6_NEXT_HEADER] == TCP_PROTOCOL and len(p) >= MIN_SYN6
                and bool(p[IPV6_HLEN + TCP_FLAGS] & TCP_SYN))
    return IPV4_NO_OPTIONS < first < 0x50  # IPv4 with options: mss.clamp finds the TCP header


def clamp_syn(pkts: list, limits: tuple[int, int] | None, counters: dict) -> list:
    """``pkts`` (one read) with a SYN's MSS lowered to ``limits`` (IPv4,
    IPv6), counted as ``mss_clamped``; unchanged when clamping is off or
    nothing needs it.  A super-segment (several packets) is never a SYN."""
    if limits is None or len(pkts) != 1:
        return pkts
    p = pkts[0]
    if not may_be_syn(p):
        return pkts
    c = mss.clamp(p, *limits)
    if c is None:
        return pkts
    counters["mss_clamped"] += 1
    return [c]


# ---------------------------------------------------------------- 2. routing

def destination(pkt) -> tuple[int, int] | None:
    """(IP version, destination address as an int) of an IP packet, or None."""
    if not pkt:
        return None
    v = pkt[0] >> 4
    if v == 4 and len(pkt) >= IPV4_HLEN:
        return 4, int.from_bytes(pkt[IPV4_DST], "big")
    if v == 6 and len(pkt) >= IPV6_HLEN:
        return 6, int.from_bytes(pkt[IPV6_DST], "big")
    return None


class RouteTable:
    """Destination -> session: each session's routes (the peer's LANs) and
    the peer's vNIC address, longest prefix first."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: list = []  # (version, net_int, mask_int, session), longest prefix first

    def rebuild(self, sessions) -> None:
        """From ``sessions`` (DataSession-like: ``routes``, ``peer.vnc.ip``)."""
        table = []
        for ds in sessions:
            nets = [network(c) for c in ds.routes]
            nets.append(network(f"{ds.peer.vnc.ip}/{32 if ':' not in ds.peer.vnc.ip else 128}"))
            for n in nets:
                table.append((n.prefixlen, n.version, int(n.network_address), int(n.netmask), ds))
        table.sort(key=lambda e: -e[0])
        self._entries = [e[1:] for e in table]

    def lookup(self, pkt):
        """The session whose peer owns the packet's destination; None for
        anything else the kernel sends into the tun (IPv6 router solicitations...)."""
        d = destination(pkt)
        if d is None:
            return None
        v, dst = d
        for ver, net, mask, ds in self._entries:
            if ver == v and dst & mask == net:
                return ds
        return None


# ---------------------------------------------------------------- 3. read and batch

def overtakes(p) -> bool:
    """May this packet (at most SPARSE_MAX bytes) go ahead of the bulk read
    in the same turn?  ICMP, UDP and pure TCP ACKs (no payload, no SYN, FIN
    or RST) of IPv4 without options or fragments, or IPv6 without extension
    headers: what a flow sends sparsely and waits for (a ping, a VoIP frame,
    a game update, DNS, the ACKs of the other direction).  Never a TCP
    segment with data, whose order within its flow TCP relies on."""
    n = len(p)
    first = p[0] if n else 0
    if first == IPV4_NO_OPTIONS and n >= IPV4_HLEN:
        if p[6] & 0x3F or p[7]:  # MF or an offset: a fragment
            return False
        proto = p[IPV4_PROTOCOL]
        off = IPV4_HLEN
    elif first >> 4 == 6 and n >= IPV6_HLEN:
        proto = p[IPV6_NEXT_HEADER]
        off = IPV6_HLEN
    else:
        return False
    if proto in SPARSE_PROTOCOLS:
        return True
    if proto != TCP_PROTOCOL or n < off + TCP_HLEN:
        return False
    return (n == off + (p[off + TCP_DATA_OFFSET] >> 4) * 4
            and not p[off + TCP_FLAGS] & (TCP_SYN | TCP_FIN | TCP_RST))


def _udp_key(p):
    """Addresses and ports of a UDP packet (IPv4 without options, IPv6
    without extension headers), or None for anything else."""
    first = p[0]
    if first == IPV4_NO_OPTIONS and p[IPV4_PROTOCOL] == UDP_PROTOCOL:
        return p[12:24]
    if first >> 4 == 6 and p[IPV6_NEXT_HEADER] == UDP_PROTOCOL:
        return p[8:44]
    return None


def read_tun(read, limits, route, counters: dict, budget: int = BATCH, first=None) -> tuple[dict, bool]:
    """Read up to ``budget`` packets with ``read`` (tun.read_packets: a list,
    or None when empty), clamp SYNs, route: ({session: its packets}, whether
    the tun was emptied).  ``first(session, packets)``, if given, takes the
    turn's first routed read at once, before the tun is read again: a lone
    packet (a ping when nothing else is queued) leaves without waiting for
    the read that finds the tun empty; its packets are not in the result.
    Each session's packets are in read order, except
    that packets that :func:`overtakes` allows go first (in their own read
    order): under bulk TCP a ping does not wait for the bulk read before it
    to be sealed and sent.  A flow's own order holds: TCP data never moves,
    and a small UDP packet stays behind the larger ones of its flow read
    before it.  OSError from the tun (EBADFD: the device was deleted) goes
    to the caller."""
    lone = first
    touched: dict = {}
    front = None  # session -> its sparse packets, when there are any
    bulk_udp = None  # UDP flows (_udp_key) with a large packet in this turn
    drained = False
    while budget > 0:
        pkts = read()
        if pkts is None:
            drained = True
            break
        if not pkts:
            continue
        pkts = clamp_syn(pkts, limits, counters)
        budget -= len(pkts)
        first = pkts[0]
        ds = route(first)  # segments share the destination
        if ds is None:
            counters["tun_no_route"] += len(pkts)
            continue
        if lone is not None:
            lone(ds, pkts)
            lone = None
            continue
        if len(first) <= SPARSE_MAX:
            if len(pkts) == 1 and overtakes(first) and (bulk_udp is None or _udp_key(first) not in bulk_udp):
                if front is None:
                    front = {}
                f = front.get(ds)
                if f is None:
                    front[ds] = [first]
                    touched.setdefault(ds, [])
                else:
                    f.append(first)
                continue
        elif first[IPV4_PROTOCOL if first[0] == IPV4_NO_OPTIONS else IPV6_NEXT_HEADER] == UDP_PROTOCOL:
            key = _udp_key(first)
            if key is not None:
                if bulk_udp is None:
                    bulk_udp = set()
                bulk_udp.add(key)
        batch = touched.get(ds)
        if batch is None:
            touched[ds] = pkts if isinstance(pkts, list) else list(pkts)
        else:
            batch += pkts
    if front:
        for ds, sparse in front.items():
            touched[ds] = sparse + touched[ds]
    return touched, drained


# ---------------------------------------------------------------- 4. seal, schedule, send

def send_batches(touched: dict, now: float, counters: dict, trace=None) -> None:
    """Each session's batch through its Session (one call per session: the
    C loops where built), out to the uplinks, and the sealed volume to the
    control connection (it decides when to rekey).  ``trace``: an
    :class:`mpvpn.agent.latency.LatencyTrace` to time the stages in, or None."""
    for ds, batch in touched.items():
        ds.sess.send_many(batch, now)
        if trace is None:
            flush(ds, counters, now)
        else:
            t1 = trace.clock()
            flush(ds, counters, now)
            trace.time("send.seal", t1 - now, len(batch))
            trace.time("send.udp", trace.clock() - t1, len(batch))
        sealer = ds.sess.sealer
        if sealer is not None and ds.conn is not None:
            ds.conn.note_sealed(sealer.send_epoch, sealer.sealed, now)


def flush(ds, counters: dict, now: float = 0.0) -> None:
    """Send what session ``ds`` has queued, each member's datagrams through
    the uplink carrying it to the subflow's remote address; datagrams the
    socket refused count as the uplink's ``tx_errors`` and ``send_errors``."""
    runs = ds.sess.datagrams_by_member()  # member -> its datagrams, in order
    if not runs:
        return
    subs = ds.sess.subflows
    uplink_of = ds.uplink_of
    punches = ds.punch  # member -> candidates.Punch (NAT traversal)
    upgrades = ds.upgrade  # relayed members whose datagrams also go direct this once
    for member, dgrams in runs.items():
        sub = subs.get(member)
        up = uplink_of.get(member)
        if sub is None or up is None or up.batch is None or sub.remote is None:
            continue
        punch = punches.get(member) if punches else None
        relay = up.relay  # uplinkrelay.UplinkRelay or None
        if punch is None and relay is None:
            failed = up.batch.send(dgrams, sub.remote)
        else:  # NAT hole punching: to every candidate until established (docs/nat.md)
            failed = 0
            dests = (sub.remote,) if punch is None else punch.destinations(sub.remote, sub.established)
            for dest in dests:
                if relay is not None and relay.carries(dest):  # through our TURN relay
                    failed += relay.send(up.batch, dgrams, dest, now)
                else:
                    failed += up.batch.send(dgrams, dest)
            if upgrades and member in upgrades and punch is not None:
                # relayed: this flush (a probe) also tries the direct candidates
                upgrades.discard(member)
                for dest in punch.targets:
                    if relay is None or not relay.carries(dest):
                        failed += up.batch.send(dgrams, dest)
        if failed:
            up.tx_errors += failed
            counters["send_errors"] += failed
