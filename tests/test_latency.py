"""Latency of the agent's loop (issue 17 item 1), as behaviour: what one turn
of the loop does for a lone packet, and the per-stage trace
(mpvpn.agent.latency).  No timing assertions: a frozen clock decides which
timers are due, counts decide the rest."""

from __future__ import annotations

import ipaddress
import random

from test_agent_inproc import Pair, ipv4_udp

from mpvpn.agent import latency, send
from mpvpn.agent.agent import DataPathHandler

TO_B = ("192.168.10.2", "192.168.20.2")


def frozen(agent) -> list:
    """Stop ``agent``'s clock at its current reading; returns [now] (change it to move time)."""
    t = [agent.clock()]
    agent.clock = lambda: t[0]
    return t


def settle(agent, turns: int = 5) -> None:
    """Turns without I/O: every overdue timer runs (and re-arms later)."""
    for _ in range(turns):
        agent.step(0)


class Spy:
    """Counts calls of an object's method, delegating to it."""

    def __init__(self, obj, name: str):
        self.calls = 0
        real = getattr(obj, name)

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)
        setattr(obj, name, spy)


def sent(host) -> int:
    return sum(u.sent for u in host.net.udp.values() if u.addr[0] in host.addresses)


def test_a_lone_packet_leaves_on_every_subflow_in_the_turn_that_read_it(tmp_path):
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        frozen(p.a)
        settle(p.a)
        before = sent(p.ha)
        p.ha.tun.inject(ipv4_udp(*TO_B, b"voice frame"))
        p.a.step(0)
        assert sent(p.ha) - before == 3  # one copy per subflow (duplicate mode), no batch wait
        p.b.step(0)
        assert p.hb.tun.written[-1] == ipv4_udp(*TO_B, b"voice frame")


def test_a_turn_that_only_moved_packets_does_not_walk_every_timer(tmp_path):
    """The full round of timers (control connection, registry, reconnect,
    uplinks) runs when one is due, not after every packet."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        frozen(p.a)
        settle(p.a)
        p.ha.tun.inject(ipv4_udp(*TO_B, b"first"))
        p.a.step(0)  # (the turn after a full round asks every timer for the next deadline)
        conn = p.a.controls[0].conn
        asked, ran = Spy(conn, "get_timer"), Spy(conn, "handle_timer")
        for i in range(10):
            p.ha.tun.inject(ipv4_udp(*TO_B, b"frame %d" % i))
            p.a.step(0)
        assert asked.calls == 0 and ran.calls == 0
        # a turn with nothing to do (select timed out) is the full round again
        p.a.step(0)
        assert asked.calls >= 1


def test_a_timer_that_falls_due_during_steady_traffic_still_runs(tmp_path):
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        t = frozen(p.a)
        settle(p.a)
        ds = next(iter(p.a.sessions.values()))
        due = ds.sess.get_timer()
        assert due is not None and due > t[0]
        served = Spy(ds.sess, "handle_timer")
        t[0] = due  # time moves to the deadline while packets keep coming
        p.ha.tun.inject(ipv4_udp(*TO_B, b"frame"))
        p.a.step(0)
        assert served.calls == 1
        assert ds.sess.get_timer() > due  # served and re-armed


def test_a_deadline_the_data_path_sets_bounds_the_next_wait(tmp_path):
    """A turn that buffers a packet (a hold deadline) or arms a timer of its
    session makes the next select() wait no longer than that deadline."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        t = frozen(p.b)
        settle(p.b)
        p.ha.tun.inject(ipv4_udp(*TO_B, b"frame"))
        p.a.step(0)
        p.b.step(0)
        ds = next(iter(p.b.sessions.values()))
        waits = []
        real = p.b.sel.select
        p.b.sel.select = lambda timeout=None: (waits.append(timeout), real(timeout))[1]
        p.b.step(1.0)
        assert waits and waits[0] <= max(0.0, ds.sess.get_timer() - t[0]) + 1e-9


def test_data_path_handlers_are_marked_and_control_ones_are_not(tmp_path):
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        kinds = {}
        for key in p.a.sel.get_map().values():
            kinds[key.fileobj] = key.data.__class__ is DataPathHandler
        assert kinds[p.a.tun] is True
        assert all(kinds[u.sock] for u in p.a.uplinks.values() if u.sock is not None)
        assert kinds[p.a.controls[0].sock] is False


# -- the trace ---------------------------------------------------------------------------

def test_histogram_buckets_bound_every_sample_within_a_quarter_octave():
    rng = random.Random(7)
    H = latency.Histogram
    for _ in range(5000):
        x = rng.choice([rng.random() * 2, rng.uniform(1, 1e7)])
        b = H.bucket(x)
        assert x < H.upper(b)
        assert b == 0 or H.upper(b - 1) <= x  # the lower edge
        assert b == 0 or H.upper(b) <= x * 1.25 + 1e-9


def test_histogram_quantiles_bound_the_exact_ones_from_above():
    rng = random.Random(3)
    xs = [rng.expovariate(1 / 300.0) for _ in range(2000)]
    h = latency.Histogram()
    for x in xs:
        h.add(x)
    s = sorted(xs)
    for q in (0.5, 0.9, 0.99):
        exact = s[int(q * len(s)) - 1]
        got = h.quantile(q)
        assert exact <= got <= max(1.0, exact) * 1.25 + 1
    assert h.quantile(1.0) == h.max == max(xs) and h.n == len(xs)
    doc = h.doc()
    assert doc["n"] == len(xs) and doc["p50"] <= doc["p90"] <= doc["p99"] <= doc["max"]


def test_the_trace_is_off_unless_asked_for():
    assert latency.LatencyTrace.from_env(lambda: 0.0, {}) is None
    assert latency.LatencyTrace.from_env(lambda: 0.0, {latency.ENV: "0"}) is None
    assert latency.LatencyTrace.from_env(lambda: 0.0, {latency.ENV: "1"}) is not None


def test_the_agents_trace_counts_each_stage_of_the_packets_it_moved(tmp_path, monkeypatch):
    monkeypatch.setenv(latency.ENV, "1")
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        for agent in (p.a, p.b):
            agent.latency_report({"reset": True})
        n = 12
        for i in range(n):
            p.ha.tun.inject(ipv4_udp(*TO_B, b"frame %d" % i))
        p.until(lambda: len(p.hb.tun.written) >= n, "delivered")
        doc_a = rpc_latency(p.a)
        doc_b = rpc_latency(p.b)
        st_a, st_b = doc_a["stages"], doc_b["stages"]
        assert doc_a["enabled"] and st_a["tun.read"]["n"] == n and st_a["send.udp"]["n"] == n
        assert st_a["tun.batch"]["n"] >= 1 and st_a["loop.busy"]["n"] >= 1
        assert st_b["tun.write"]["n"] >= n  # (and keepalives' replies, if any were due)
        assert st_b["udp.read"]["n"] >= 3 * n  # every copy was read
        # reset: counted afresh
        assert p.a.latency_report({"reset": True})["stages"]["tun.read"]["n"] == n
        assert rpc_latency(p.a)["stages"]["tun.read"]["n"] == 0
        assert "tun.read" in latency.format_report(doc_a)


def rpc_latency(agent) -> dict:
    return agent.latency_report({})


def test_without_the_trace_the_rpc_says_so_and_ubus_does_not_offer_it(tmp_path):
    from mpvpn.io import rpc, ubus

    with Pair(tmp_path, extra_base="") as p:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the agent answers from its loop
            fut = pool.submit(rpc.call, rpc.socket_path(p.a.run_dir), "latency")
            p.until(fut.done, "the rpc answer")
        assert fut.result() == {"enabled": False}
        assert "off" in latency.format_report({"enabled": False})
        assert set(p.a.rpc_handlers()) <= set(ubus.METHODS)  # (ubus refuses a method it cannot describe)


def test_udp_receive_stamps_measure_the_wait_in_the_socket():
    """BatchSocket.stamp: the kernel's SO_TIMESTAMPNS of a datagram that sat
    in the socket is older than its receive (loopback, real sockets)."""
    import socket
    import time

    from mpvpn.io.udp import BatchSocket

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        b = BatchSocket(rx)
        waits = []
        b.stamp(lambda w, n: waits.append((w, n)))
        tx.sendto(b"x" * 100, rx.getsockname())
        time.sleep(0.01)  # the datagram waits in the socket
        got, _ = b.recv()
        assert got == [b"x" * 100]
        assert len(waits) == 1 and waits[0][1] == 1 and waits[0][0] > 0.0
    finally:
        rx.close()
        tx.close()


# -- the shortest path for an answer -------------------------------------------------------

def echo_on_write(tun, reply) -> None:
    """Make the in-memory vNIC answer each packet written into it with
    ``reply(packet)`` from inside the write, as the kernel does for a ping to
    a host behind the router: the ICMP echo reply is routed back into the tun
    before write() returns (the softirq runs on the writer's CPU)."""
    real = tun.write_packets

    def write_packets(packets):
        failed = real(packets)
        for p in packets:
            r = reply(p)
            if r is not None:
                tun.inject(r)
        return failed
    tun.write_packets = write_packets


def log_uplinks(host, log: list) -> None:
    """Record ("recv", n) and ("send", n) of ``host``'s uplink sockets in call order."""
    for ep in host.uplinks.values():
        recv, send_ = ep.recv, ep.send

        def r(recv=recv):
            try:
                out = recv()
            except BlockingIOError:
                log.append(("recv", 0))
                raise
            log.append(("recv", len(out[0])))
            return out

        def s(datagrams, addr, send_=send_):
            log.append(("send", len(datagrams)))
            return send_(datagrams, addr)
        ep.recv, ep.send = r, s


def test_a_lone_packet_is_sent_before_the_tun_is_read_again(tmp_path):
    """A ping when nothing else is queued: its three copies go out before
    the read that finds the tun empty (that read, an exception in Python,
    is not on the ping's way any more)."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        frozen(p.a)
        settle(p.a)
        log: list = []
        log_uplinks(p.ha, log)
        real = p.ha.tun.read_packets

        def read_packets():
            got = real()
            log.append(("read", 0 if got is None else len(got)))
            return got
        p.ha.tun.read_packets = read_packets
        p.ha.tun.inject(ipv4_ping(*TO_B, 1))
        p.a.step(0)
        assert log == [("read", 1), ("send", 1), ("send", 1), ("send", 1), ("read", 0)], log


def test_a_lone_datagram_is_written_into_the_tun_before_the_socket_is_read_again(tmp_path):
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        for agent in (p.a, p.b):
            frozen(agent)
            settle(agent)
        ping = ipv4_ping(*TO_B, 1)
        p.ha.tun.inject(ping)
        p.a.step(0)
        log: list = []
        log_uplinks(p.hb, log)
        real = p.hb.tun.write_packets

        def write_packets(packets):
            log.append(("write", len(packets)))
            return real(packets)
        p.hb.tun.write_packets = write_packets
        p.b.step(0)
        assert log[:3] == [("recv", 1), ("write", 1), ("recv", 0)], log


def test_an_answer_leaves_before_the_stale_copies_are_read(tmp_path):
    """B reads the first copy of a request, writes it into the tun, and the
    kernel's answer is in the tun before the write returns: the answer goes
    out in that turn, before B reads the other two copies of the request
    (which were queued in its other sockets all along)."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        for agent in (p.a, p.b):
            frozen(agent)
            settle(agent)
        request = ipv4_udp(*TO_B, b"ping")
        answer = ipv4_udp(*reversed(TO_B), b"pong")
        echo_on_write(p.hb.tun, lambda pkt: answer if pkt == request else None)
        p.ha.tun.inject(request)
        p.a.step(0)  # three copies queued at B, one per uplink
        assert sum(len(ep.queue) for ep in p.hb.uplinks.values()) == 3
        log: list = []
        log_uplinks(p.hb, log)
        p.b.step(0)
        assert p.hb.tun.written[-1] == request
        sends = [i for i, (what, _n) in enumerate(log) if what == "send"]
        recvs = [i for i, (what, n) in enumerate(log) if what == "recv" and n]
        assert len(recvs) == 3 and len(sends) >= 3, log
        assert sends[2] < recvs[1], log  # the answer on all three subflows before the second copy
        p.a.step(0)
        assert p.ha.tun.written[-1] == answer


# -- sparse packets ahead of the bulk, and the tun's standing queue -----------------------

def ipv4_tcp(src: str, dst: str, payload: bytes = b"", flags: int = 0x10, sport: int = 40000) -> bytes:
    """An IPv4 TCP segment (20-byte header, no options; checksums zero)."""
    tcp = (sport.to_bytes(2, "big") + (5201).to_bytes(2, "big") + bytes(8) + bytes([0x50, flags])
           + (65535).to_bytes(2, "big") + bytes(4))
    total = 20 + len(tcp) + len(payload)
    hdr = (bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(4) + bytes([64, 6]) + b"\0\0"
           + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    return hdr + tcp + payload


def ipv4_ping(src: str, dst: str, seq: int) -> bytes:
    icmp = bytes([8, 0, 0, 0, 0, 1]) + seq.to_bytes(2, "big") + bytes(56)
    hdr = (bytes([0x45, 0]) + (20 + len(icmp)).to_bytes(2, "big") + bytes(4) + bytes([64, 1]) + b"\0\0"
           + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed)
    return hdr + icmp


def reader(reads: list):
    """A tun.read_packets over ``reads`` (each a list of packets: one read)."""
    it = iter(reads)
    return lambda: next(it, None)


def test_overtakes_lets_sparse_packets_ahead_and_never_tcp_data():
    assert send.overtakes(ipv4_ping(*TO_B, 1))
    assert send.overtakes(ipv4_udp(*TO_B, b"voice"))
    assert send.overtakes(ipv4_tcp(*TO_B))  # a pure ACK
    assert not send.overtakes(ipv4_tcp(*TO_B, b"x"))  # data: its flow's order matters
    for flag in (0x01, 0x02, 0x04):  # FIN, SYN, RST
        assert not send.overtakes(ipv4_tcp(*TO_B, flags=0x10 | flag))
    frag = bytearray(ipv4_udp(*TO_B, b"tail"))
    frag[6] = 0x20  # more fragments
    assert not send.overtakes(bytes(frag))
    assert not send.overtakes(b"") and not send.overtakes(b"\x45" + bytes(10))


def test_read_tun_puts_sparse_packets_ahead_of_the_bulk_of_the_turn_and_keeps_each_flow_in_order():
    ds = object()
    bulk = [ipv4_tcp(*TO_B, bytes([i]) * 1400) for i in range(6)]
    ping = ipv4_ping(*TO_B, 1)
    ack = ipv4_tcp(*TO_B)
    voice_big, voice_small = ipv4_udp(*TO_B, b"V" * 1000, sport=7000), ipv4_udp(*TO_B, b"v", sport=7000)
    game = ipv4_udp(*TO_B, b"g", sport=7001)
    reads = [bulk[:3], [voice_big], bulk[3:5], [ping], [voice_small], [ack], [bulk[5]], [game]]
    touched, drained = send.read_tun(reader(reads), None, lambda p: ds, {"tun_no_route": 0})
    assert drained
    out = touched[ds]
    assert out[:3] == [ping, ack, game]  # sparse, in their read order
    # the rest in read order: the small voice frame stays behind its flow's big one
    assert out[3:] == bulk[:3] + [voice_big] + bulk[3:5] + [voice_small, bulk[5]]


def test_read_tun_says_whether_the_turn_emptied_the_tun():
    ds = object()
    def reads(n):
        return reader([[ipv4_tcp(*TO_B, b"x" * 1400)] for _ in range(n)])
    touched, drained = send.read_tun(reads(10), None, lambda p: ds, {}, budget=4)
    assert not drained and len(touched[ds]) == 4
    touched, drained = send.read_tun(reads(3), None, lambda p: ds, {}, budget=4)
    assert drained and len(touched[ds]) == 3


def test_a_ping_behind_a_bulk_backlog_leaves_first(tmp_path):
    """In one turn A reads 40 bulk segments and then a ping: the first read
    leaves at once (a lone packet does not wait for the next read), and the
    ping is sealed and sent ahead of the other 39, so B writes it second."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        for agent in (p.a, p.b):
            frozen(agent)
            settle(agent)
        bulk = [ipv4_tcp(*TO_B, i.to_bytes(2, "big") * 700) for i in range(40)]
        ping = ipv4_ping(*TO_B, 7)
        for pkt in bulk + [ping]:
            p.ha.tun.inject(pkt)
        n0 = len(p.hb.tun.written)
        p.a.step(0)
        for _ in range(4):
            p.b.step(0)
        got = p.hb.tun.written[n0:]
        assert got == [bulk[0], ping] + bulk[1:]


def test_a_tun_no_turn_empties_loses_a_bulk_packet_after_the_interval_and_never_a_small_one(tmp_path,
                                                                                           monkeypatch):
    """The standing queue in the vNIC's ring (mpvpn.core.aqm): while every
    turn stops at its batch budget, the agent drops bulk packets at CoDel's
    pace and counts them; the pings in the same queue all get through.
    (An experiment, MPVPN_TUN_AQM=1.)"""
    monkeypatch.setenv("MPVPN_TUN_AQM", "1")
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        t = frozen(p.a)
        settle(p.a)
        frozen(p.b)
        sent_bulk = sent_pings = 0
        for turn in range(40):  # each turn finds more than a batch waiting
            for i in range(send.BATCH + 10):
                p.ha.tun.inject(ipv4_tcp(*TO_B, b"b" * 1000))
                sent_bulk += 1
            p.ha.tun.inject(ipv4_ping(*TO_B, turn))
            sent_pings += 1
            p.a.step(0)
            t[0] += 0.001  # 1 ms per turn: 40 ms of standing queue
        left = []
        while (r := p.ha.tun.read_packets()) is not None:  # what the agent never read
            left += r
        for _ in range(400):
            p.b.step(0)
        drops = p.a.counters["tun_aqm_drops"]
        assert drops >= 3  # first after 10 ms, then faster (test_aqm.py has the law)
        written = p.hb.tun.written
        read_pings = sent_pings - sum(1 for w in left if w[9] == 1)
        read_bulk = sent_bulk - sum(1 for w in left if w[9] == 6)
        assert sum(1 for w in written if w[9] == 1) == read_pings > 0  # every ping A read arrived
        assert sum(1 for w in written if w[9] == 6) == read_bulk - drops


def test_with_a_tun_backlog_the_uplinks_are_read_before_the_bulk(tmp_path):
    """A is sealing bulk TCP (its tun had more than a batch waiting last
    turn); an answer from B is queued in A's uplinks.  The next turn reads
    every uplink (and writes the answer into the tun) before it seals the
    next batch of bulk, and the answer does not pull a bulk batch in
    ahead of the other uplinks either."""
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        for agent in (p.a, p.b):
            frozen(agent)
            settle(agent)
        for _ in range(send.BATCH + 50):
            p.ha.tun.inject(ipv4_tcp(*TO_B, b"b" * 1000))
        p.a.step(0)  # one batch: the tun still has a backlog
        answer = ipv4_udp(*reversed(TO_B), b"pong")
        p.hb.tun.inject(answer)
        p.b.step(0)  # three copies of the answer queued at A
        log: list = []
        log_uplinks(p.ha, log)
        p.a.step(0)
        assert answer in p.ha.tun.written
        whats = [what for what, n in log if n]
        assert whats.count("recv") == 3 and "send" in whats, log
        assert whats.index("send") > max(i for i, w in enumerate(whats) if w == "recv"), log


def age(host, seconds: float) -> None:
    """Make everything queued in ``host``'s uplink sockets look ``seconds``
    older (the receive stamps the kernel would have put on it)."""
    for ep in host.uplinks.values():
        ep.queue = type(ep.queue)((d, src, when - seconds) for d, src, when in ep.queue)


def test_without_the_experiments_nothing_is_dropped_and_the_uplinks_are_not_stamped(tmp_path):
    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        assert p.b.rx_aqm is None and p.a.tun_aqm is None
        assert all(ep._on_stamp is None for ep in p.hb.uplinks.values())


def test_a_standing_queue_in_the_sockets_loses_a_bulk_packet_and_never_a_ping(tmp_path, monkeypatch):
    """Bulk toward B outruns B: what B reads has waited 5 ms in its socket
    buffers, turn after turn.  After CoDel's interval B drops bulk packets
    (after opening them: no gap for the NACK machinery to repair), counted
    as rx_aqm_drops; every ping arrives.  Without the wait, nothing drops.
    (An experiment, MPVPN_RX_AQM=1.)"""
    monkeypatch.setenv("MPVPN_RX_AQM", "1")
    def run(p, wait: float, turns: int = 40) -> tuple[int, int, int]:
        t = frozen(p.b)
        frozen(p.a)
        settle(p.a)
        settle(p.b)
        n0 = len(p.hb.tun.written)
        bulk = 0
        for turn in range(turns):
            for _ in range(20):
                p.ha.tun.inject(ipv4_tcp(*TO_B, b"b" * 1000))
                bulk += 1
            p.ha.tun.inject(ipv4_ping(*TO_B, turn))
            p.a.step(0)
            age(p.hb, wait)
            p.b.step(0)
            t[0] += 0.001
        for _ in range(10):
            p.b.step(0)
        got = p.hb.tun.written[n0:]
        return bulk, sum(1 for w in got if w[9] == 6), sum(1 for w in got if w[9] == 1)

    with Pair(tmp_path, extra_base="") as p:
        p.connected()
        bulk, got_bulk, got_pings = run(p, 0.0)
        assert p.b.counters["rx_aqm_drops"] == 0 and got_bulk == bulk and got_pings == 40
        bulk, got_bulk, got_pings = run(p, 0.005)
        drops = p.b.counters["rx_aqm_drops"]
        assert drops >= 3 and got_bulk == bulk - drops and got_pings == 40
        assert p.b.status()["sessions"][0]["counters"]["nacks_sent"] == 0  # no gap to repair
