"""SMPU wire format: the fixed header, opcodes and the control payloads.

Pure functions over bytes; no I/O.  The byte layout is documented in
``docs/protocol.md``; keep the two in step.

Header (20 bytes, network byte order)::

    0        1        2        3
    +--------+--------+--------+--------+
    | version| opcode | member |  flags |
    +--------+--------+--------+--------+
    |            session id             |
    +--------+--------+--------+--------+
    |  payload length |  epoch | reserved|
    +--------+--------+--------+--------+
    |      sequence number (64 bit)     |
    |                                   |
    +--------+--------+--------+--------+
    | payload ... | [16-byte AEAD tag if flags & F_SEALED]

Decoding never raises on bad input: it returns ``None`` and says why through
:class:`DecodeError` codes, so callers can count drops by reason.
"""

from __future__ import annotations

import struct
from enum import IntEnum

VERSION = 1

HEADER = struct.Struct("!BBBBIHBBQ")
HEADER_LEN = HEADER.size  # 20
TAG_LEN = 16  # AEAD tag (ChaCha20-Poly1305 / AES-GCM) when F_SEALED is set
# Byte offsets of the header fields (the C loops in _fastpath.c use the same
# numbers; tests/test_fastpath.py compares them with these).
OFF_VERSION = 0
OFF_OPCODE = 1
OFF_MEMBER = 2
OFF_FLAGS = 3
OFF_SESSION = 4
OFF_LENGTH = 8
OFF_EPOCH = 10
OFF_RESERVED = 11
OFF_SEQ = 12

# flags
F_SEALED = 0x01  # payload is AEAD ciphertext followed by a TAG_LEN tag
KNOWN_FLAGS = F_SEALED

MAX_MEMBER = 255  # member IDs 1..255; 0 is never valid
MAX_SEQ = (1 << 64) - 1
# Largest payload that fits one UDP datagram with our header and a tag.
MAX_PAYLOAD = 65507 - HEADER_LEN - TAG_LEN


class Op(IntEnum):
    CONNECT = 0x01  # initiator -> responder: open this subflow
    CONNECT_ACK = 0x02  # responder -> initiator
    ACK = 0x03  # initiator -> responder: third step of the open
    CLOSE = 0x04  # either side: close this subflow
    CLOSE_ACK = 0x05
    KEEPALIVE = 0x06  # probe: timestamps and echoed counters
    KEEPALIVE_ACK = 0x07  # immediate answer to a probe, same layout
    NACK = 0x08  # receiver -> sender: please re-send these missing sequence numbers
    TEST = 0x09  # link test (mpvpn test-links): load, reports, requests; variable length
    DATA = 0x10  # one user packet (inner IPv4/IPv6 datagram)


OPCODES = frozenset(int(o) for o in Op)
DATA = int(Op.DATA)


class DecodeError(IntEnum):
    TRUNCATED = 1  # shorter than a header, or than the header says
    VERSION = 2  # unknown protocol version
    OPCODE = 3  # unknown opcode
    FLAGS = 4  # unknown flag bits or non-zero reserved byte
    LENGTH = 5  # payload length disagrees with the datagram size
    MEMBER = 6  # member ID 0
    SESSION = 7  # session ID 0
    PAYLOAD = 8  # control payload of the wrong size for its opcode


class Header:
    """A decoded header.  Plain attributes; cheap to build."""

    __slots__ = ("version", "opcode", "member", "flags", "session", "length", "epoch", "seq")

    def __init__(self, opcode, member, session, seq, length=0, flags=0, epoch=0, version=VERSION):
        self.version = version
        self.opcode = opcode
        self.member = member
        self.flags = flags
        self.session = session
        self.length = length
        self.epoch = epoch
        self.seq = seq

    def __repr__(self):
        try:
            name = Op(self.opcode).name
        except ValueError:
            name = hex(self.opcode)
        return (
            f"Header({name}, member={self.member}, session={self.session:#x}, "
            f"seq={self.seq}, len={self.length}, flags={self.flags:#x}, epoch={self.epoch})"
        )


_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


def encode(opcode: int, member: int, session: int, seq: int, payload: bytes = b"",
           flags: int = 0, epoch: int = 0) -> bytes:
    """Build one datagram: header + payload (payload already sealed if F_SEALED)."""
    plen = len(payload) - (TAG_LEN if flags & F_SEALED else 0)
    if not 0 <= plen <= MAX_PAYLOAD:
        raise ValueError(f"payload length {plen} out of range")
    return _pack_header(VERSION, opcode, member, flags, session, plen, epoch, 0, seq) + payload


def encode_header(opcode: int, member: int, session: int, seq: int, length: int,
                  flags: int = 0, epoch: int = 0) -> bytes:
    """Just the 20 header bytes (used as AEAD associated data)."""
    return _pack_header(VERSION, opcode, member, flags, session, length, epoch, 0, seq)


# --- DATA datagrams ---------------------------------------------------------
# The one builder and the one parser of DATA datagrams: every Python path
# (mpvpn.core.smpu's senders and receivers, mpvpn.core.seal) goes through these, and
# the C loops (_fastpath.c) use the same constants (checked by a test).

_MEMBER_BYTE = [bytes((i,)) for i in range(256)]


def data_header(member: int, session: int, seq: int, length: int, flags: int = 0,
                epoch: int = 0) -> bytes:
    """The 20 header bytes of a DATA datagram carrying ``length`` payload
    bytes (plaintext length; a sealed one's tag follows the ciphertext)."""
    return _pack_header(VERSION, DATA, member, flags, session, length, epoch, 0, seq)


def data_datagram(member: int, session: int, seq: int, payload: bytes) -> bytes:
    """A plaintext (unsealed) DATA datagram."""
    return _pack_header(VERSION, DATA, member, 0, session, len(payload), 0, 0, seq) + payload


def with_member(datagram: bytes, member: int) -> bytes:
    """A copy of a DATA datagram addressed to ``member`` (header byte
    ``OFF_MEMBER`` replaced).  A sealed DATA datagram stays authentic: its
    associated data has the member byte zeroed (docs/protocol.md)."""
    return datagram[:OFF_MEMBER] + _MEMBER_BYTE[member] + datagram[OFF_MEMBER + 1:]


def with_members(datagram: bytes, members) -> list[bytes]:
    """:func:`with_member` for several members at once (one copy each)."""
    head, tail = datagram[:OFF_MEMBER], datagram[OFF_MEMBER + 1:]
    return [head + _MEMBER_BYTE[m] + tail for m in members]


def parse_data(data: bytes, member: int, session: int, flags: int) -> int | None:
    """The sequence number of ``data`` if it is a well-formed DATA datagram
    of ``session`` for ``member`` with exactly ``flags`` (sealed or not), else
    None (then :func:`decode` says what it is).  Never raises."""
    n = len(data)
    if n < HEADER_LEN or data[OFF_OPCODE] != DATA:
        return None
    ver, _op, m, f, sid, length, _ep, rsv, seq = _unpack_header(data)
    if (m == member and sid == session and ver == VERSION and not rsv and f == flags
            and n == HEADER_LEN + length + (TAG_LEN if f & F_SEALED else 0)):
        return seq
    return None


def decode(data: bytes) -> Header | DecodeError:
    """Parse and validate a datagram's header against its size.

    Returns a :class:`Header` or the :class:`DecodeError` saying why the
    datagram is malformed.  Never raises for any input.
    """
    n = len(data)
    if n < HEADER_LEN:
        return DecodeError.TRUNCATED
    version, opcode, member, flags, session, length, epoch, reserved, seq = _unpack_header(data)
    if version != VERSION:
        return DecodeError.VERSION
    if opcode not in OPCODES:
        return DecodeError.OPCODE
    if flags & ~KNOWN_FLAGS or reserved:
        return DecodeError.FLAGS
    expected = HEADER_LEN + length + (TAG_LEN if flags & F_SEALED else 0)
    if n != expected:
        return DecodeError.TRUNCATED if n < expected else DecodeError.LENGTH
    if member == 0:
        return DecodeError.MEMBER
    if session == 0:
        return DecodeError.SESSION
    if opcode != DATA:
        size = CONTROL_SIZES[opcode]
        if length != size and (opcode not in VARIABLE_SIZE or length < size):
            return DecodeError.PAYLOAD
    return Header(opcode, member, session, seq, length, flags, epoch, version)


# --- control payloads -----------------------------------------------------

# CONNECT: initiator's timestamp (us) and its requested keepalive interval (ms)
CONNECT = struct.Struct("!QH")
# CONNECT_ACK: echo of the initiator's timestamp, responder's own timestamp
CONNECT_ACK = struct.Struct("!QQ")
# ACK: echo of the responder's timestamp
ACK = struct.Struct("!Q")
# CLOSE: reason code
CLOSE = struct.Struct("!B")
# KEEPALIVE and KEEPALIVE_ACK ("probe"):
#   ts_us        sender's clock when sent (microseconds, wraps at 2**64)
#   echo_ts_us   ts_us of the last probe received from the peer on this subflow
#   echo_delay_us  time that echoed probe waited here before this one left
#   tx_packets   packets the sender has sent on this subflow, this one included
#   rx_loss_ppm  loss the sender measured on the peer->sender direction of this
#                subflow, parts per million; 0xFFFFFFFF = not measured yet
PROBE = struct.Struct("!QQIQI")
LOSS_UNKNOWN = 0xFFFFFFFF
# NACK: the receiver asks for DATA sequence numbers it is missing
#   base_seq     the lowest sequence number asked for
#   bitmap       bit i (least significant = 0) set: base_seq + i is missing;
#                bit 0 is always set, so one NACK names 1..64 numbers
NACK = struct.Struct("!QQ")
NACK_SPAN = 64


def nack_encode(seqs) -> bytes:
    """NACK payload for ascending ``seqs`` that all lie in ``seqs[0] .. seqs[0] + 63``."""
    base = seqs[0]
    bits = 0
    for s in seqs:
        d = s - base
        if not 0 <= d < NACK_SPAN:
            raise ValueError("NACK sequence numbers must lie within 64 of the first")
        bits |= 1 << d
    return NACK.pack(base, bits)


def nack_decode(payload) -> list[int]:
    """The sequence numbers a NACK payload names (ascending; empty if base is 0)."""
    base, bits = NACK.unpack(payload)
    if base == 0:
        return []
    out = []
    i = 0
    while bits:
        if bits & 1:
            s = base + i
            if s > MAX_SEQ:
                break
            out.append(s)
        bits >>= 1
        i += 1
    return out

# TEST: every link-test message starts with
#   kind     1 LOAD, 2 REPORT, 3 PULL, 4 END (see mpvpn.core.linktest)
#   test_id  the test run (chosen by the side that runs the test)
#   phase    index of the phase within the run
#   about    the member the message is about (LOAD: the member it travels on)
# followed by the kind's body (mpvpn.core.linktest); a LOAD is padded to the size
# of a full data packet.
TEST_HEAD = struct.Struct("!BIBB")

CONTROL_SIZES = {
    int(Op.CONNECT): CONNECT.size,
    int(Op.CONNECT_ACK): CONNECT_ACK.size,
    int(Op.ACK): ACK.size,
    int(Op.CLOSE): CLOSE.size,
    int(Op.CLOSE_ACK): 0,
    int(Op.KEEPALIVE): PROBE.size,
    int(Op.KEEPALIVE_ACK): PROBE.size,
    int(Op.NACK): NACK.size,
    int(Op.TEST): TEST_HEAD.size,  # the minimum: TEST is in VARIABLE_SIZE
}
# Control opcodes whose payload may be longer than CONTROL_SIZES (a minimum then).
VARIABLE_SIZE = frozenset({int(Op.TEST)})


class CloseReason(IntEnum):
    NORMAL = 0  # administrative close / subflow removed
    SHUTDOWN = 1  # whole session ending
    DEAD = 2  # sender had declared the subflow dead


def payload_of(data: bytes, hdr: Header) -> memoryview:
    """The payload bytes (plaintext or ciphertext+tag) of a decoded datagram."""
    return memoryview(data)[HEADER_LEN:]
