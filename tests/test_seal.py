"""Tests for mpvpn.core.seal: datagram AEAD per docs/protocol.md "Sealing"."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import wire
from mpvpn.core.noise import Handshake
from mpvpn.core.seal import Sealer, next_epoch, with_member

SESSION = 0x1234ABCD
K_AB, K_BA = os.urandom(32), os.urandom(32)  # A->B and B->A keys


def _pair(epoch=1):
    """A (say the client) and B (the server) with matching per-direction keys."""
    return Sealer(K_AB, K_BA, epoch), Sealer(K_BA, K_AB, epoch)


def _control_payload(op):
    return os.urandom(wire.CONTROL_SIZES[int(op)])


CONTROL_OPS = [op for op in wire.Op if op != wire.Op.DATA]


def _nonce(cls, member, seq):
    """The nonce layout documented in docs/protocol.md, built independently."""
    return struct.pack("!BBHQ", cls, member, 0, seq)


# --- round trips --------------------------------------------------------------

def test_data_round_trip():
    a, b = _pair()
    payload = os.urandom(1400)
    d0 = a.seal_data(SESSION, 1, payload)
    assert len(d0) == wire.HEADER_LEN + 1400 + wire.TAG_LEN
    for member in (1, 2, 255):
        d = with_member(d0, member)
        hdr = wire.decode(d)
        assert isinstance(hdr, wire.Header)
        assert (hdr.opcode, hdr.member, hdr.session, hdr.seq) == (wire.DATA, member, SESSION, 1)
        assert hdr.flags == wire.F_SEALED and hdr.epoch == 1 and hdr.length == 1400
        assert b.open(d, hdr) == payload
    assert b.counters() == {"bad_tag": 0, "unknown_epoch": 0, "not_sealed": 0, "malformed": 0}


def test_seal_generic_data_equals_seal_data_plus_member():
    a, b = _pair()
    d = a.seal(wire.DATA, 3, SESSION, 5, b"payload")
    assert wire.decode(d).member == 3 and b.open(d) == b"payload"
    a2, _ = _pair()
    assert with_member(a2.seal_data(SESSION, 5, b"payload"), 3) == d  # deterministic AEAD


@pytest.mark.parametrize("op", CONTROL_OPS, ids=lambda op: op.name)
def test_control_round_trip(op):
    a, b = _pair()
    payload = _control_payload(op)
    d = a.seal(op, 7, SESSION, 1, payload)
    hdr = wire.decode(d)
    assert isinstance(hdr, wire.Header), hdr
    assert (hdr.opcode, hdr.member, hdr.seq, hdr.flags, hdr.epoch) == (op, 7, 1, wire.F_SEALED, 1)
    assert b.open(d, hdr) == payload
    # and the other direction
    d = b.seal(op, 7, SESSION, 1, payload)
    assert a.open(d, wire.decode(d)) == payload


def test_max_payload_and_empty_payload():
    a, b = _pair()
    big = os.urandom(wire.MAX_PAYLOAD)
    d = with_member(a.seal_data(SESSION, 1, big), 1)
    assert isinstance(wire.decode(d), wire.Header) and b.open(d) == big
    d = a.seal(wire.Op.CLOSE_ACK, 1, SESSION, 1, b"")
    assert b.open(d, wire.decode(d)) == b""


def test_seal_data_copies():
    a, b = _pair()
    copies = a.seal_data_copies(SESSION, 9, b"user packet", [1, 2, 3])
    assert [wire.decode(d).member for d in copies] == [1, 2, 3]
    assert len({d[:2] + d[3:] for d in copies}) == 1  # only the member byte differs
    assert all(b.open(d) == b"user packet" for d in copies)


def test_open_accepts_bytearray_and_memoryview():
    a, b = _pair()
    d = with_member(a.seal_data(SESSION, 1, b"x" * 100), 1)
    assert b.open(bytearray(d)) == b"x" * 100
    assert b.open(memoryview(d)) == b"x" * 100


# --- tampering -----------------------------------------------------------------

def test_every_bit_flip_rejected_data():
    """Any single flipped bit -- header, ciphertext or tag -- is rejected,
    except in DATA's member byte, which is a routing hint (next test)."""
    a, b = _pair()
    d = with_member(a.seal_data(SESSION, 42, os.urandom(64)), 1)
    for i in range(len(d) * 8):
        if i // 8 == 2:
            continue
        bad = bytearray(d)
        bad[i // 8] ^= 1 << (i % 8)
        assert b.open(bytes(bad)) is None, f"bit {i} accepted"
    assert b.open(d) is not None
    c = b.counters()
    assert c["bad_tag"] > 0 and c["not_sealed"] == 1 and c["unknown_epoch"] == 8


def test_every_bit_flip_rejected_control():
    a, b = _pair()
    d = a.seal(wire.Op.KEEPALIVE, 4, SESSION, 17, _control_payload(wire.Op.KEEPALIVE))
    for i in range(len(d) * 8):
        bad = bytearray(d)
        bad[i // 8] ^= 1 << (i % 8)
        assert b.open(bytes(bad)) is None, f"bit {i} accepted"
    assert b.open(d) is not None


def test_data_member_is_a_routing_hint_control_member_is_authenticated():
    a, b = _pair()
    d = a.seal_data(SESSION, 1, b"data")
    for m in range(256):
        assert b.open(with_member(d, m)) == b"data"
    c = a.seal(wire.Op.ACK, 1, SESSION, 1, _control_payload(wire.Op.ACK))
    assert b.open(c) is not None
    for m in range(256):
        if m != 1:
            assert b.open(with_member(c, m)) is None
    assert b.bad_tag == 255


def test_wrong_key_and_reflection_rejected():
    a, b = _pair()
    d = with_member(a.seal_data(SESSION, 1, b"secret"), 1)
    assert Sealer(os.urandom(32), os.urandom(32), 1).open(d) is None  # wrong key
    assert a.open(d) is None  # reflected back to its sender: other direction's key
    assert Sealer(K_BA, K_AB, 2).open(d) is None  # right key, wrong epoch
    assert b.open(d) == b"secret"


def test_session_and_seq_are_authenticated():
    a, b = _pair()
    d = bytearray(with_member(a.seal_data(SESSION, 1, b"p"), 1))
    d[4:8] = (SESSION + 1).to_bytes(4, "big")  # other session
    assert b.open(bytes(d)) is None
    d = bytearray(with_member(a.seal_data(SESSION, 2, b"p"), 1))
    d[12:20] = (3).to_bytes(8, "big")  # other sequence number
    assert b.open(bytes(d)) is None


def test_rejection_counters_by_reason():
    a, b = _pair()
    plain = wire.encode(wire.Op.ACK, 1, SESSION, 1, bytes(8))
    assert b.open(plain, wire.decode(plain)) is None and b.not_sealed == 1
    d = bytearray(a.seal(wire.Op.ACK, 1, SESSION, 1, bytes(8)))
    d[10] = 99  # epoch never installed
    assert b.open(bytes(d)) is None and b.unknown_epoch == 1
    d = bytearray(a.seal(wire.Op.ACK, 1, SESSION, 2, bytes(8)))
    d[-1] ^= 1
    assert b.open(bytes(d)) is None and b.bad_tag == 1
    assert b.open(b"short") is None and b.malformed == 1
    assert b.counters() == {"bad_tag": 1, "unknown_epoch": 1, "not_sealed": 1, "malformed": 1}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), sealed=st.booleans(), epoch=st.sampled_from([0, 1, 2]))
def test_random_bytes_never_raise(data, sealed, epoch):
    b = Sealer(K_BA, K_AB, 1)
    b.rotate(os.urandom(32), os.urandom(32), 2)
    if len(data) > 10:
        d = bytearray(data)
        if sealed:
            d[3] |= wire.F_SEALED
        d[10] = epoch
        data = bytes(d)
    assert b.open(data) is None
    assert sum(b.counters().values()) == 1


def test_garbage_types_never_raise():
    b = Sealer(K_BA, K_AB, 1)
    for junk in (None, 12, "string" * 10, object()):
        assert b.open(junk) is None
    assert b.malformed == 4


# --- nonces ----------------------------------------------------------------------

def test_nonce_layout_is_as_documented():
    """Decrypt with a raw ChaCha20Poly1305 using the documented nonce and AAD."""
    a, _ = _pair()
    raw = ChaCha20Poly1305(K_AB)
    d = with_member(a.seal_data(SESSION, 0x0102030405060708, b"data"), 9)
    aad = d[:2] + b"\x00" + d[3:20]
    assert raw.decrypt(_nonce(0, 0, 0x0102030405060708), d[20:], aad) == b"data"
    c = a.seal(wire.Op.CONNECT, 9, SESSION, 77, bytes(10))
    assert raw.decrypt(_nonce(1, 9, 77), c[20:], c[:20]) == bytes(10)


def test_control_nonces_never_repeat_across_subflows():
    """Every subflow's control counter starts at 1, yet (class, member, seq)
    makes each nonce unique under the one send key: the same plaintext gives
    unrelated ciphertexts, and no two nonces coincide."""
    a, b = _pair()
    payload = bytes(wire.PROBE.size)
    nonces, bodies = set(), set()
    for member in range(1, 6):
        for seq in range(1, 21):
            d = a.seal(wire.Op.KEEPALIVE, member, SESSION, seq, payload)
            assert b.open(d) == payload
            nonces.add(_nonce(1, member, seq))
            bodies.add(d[20:])
    data_nonces = set()
    for seq in range(1, 21):
        a.seal_data(SESSION, seq, payload)
        data_nonces.add(_nonce(0, 0, seq))
    assert len(nonces) == 100 and len(bodies) == 100
    assert not nonces & data_nonces  # class byte separates DATA from control


def test_nonce_reuse_guard():
    a, _ = _pair()
    a.seal_data(SESSION, 5, b"x")
    with pytest.raises(ValueError):
        a.seal_data(SESSION, 5, b"y")
    with pytest.raises(ValueError):
        a.seal_data(SESSION, 4, b"y")
    a.seal(wire.Op.ACK, 1, SESSION, 3, bytes(8))
    with pytest.raises(ValueError):
        a.seal(wire.Op.ACK, 1, SESSION, 3, bytes(8))
    a.seal(wire.Op.ACK, 2, SESSION, 3, bytes(8))  # other member: other nonce
    with pytest.raises(ValueError):
        a.seal(wire.Op.ACK, 0, SESSION, 4, bytes(8))
    with pytest.raises(ValueError):
        a.seal_data(SESSION, wire.MAX_SEQ + 1, b"y")
    with pytest.raises(ValueError):
        a.seal_data(SESSION, 6, bytes(wire.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        a.seal(wire.Op.ACK, 3, SESSION, 1, bytes(wire.MAX_PAYLOAD + 1))
    assert a.seal_data(SESSION, wire.MAX_SEQ, b"last")  # the top sequence number is fine


# --- epochs and rekey --------------------------------------------------------------

def test_rotation_with_overlap():
    a, b = _pair(epoch=1)
    in_flight = with_member(a.seal_data(SESSION, 1, b"old"), 1)
    k2_ab, k2_ba = os.urandom(32), os.urandom(32)
    a.rotate(k2_ab, k2_ba, 2)
    b.rotate(k2_ba, k2_ab, 2)
    new = with_member(a.seal_data(SESSION, 2, b"new"), 2)
    assert wire.decode(new).epoch == 2
    assert b.open(new) == b"new"
    assert b.open(in_flight) == b"old"  # previous epoch still accepted
    b.drop_previous()
    assert b.open(in_flight) is None and b.unknown_epoch == 1
    assert b.open(new) == b"new"
    with pytest.raises(ValueError):
        b.rotate(os.urandom(32), os.urandom(32), 2)  # already current


def test_deferred_send_switches_on_key_confirmation():
    """The handshake responder installs new keys first; it keeps sending on the
    old epoch until the initiator's first datagram of the new epoch arrives."""
    client, server = _pair(epoch=1)
    # real keys from a fresh Noise handshake
    init = Handshake("NNpsk0", True, bytes(32), b"rekey")
    resp = Handshake("NNpsk0", False, bytes(32), b"rekey")
    resp.read_message(init.write_message())
    m2 = resp.write_message()
    rk = resp.split()
    server.rotate(rk.data_send_key, rk.data_recv_key, 2, defer_send=True)
    assert server.send_pending and server.send_epoch == 1 and server.epoch == 2
    d = server.seal(wire.Op.KEEPALIVE, 1, SESSION, 1, bytes(32))
    assert wire.decode(d).epoch == 1
    assert client.open(d) is not None  # client has not even got the keys yet
    init.read_message(m2)
    ik = init.split()
    client.rotate(ik.data_send_key, ik.data_recv_key, 2)
    assert client.open(d) is not None  # old epoch, still accepted
    d = client.seal(wire.Op.KEEPALIVE, 1, SESSION, 1, bytes(32))
    assert server.open(d) is not None
    assert not server.send_pending and server.send_epoch == 2
    d = server.seal(wire.Op.KEEPALIVE, 1, SESSION, 1, bytes(32))  # fresh nonce space
    assert wire.decode(d).epoch == 2 and client.open(d) is not None


def test_confirm_send_and_forged_new_epoch_does_not_confirm():
    a, b = _pair()
    b.rotate(os.urandom(32), os.urandom(32), 2, defer_send=True)
    forged = bytearray(with_member(a.seal_data(SESSION, 1, b"x"), 1))
    forged[10] = 2
    assert b.open(bytes(forged)) is None and b.send_pending
    b.confirm_send()
    assert not b.send_pending and b.send_epoch == 2


def test_epoch_validation_and_next_epoch():
    for bad in (0, 256, -1):
        with pytest.raises(ValueError):
            Sealer(K_AB, K_BA, bad)
    with pytest.raises(ValueError):
        Sealer(K_AB[:16], K_BA, 1)
    assert next_epoch(1) == 2 and next_epoch(254) == 255 and next_epoch(255) == 1


def test_aes_gcm_sessions_work_and_do_not_open_chacha_datagrams():
    import os as _os

    from mpvpn.core import seal as sealmod

    k1, k2 = _os.urandom(32), _os.urandom(32)
    a = sealmod.Sealer(k1, k2, 1, cipher=sealmod.AES)
    b = sealmod.Sealer(k2, k1, 1, cipher=sealmod.AES)
    d = sealmod.with_member(a.seal_data(9, 1, b"payload"), 2)
    assert b.open(d) == b"payload"
    b.rotate(_os.urandom(32), _os.urandom(32), 2)  # a rekey keeps the session's cipher
    assert b.cipher == sealmod.AES and b.open(d) == b"payload"  # previous epoch still opens
    wrong = sealmod.Sealer(k2, k1, 1)  # ChaCha20 with the same keys
    assert wrong.open(d) is None and wrong.bad_tag == 1
    with pytest.raises(ValueError):
        sealmod.Sealer(k1, k2, 1, cipher="rot13")


def test_cpu_detection_and_preference():
    from mpvpn.core import seal as sealmod

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n"
    mips = "system type\t\t: MediaTek MT7621\ncpu model\t\t: MIPS 1004Kc\n"
    assert sealmod.preferred_ciphers(x86) == (sealmod.AES, sealmod.CHACHA)
    assert sealmod.preferred_ciphers(arm) == (sealmod.AES, sealmod.CHACHA)
    assert sealmod.preferred_ciphers(mips) == (sealmod.CHACHA, sealmod.AES)
    assert sealmod.choose_cipher((sealmod.AES, sealmod.CHACHA), ("other",)) is None


# --- the send key's usage count (rekey by volume) -------------------------------------------


def test_sealed_counts_every_encryption_under_the_send_key():
    a, b = _pair()
    assert a.sealed == 0
    a.seal_data(7, 1, b"x")
    a.seal(int(CONTROL_OPS[0]), 3, 7, 1, _control_payload(CONTROL_OPS[0]))
    a.seal_data_copies(7, 2, b"y", [1, 2, 3])  # one encryption, three copies
    assert a.sealed == 3
    encrypt, epoch = a.reserve_data(3, 10)
    assert epoch == 1 and a.sealed == 13
    with pytest.raises(ValueError):
        a.reserve_data(12, 2)  # 12 was reserved: a nonce would repeat
    with pytest.raises(ValueError):
        a.seal_data(7, 12, b"z")
    with pytest.raises(ValueError):
        a.reserve_data(13, -1)
    a.reserve_data(13, 0)  # an empty batch reserves nothing
    # what reserve_data hands out seals exactly as seal_data does
    hdr = wire.HEADER.pack(wire.VERSION, wire.DATA, 0, wire.F_SEALED, 7, 1, epoch, 0, 3)
    d = hdr + encrypt(b"\x00" * 4 + hdr[12:], b"q", hdr)
    assert b.open(d) == b"q"
    assert a.seal_data(7, 13, b"r") and a.sealed == 14
    # a new send key starts from zero (initiator at once, responder on confirmation)
    k3, k4 = os.urandom(32), os.urandom(32)
    a.rotate(k3, k4, 2)
    assert a.sealed == 0 and a.send_epoch == 2
    b.seal_data(7, 1, b"s")
    b.rotate(k4, k3, 2, defer_send=True)
    b.seal_data(7, 2, b"t")
    assert b.sealed == 2 and b.send_epoch == 1  # still the old key
    b.confirm_send()
    assert b.sealed == 0 and b.send_epoch == 2


def test_the_budget_keeps_aes_gcm_within_its_usage_limit():
    """RFC 8446 5.5 / draft-irtf-cfrg-aead-limits: about 2**36 blocks under
    one AES-GCM key for a 2**-57 advantage; our largest packet is 9000 bytes
    (vNIC MTU) plus header and tag."""
    from mpvpn.agent import config
    from mpvpn.core import controlconn, seal

    blocks = -(-(9000 + wire.HEADER_LEN + wire.TAG_LEN) // 16)
    assert seal.REKEY_AFTER_PACKETS * (blocks + 1) < 2 ** 36
    assert controlconn.ControlConfig.rekey_packets == seal.REKEY_AFTER_PACKETS
    assert int(config.OPTIONS["base"]["rekey_packets"].default) == seal.REKEY_AFTER_PACKETS


def test_data_decryptors_open_what_seal_data_sealed_and_refuse_during_a_pending_rekey():
    a = Sealer(K_AB, K_BA, 1)
    b = Sealer(K_BA, K_AB, 1)
    d = with_member(a.seal_data(7, 1, b"hello"), 2)
    epoch, dec, prev, prev_dec = b.data_decryptors()
    assert (epoch, prev, prev_dec) == (1, None, None)
    nonce = b"\x00" * 4 + d[wire.OFF_SEQ:wire.HEADER_LEN]
    aad = d[:wire.OFF_MEMBER] + b"\x00" + d[wire.OFF_MEMBER + 1:wire.HEADER_LEN]
    assert dec(nonce, d[wire.HEADER_LEN:], aad) == b"hello"
    b.rotate(os.urandom(32), os.urandom(32), 2)
    epoch, _dec, prev, prev_dec = b.data_decryptors()
    assert (epoch, prev) == (2, 1)
    assert prev_dec(nonce, d[wire.HEADER_LEN:], aad) == b"hello"  # the old epoch still opens
    b.rotate(os.urandom(32), os.urandom(32), 3, defer_send=True)
    assert b.send_pending
    with pytest.raises(RuntimeError):
        b.data_decryptors()  # only open() may confirm the new send key
