"""Tests of the network-namespace lab itself (tests/netlab).

All traffic stays between addresses of namespaces the lab creates.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap

import netlab
import pytest
from netlab import Lab, LabError, list_lab_namespaces, parse_ping
from stats import fraction_interval as binomial_bounds

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- no root


def test_parse_ping_output():
    out = textwrap.dedent("""\
        PING 10.1.0.2 (10.1.0.2) 56(84) bytes of data.

        --- 10.1.0.2 ping statistics ---
        300 packets transmitted, 207 received, 31% packet loss, time 1004ms
        rtt min/avg/max/mdev = 0.011/0.031/0.170/0.014 ms
        """)
    r = parse_ping(out)
    assert (r.sent, r.received) == (300, 207)
    assert r.loss == pytest.approx(0.31)
    assert (r.rtt_min, r.rtt_avg, r.rtt_max) == (0.011, 0.031, 0.170)
    r = parse_ping("3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms\n", 1)
    assert r.received == 0 and r.loss == 1.0 and r.rtt_avg is None


# ---------------------------------------------------------------- topology


def test_carriers_reachable(lab: Lab):
    assert lab.n == 3
    for i, c in lab.carriers.items():
        assert (c.a_ip, c.b_ip, c.ifname) == (f"10.{i}.0.1", f"10.{i}.0.2", f"c{i}")
        r = lab.ping("ra", c.b_ip, count=3, interval=0.01)
        assert r.received == 3, r.output
        assert lab.ping("rb", c.a_ip, count=1).received == 1
    assert lab.ping("ha", lab.ra_lan_ip, count=1).received == 1
    assert lab.ping("hb", lab.rb_lan_ip, count=1).received == 1


def test_lans_isolated(lab: Lab):
    # No route between the LANs until the VPN adds one.
    assert lab.run("ra", ["ip", "route", "get", lab.hb_ip], check=False).returncode != 0
    assert lab.run("rb", ["ip", "route", "get", lab.ha_ip], check=False).returncode != 0
    for src, dst in (("ha", lab.hb_ip), ("hb", lab.ha_ip), ("ra", lab.hb_ip),
                     ("rb", lab.ha_ip), ("ha", lab.rb_lan_ip)):
        r = lab.ping(src, dst, count=1, timeout=0.3)
        assert r.received == 0, f"{src} -> {dst} should be unreachable:\n{r.output}"
    # ip_forward is on in the routers, off in the hosts.
    assert lab.run("ra", "cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert lab.run("ha", "cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"
    default = lab.run("ha", "ip route show default").stdout
    assert f"via {lab.ra_lan_ip}" in default


def test_ipv6_carriers(make_lab):
    lab = make_lab(carriers=2, ipv6=True)
    for c in lab.carriers.values():
        assert c.a_ip6 == f"fd00:{c.index}::1"
        assert lab.ping("ra", c.b_ip6, count=2, interval=0.01).received == 2


def test_parallel_labs_do_not_collide(make_lab):
    a, b = make_lab(carriers=1), make_lab(carriers=1)
    assert a.prefix != b.prefix and not set(a.namespaces) & set(b.namespaces)
    assert a.ping("ra", "10.1.0.2", count=1).received == 1
    assert b.ping("ra", "10.1.0.2", count=1).received == 1


# ---------------------------------------------------------------- impairments


def test_loss(lab: Lab):
    n = 300
    lab.ping("ra", "10.1.0.2", count=1)  # ARP warm-up
    lab.set_loss(1, 30, direction="a2b")
    r = lab.ping("ra", "10.1.0.2", count=n, interval=0.002, timeout=1)
    lo, hi = binomial_bounds(n, 0.30)
    assert r.sent == n and lo <= r.loss <= hi, (r.loss, (lo, hi))
    # both directions: a round trip survives with 0.7 * 0.7
    lab.set_loss(1, 30)
    r = lab.ping("ra", "10.1.0.2", count=n, interval=0.002, timeout=1)
    lo, hi = binomial_bounds(n, 1 - 0.7 * 0.7)
    assert lo <= r.loss <= hi, (r.loss, (lo, hi))
    assert "numgen random mod 10000 < 3000" in lab.nft_ruleset("ra")
    # other carriers untouched, and 0 removes the loss again
    assert lab.ping("ra", "10.2.0.2", count=50, interval=0.002).received == 50
    lab.set_loss(1, 0)
    assert lab.ping("ra", "10.1.0.2", count=50, interval=0.002).received == 50


UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))              # the address stays bindable while down
try:
    s.sendto(b'x', (sys.argv[2], 9))
    print('sent')
except OSError as e:
    print('errno', e.errno)
"""


def test_link_down_blackhole(lab: Lab):
    assert lab.ping("ra", "10.1.0.2", count=1).received == 1
    lab.link_down(1)
    assert lab.is_down(1)
    assert lab.ping("ra", "10.1.0.2", count=3, interval=0.05, timeout=0.3).received == 0
    assert lab.ping("rb", "10.1.0.1", count=2, interval=0.05, timeout=0.3).received == 0
    assert lab.ping("ra", "10.2.0.2", count=1).received == 1
    # silent outage: interface up, address present, sendto() succeeds
    assert "10.1.0.1/24" in lab.run("ra", "ip -o addr show dev c1").stdout
    assert "state UP" in lab.run("ra", "ip link show dev c1").stdout
    assert lab.python("ra", UDP_PROBE, "10.1.0.1", "10.1.0.2").stdout.strip() == "sent"
    lab.link_up(1)
    assert not lab.is_down(1)
    assert lab.ping("ra", "10.1.0.2", count=3, interval=0.05).received == 3


def test_link_down_carrier_mode(lab: Lab):
    lab.link_down(2, mode="carrier")
    assert lab.ping("ra", "10.2.0.2", count=2, interval=0.05, timeout=0.3).received == 0
    assert "10.2.0.1/24" in lab.run("ra", "ip -o addr show dev c2").stdout
    out = lab.python("ra", UDP_PROBE, "10.2.0.1", "10.2.0.2").stdout.strip()
    assert out == f"errno {errno.ENETUNREACH}"
    lab.link_up(2)
    assert lab.ping("ra", "10.2.0.2", count=3, interval=0.05).received == 3


def test_rate_limit(lab: Lab):
    lab.set_rate(1, 20)
    assert re.search(r"qdisc tbf .* rate 20Mbit ", lab.run("ra", "tc qdisc show dev c1").stdout)
    mbit = lab.tcp_throughput("ra", "rb", "10.1.0.2", seconds=1.5)
    assert 0 < mbit <= 20 * 1.3, mbit  # (a busy machine may send less, never more)
    # direction-selectable: limit only b2a, a2b is then unshaped
    lab.set_rate(1, None)
    lab.set_rate(1, 10, direction="b2a")
    assert "tbf" not in lab.run("ra", "tc qdisc show dev c1").stdout
    assert "tbf" in lab.run("rb", "tc qdisc show dev c1").stdout
    assert re.search(r"qdisc tbf .* rate 10Mbit ", lab.run("rb", "tc qdisc show dev c1").stdout)
    mbit = lab.tcp_throughput("rb", "ra", "10.1.0.1", seconds=1.0, port=5202)
    assert 0 < mbit <= 10 * 1.3, mbit


# ---------------------------------------------------------------- delay shim


def test_delay_rtt(make_lab):
    lab = make_lab(carriers=2, delays={1: (10, 2)})
    assert lab.carrier(1).shimmed and not lab.carrier(2).shimmed
    lab.ping("ra", "10.1.0.2", count=1)  # ARP (also delayed) warm-up
    r = lab.ping("ra", "10.1.0.2", count=40, interval=0.01)
    assert r.received == 40, r.output
    # upper bounds: plus what the shim itself reports it sent late (a busy machine)
    late = sum(lab.shim_stats(1)[d]["late_max_ms"] for d in ("a2b", "b2a"))
    assert 16 - 0.2 <= r.rtt_min and r.rtt_max <= 24 + 4 + late, (r, late)
    assert 20 - 2.5 <= r.rtt_avg <= 20 + 2.5 + late, (r, late)
    assert lab.ping("ra", "10.2.0.2", count=5, interval=0.01).rtt_avg < 16 - 0.2  # not delayed
    # run-time change, and per direction
    lab.set_delay(1, 25, direction="a2b")
    lab.set_delay(1, 5, direction="b2a")
    r = lab.ping("ra", "10.1.0.2", count=10, interval=0.01)
    stats = lab.shim_stats(1)
    late = stats["a2b"]["late_max_ms"] + stats["b2a"]["late_max_ms"]
    assert r.received == 10 and 29.8 <= r.rtt_min and r.rtt_avg <= 32.5 + late, (r, late)
    assert stats["a2b"]["delay_ms"] == 25 and stats["b2a"]["forwarded"] > 0
    with pytest.raises(LabError):
        lab.set_delay(2, 10)      # direct carrier: no shim


REORDER_RX = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9100)); s.settimeout(1.0)
print('ready', flush=True)
seqs = []
try:
    while len(seqs) < int(sys.argv[2]):
        seqs.append(int.from_bytes(s.recv(64)[:4], 'big'))
except socket.timeout:
    pass
print(json.dumps(seqs))
"""

REORDER_TX = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(i.to_bytes(4, 'big') + b'x' * 60, (sys.argv[1], 9100))
    time.sleep(0.0002)
"""


def _send_numbered(lab: Lab, n: int) -> list[int]:
    rx = lab.python_popen("rb", REORDER_RX, "10.1.0.2", str(n),
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    lab.python("ra", REORDER_TX, "10.1.0.2", str(n))
    out, _ = rx.communicate(timeout=10)
    return json.loads(out)


def test_delay_reorder(make_lab):
    lab = make_lab(carriers=1, delays={1: {"ms": 10, "jitter_ms": 5, "reorder": True}})
    lab.ping("ra", "10.1.0.2", count=1)
    n = 400
    seqs = _send_numbered(lab, n)
    assert sorted(seqs) == list(range(n))       # nothing lost, only reordered
    inversions = sum(1 for a, b in zip(seqs, seqs[1:]) if b < a)
    assert inversions > n // 20, inversions
    # FIFO mode with the same jitter keeps the order
    lab.set_delay(1, 10, 5, reorder=False)
    seqs = _send_numbered(lab, n)
    assert seqs == list(range(n))


# ---------------------------------------------------------------- teardown


def test_teardown_leaves_nothing(netlab_ready):
    lab = Lab(carriers=2, delays={2: 5})
    prefix = lab.prefix
    sleeper = lab.popen("ha", ["sleep", "60"])
    shim = lab._shims[2]
    names = set(lab.namespaces)
    assert names <= set(netlab.list_lab_namespaces())
    lab.close()
    lab.close()                                   # idempotent
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed
    assert prefix not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert sleeper.poll() is not None and shim.poll() is not None
    assert not (netlab.MARKER_DIR / f"{prefix}.json").exists()
    assert lab.leftovers() == []


def test_teardown_on_exception(netlab_ready):
    with pytest.raises(ZeroDivisionError):
        with Lab(carriers=1) as lab:
            prefix = lab.prefix
            1 / 0
    assert not [n for n in netlab.list_lab_namespaces() if n.startswith(prefix + "-")]


def test_cleanup_stale_removes_dead_owner(lab: Lab):
    # A child process builds a lab (with a background process inside) and
    # dies without tearing down.
    code = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {HERE!r})
        import netlab
        lab = netlab.Lab(carriers=1, delays={{1: 1}})
        lab.popen('ra', ['sleep', '60'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(lab.prefix, flush=True)
        os._exit(0)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=30)
    dead = out.stdout.strip()
    assert dead.startswith("mpv"), out.stderr
    try:
        assert any(n.startswith(dead + "-") for n in netlab.list_lab_namespaces())
        removed = netlab.cleanup_stale()
        assert {f"{dead}-{r}" for r in ("ra", "rb", "ha", "hb", "wan")} <= set(removed)
        assert not any(n.startswith(dead + "-") for n in netlab.list_lab_namespaces())
        # our own (live) lab is untouched
        assert lab.ping("ra", "10.1.0.2", count=1).received == 1
    finally:
        for r in ("ra", "rb", "ha", "hb", "wan"):
            netlab._delete_ns(f"{dead}-{r}")


def test_an_added_site_reaches_the_hub_over_its_own_carriers_and_is_torn_down(make_lab):
    lab = make_lab(carriers=2)
    c = lab.add_site("c")
    assert c.carrier_ips == {1: "10.21.0.1", 2: "10.22.0.1"}
    for i in (1, 2):  # rb's carrier addresses, over the new site's own links
        assert lab.reachable(c.router, f"10.{i}.0.2")
    assert lab.reachable(c.host, c.router_lan_ip)
    assert not lab.reachable(c.host, "192.168.20.2")  # no route between the LANs without the VPN
    assert not lab.reachable(c.router, "10.1.0.1")  # and site A is not on its path
    with pytest.raises(ValueError):
        lab.add_site("c")
    names = [c.router, c.host]
    lab.close()
    assert not any(ns in list_lab_namespaces() for ns in names)
