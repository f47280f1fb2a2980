"""The tun edge: the real device (in a throwaway namespace) and the in-memory stand-in."""

import select

import pytest

from mpvpn.io.tun import LinuxTun, MemoryTun, TunError, valid_ifname


def test_interface_names_are_checked():
    assert valid_ifname("mpvpn0") and valid_ifname("a-b_c.1")
    for bad in ("", "x" * 16, "a b", "a/b", "..", "ä"):
        assert not valid_ifname(bad)
    with pytest.raises(TunError):
        LinuxTun("bad name")


def test_memory_tun_is_selectable_and_fifo():
    t = MemoryTun()
    assert t.read() is None
    t.inject(b"one")
    t.inject(b"two")
    r, _, _ = select.select([t], [], [], 0)
    assert r == [t]
    assert t.read() == b"one" and t.read() == b"two" and t.read() is None
    assert t.write(b"out") and t.written == [b"out"]
    t.close()


CODE = r"""
import os, select, socket, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.tun import LinuxTun
from mpvpn.io.netcfg import NetConfig
t = LinuxTun("mpvt0"); n = NetConfig()
n.configure("mpvt0", "172.31.0.1/30", 1400)
n.add_route("192.168.77.0/24", "mpvt0")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hello-tun", ("192.168.77.9", 9999))
pkt = None
for _ in range(20):  # the kernel may send IPv6 router solicitations first
    select.select([t], [], [], 2)
    pkt = t.read()
    if pkt and pkt[0] >> 4 == 4:
        break
assert pkt[0] >> 4 == 4 and pkt[16:20] == bytes([192, 168, 77, 9]) and pkt.endswith(b"hello-tun"), pkt
while t.read() is not None:  # non-blocking: drains, then None
    pass
assert t.write(pkt)  # a well-formed packet is accepted
t.write(b"\x00" * 3)  # malformed input: refused by the kernel, never raises
print("ok", t.name)
"""


def test_linux_tun_carries_packets_in_a_throwaway_namespace(throwaway_netns):
    run, cmd = throwaway_netns
    r = run(CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok mpvt0"
    # not persistent: the device went away with the process
    assert "mpvt0" not in cmd("ip", "link").stdout


OFFLOAD_CODE = r"""
import os, select, struct, subprocess, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.tun import LinuxTun
from mpvpn.io import offload as o
from mpvpn.io.netcfg import NetConfig

def sh(*a):
    subprocess.run(a, check=True)

sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
for k in ("all", "default"):
    sh("sysctl", "-qw", f"net.ipv4.conf.{k}.rp_filter=0")
    sh("sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1")  # no stray solicitations on the tuns
n = NetConfig()
a = LinuxTun("ofa0", offload="tso")   # writes super-segments, reads them (TSO)
b = LinuxTun("ofb0", offload="tso")
c = LinuxTun("ofc0", offload="off")   # plain: the kernel must segment for it
assert (a.offload, b.offload, c.offload) == ("tso", "tso", "off"), (a.offload_error, b.offload_error)
n.configure("ofa0", "10.71.1.1/24", 1400)
n.configure("ofb0", "10.71.2.1/24", 1400)
n.configure("ofc0", "10.71.3.1/24", 1400)
for t in (a, b, c):
    while t.read_packets() is not None:
        pass

def segments(dst, count, mss=1348):
    out = []
    for i in range(count):
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000 + i * mss, 77, 0x50, 0x10, 500, 0, 0) + os.urandom(mss)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 50 + i, 0x4000, 64, 6, 0,
                                   bytes([10, 71, 1, 2]), bytes(dst)))
        ip[10:12] = o.checksum(ip).to_bytes(2, "big")
        pkt = bytearray(ip + tcp)
        l4 = len(tcp)
        pkt[36:38] = o.checksum(pkt[20:], o.pseudo_sum(pkt, l4)).to_bytes(2, "big")
        out.append(bytes(pkt))
    return out

def forwarded(p):  # what forwarding does to a packet: TTL - 1, new header checksum
    q = bytearray(p)
    q[8] -= 1
    q[10:12] = b"\0\0"
    q[10:12] = o.checksum(q[:20]).to_bytes(2, "big")
    return bytes(q)

def collect(t, want):
    # only our IPv4 TCP test packets: a fresh interface also sees IPv6
    # router/neighbour solicitations and the like
    got = []
    while len(got) < want:
        if not select.select([t], [], [], 3)[0]:
            break
        got += [p for p in t.read_packets() or [] if p[:1] == b"\x45" and p[9] == 6]
    return got

# 1. a coalesced super-segment written into ofa0, routed out of the plain ofc0:
#    the kernel cuts it back into exactly the original segments
segs = segments([10, 71, 3, 9], 12)
assert len(o.coalesce(segs)) == 1
assert a.write_packets(segs) == 0
got = collect(c, 12)
assert got == [forwarded(p) for p in segs], [len(g) for g in got]

# 2. the same written into ofb0 and routed out of ofa0 (TSO): it arrives as
#    one read of one super-segment that read_packets splits into the originals
segs = segments([10, 71, 1, 9], 12)
assert b.write_packets(segs) == 0
frame = b""
while select.select([a], [], [], 3)[0]:
    frame = os.read(a.fileno(), 70000)
    if frame[1] != 0:  # the super-segment (not some stray single packet)
        break
hdr = o.parse_hdr(frame)
assert hdr[1] == o.GSO_TCPV4 and hdr[3] == 1348, hdr
assert o.split(frame) == [forwarded(p) for p in segs]

# 3. a single packet passes both ways; garbage is refused without raising
assert b.write(segs[0])
got = collect(a, 1)
assert got == [forwarded(segs[0])], (got[0][:60].hex(), forwarded(segs[0])[:60].hex())
assert b.write_packets([b"\x45" + b"\0" * 5]) in (0, 1)  # the kernel may take it and drop it later
print("ok")
"""


def test_linux_tun_offloads_in_a_throwaway_namespace(throwaway_netns):
    run, _cmd = throwaway_netns
    r = run(OFFLOAD_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_unknown_offload_mode_is_refused():
    with pytest.raises(TunError):
        LinuxTun("mpvt1", offload="fast")


REFUSED_CODE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.tun import LinuxTun, TunError
try:
    LinuxTun("lo")  # exists, and is no tun
except TunError as e:
    print("refused", e.errno, "cannot create tun 'lo'" in str(e) and "kmod-tun" in str(e))
else:
    print("created")
"""


def test_a_name_taken_by_another_device_is_refused_clearly(throwaway_netns):
    run, _cmd = throwaway_netns
    r = run(REFUSED_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "refused" and r.stdout.split()[2] == "True", r.stdout


MQ_CODE = r"""
import os, select, socket, struct, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.tun import LinuxTun
from mpvpn.io import offload as o
from mpvpn.io.netcfg import NetConfig

t = LinuxTun("mqt0", offload="off", queues=2)
q1 = LinuxTun.adopt(t.take_queue(), t.name, t.offload)
NetConfig().configure("mqt0", "10.72.0.1/24", 1400)
queues = [t, q1]
for q in queues:
    while q.read_packets() is not None:
        pass
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.bind(("10.72.0.1", 7))

def udp(src, sport, payload):
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0x4000, 64, 17, 0,
                               socket.inet_aton(src), socket.inet_aton("10.72.0.1")))
    ip[10:12] = o.checksum(ip).to_bytes(2, "big")
    return bytes(ip) + struct.pack("!HHHH", sport, 7, 8 + len(payload), 0) + payload

wrong = 0
for f in range(24):
    src, sport = f"10.72.0.{2 + f}", 5000 + f
    assert queues[f % 2].write(udp(src, sport, b"ping %d" % f))
    data, addr = echo.recvfrom(100)
    echo.sendto(data, addr)  # the reply goes back into the tun: which queue?
    got = None
    while got is None:
        r, _, _ = select.select(queues, [], [], 2)
        assert r, "no reply"
        for q in r:
            for p in q.read_packets() or []:
                if p[9] == 17 and socket.inet_ntoa(p[16:20]) == src:
                    got = queues.index(q)
    wrong += got != f % 2
print("wrong", wrong)
"""


def test_a_multi_queue_tun_sends_a_flow_back_to_the_queue_that_wrote_it(throwaway_netns):
    """What base.workers relies on (mpvpn.agent.workers): each worker writes
    its sessions' packets into its own queue, and the kernel (tun's automatic
    flow steering) sends the replies of those flows to that queue."""
    run, _cmd = throwaway_netns
    r = run(MQ_CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["wrong", "0"]
