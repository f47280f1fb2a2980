"""The tun edge: the real device (in a throwaway namespace) and the in-memory stand-in."""

import select

import pytest

from mpvpn.tun import LinuxTun, MemoryTun, TunError, valid_ifname


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
from mpvpn.tun import LinuxTun
from mpvpn.netcfg import NetConfig
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
