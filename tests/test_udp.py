"""Uplink sockets: bound to their address, absent addresses retried, clear errors."""

import socket

import pytest

from mpvpn.io.udp import UplinkUnavailable, open_uplink, sockaddr


def test_bound_to_the_uplink_address_and_non_blocking():
    s = open_uplink("127.0.0.1", 0)
    try:
        assert s.getsockname()[0] == "127.0.0.1"
        assert s.gettimeout() == 0.0
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.sendto(b"x", s.getsockname())
        import select

        select.select([s], [], [], 1)
        assert s.recvfrom(100)[0] == b"x"
        peer.close()
    finally:
        s.close()


def test_the_receive_buffer_is_the_size_asked_for(monkeypatch):
    """SO_RCVBUF is what open_uplink is asked for (the kernel reports twice
    the request: its bookkeeping): the queue bulk TCP fills under load.  As
    root a configured size holds even beyond net.core.rmem_max
    (SO_RCVBUFFORCE); unconfigured, the 4 MiB request stays capped there."""
    import os

    monkeypatch.delenv("MPVPN_UDP_RCVBUF", raising=False)
    rmem_max = int(open("/proc/sys/net/core/rmem_max").read())
    for asked in (None, 64 << 10, 2 * rmem_max):  # (the last: only root gets it)
        s = open_uplink("127.0.0.1", 0) if asked is None else open_uplink("127.0.0.1", 0, rcvbuf=asked)
        try:
            want = 4 << 20 if asked is None else asked
            if asked is None or os.geteuid() != 0:
                want = min(want, rmem_max)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * want
        finally:
            s.close()


def test_absent_address_is_retryable_not_fatal():
    with pytest.raises(UplinkUnavailable, match="not configured"):
        open_uplink("192.0.2.123", 7000)  # TEST-NET-1: never on this host


def test_port_in_use_is_explained():
    a = open_uplink("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="already in use"):
            open_uplink("127.0.0.1", a.getsockname()[1])
    finally:
        a.close()


def test_ipv6_and_sockaddr():
    assert sockaddr("10.1.0.2", 7000) == ("10.1.0.2", 7000)
    assert sockaddr("fd00:1::2", 7000) == ("fd00:1::2", 7000, 0, 0)
    try:
        s = open_uplink("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert s.family == socket.AF_INET6
    s.close()


def _pair():
    import select

    rx = open_uplink("127.0.0.1", 0)
    tx = open_uplink("127.0.0.1", 0)
    return rx, tx, select


def test_batch_send_is_identical_to_one_by_one_and_uses_fewer_calls():
    from mpvpn.io.udp import BatchSocket

    rx, tx, select = _pair()
    try:
        b = BatchSocket(tx)
        dgrams = [bytes([i]) * 300 for i in range(50)] + [b"short-last"] + [b"x" * 100, b"y" * 200]
        assert b.send(dgrams, rx.getsockname()) == 0
        got = []
        rb = BatchSocket(rx)
        while len(got) < len(dgrams):
            if not select.select([rx], [], [], 2)[0]:
                break
            try:
                more, _ = rb.recv()
            except BlockingIOError:
                continue
            got.extend(more)
        assert got == dgrams  # same datagrams, same order, same boundaries
        if b.gso:
            assert b.tx_calls < len(dgrams) / 4  # runs of equal size went out in one call
    finally:
        rx.close()
        tx.close()


def test_batch_send_falls_back_when_gso_is_refused():
    from mpvpn.io.udp import BatchSocket

    class NoGso:
        def __init__(self, real):
            self.real = real
            self.sent = []

        def sendmsg(self, *a):
            raise OSError(22, "Invalid argument")

        def sendto(self, d, addr):
            self.sent.append(d)

    fake = NoGso(None)
    b = BatchSocket(fake)
    assert b.send([b"a" * 10] * 5, ("127.0.0.1", 9)) == 0
    assert fake.sent == [b"a" * 10] * 5 and b.gso is False
