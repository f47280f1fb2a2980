"""Netlink edge: address, MTU, routes tagged with our protocol number, crash cleanup."""


CODE = r"""
import sys, subprocess
sys.path.insert(0, sys.argv[1])
from mpvpn.io.netcfg import NetConfig, RTPROT_MPVPN, NetError
subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d0p"], check=True)
subprocess.run(["ip", "link", "set", "d0p", "up"], check=True)
subprocess.run(["ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep0p"], check=True)
subprocess.run(["ip", "link", "set", "keep0p", "up"], check=True)
subprocess.run(["ip", "link", "set", "keep0", "up"], check=True)
subprocess.run(["ip", "route", "add", "10.200.0.0/16", "dev", "keep0"], check=True)  # not ours
n = NetConfig()
n.configure("d0", "172.30.9.1/30", 1380)
n.configure("d0", "172.30.9.5/30", 1380)  # reconfigure: exactly one address
assert [a for a in n.addresses("d0") if "." in a] == ["172.30.9.5/30"], n.addresses("d0")
out = subprocess.run(["ip", "link", "show", "d0"], capture_output=True, text=True).stdout
assert "mtu 1380" in out and "UP" in out, out
n.add_route("192.168.20.0/24", "d0")
n.add_route("192.168.20.0/24", "d0")  # replace, not an error
n.add_route("fd00:20::/64", "d0")
assert sorted(r for r, _ in n.our_routes()) == ["192.168.20.0/24", "fd00:20::/64"]
assert n.device_of("172.30.9.5") == "d0"
assert n.del_route("192.168.20.0/24", "d0") and not n.del_route("192.168.20.0/24", "d0")
n.add_route("192.168.21.0/24", "d0")
# a new agent after a crash: flush_ours removes ours and nothing else
m = NetConfig()
assert m.flush_ours() == 2 and m.our_routes() == []
assert "10.200.0.0/16" in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
try:
    n.configure("nope0", "10.0.0.1/30", 1400)
except NetError as e:
    assert "no such interface" in str(e)
else:
    raise AssertionError("configured a missing interface")
print("ok")
"""


def test_netcfg_in_a_throwaway_namespace(throwaway_netns):
    run, _ = throwaway_netns
    r = run(CODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


BAD_MTU = r"""
import sys, subprocess
sys.path.insert(0, sys.argv[1])
from mpvpn.io.netcfg import NetConfig, NetError
subprocess.run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d0p"], check=True)
try:
    NetConfig().configure("d0", "172.30.9.1/30", 70000)  # the kernel refuses this MTU
except NetError as e:
    print("refused:", "mtu 70000" in str(e))
"""


def test_kernel_refusals_become_clear_errors(throwaway_netns):
    run, _ = throwaway_netns
    r = run(BAD_MTU)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "refused: True"
