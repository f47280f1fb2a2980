"""Tests for mpvpn.core.noise: published vectors, interop, rejection, key helpers."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvpn.core import noise
from mpvpn.core.noise import (MAX_MESSAGE_LEN, CipherState, DecryptError, Handshake, HandshakeError,
                              NonceExhausted, generate_keypair, genpsk, load_psk, psk_id,
                              public_key)

VECTORS = json.loads((Path(__file__).parent / "data" / "noise_vectors.json").read_text())["vectors"]
PSK = bytes(range(32))
PROLOGUE = b"mpvpn test prologue"


def _hx(v, key):
    return bytes.fromhex(v[key]) if key in v else None


def _vector_pair(v):
    pattern = v["protocol_name"].split("_")[1]
    init = Handshake(pattern, True, _hx(v, "init_psk"), _hx(v, "init_prologue"),
                     s=_hx(v, "init_static"), rs=_hx(v, "init_remote_static"),
                     e=_hx(v, "init_ephemeral"))
    resp = Handshake(pattern, False, _hx(v, "resp_psk"), _hx(v, "resp_prologue"),
                     s=_hx(v, "resp_static"), rs=_hx(v, "resp_remote_static"),
                     e=_hx(v, "resp_ephemeral"))
    return init, resp


def _pair(pattern="NNpsk0", psk_i=PSK, psk_r=PSK, prologue_i=PROLOGUE, prologue_r=PROLOGUE):
    if pattern == "KKpsk0":
        si, pi = generate_keypair()
        sr, pr = generate_keypair()
        init = Handshake(pattern, True, psk_i, prologue_i, s=si, rs=pr)
        resp = Handshake(pattern, False, psk_r, prologue_r, s=sr, rs=pi)
    else:
        init = Handshake(pattern, True, psk_i, prologue_i)
        resp = Handshake(pattern, False, psk_r, prologue_r)
    return init, resp


def _complete(pattern="NNpsk0"):
    init, resp = _pair(pattern)
    resp.read_message(init.write_message(b"hello"))
    init.read_message(resp.write_message(b"welcome"))
    return init, resp


# --- published test vectors ---------------------------------------------------

def test_vector_file_has_both_suites():
    names = {v["protocol_name"] for v in VECTORS}
    assert names == {"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s", "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s"}


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["protocol_name"])
def test_published_vector(v):
    """Byte-exact against cacophony's vectors: both handshake messages and
    the following transport messages, in both roles."""
    init, resp = _vector_pair(v)
    msgs = v["messages"]
    # handshake: initiator -> responder, responder -> initiator
    for n, (writer, reader) in enumerate(((init, resp), (resp, init))):
        payload = bytes.fromhex(msgs[n]["payload"])
        ct = writer.write_message(payload)
        assert ct.hex() == msgs[n]["ciphertext"]
        assert reader.read_message(ct) == payload
    assert init.complete and resp.complete
    assert init.handshake_hash == resp.handshake_hash
    ki, kr = init.split(), resp.split()
    assert ki.handshake_hash == kr.handshake_hash == init.handshake_hash
    # transport messages alternate, starting with the initiator
    for n, m in enumerate(msgs[2:]):
        send, recv = (ki.send, kr.recv) if n % 2 == 0 else (kr.send, ki.recv)
        payload = bytes.fromhex(m["payload"])
        ct = send.encrypt_with_ad(b"", payload)
        assert ct.hex() == m["ciphertext"]
        assert recv.decrypt_with_ad(b"", ct) == payload


# --- round trips and key schedule -------------------------------------------

@pytest.mark.parametrize("pattern", ["NNpsk0", "KKpsk0"])
def test_round_trip_and_keys(pattern):
    init, resp = _pair(pattern)
    m1 = init.write_message(b"client hello")
    assert resp.read_message(m1) == b"client hello"
    assert not init.complete and not resp.complete
    m2 = resp.write_message(b"server hello")
    assert init.read_message(m2) == b"server hello"
    assert init.complete and resp.complete
    assert len(m1) == 32 + len(b"client hello") + 16
    assert init.handshake_hash == resp.handshake_hash and len(init.handshake_hash) == 32

    ki, kr = init.split(), resp.split()
    assert init.split() is ki  # idempotent
    # control channel, both directions, with associated data
    assert kr.recv.decrypt_with_ad(b"ad", ki.send.encrypt_with_ad(b"ad", b"ping")) == b"ping"
    assert ki.recv.decrypt_with_ad(b"", kr.send.encrypt_with_ad(b"", b"pong")) == b"pong"
    # data keys: pairwise equal across sides, all distinct, independent of control keys
    assert ki.data_send_key == kr.data_recv_key
    assert ki.data_recv_key == kr.data_send_key
    keys = {ki.data_send_key, ki.data_recv_key, ki.send._k, ki.recv._k}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    # the data keys work with a plain ChaCha20Poly1305
    ct = ChaCha20Poly1305(ki.data_send_key).encrypt(bytes(12), b"x", b"")
    assert ChaCha20Poly1305(kr.data_recv_key).decrypt(bytes(12), ct, b"") == b"x"
    assert ki.data_send_key.hex() not in repr(ki)  # keys never printed


@pytest.mark.parametrize("pattern,reading_msg1", [("NNpsk0", 0), ("KKpsk0", 2)])
def test_x25519_operations_are_counted(pattern, reading_msg1):
    """The control layer's promise (no X25519 for a first message that
    fails its cheap checks) is tested with this counter."""
    init, resp = _pair(pattern)
    n0 = noise.x25519_operations()
    m1 = init.write_message(b"")
    n1 = noise.x25519_operations()
    assert n1 - n0 == 1 + reading_msg1  # e, plus es and ss for KK
    resp.read_message(m1)
    assert noise.x25519_operations() - n1 == reading_msg1  # NNpsk0: psk check only
    with pytest.raises(noise.HandshakeError):
        _pair(pattern)[1].read_message(m1[:-1] + bytes([m1[-1] ^ 1]))
    n2 = noise.x25519_operations()
    init.read_message(resp.write_message(b""))
    assert noise.x25519_operations() - n2 == (3 if pattern == "NNpsk0" else 5)


def test_fresh_ephemerals_give_fresh_keys():
    a, _ = _complete()
    b, _ = _complete()
    assert a.split().data_send_key != b.split().data_send_key
    assert a.handshake_hash != b.handshake_hash


def test_kk_remote_static_and_public_key():
    priv, pub = generate_keypair()
    assert public_key(priv) == pub and len(priv) == len(pub) == 32
    init, resp = _complete("KKpsk0")
    assert init.remote_static is not None and resp.remote_static is not None


# --- rejection ---------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["NNpsk0", "KKpsk0"])
def test_wrong_psk_rejected_by_responder(pattern):
    other = bytes(32)
    if pattern == "KKpsk0":
        si, pi = generate_keypair()
        sr, pr = generate_keypair()
        init = Handshake(pattern, True, PSK, PROLOGUE, s=si, rs=pr)
        resp = Handshake(pattern, False, other, PROLOGUE, s=sr, rs=pi)
    else:
        init, resp = _pair(pattern, psk_r=other)
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b""))
    assert not resp.complete


def test_wrong_static_key_rejected():
    si, pi = generate_keypair()
    sr, pr = generate_keypair()
    _, wrong = generate_keypair()
    init = Handshake("KKpsk0", True, PSK, PROLOGUE, s=si, rs=pr)
    resp = Handshake("KKpsk0", False, PSK, PROLOGUE, s=sr, rs=wrong)
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b""))


def test_prologue_mismatch_rejected():
    init, resp = _pair(prologue_r=b"other")
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b""))


@pytest.mark.parametrize("pattern", ["NNpsk0", "KKpsk0"])
def test_every_bit_flip_rejected(pattern):
    init, resp = _pair(pattern)
    m1 = init.write_message(b"payload")
    for i in range(len(m1) * 8):
        bad = bytearray(m1)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(HandshakeError):
            resp.read_message(bytes(bad))
    # state untouched by all those failures: the genuine message still works
    assert resp.read_message(m1) == b"payload"
    m2 = resp.write_message(b"reply")
    for i in range(len(m2) * 8):
        bad = bytearray(m2)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(HandshakeError):
            init.read_message(bytes(bad))
    assert init.read_message(m2) == b"reply"
    assert init.split().data_send_key == resp.split().data_recv_key


def test_forged_response_does_not_kill_pending_handshake():
    init, resp = _pair()
    assert resp.read_message(init.write_message()) == b""
    m2 = resp.write_message()
    with pytest.raises(HandshakeError):
        init.read_message(os.urandom(len(m2)))
    assert init.read_message(m2) == b""
    assert init.complete


def test_truncated_and_oversized_messages():
    init, resp = _pair()
    m1 = init.write_message(b"abc")
    for n in range(len(m1)):
        with pytest.raises(HandshakeError):
            resp.read_message(m1[:n])
    with pytest.raises(HandshakeError):
        resp.read_message(m1 + b"\x00")
    with pytest.raises(HandshakeError):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))
    assert resp.read_message(m1) == b"abc"


def test_low_order_point_rejected():
    init, resp = _pair()
    resp.read_message(init.write_message())
    # an all-zero ephemeral is a low-order point: X25519 gives an all-zero secret
    with pytest.raises(HandshakeError):
        init.read_message(bytes(32) + bytes(16))


@pytest.mark.parametrize("pattern", ["NNpsk0", "KKpsk0"])
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_handshake_error(pattern, data):
    init, resp = _pair(pattern)
    with pytest.raises(HandshakeError):
        resp.read_message(data)
    init.write_message()  # now the initiator waits for message 2
    with pytest.raises(HandshakeError):
        init.read_message(data)


def test_non_bytes_input_only_raises_handshake_error():
    _, resp = _pair()
    for junk in (None, 5, "text", object()):
        with pytest.raises(HandshakeError):
            resp.read_message(junk)
    init, resp = _pair()
    assert resp.read_message(bytearray(init.write_message(b"x"))) == b"x"


def test_out_of_turn_and_after_completion():
    init, resp = _pair()
    with pytest.raises(HandshakeError):
        init.read_message(b"x" * 64)  # initiator must write first
    with pytest.raises(HandshakeError):
        resp.write_message()  # responder must read first
    with pytest.raises(HandshakeError):
        init.split()
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    with pytest.raises(HandshakeError):
        init.write_message()
    with pytest.raises(HandshakeError):
        resp.read_message(b"")


def test_max_message_len_guard():
    assert Handshake.max_message_len == MAX_MESSAGE_LEN == 65535
    init, resp = _pair()
    with pytest.raises(HandshakeError):
        init.write_message(bytes(MAX_MESSAGE_LEN - 48 + 1))  # e(32) + tag(16) + payload
    assert not init.complete  # failed write left no trace
    m1 = init.write_message(bytes(MAX_MESSAGE_LEN - 48))
    assert len(m1) == MAX_MESSAGE_LEN
    assert len(resp.read_message(m1)) == MAX_MESSAGE_LEN - 48


def test_constructor_validation():
    with pytest.raises(ValueError):
        Handshake("XX", True, PSK)
    with pytest.raises(ValueError):
        Handshake("NNpsk0", True, PSK[:31])
    with pytest.raises(ValueError):
        Handshake("KKpsk0", True, PSK)  # needs s and rs
    priv, pub = generate_keypair()
    with pytest.raises(ValueError):
        Handshake("NNpsk0", True, PSK, s=priv, rs=pub)
    with pytest.raises(ValueError):
        Handshake("KKpsk0", True, PSK, s=priv[:5], rs=pub)
    with pytest.raises(ValueError):
        Handshake("KKpsk0", True, PSK, s=priv, rs=pub + b"x")


# --- CipherState semantics -----------------------------------------------------

def test_cipherstate_nonce_counter_and_replay():
    init, resp = _complete()
    send, recv = init.split().send, resp.split().recv
    c0 = send.encrypt_with_ad(b"", b"zero")
    c1 = send.encrypt_with_ad(b"", b"one")
    assert send.n == 2
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"", c1)  # out of order: counter says 0
    assert recv.n == 0  # failure does not advance
    assert recv.decrypt_with_ad(b"", c0) == b"zero"
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"", c0)  # replay
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"other ad", c1)  # wrong associated data
    assert recv.decrypt_with_ad(b"", c1) == b"one"
    for junk in (b"", b"x" * 15, bytes(MAX_MESSAGE_LEN + 1)):
        with pytest.raises(DecryptError):
            recv.decrypt_with_ad(b"", junk)


def test_cipherstate_nonce_exhaustion():
    key = os.urandom(32)
    a, b = CipherState(key), CipherState(key)
    a.set_nonce(noise.MAX_NONCE - 1)
    b.set_nonce(noise.MAX_NONCE - 1)
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(NonceExhausted):
        a.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(DecryptError):
        b.decrypt_with_ad(b"", bytes(32))
    with pytest.raises(ValueError):
        a.set_nonce(1 << 64)


def test_cipherstate_without_key_passes_through():
    cs = CipherState()
    assert not cs.has_key()
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"


def test_rekey_matches_spec_and_interoperates():
    key = os.urandom(32)
    a, b = CipherState(key), CipherState(key)
    a.encrypt_with_ad(b"", b"x")
    a.rekey()
    # REKEY(k) = ENCRYPT(k, 2^64-1, zerolen, zeros)[:32]; n unchanged
    expected = ChaCha20Poly1305(key).encrypt(bytes(4) + b"\xff" * 8, bytes(32), b"")[:32]
    assert a._k == expected and a.n == 1
    b.decrypt_with_ad(b"", CipherState(key).encrypt_with_ad(b"", b"x"))
    b.rekey()
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"after")) == b"after"


# --- key helpers -----------------------------------------------------------------

def test_genpsk_load_psk_round_trip():
    text = genpsk()
    raw = load_psk(text)
    assert len(raw) == 32 and base64.b64encode(raw).decode() == text
    assert load_psk("  " + text + "\n") == raw
    assert load_psk(text.encode()) == raw
    assert genpsk() != text


@pytest.mark.parametrize("bad, why", [
    ("", "empty"),
    ("not base64!!", "base64"),
    (base64.b64encode(bytes(31)).decode(), "31 bytes"),
    (base64.b64encode(bytes(33)).decode(), "33 bytes"),
    (base64.b64encode(bytes(64)).decode(), "64 bytes"),
    (b"\xff\xfe", "base64"),
])
def test_load_psk_errors(bad, why):
    with pytest.raises(ValueError, match=why):
        load_psk(bad)


def test_load_psk_error_does_not_echo_key():
    secret = base64.b64encode(b"S" * 31).decode()
    with pytest.raises(ValueError) as info:
        load_psk(secret)
    assert secret not in str(info.value)


def test_psk_id():
    a, b = load_psk(genpsk()), load_psk(genpsk())
    assert len(psk_id(a)) == 8 and psk_id(a) == psk_id(a) and psk_id(a) != psk_id(b)
    assert psk_id(a) not in a


# --- interop with the noiseprotocol package (test-only dependency) ---------------

def _their(pattern, initiator, psk, prologue, s=None, rs=None):
    connection = pytest.importorskip("noise.connection")
    c = connection.NoiseConnection.from_name(f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2s".encode())
    c.set_as_initiator() if initiator else c.set_as_responder()
    c.set_psks(psk)
    c.set_prologue(prologue)
    if s is not None:
        c.set_keypair_from_private_bytes(connection.Keypair.STATIC, s)
        c.set_keypair_from_public_bytes(connection.Keypair.REMOTE_STATIC, rs)
    c.start_handshake()
    return c


@pytest.mark.parametrize("pattern", ["NNpsk0", "KKpsk0"])
@pytest.mark.parametrize("we_initiate", [True, False])
def test_interop_noiseprotocol(pattern, we_initiate):
    psk = os.urandom(32)
    si, pi = generate_keypair()
    sr, pr = generate_keypair()
    kk = pattern == "KKpsk0"
    ours = Handshake(pattern, we_initiate, psk, PROLOGUE,
                     s=(si if we_initiate else sr) if kk else None,
                     rs=(pr if we_initiate else pi) if kk else None)
    theirs = _their(pattern, not we_initiate, psk, PROLOGUE,
                    s=(sr if we_initiate else si) if kk else None,
                    rs=(pi if we_initiate else pr) if kk else None)
    if we_initiate:
        assert theirs.read_message(ours.write_message(b"m1")) == b"m1"
        assert ours.read_message(theirs.write_message(b"m2")) == b"m2"
    else:
        assert ours.read_message(theirs.write_message(b"m1")) == b"m1"
        assert theirs.read_message(ours.write_message(b"m2")) == b"m2"
    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    keys = ours.split()
    for i in range(3):
        assert theirs.decrypt(keys.send.encrypt_with_ad(b"", b"to them %d" % i)) == b"to them %d" % i
        assert keys.recv.decrypt_with_ad(b"", theirs.encrypt(b"to us %d" % i)) == b"to us %d" % i


def test_interop_wrong_psk_fails_against_noiseprotocol():
    ours = Handshake("NNpsk0", True, os.urandom(32), PROLOGUE)
    theirs = _their("NNpsk0", False, os.urandom(32), PROLOGUE)
    with pytest.raises(Exception):
        theirs.read_message(ours.write_message(b""))
