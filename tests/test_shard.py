"""Sessions sharded over workers by the kernel (issue 16, a worker per core):
core/shard.py's classic BPF program attached to a real SO_REUSEPORT group
(io/reuseport.py) on loopback sends every datagram of a session to one
socket, the one shard_of() names, exactly once; STUN, short datagrams and
anything not SMPU go to socket 0."""

from __future__ import annotations

import random
import select
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpvpn.core import shard, wire
from mpvpn.io import reuseport


def smpu(session_id: int, seq: int, member: int = 1) -> bytes:
    return wire.HEADER.pack(wire.VERSION, wire.DATA, member, 0, session_id, 8, 0, 0, seq) + b"payload!"


def drain(socks, timeout: float = 2.0, want: int | None = None) -> list[list[bytes]]:
    """Everything each socket received (until ``want`` datagrams in all, or quiet)."""
    got: list[list[bytes]] = [[] for _ in socks]
    total = 0
    while want is None or total < want:
        ready, _, _ = select.select(socks, [], [], timeout if want is not None else 0.2)
        if not ready:
            break
        for s in ready:
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                got[socks.index(s)].append(data)
                total += 1
    return got


def group(n: int):
    return reuseport.open_group("127.0.0.1", _free_port(), n)


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_kernel_sends_every_datagram_of_a_session_to_its_workers_socket_once(n):
    socks = group(n)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        addr = socks[0].getsockname()
        rng = random.Random(n)
        sids = [rng.getrandbits(32) or 1 for _ in range(40)]
        sent = []
        for seq in range(5):
            for sid in sids:
                d = smpu(sid, seq)
                tx.sendto(d, addr)
                sent.append(d)
        got = drain(socks, want=len(sent))
        assert sorted(d for g in got for d in g) == sorted(sent)  # every one, once
        for i, g in enumerate(got):
            for d in g:
                assert shard.shard_of(d, n) == i == struct.unpack_from("!I", d, wire.OFF_SESSION)[0] % n
        assert all(got), "some socket got nothing: sessions not spread"
    finally:
        tx.close()
        for s in socks:
            s.close()


def test_stun_short_datagrams_and_junk_go_to_the_main_socket():
    n = 3
    socks = group(n)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        addr = socks[0].getsockname()
        stun = struct.pack("!HHI12s", 0x0101, 0, shard.STUN_COOKIE, b"t" * 12)  # Binding success
        odd = [stun, b"\x01\x10\x01", b"\x40\x00\x00\x08" + bytes(8),  # short, TURN ChannelData
               b"\x02" + smpu(5, 1)[1:], smpu(shard.STUN_COOKIE, 1)]  # another version, the cookie
        for d in odd:
            tx.sendto(d, addr)
        got = drain(socks, want=len(odd))
        assert sorted(got[0]) == sorted(odd) and not got[1] and not got[2]
        assert all(shard.shard_of(d, n) == 0 for d in odd)
    finally:
        tx.close()
        for s in socks:
            s.close()


def test_a_group_shares_one_port_and_needs_every_member():
    socks = reuseport.open_group("127.0.0.1", 0, 3)  # port 0: the first one's, for all
    try:
        assert len({s.getsockname() for s in socks}) == 1
    finally:
        for s in socks:
            s.close()
    with pytest.raises(ValueError):
        shard.reuseport_program(0)
    port = _free_port()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", port))  # an agent without workers holds the port
    try:
        with pytest.raises(OSError, match="already in use"):
            reuseport.open_group("127.0.0.1", port, 2)
    finally:
        plain.close()


@given(st.binary(max_size=40), st.integers(1, shard.MAX_WORKERS))
def test_shard_of_is_an_index_of_the_group(data, n):
    assert 0 <= shard.shard_of(data, n) < n


@given(st.integers(1, 2**32 - 1), st.integers(1, shard.MAX_WORKERS))
def test_a_sessions_datagrams_go_where_its_owner_is(sid, n):
    if sid != shard.STUN_COOKIE:
        assert shard.shard_of(smpu(sid, 7), n) == shard.owner(sid, n)
