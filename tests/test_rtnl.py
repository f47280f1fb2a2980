"""The rtnetlink module: message layouts, reply parsing (good, bad, multi-part),
and the real kernel in a throwaway namespace through NetConfig."""

import errno
import json
import random
import shutil
import socket
import struct
import sys

import pytest

from mpvpn.io import rtnl
from mpvpn.io.rtnl import NetError


def h16(x: int) -> bytes:  # host byte order, independent of the module's struct formats
    return x.to_bytes(2, sys.byteorder)


def h32(x: int) -> bytes:
    return x.to_bytes(4, sys.byteorder)


def hdr(length, kind, flags, seq, pid):
    return h32(length) + h16(kind) + h16(flags) + h32(seq) + h32(pid)


V4 = bytes([192, 168, 20, 0])
V6 = socket.inet_pton(socket.AF_INET6, "fd00:20::")


# -- building ---------------------------------------------------------------

def test_nlmsghdr_layout():
    body = b"\x01\x02\x03\x04"
    m = rtnl.message(rtnl.RTM_NEWLINK, rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK, 7, body)
    assert m == hdr(20, 16, 0x5, 7, 0) + body
    assert rtnl.NLM_F_DUMP == 0x300 and rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL == 0x600
    assert rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE == 0x500


def test_attributes_are_padded_to_four_bytes():
    assert rtnl.attr(3, b"") == h16(4) + h16(3)
    assert rtnl.attr(3, b"abcd") == h16(8) + h16(3) + b"abcd"
    a = rtnl.attr(3, b"abcde")  # length says 9, three zero bytes of padding follow
    assert a == h16(9) + h16(3) + b"abcde\0\0\0" and len(a) == 12
    assert rtnl.u32(4, 1400) == h16(8) + h16(4) + h32(1400)
    for n in range(9):
        assert len(rtnl.attr(1, b"x" * n)) == 4 + (n + 3) // 4 * 4
    # and back: odd lengths, nested / byte-order flag bits masked off the type
    buf = rtnl.attr(1, b"abcde") + rtnl.attr(0x8000 | 2, b"") + rtnl.attr(0x4000 | 3, b"xy")
    assert rtnl.parse_attrs(buf) == {1: b"abcde", 2: b"", 3: b"xy"}
    assert rtnl.parse_attrs(buf + b"\0\0") == {1: b"abcde", 2: b"", 3: b"xy"}  # < 4 trailing bytes


def test_ifinfomsg_layout():
    ifi = lambda flags, change: bytes([socket.AF_UNSPEC, 0]) + h16(0) + h32(7) + h32(flags) + h32(change)
    assert rtnl.link_msg(7, mtu=1400) == ifi(0, 0) + h16(8) + h16(rtnl.IFLA_MTU) + h32(1400)
    assert rtnl.link_msg(7, up=True) == ifi(1, 1)      # IFF_UP set, and only IFF_UP changed
    assert rtnl.link_msg(7, up=False) == ifi(0, 1)
    assert rtnl.link_msg(7) == ifi(0, 0)               # RTM_DELLINK body


def test_link_kind_is_read_from_nested_linkinfo():
    body = rtnl.IFINFO.pack(0, 65534, 7, 0x1, 0) + rtnl.attr(3, b"mpvpn0\0") + \
        rtnl.attr(rtnl.IFLA_LINKINFO, rtnl.attr(rtnl.IFLA_INFO_KIND, b"tun\0"))
    link = rtnl.parse_link(body)
    assert (link["index"], link["type"], link["flags"], link["kind"]) == (7, 65534, 1, "tun")
    assert rtnl.parse_link(rtnl.IFINFO.pack(0, 772, 1, 0, 0))["kind"] is None  # lo: no linkinfo
    with pytest.raises(NetError, match="truncated ifinfomsg"):
        rtnl.parse_link(body[:10])
    with pytest.raises(NetError, match="malformed netlink attribute"):
        rtnl.parse_link(rtnl.IFINFO.pack(0, 1, 7, 0, 0) + rtnl.attr(rtnl.IFLA_LINKINFO, b"\xff\x00\x01\x00"))


def test_ifaddrmsg_layout():
    ip = bytes([172, 30, 9, 1])
    m = rtnl.addr_msg(socket.AF_INET, 3, 30, ip, ip)  # IPv4: IFA_LOCAL and IFA_ADDRESS, like `ip addr add`
    assert m == bytes([socket.AF_INET, 30, 0, 0]) + h32(3) + h16(8) + h16(2) + ip + h16(8) + h16(1) + ip
    ip6 = socket.inet_pton(socket.AF_INET6, "fd00:9::1")
    m = rtnl.addr_msg(socket.AF_INET6, 3, 64, ip6)    # IPv6: IFA_ADDRESS only
    assert m == bytes([socket.AF_INET6, 64, 0, 0]) + h32(3) + h16(20) + h16(1) + ip6
    a = rtnl.parse_addr(m)
    assert (a["family"], a["prefixlen"], a["index"]) == (socket.AF_INET6, 64, 3)
    assert rtnl.get_ip(a["family"], a["attrs"], rtnl.IFA_ADDRESS) == "fd00:9::1"
    assert rtnl.dump_msg(socket.AF_INET6, rtnl.IFADDR) == bytes([socket.AF_INET6]) + bytes(7)


def test_rtmsg_layout():
    table, dst, oif, prio = (h16(8) + h16(15) + h32(254), h16(8) + h16(1) + V4,
                             h16(8) + h16(4) + h32(3), h16(8) + h16(6) + h32(50))
    # replace: main table, proto 167, scope universe, unicast
    m = rtnl.route_msg(socket.AF_INET, V4, 24, 3, 167)
    assert m == bytes([socket.AF_INET, 24, 0, 0, 254, 167, 0, 1]) + h32(0) + table + dst + oif
    assert rtnl.route_msg(socket.AF_INET, V4, 24, 3, 167, priority=50) == m + prio
    # delete: scope nowhere and type unspec match any route of ours
    m = rtnl.route_msg(socket.AF_INET, V4, 24, 3, 167, delete=True)
    assert m[:8] == bytes([socket.AF_INET, 24, 0, 0, 254, 167, 255, 0])
    # a default route has no RTA_DST
    m = rtnl.route_msg(socket.AF_INET, b"", 0, 3, 167)
    assert m == bytes([socket.AF_INET, 0, 0, 0, 254, 167, 0, 1]) + h32(0) + table + oif
    m = rtnl.route_msg(socket.AF_INET6, V6, 64, 3, 167)
    r = rtnl.parse_route(m)
    assert (r["family"], r["dst_len"], r["table"], r["protocol"], r["scope"], r["type"]) == \
        (socket.AF_INET6, 64, 254, 167, 0, 1)
    assert rtnl.get_ip(socket.AF_INET6, r["attrs"], rtnl.RTA_DST) == "fd00:20::"
    assert rtnl.get_u32(r["attrs"], rtnl.RTA_OIF) == 3 and rtnl.get_u32(r["attrs"], rtnl.RTA_PRIORITY) is None
    # a table above 255 only fits RTA_TABLE
    r = rtnl.parse_route(rtnl.route_msg(socket.AF_INET, V4, 24, 3, 167, table=1000))
    assert r["table"] == 1000 and rtnl.route_msg(socket.AF_INET, V4, 24, 3, 167, table=1000)[4] == 0


# -- parsing replies --------------------------------------------------------

def error_reply(seq, pid, err, flags=0, tlvs=b""):
    echoed = hdr(36, rtnl.RTM_NEWADDR, 0x605, seq, pid)  # capped: the request's header only
    return rtnl.message(rtnl.NLMSG_ERROR, flags, seq, struct.pack("=i", err) + echoed + tlvs, pid)


def test_nlmsg_error_becomes_oserror_with_its_errno():
    [(kind, flags, seq, pid, payload)] = rtnl.parse_messages(error_reply(5, 99, -errno.EEXIST))
    assert (kind, seq, pid) == (rtnl.NLMSG_ERROR, 5, 99)
    e = rtnl.error_of(flags, payload)
    assert isinstance(e, OSError) and e.errno == errno.EEXIST
    assert str(e) == "[Errno 17] File exists"
    [(_, flags, _, _, payload)] = rtnl.parse_messages(error_reply(5, 99, 0))
    assert rtnl.error_of(flags, payload) is None  # an ACK
    # extended ACK text is added
    tlvs = rtnl.attr(rtnl.NLMSGERR_ATTR_MSG, b"mtu greater than device maximum\0")
    [(_, flags, _, _, payload)] = rtnl.parse_messages(
        error_reply(5, 99, -errno.EINVAL, rtnl.NLM_F_CAPPED | rtnl.NLM_F_ACK_TLVS, tlvs))
    e = rtnl.error_of(flags, payload)
    assert e.errno == errno.EINVAL and str(e) == "[Errno 22] Invalid argument (mtu greater than device maximum)"
    with pytest.raises(NetError, match="truncated"):
        rtnl.error_of(0, b"\x01")


class FakeSocket:
    """Stands in for the netlink socket: records what is sent, replays datagrams."""

    def __init__(self, *datagrams):
        self.sent, self.datagrams, self.closed = [], list(datagrams), False

    def close(self):
        self.closed = True

    def send(self, data):
        self.sent.append(data)
        return len(data)

    def recvmsg(self, size):
        item = self.datagrams.pop(0)
        if isinstance(item, BaseException):
            raise item
        data, mflags, sender = item if isinstance(item, tuple) else (item, 0, 0)
        return data, [], mflags, (sender, 0)


def fake(*datagrams, pid=4242):
    nl = object.__new__(rtnl.Rtnl)
    nl.sock, nl.pid, nl.seq = FakeSocket(*datagrams), pid, 0
    nl._open = lambda: setattr(nl, "sock", FakeSocket())  # what a reset opens
    return nl


def addr_reply(seq, index, flags=rtnl.NLM_F_MULTI, pid=4242):
    body = rtnl.addr_msg(socket.AF_INET, index, 24, bytes([10, 0, 0, index]), bytes([10, 0, 0, index]))
    return rtnl.message(rtnl.RTM_NEWADDR, flags, seq, body, pid)


def done(seq, err=0, pid=4242):
    return rtnl.message(rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI, seq, struct.pack("=i", err), pid)


def test_multipart_dump_is_read_until_done():
    nl = fake(addr_reply(1, 1) + addr_reply(1, 2),
              addr_reply(0, 9) + addr_reply(1, 9, pid=7),  # stale seq / other port: skipped
              (addr_reply(1, 8), 0, 1234),                  # not from the kernel: skipped
              addr_reply(1, 3) + done(1))
    got = nl.dump(rtnl.RTM_GETADDR, rtnl.dump_msg(socket.AF_INET, rtnl.IFADDR))
    assert [rtnl.parse_addr(p)["index"] for p in got] == [1, 2, 3]
    [sent] = nl.sock.sent
    assert sent[:16] == hdr(24, rtnl.RTM_GETADDR, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP, 1, 0)
    assert nl.sock.datagrams == []


def test_interrupted_dump_is_retried():
    intr = rtnl.NLM_F_MULTI | rtnl.NLM_F_DUMP_INTR
    nl = fake(addr_reply(1, 1, flags=intr) + done(1), addr_reply(2, 1) + addr_reply(2, 2) + done(2))
    assert len(nl.dump(rtnl.RTM_GETADDR, rtnl.dump_msg(0, rtnl.IFADDR))) == 2 and nl.seq == 2


def test_request_reads_until_its_ack_or_error():
    nl = fake(error_reply(1, 4242, 0))
    assert nl.request(rtnl.RTM_NEWLINK, rtnl.NLM_F_ACK, rtnl.link_msg(3, mtu=1400)) == []
    assert struct.unpack_from("=IHHII", nl.sock.sent[0]) == (40, rtnl.RTM_NEWLINK, 0x5, 1, 0)
    nl = fake(error_reply(7, 4242, -errno.ESRCH) + error_reply(1, 4242, -errno.ENODEV), pid=4242)
    with pytest.raises(NetError) as e:
        nl.request(rtnl.RTM_DELLINK, rtnl.NLM_F_ACK, rtnl.link_msg(3))
    assert e.value.errno == errno.ENODEV  # the stale ESRCH (seq 7) was skipped
    nl = fake(done(1, -errno.EBUSY))
    with pytest.raises(NetError) as e:
        nl.dump(rtnl.RTM_GETROUTE, rtnl.dump_msg(socket.AF_INET, rtnl.RTMSG))
    assert e.value.errno == errno.EBUSY and not nl.sock.closed  # the kernel's answer: no reset


@pytest.mark.parametrize("reply, match", [
    (b"\x01\x02\x03", "truncated netlink reply"),
    (hdr(100, 16, 0, 1, 4242) + bytes(4), "malformed netlink reply"),   # longer than the datagram
    (hdr(8, 16, 0, 1, 4242), "malformed netlink reply"),                # shorter than its header
    (rtnl.message(rtnl.NLMSG_ERROR, 0, 1, b"\0", 4242), "truncated netlink error"),
    (rtnl.message(rtnl.RTM_NEWROUTE, 2, 1, b"\x02\x18", 4242) + done(1), None),  # parsed later
])
def test_garbage_replies_raise_neterror(reply, match):
    nl = fake(reply)
    if match is None:
        [payload] = nl.dump(rtnl.RTM_GETROUTE, b"")
        with pytest.raises(NetError, match="truncated rtmsg"):
            rtnl.parse_route(payload)
    else:
        old = nl.sock
        with pytest.raises(NetError, match=match):
            nl.dump(rtnl.RTM_GETROUTE, b"")
        assert old.closed and nl.sock is not old  # what is left of that exchange can't get in the way


def test_bad_attributes_and_socket_trouble_raise_neterror():
    with pytest.raises(NetError, match="malformed netlink attribute"):
        rtnl.parse_attrs(h16(40) + h16(1) + b"abcd")
    with pytest.raises(NetError, match="malformed netlink attribute"):
        rtnl.parse_attrs(h16(2) + h16(1) + b"abcd")
    with pytest.raises(NetError, match="expected 4"):
        rtnl.get_u32({4: b"\1\2"}, 4)
    with pytest.raises(NetError, match="malformed address"):
        rtnl.get_ip(socket.AF_INET, {1: bytes(16)}, 1)
    with pytest.raises(NetError, match="truncated ifaddrmsg"):
        rtnl.parse_addr(b"\x02\x18")
    with pytest.raises(NetError, match="larger than"):
        fake((b"", socket.MSG_TRUNC, 0)).dump(rtnl.RTM_GETADDR, b"")
    with pytest.raises(NetError, match="no netlink reply"):
        fake(socket.timeout("timed out")).dump(rtnl.RTM_GETADDR, b"")
    with pytest.raises(NetError) as e:
        fake(OSError(errno.ENOBUFS, "No buffer space available")).dump(rtnl.RTM_GETADDR, b"")
    assert e.value.errno == errno.ENOBUFS


def test_random_garbage_never_escapes_as_anything_but_neterror():
    rnd = random.Random(167)
    route = rtnl.route_msg(socket.AF_INET6, V6, 64, 3, 167, priority=9)
    addr = rtnl.addr_msg(socket.AF_INET, 1, 24, bytes(4), bytes(4))
    err = struct.pack("=i", -22) + hdr(36, 20, 5, 1, 0) + rtnl.attr(rtnl.NLMSGERR_ATTR_MSG, b"no\0")
    framed = addr_reply(1, 1) + rtnl.message(rtnl.RTM_NEWROUTE, 2, 1, route, 4242)
    parsed = 0
    for _ in range(3000):
        data = bytearray(rnd.choice((route, addr, err, framed)))
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        if rnd.random() < 0.3:
            data = data[:rnd.randint(0, len(data))]
        data = bytes(data)
        try:
            rtnl.parse_messages(data)
        except NetError:
            pass
        try:
            rtnl.error_of(rtnl.NLM_F_CAPPED | rtnl.NLM_F_ACK_TLVS, data)
        except NetError:
            pass
        for parse in (rtnl.parse_route, rtnl.parse_addr, rtnl.parse_link):
            try:
                r = parse(data)
                for k in (1, 2, 4, 6, 15):
                    rtnl.get_u32(r["attrs"], k)
                    rtnl.get_ip(r["family"], r["attrs"], k)
                parsed += 1
            except NetError:
                pass
    assert parsed > 500  # the garbage was not all rejected at the first byte


# -- the real kernel, in a throwaway namespace ------------------------------

@pytest.fixture
def netns(throwaway_netns):
    """throwaway_netns (skips when not root; always deleted), provided `ip` exists."""
    if shutil.which("ip") is None:
        sys.stderr.write("\nrtnl namespace tests skipped: iproute2's `ip` is missing\n")
        pytest.skip("iproute2's `ip` is missing")
    return throwaway_netns


SETUP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.netcfg import NetConfig
n = NetConfig()
n.configure("d0", "172.30.9.1/30", 1380)
n.configure("d0", "fd00:9::1/64", 1380)
n.add_route("192.168.20.0/24", "d0")
n.add_route("192.168.20.0/24", "d0")          # replace: not an error
n.add_route("192.168.21.0/24", "d0", metric=50)
n.add_route("fd00:20::/64", "d0")
n.add_route("fd00:20::/64", "d0")
n.add_route("fd00:21::/64", "d0", metric=50)
print(json.dumps(dict(ours=sorted(n.our_routes()), addrs=n.addresses("d0"), index=n.index("d0"),
                      dev4=n.device_of("172.30.9.1"), dev6=n.device_of("fd00:9::1"),
                      nodev=n.device_of("10.9.9.9"), missing=n.index("nope0"), noaddrs=n.addresses("nope0"))))
n.close()
"""

TEARDOWN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.netcfg import NetConfig
n = NetConfig()
out = dict(del1=n.del_route("192.168.20.0/24", "d0"), del2=n.del_route("192.168.20.0/24", "d0"),
           del6=n.del_route("fd00:20::/64", "d0"), nodev=n.del_route("192.168.20.0/24", "nope0"))
out.update(flushed=n.flush_ours(), ours=n.our_routes(), again=n.flush_ours())
out.update(gone=n.delete_link("d0"), index=n.index("d0"), gone2=n.delete_link("d0"))
print(json.dumps(out))
"""


def ip_json(cmd, *argv):
    r = cmd("ip", "-j", *argv)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def routes(cmd, family):
    return {r["dst"]: r for r in ip_json(cmd, family, "-d", "route", "show", "table", "main")}


def test_netconfig_against_the_kernel(netns):
    run, cmd = netns
    for argv in (("link", "add", "d0", "type", "veth", "peer", "name", "d0p"), ("link", "set", "d0p", "up")):
        assert cmd("ip", *argv).returncode == 0
    r = run(SETUP)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    [link] = ip_json(cmd, "addr", "show", "dev", "d0")
    assert link["mtu"] == 1380 and "UP" in link["flags"]
    # (a link-local fe80:: address may come back once the carrier is up)
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] != "link"] == \
        [("172.30.9.1", 30), ("fd00:9::1", 64)]
    assert [a for a in got["addrs"] if not a.startswith("fe80:")] == ["172.30.9.1/30", "fd00:9::1/64"]
    assert got["index"] == link["ifindex"]
    assert got["dev4"] == got["dev6"] == "d0" and got["nodev"] is None
    assert got["missing"] is None and got["noaddrs"] == []
    assert got["ours"] == [[d, link["ifindex"]] for d in
                           ("192.168.20.0/24", "192.168.21.0/24", "fd00:20::/64", "fd00:21::/64")]
    v4, v6 = routes(cmd, "-4"), routes(cmd, "-6")
    for dst, metric, table in (("192.168.20.0/24", None, v4), ("192.168.21.0/24", 50, v4),
                               ("fd00:20::/64", 1024, v6), ("fd00:21::/64", 50, v6)):
        rt = table[dst]
        assert (rt["protocol"], rt["dev"], rt["type"], rt["scope"], rt.get("metric")) == \
            ("167", "d0", "unicast", "global", metric), rt
    assert len(ip_json(cmd, "route", "show", "proto", "167")) == 2  # replaced, not added twice
    assert len(ip_json(cmd, "-6", "route", "show", "proto", "167")) == 2
    # routes that are not ours must survive flush_ours
    assert cmd("ip", "route", "add", "10.200.0.0/16", "dev", "d0").returncode == 0
    assert cmd("ip", "-6", "route", "add", "fd00:99::/64", "dev", "d0").returncode == 0

    r = run(TEARDOWN)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == dict(del1=True, del2=False, del6=True, nodev=False, flushed=2, ours=[], again=0,
                       gone=True, index=None, gone2=False), got
    names = [link["ifname"] for link in ip_json(cmd, "link")]
    assert "d0" not in names and "d0p" not in names  # the veth pair went together


def test_kernel_errors_and_dumps_through_the_socket(netns):
    run, _ = netns
    r = run(r"""
import errno, socket, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io import rtnl
nl = rtnl.Rtnl()
try:
    nl.request(rtnl.RTM_DELLINK, rtnl.NLM_F_ACK, rtnl.link_msg(99999))
except rtnl.NetError as e:
    assert e.errno == errno.ENODEV, e
else:
    raise AssertionError("deleted a missing link")
nl.request(rtnl.RTM_NEWLINK, rtnl.NLM_F_ACK, rtnl.link_msg(1, up=True))   # lo up: an ACK, no data
addrs = [rtnl.parse_addr(p) for p in nl.dump(rtnl.RTM_GETADDR, rtnl.dump_msg(0, rtnl.IFADDR))]
assert {(a["index"], rtnl.get_ip(a["family"], a["attrs"], rtnl.IFA_ADDRESS)) for a in addrs} == \
    {(1, "127.0.0.1"), (1, "::1")}, addrs
for _ in range(3):  # seq numbers keep lining up
    nl.dump(rtnl.RTM_GETROUTE, rtnl.dump_msg(socket.AF_INET6, rtnl.RTMSG))
old = nl.sock
nl._reset()  # what a garbled reply leads to: a fresh socket that works
assert old.fileno() == -1 and nl.pid == nl.sock.getsockname()[0]
assert len(nl.dump(rtnl.RTM_GETADDR, rtnl.dump_msg(0, rtnl.IFADDR))) == 2
nl.close()
print("ok")
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


LEFTOVERS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mpvpn.io.netcfg import NetConfig
n = NetConfig()
n.add_route("10.77.0.0/24", "t0")
n.add_route("10.88.0.0/24", "d0")
kinds = [n.link_kind(x) for x in ("t0", "d0", "lo", "nope0")]
print(json.dumps(dict(kinds=kinds, flushed=n.flush_ours("t0"), none=n.flush_ours("nope0"),
                      ours=[r for r, _ in n.our_routes()])))
"""


def test_link_kind_and_flushing_only_one_devices_routes(netns):
    run, cmd = netns
    for argv in (("tuntap", "add", "mode", "tun", "t0"), ("link", "set", "t0", "up"),
                 ("link", "add", "d0", "type", "veth", "peer", "name", "d0p"), ("link", "set", "d0", "up"),
                 ("link", "set", "d0p", "up")):
        assert cmd("ip", *argv).returncode == 0, argv
    r = run(LEFTOVERS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == dict(kinds=["tun", "veth", None, None], flushed=1, none=0,
                                        ours=["10.88.0.0/24"])
