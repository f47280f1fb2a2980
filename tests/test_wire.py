"""SMPU header encoding and the validation of untrusted datagrams."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import wire
from mpvpn.core.wire import DecodeError, Op


def test_header_layout_is_the_documented_one():
    d = wire.encode(Op.DATA, member=2, session=0x01020304, seq=5, payload=b"ab")
    assert d == bytes.fromhex("01 10 02 00 01020304 0002 00 00 0000000000000005 6162")
    assert wire.HEADER_LEN == 20


def test_roundtrip_every_opcode_with_its_payload_size():
    for op in Op:
        size = 7 if op == Op.DATA else wire.CONTROL_SIZES[op]
        d = wire.encode(op, 9, 0xDEADBEEF, 2**64 - 1, bytes(range(size)), epoch=3)
        h = wire.decode(d)
        assert isinstance(h, wire.Header), op
        assert (h.opcode, h.member, h.session, h.seq, h.length, h.epoch) == (
            op, 9, 0xDEADBEEF, 2**64 - 1, size, 3)
        assert bytes(wire.payload_of(d, h)) == bytes(range(size))


def test_sealed_datagram_counts_the_tag_outside_the_length():
    body = b"x" * 30 + b"T" * wire.TAG_LEN
    d = wire.encode(Op.DATA, 1, 1, 1, body, flags=wire.F_SEALED)
    h = wire.decode(d)
    assert h.length == 30 and h.flags == wire.F_SEALED
    # the same bytes without the SEALED flag no longer add up
    bad = bytearray(d)
    bad[3] = 0
    assert wire.decode(bytes(bad)) is DecodeError.LENGTH


def _data(**kw):
    fields = dict(version=1, opcode=0x10, member=1, flags=0, session=7, length=3, epoch=0,
                  reserved=0, seq=1)
    fields.update(kw)
    return struct.pack("!BBBBIHBBQ", *fields.values()) + b"abc"


@pytest.mark.parametrize("data,why", [
    (b"", DecodeError.TRUNCATED),
    (_data()[:19], DecodeError.TRUNCATED),
    (_data()[:-1], DecodeError.TRUNCATED),
    (_data() + b"!", DecodeError.LENGTH),
    (_data(length=60000), DecodeError.TRUNCATED),
    (_data(version=2), DecodeError.VERSION),
    (_data(version=0), DecodeError.VERSION),
    (_data(opcode=0x42), DecodeError.OPCODE),
    (_data(flags=0x80), DecodeError.FLAGS),
    (_data(reserved=1), DecodeError.FLAGS),
    (_data(member=0), DecodeError.MEMBER),
    (_data(session=0), DecodeError.SESSION),
    (_data(opcode=int(Op.KEEPALIVE)), DecodeError.PAYLOAD),  # 3 bytes is not a probe
    (_data(opcode=int(Op.CLOSE_ACK)), DecodeError.PAYLOAD),
])
def test_malformed_datagrams_are_classified(data, why):
    assert wire.decode(data) is why


def test_encode_refuses_oversized_payload():
    with pytest.raises(ValueError):
        wire.encode(Op.DATA, 1, 1, 1, bytes(wire.MAX_PAYLOAD + 1))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_decode_never_raises_on_random_bytes(data):
    r = wire.decode(data)
    assert isinstance(r, (wire.Header, DecodeError))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Op)), st.integers(1, 255), st.integers(1, 2**32 - 1),
       st.integers(0, 2**64 - 1), st.data())
def test_any_bit_flip_in_the_header_is_either_caught_or_changes_a_field(op, member, session, seq, data):
    size = 5 if op == Op.DATA else wire.CONTROL_SIZES[op]
    d = bytearray(wire.encode(op, member, session, seq, bytes(size)))
    i = data.draw(st.integers(0, wire.HEADER_LEN - 1))
    bit = data.draw(st.integers(0, 7))
    d[i] ^= 1 << bit
    r = wire.decode(bytes(d))
    if isinstance(r, wire.Header):
        before = (op, member, session, seq, size, 0)
        assert (r.opcode, r.member, r.session, r.seq, r.length, r.epoch) != before


def test_nack_payload_names_up_to_64_sequence_numbers():
    p = wire.nack_encode([100, 101, 163])
    assert len(p) == wire.NACK.size == wire.CONTROL_SIZES[Op.NACK] == 16
    assert wire.nack_decode(p) == [100, 101, 163]
    assert wire.NACK.unpack(p) == (100, (1 << 0) | (1 << 1) | (1 << 63))
    with pytest.raises(ValueError):
        wire.nack_encode([100, 164])
    assert wire.nack_decode(wire.NACK.pack(0, 0xFF)) == []  # base 0 names nothing
    top = wire.nack_decode(wire.NACK.pack(wire.MAX_SEQ - 1, 0xFFFFFFFFFFFFFFFF))
    assert top == [wire.MAX_SEQ - 1, wire.MAX_SEQ]  # never beyond 2**64-1
    d = wire.encode(Op.NACK, 2, 9, 1, p)
    h = wire.decode(d)
    assert h.opcode == Op.NACK and bytes(wire.payload_of(d, h)) == p
    assert wire.decode(wire.encode(Op.NACK, 2, 9, 1, p[:8])) is DecodeError.PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**64 - 65), st.sets(st.integers(0, 63), min_size=1))
def test_nack_roundtrip(base, offsets):
    seqs = sorted(base + o for o in offsets)
    assert wire.nack_decode(wire.nack_encode(seqs)) == seqs


def test_test_opcode_has_a_minimum_length_not_a_fixed_one():
    head = wire.TEST_HEAD.pack(1, 7, 0, 2)
    for pad in (0, 1, 1400):
        h = wire.decode(wire.encode(Op.TEST, 2, 5, 9, head + bytes(pad)))
        assert isinstance(h, wire.Header) and h.length == len(head) + pad
    assert wire.decode(wire.encode(Op.TEST, 2, 5, 9, head[:-1])) is wire.DecodeError.PAYLOAD
    # other control opcodes stay exact
    assert wire.decode(wire.encode(Op.NACK, 2, 5, 9, bytes(wire.NACK.size + 1))) is wire.DecodeError.PAYLOAD


def test_field_offsets_match_the_header_struct():
    """The OFF_* offsets (used by the C loops and the sealer) are where
    HEADER.pack puts each field."""
    fields = ["OFF_VERSION", "OFF_OPCODE", "OFF_MEMBER", "OFF_FLAGS", "OFF_SESSION",
              "OFF_LENGTH", "OFF_EPOCH", "OFF_RESERVED", "OFF_SEQ"]
    fmt = wire.HEADER.format.lstrip("!")
    assert len(fmt) == len(fields)
    for i, name in enumerate(fields):
        assert getattr(wire, name) == struct.calcsize("!" + fmt[:i]), name
    h = wire.HEADER.pack(1, 0x10, 7, 1, 0xA1B2C3D4, 0x0506, 9, 0, 0x0102030405060708)
    assert h[wire.OFF_MEMBER] == 7 and h[wire.OFF_EPOCH] == 9 and h[wire.OFF_FLAGS] == 1
    assert h[wire.OFF_SESSION:wire.OFF_SESSION + 4] == bytes.fromhex("a1b2c3d4")
    assert h[wire.OFF_LENGTH:wire.OFF_LENGTH + 2] == bytes.fromhex("0506")
    assert h[wire.OFF_SEQ:] == bytes(range(1, 9))


@given(st.integers(1, 255), st.integers(1, 2**32 - 1), st.integers(0, wire.MAX_SEQ),
       st.binary(max_size=64))
def test_data_builder_and_parser_agree_with_decode(member, session, seq, payload):
    d = wire.data_datagram(member, session, seq, payload)
    h = wire.decode(d)
    assert (h.opcode, h.member, h.session, h.seq, h.length, h.flags) == (
        wire.DATA, member, session, seq, len(payload), 0)
    assert d[:wire.HEADER_LEN] == wire.data_header(member, session, seq, len(payload))
    assert wire.parse_data(d, member, session, 0) == seq
    assert d[wire.HEADER_LEN:] == payload
    other = member % 255 + 1
    assert wire.parse_data(d, other, session, 0) is None  # another subflow's
    assert wire.parse_data(d, member, session % (2**32 - 1) + 1, 0) is None  # another session's
    assert wire.parse_data(d, member, session, wire.F_SEALED) is None  # not sealed
    moved = wire.with_member(d, other)
    assert wire.parse_data(moved, other, session, 0) == seq
    assert moved[wire.HEADER_LEN:] == payload


@given(st.binary(max_size=64), st.integers(1, 255), st.integers(1, 2**32 - 1),
       st.sampled_from([0, wire.F_SEALED]))
def test_parse_data_accepts_only_what_decode_calls_that_data(data, member, session, flags):
    seq = wire.parse_data(data, member, session, flags)
    if seq is not None:
        h = wire.decode(data)
        assert h.opcode == wire.DATA and h.member == member and h.session == session
        assert h.flags == flags and h.seq == seq


def test_sealed_data_header_lengths():
    h = wire.data_header(3, 5, 9, 100, wire.F_SEALED, 2)
    d = h + bytes(100 + wire.TAG_LEN)
    assert wire.parse_data(d, 3, 5, wire.F_SEALED) == 9
    assert wire.parse_data(d[:-1], 3, 5, wire.F_SEALED) is None


@given(st.lists(st.integers(1, 255), max_size=4), st.integers(1, 2**32 - 1),
       st.integers(0, wire.MAX_SEQ), st.binary(max_size=32))
def test_the_batch_copier_makes_what_the_single_one_makes(members, session, seq, payload):
    d = wire.data_datagram(1, session, seq, payload)
    assert wire.with_members(d, members) == [wire.with_member(d, m) for m in members]
