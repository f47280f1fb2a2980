"""Noise Protocol Framework (revision 34) handshakes for the control connection.

Two handshake patterns, both ``25519_ChaChaPoly_BLAKE2s``:

* ``NNpsk0`` -- PSK-only mode.  Mutual authentication by the 32-byte
  pre-shared key (mixed in before anything else, so a first message from
  someone without the PSK is rejected after one AEAD check and no X25519
  operation), forward secrecy from the two ephemeral keys::

      -> psk, e
      <- e, ee

* ``KKpsk0`` -- optional mode where both sides also hold X25519 static key
  pairs and know the peer's public key beforehand::

      -> s
      <- s
      ...
      -> psk, e, es, ss
      <- e, ee, se

This is a small, literal transcription of the specification's
``CipherState`` / ``SymmetricState`` / ``HandshakeState`` objects (sections
5.1-5.3, 9 "Pre-shared symmetric keys", and 12.1/12.3/12.7 for 25519,
ChaChaPoly and BLAKE2s).
Every primitive comes from the ``cryptography`` package: X25519,
ChaCha20-Poly1305, BLAKE2s, HMAC and (for the data-plane keys) HKDF-SHA256.
The implementation is checked against the published cacophony test vectors
(``tests/data/noise_vectors.json``) and, when installed, against the
``noiseprotocol`` package.

Sans-I/O: bytes in, bytes out; no sockets, clocks or threads.  Randomness:
ephemeral and static keys from ``X25519PrivateKey.generate()`` (OpenSSL's
CSPRNG), PSKs from ``os.urandom``.

Errors: :meth:`Handshake.read_message` raises :class:`HandshakeError` and
nothing else for any input bytes; a failed ``read_message`` leaves the
handshake state exactly as it was, so a forged or corrupted message cannot
kill a pending handshake (the genuine message can still follow).
:meth:`CipherState.decrypt_with_ad` raises :class:`DecryptError` for any
input that does not authenticate.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          PublicFormat)

__all__ = [
    "NoiseError",
    "HandshakeError",
    "DecryptError",
    "NonceExhausted",
    "CipherState",
    "SessionKeys",
    "Handshake",
    "PATTERNS",
    "MAX_MESSAGE_LEN",
    "KEY_LEN",
    "TAG_LEN",
    "generate_keypair",
    "public_key",
    "genpsk",
    "load_psk",
    "psk_id",
    "x25519_operations",
]

MAX_MESSAGE_LEN = 65535  # Noise: no message (handshake or transport) is longer
KEY_LEN = 32  # DHLEN for 25519, cipher key length, PSK length
HASH_LEN = 32  # BLAKE2s
TAG_LEN = 16  # ChaChaPoly
MAX_NONCE = (1 << 64) - 1  # reserved by the spec (used by rekey only)

# Data-plane key derivation (ours, outside Noise): HKDF-SHA256 over the two
# Split() keys, salted with the handshake hash, one label per direction.
DATA_KEY_INFO_I2R = b"mpvpn v1 data key initiator->responder"
DATA_KEY_INFO_R2I = b"mpvpn v1 data key responder->initiator"
PSK_ID_LABEL = b"mpvpn v1 psk id"
PSK_ID_LEN = 8

# Handshake patterns: (pre-messages initiator, pre-messages responder, messages).
# Tokens exactly as in the spec; psk modifier applied.
PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "NNpsk0": ((), (), (("psk", "e"), ("e", "ee"))),
    "KKpsk0": (("s",), ("s",), (("psk", "e", "es", "ss"), ("e", "ee", "se"))),
}
_SUITE = "25519_ChaChaPoly_BLAKE2s"


class NoiseError(Exception):
    """Base class of this module's errors."""


class HandshakeError(NoiseError):
    """A handshake message was rejected (or the API was used out of turn)."""


class DecryptError(NoiseError):
    """A transport message did not authenticate (or the receive nonce is spent)."""


class NonceExhausted(NoiseError):
    """The send nonce reached 2**64-1: rekey or run a new handshake."""


# --- primitive functions (spec section 4 / 12) ------------------------------

def _hash(data: bytes) -> bytes:
    h = hashes.Hash(hashes.BLAKE2s(HASH_LEN))
    h.update(data)
    return h.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    m = hmac.HMAC(key, hashes.BLAKE2s(HASH_LEN))
    m.update(data)
    return m.finalize()


def _hkdf(chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (spec 4.3): HMAC-BLAKE2s based, 2 or 3 outputs."""
    temp_key = _hmac(chaining_key, ikm)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    out3 = _hmac(temp_key, out2 + b"\x03")
    return out1, out2, out3


def _nonce(n: int) -> bytes:
    # ChaChaPoly: 32 bits of zeros followed by the little-endian 64-bit counter.
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


# X25519 operations (key generation and DH) done by handshakes in this
# process: the costly part of a handshake, read with x25519_operations().
_x25519_ops = 0


def x25519_operations() -> int:
    """How many X25519 operations (ephemeral key generations and DH
    exchanges) :class:`Handshake` objects of this process have done so far.
    The control layer must do none for a first message that fails its cheap
    checks (MAC, freshness); tests and status read this counter."""
    return _x25519_ops


def _generate() -> X25519PrivateKey:
    global _x25519_ops
    _x25519_ops += 1
    return X25519PrivateKey.generate()


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    global _x25519_ops
    _x25519_ops += 1
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise HandshakeError("invalid X25519 public key") from exc


def _private_key(raw: bytes, what: str) -> X25519PrivateKey:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} raw bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- key helpers -------------------------------------------------------------

def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private32, public32)`` raw bytes."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return raw, _public_bytes(private)


def public_key(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a raw 32-byte private key."""
    return _public_bytes(_private_key(private, "private key"))


def genpsk() -> str:
    """A new pre-shared key: base64 of 32 random bytes (what ``mpvpn genpsk`` prints)."""
    return base64.b64encode(os.urandom(KEY_LEN)).decode("ascii")


def load_psk(text: str | bytes) -> bytes:
    """Decode and validate a base64 PSK; returns its 32 bytes.

    Raises ValueError with a message that says what is wrong, never
    echoing the key itself.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("psk: not base64 (non-ASCII characters)") from None
    if not isinstance(text, str):
        raise ValueError("psk: expected a base64 string")
    text = text.strip()
    if not text:
        raise ValueError("psk: empty; generate one with `mpvpn genpsk`")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("psk: not valid base64; generate one with `mpvpn genpsk`") from None
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"psk: decodes to {len(raw)} bytes, must be exactly {KEY_LEN}; "
            "generate one with `mpvpn genpsk`")
    return raw


def psk_id(psk: bytes) -> bytes:
    """A short public identifier of a PSK (8 bytes), for a server to pick the
    right PSK among many clients before the handshake.  Reveals nothing
    useful about the key (truncated BLAKE2s of a label and the key) but is a
    stable, linkable identifier: send it in the clear only where that is
    acceptable, and bind it into the prologue."""
    if len(psk) != KEY_LEN:
        raise ValueError(f"psk must be {KEY_LEN} bytes")
    return _hash(PSK_ID_LABEL + bytes(psk))[:PSK_ID_LEN]


# --- CipherState (spec 5.1) -------------------------------------------------

class CipherState:
    """A ChaChaPoly key and a 64-bit nonce counter.

    ``encrypt_with_ad`` / ``decrypt_with_ad`` follow the spec: without a key
    they pass the plaintext through; the nonce increments after each
    successful operation; an authentication failure leaves ``n`` unchanged;
    once ``n`` reaches 2**64-1 further operations fail.
    """

    __slots__ = ("_k", "_aead", "n")

    def __init__(self, key: bytes | None = None, n: int = 0):
        self._k = None
        self._aead = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)
        self.n = n

    def initialize_key(self, key: bytes | None) -> None:
        if key is None:
            self._k = None
            self._aead = None
        else:
            if len(key) != KEY_LEN:
                raise ValueError(f"cipher key must be {KEY_LEN} bytes")
            self._k = bytes(key)
            self._aead = ChaCha20Poly1305(self._k)
        self.n = 0

    def has_key(self) -> bool:
        return self._k is not None

    def set_nonce(self, n: int) -> None:
        if not 0 <= n <= MAX_NONCE:
            raise ValueError("nonce out of range")
        self.n = n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        if self.n >= MAX_NONCE:
            raise NonceExhausted("send nonce exhausted; rekey or run a new handshake")
        if len(plaintext) + TAG_LEN > MAX_MESSAGE_LEN:
            raise ValueError(f"plaintext too long for one Noise message ({len(plaintext)} bytes)")
        out = self._aead.encrypt(_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= MAX_NONCE:
            raise DecryptError("receive nonce exhausted")
        if not TAG_LEN <= len(ciphertext) <= MAX_MESSAGE_LEN:
            raise DecryptError("bad ciphertext length")
        try:
            out = self._aead.decrypt(_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise DecryptError("authentication failed") from None
        self.n += 1
        return out

    def rekey(self) -> None:
        """Spec 4.2 REKEY: k = first 32 bytes of ENCRYPT(k, 2**64-1, "", zeros).

        The nonce counter is left as it is (spec 5.1 Rekey())."""
        if self._aead is None:
            raise NoiseError("rekey without a key")
        new = self._aead.encrypt(_nonce(MAX_NONCE), bytes(KEY_LEN), b"")[:KEY_LEN]
        self._k = new
        self._aead = ChaCha20Poly1305(new)

    def __repr__(self):
        return f"CipherState(keyed={self._k is not None}, n={self.n})"


# --- SymmetricState (spec 5.2) ----------------------------------------------

class _SymmetricState:
    __slots__ = ("ck", "h", "cs")

    def __init__(self, protocol_name: bytes):
        if len(protocol_name) <= HASH_LEN:
            self.h = protocol_name + bytes(HASH_LEN - len(protocol_name))
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cs = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        temp_k1, temp_k2 = _hkdf(self.ck, b"", 2)
        return temp_k1[:KEY_LEN], temp_k2[:KEY_LEN]

    # transactional read_message support
    def snapshot(self):
        return (self.ck, self.h, self.cs._k, self.cs.n)

    def restore(self, snap) -> None:
        self.ck, self.h, k, n = snap
        self.cs.initialize_key(k)
        self.cs.n = n


# --- session keys -------------------------------------------------------------

class SessionKeys:
    """What a completed handshake yields.

    * ``send`` / ``recv``: Noise CipherStates for the (ordered, reliable)
      control channel, one per direction.
    * ``data_send_key`` / ``data_recv_key``: 32-byte ChaCha20-Poly1305 keys
      for sealing SMPU datagrams (``mpvpn.core.seal``), derived with HKDF-SHA256
      from both Split() keys, salted with the handshake hash, one info label
      per direction -- independent of the control keys.  The initiator's
      ``data_send_key`` is the responder's ``data_recv_key``.
    * ``handshake_hash``: the Noise channel binding value ``h``.
    """

    __slots__ = ("send", "recv", "data_send_key", "data_recv_key", "handshake_hash", "initiator")

    def __init__(self, send, recv, data_send_key, data_recv_key, handshake_hash, initiator):
        self.send = send
        self.recv = recv
        self.data_send_key = data_send_key
        self.data_recv_key = data_recv_key
        self.handshake_hash = handshake_hash
        self.initiator = initiator

    def __repr__(self):  # never print keys
        return f"SessionKeys(initiator={self.initiator}, send={self.send!r}, recv={self.recv!r})"


def _data_key(k1: bytes, k2: bytes, h: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=h, info=info).derive(k1 + k2)


# --- HandshakeState (spec 5.3) ----------------------------------------------

class Handshake:
    """One side of a Noise ``NNpsk0`` or ``KKpsk0`` handshake.

    ``Handshake(pattern, initiator, psk, prologue, s=None, rs=None, e=None)``

    * ``psk``: the 32-byte pre-shared key (both patterns).
    * ``prologue``: bytes both sides must agree on (bind protocol version,
      role and any cleartext identifiers here).
    * ``s``: our X25519 static private key (32 raw bytes), ``KKpsk0`` only.
    * ``rs``: the peer's X25519 static public key (32 raw bytes), ``KKpsk0`` only.
    * ``e``: a fixed ephemeral private key -- for test vectors only.

    The initiator calls ``write_message`` then ``read_message``; the
    responder the reverse.  After that ``complete`` is true and ``split()``
    returns the :class:`SessionKeys`.
    """

    max_message_len = MAX_MESSAGE_LEN

    def __init__(self, pattern: str, initiator: bool, psk: bytes, prologue: bytes = b"",
                 s: bytes | None = None, rs: bytes | None = None, e: bytes | None = None):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown handshake pattern {pattern!r} (use one of {sorted(PATTERNS)})")
        if not isinstance(psk, (bytes, bytearray)) or len(psk) != KEY_LEN:
            raise ValueError(f"psk must be {KEY_LEN} bytes")
        pre_i, pre_r, messages = PATTERNS[pattern]
        needs_static = bool(pre_i or pre_r) or any(
            t in ("s", "es", "se", "ss") for m in messages for t in m)
        if needs_static:
            if s is None or rs is None:
                raise ValueError(f"{pattern} needs our static private key s and the peer's public key rs")
        elif s is not None or rs is not None:
            raise ValueError(f"{pattern} takes no static keys")
        self.pattern = pattern
        self.protocol_name = f"Noise_{pattern}_{_SUITE}".encode("ascii")
        self.initiator = bool(initiator)
        self._psk = bytes(psk)
        self._s = _private_key(s, "s") if s is not None else None
        self._s_pub = _public_bytes(self._s) if self._s is not None else None
        if rs is not None and (not isinstance(rs, (bytes, bytearray)) or len(rs) != KEY_LEN):
            raise ValueError(f"rs must be {KEY_LEN} raw bytes")
        self._rs = bytes(rs) if rs is not None else None
        self._e = _private_key(e, "e") if e is not None else None
        self._e_pub = _public_bytes(self._e) if self._e is not None else None
        self._re: bytes | None = None
        self._messages = messages
        self._index = 0  # next message pattern to process
        self._keys: SessionKeys | None = None

        self._ss = _SymmetricState(self.protocol_name)
        self._ss.mix_hash(bytes(prologue))
        # Pre-messages: initiator's keys first, then the responder's.
        for owner_is_initiator, tokens in ((True, pre_i), (False, pre_r)):
            for token in tokens:
                if token != "s":  # pragma: no cover - only "s" pre-messages are defined here
                    raise ValueError(f"unsupported pre-message token {token}")
                local = owner_is_initiator == self.initiator
                self._ss.mix_hash(self._s_pub if local else self._rs)

    # -- state ------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._index >= len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """The current handshake hash ``h`` (the channel binding once complete)."""
        return self._ss.h

    @property
    def remote_static(self) -> bytes | None:
        return self._rs

    def _my_turn(self) -> bool:
        # message 0 is the initiator's, 1 the responder's, ...
        return (self._index % 2 == 0) == self.initiator

    # -- token processing ----------------------------------------------------------
    def _dh_for(self, token: str) -> bytes:
        # es: initiator DH(e, rs) / responder DH(s, re); se: the mirror; ee, ss plain.
        if token == "ee":
            return _dh(self._e, self._re)
        if token == "ss":
            return _dh(self._s, self._rs)
        if token == "es":
            return _dh(self._e, self._rs) if self.initiator else _dh(self._s, self._re)
        if token == "se":
            return _dh(self._s, self._re) if self.initiator else _dh(self._e, self._rs)
        raise AssertionError(token)  # pragma: no cover

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message carrying ``payload`` (encrypted
        once a key is available, which with ``psk0`` is from the start)."""
        if self.complete:
            raise HandshakeError("handshake already complete")
        if not self._my_turn():
            raise HandshakeError("not our turn to write")
        tokens = self._messages[self._index]
        # Check the size before touching any state (conservative: assumes a
        # key, hence a tag, for every encrypted field).
        overhead = sum(KEY_LEN if t == "e" else KEY_LEN + TAG_LEN if t == "s" else 0
                       for t in tokens) + TAG_LEN
        if len(payload) + overhead > MAX_MESSAGE_LEN:
            raise HandshakeError("handshake message would exceed 65535 bytes")
        ss = self._ss
        out = bytearray()
        for token in tokens:
            if token == "e":
                if self._e is None:
                    self._e = _generate()
                    self._e_pub = _public_bytes(self._e)
                out += self._e_pub
                ss.mix_hash(self._e_pub)
                ss.mix_key(self._e_pub)  # psk modifier: "e" also calls MixKey
            elif token == "s":  # pragma: no cover - not in our patterns' messages
                out += ss.encrypt_and_hash(self._s_pub)
            elif token == "psk":
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_for(token))
        out += ss.encrypt_and_hash(bytes(payload))
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its payload.

        Raises :class:`HandshakeError` (only) if the message is rejected for
        any reason; the handshake state is then unchanged."""
        if self.complete:
            raise HandshakeError("handshake already complete")
        if self._my_turn():
            raise HandshakeError("not our turn to read")
        try:
            message = bytes(memoryview(message))
        except Exception:
            raise HandshakeError("message is not bytes-like") from None
        if len(message) > MAX_MESSAGE_LEN:
            raise HandshakeError("handshake message longer than 65535 bytes")
        snap = self._ss.snapshot()
        saved = (self._re, self._rs)
        try:
            payload = self._read(message)
        except HandshakeError:
            self._ss.restore(snap)
            self._re, self._rs = saved
            raise
        except Exception as exc:  # defensive: nothing else may escape
            self._ss.restore(snap)
            self._re, self._rs = saved
            raise HandshakeError(f"malformed handshake message ({type(exc).__name__})") from None
        self._index += 1
        return payload

    def _read(self, message: bytes) -> bytes:
        ss = self._ss
        pos = 0
        for token in self._messages[self._index]:
            if token == "e":
                if len(message) - pos < KEY_LEN:
                    raise HandshakeError("handshake message too short")
                re = message[pos:pos + KEY_LEN]
                pos += KEY_LEN
                self._re = re
                ss.mix_hash(re)
                ss.mix_key(re)  # psk modifier
            elif token == "s":  # pragma: no cover - not in our patterns' messages
                n = KEY_LEN + (TAG_LEN if ss.cs.has_key() else 0)
                if len(message) - pos < n:
                    raise HandshakeError("handshake message too short")
                try:
                    self._rs = ss.decrypt_and_hash(message[pos:pos + n])
                except DecryptError:
                    raise HandshakeError("handshake authentication failed") from None
                pos += n
            elif token == "psk":
                ss.mix_key_and_hash(self._psk)
            else:
                ss.mix_key(self._dh_for(token))
        rest = message[pos:]
        if ss.cs.has_key() and len(rest) < TAG_LEN:
            raise HandshakeError("handshake message too short")
        try:
            return ss.decrypt_and_hash(rest)
        except DecryptError:
            raise HandshakeError("handshake authentication failed (wrong PSK or key?)") from None

    # -- result -----------------------------------------------------------------------
    def split(self) -> SessionKeys:
        """The session keys; only once the handshake is complete."""
        if not self.complete:
            raise HandshakeError("handshake not complete")
        if self._keys is None:
            k1, k2 = self._ss.split()
            h = self._ss.h
            i2r = _data_key(k1, k2, h, DATA_KEY_INFO_I2R)
            r2i = _data_key(k1, k2, h, DATA_KEY_INFO_R2I)
            c1, c2 = CipherState(k1), CipherState(k2)
            if self.initiator:
                self._keys = SessionKeys(c1, c2, i2r, r2i, h, True)
            else:
                self._keys = SessionKeys(c2, c1, r2i, i2r, h, False)
            # The ephemeral private key is no longer needed.
            self._e = None
        return self._keys

    def __repr__(self):
        return (f"Handshake({self.pattern}, initiator={self.initiator}, "
                f"message={self._index}/{len(self._messages)})")
