"""bench/kqueues.py reads what iproute2 prints (outputs captured from
ss 6.x / ip 6.x on this project's lab host) and bench/latency.py's --env
expands to one row per combination."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import kqueues  # noqa: E402
import latency  # noqa: E402

SS = """State  Recv-Q Send-Q Local Address:Port Peer Address:PortProcess
UNCONN 1664   0          10.1.0.2:7000      0.0.0.0:*
\t skmem:(r1664,rb8388608,t0,tb8388608,f2432,w0,o0,bl0,d7)
UNCONN 0      0          10.2.0.2:7000      0.0.0.0:*
\t skmem:(r0,rb212992,t512,tb212992,f0,w0,o0,bl0,d0)
"""

LINKS = """1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000
    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
    RX:  bytes packets errors dropped  missed   mcast
           256       2      0       0       0       0
    TX:  bytes packets errors dropped carrier collsns
           256       2      0       0       0       0
10: lan@if20: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000
    link/ether 02:00:00:00:00:0a brd ff:ff:ff:ff:ff:ff link-netns mpv1-ha
    RX:  bytes packets errors dropped  missed   mcast
     912345678   50120      0       0       0       0
    TX:  bytes packets errors dropped carrier collsns
       1234567    9000      0       0       0       0
12: mpvpn0: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1400 qdisc pfifo_fast state UNKNOWN mode DEFAULT group default qlen 500
    link/none
    RX:  bytes packets errors dropped  missed   mcast
       1234567    9000      0       0       0       0
    TX:  bytes packets errors dropped carrier collsns
     912000000   50100      0       3       0       0
"""

TCP = """State Recv-Q Send-Q Local Address:Port Peer Address:Port Process
ESTAB 0      0      192.168.10.2:50000 192.168.20.2:5201
\t cubic wscale:7,7 rto:204 rtt:0.1/0.05 mss:1348 cwnd:10 bytes_acked:100
ESTAB 0      1000   192.168.10.2:50002 192.168.20.2:5201
\t bbr wscale:7,7 rto:210 rtt:8.311/1.2 mss:1348 cwnd:1310 unacked:912 retrans:0/40 minrtt:0.29
"""


def test_socket_memory_and_drops_per_local_address():
    assert kqueues.parse_ss(SS) == {"10.1.0.2:7000": (1664, 8388608, 0, 8388608, 7),
                                    "10.2.0.2:7000": (0, 212992, 512, 212992, 0)}


def test_links_and_the_ring_estimate():
    links = kqueues.parse_links(LINKS)
    assert links["mpvpn0"] == {"qlen": 500, "rx_packets": 9000, "rx_dropped": 0,
                               "tx_packets": 50100, "tx_dropped": 3}
    assert links["lan"]["rx_packets"] == 50120
    # 50120 frames in from the LAN, 50100 read by the agent, 3 dropped at the ring
    assert kqueues.ring_depth(links, "mpvpn0") == 17
    assert kqueues.ring_depth(links, "absent0") is None


def test_the_busiest_tcp_connection_is_the_bulk_sender():
    t = kqueues.parse_tcp(TCP)
    assert t == {"rtt": 8.311, "minrtt": 0.29, "cwnd": 1310, "unacked": 912, "retrans": 40, "mss": 1348}


def test_qdisc_backlog_and_drops():
    q = kqueues.parse_qdisc("qdisc pfifo_fast 0: root refcnt 2 bands 3\n"
                            " Sent 100 bytes 2 pkt (dropped 5, overlimits 0 requeues 0)\n"
                            " backlog 3000b 2p requeues 0\n")
    assert q == {"kind": "pfifo_fast", "dropped": 5, "backlog_b": 3000, "backlog_p": 2}


def test_env_variants_one_row_per_combination():
    assert latency.env_variants([]) == [{}]
    assert latency.env_variants(["A=1,2", "B=x"]) == [{"A": "1", "B": "x"}, {"A": "2", "B": "x"}]


def test_counter_deltas_keep_what_grew():
    before = {"a": {"sent": 10, "late": 0, "skipped": 2}}
    after = {"a": {"sent": 25, "late": 0, "skipped": 2, "nack_declined": 3, "state": "up"}}
    assert latency.counter_deltas(before, after) == {"a": {"sent": 15, "nack_declined": 3}}
