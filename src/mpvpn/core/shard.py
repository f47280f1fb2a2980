"""Which worker's socket a datagram goes to when a hub's data path is split
over several processes (issue 16, a worker per core; sans-I/O).

The workers' UDP sockets of one uplink share its address and port
(SO_REUSEPORT, :mod:`mpvpn.io.reuseport`); the kernel picks the socket of
each arriving datagram by running :func:`reuseport_program` on its UDP
payload and takes the socket at the index it returns (the order in which
the sockets joined the group).  The program reads the SMPU session id
(``wire.OFF_SESSION``) so that every datagram of a session reaches the
worker that holds it, without any process touching it first:

* an SMPU datagram (first byte ``wire.VERSION``) of session ``s``: ``s % n``;
* anything else -- STUN (the magic cookie where SMPU has its session id),
  TURN ChannelData, a datagram shorter than the session id, junk -- goes to
  socket 0 (the main process, which holds the STUN and relay clients and
  counts junk).  A load past the end of the datagram ends a classic BPF
  program with 0, so a short datagram is index 0 too.

:func:`shard_of` is the same decision in Python (what the program computes,
for the process that has to route a packet it did not receive itself, and
for the tests, which check it against the kernel's choice).
"""

from __future__ import annotations

from mpvpn.core import wire

# the STUN magic cookie (RFC 8489 6) sits where SMPU has its session id; no
# session takes that value (controlconn.random_session_id)
STUN_COOKIE = 0x2112A442
MAX_WORKERS = 64

# classic BPF (linux/filter.h, linux/bpf_common.h)
_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS: A = byte at k
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = big-endian word at k
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: pc += (A == k) ? jt : jf
_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K: A %= k
_RET_A = 0x16  # BPF_RET | BPF_A
_RET_K = 0x06  # BPF_RET | BPF_K


def reuseport_program(n: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program ``[(code, jt, jf, k), ...]`` that picks the
    socket of ``n`` (1..MAX_WORKERS) for a UDP payload."""
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}")
    return [
        (_LD_B_ABS, 0, 0, wire.OFF_VERSION),  # 0: A = version byte
        (_JEQ_K, 0, 4, wire.VERSION),  # 1: not SMPU -> 6
        (_LD_W_ABS, 0, 0, wire.OFF_SESSION),  # 2: A = session id (short datagram: return 0)
        (_JEQ_K, 2, 0, STUN_COOKIE),  # 3: STUN -> 6
        (_MOD_K, 0, 0, n),  # 4: A %= n
        (_RET_A, 0, 0, 0),  # 5: socket A
        (_RET_K, 0, 0, 0),  # 6: socket 0
    ]


def shard_of(datagram, n: int) -> int:
    """The index :func:`reuseport_program` ``(n)`` returns for ``datagram``."""
    end = wire.OFF_SESSION + 4
    if not datagram or datagram[wire.OFF_VERSION] != wire.VERSION or len(datagram) < end:
        return 0
    sid = int.from_bytes(datagram[wire.OFF_SESSION:end], "big")
    return 0 if sid == STUN_COOKIE else sid % n


def owner(session_id: int, n: int) -> int:
    """The worker (0..n-1) that holds session ``session_id``."""
    return session_id % n
