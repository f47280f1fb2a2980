"""Datagram AEAD for SMPU ("Sealing" in ``docs/protocol.md``).

Every SMPU datagram after the control handshake is sealed with
ChaCha20-Poly1305 (from ``cryptography``) under per-direction session keys
(``mpvpn.core.noise.SessionKeys.data_send_key`` / ``data_recv_key``):

* The header keeps its layout; ``flags`` gets ``F_SEALED``, ``epoch`` says
  which keys sealed the datagram, ``payload length`` stays the plaintext
  length and a 16-byte tag follows the ciphertext.
* Nonce (96 bits) = ``class u8 | member u8 | 0x0000 | sequence u64`` with the
  sequence big-endian, i.e. exactly header bytes 12..19.  DATA uses class 0
  and member 0; control opcodes use class 1 and their member ID.
* Associated data = the 20 header bytes, with the member byte (byte 2) set
  to 0 for DATA.  So one DATA packet is sealed once and the same sealed
  bytes go out on every subflow with only the member byte patched
  (:func:`with_member`), and the receiver can drop later copies by sequence
  number before decrypting.

Keys are selected by epoch: the current receive epoch and, after
:meth:`Sealer.rotate`, the previous one until :meth:`Sealer.drop_previous`,
so a rekey never interrupts traffic.  :meth:`Sealer.open` never raises; it
returns ``None`` and counts the reason.

Sans-I/O: bytes in, bytes out; no sockets, clocks or threads.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from mpvpn.core import wire

__all__ = ["Sealer", "with_member", "next_epoch", "KEY_LEN", "NONCE_DATA", "NONCE_CONTROL",
           "REKEY_AFTER_PACKETS"]

KEY_LEN = 32
NONCE_DATA = 0  # nonce class byte for DATA
NONCE_CONTROL = 1  # nonce class byte for control opcodes
MIN_EPOCH, MAX_EPOCH = 1, 255  # epoch 0 means "not encrypted" on the wire

#: Packets sealed under one send key before the control connection rekeys
#: (as WireGuard's REKEY_AFTER_MESSAGES; the timer usually comes first).
#: 2**26 keeps AES-256-GCM within the limit of RFC 8446 section 5.5 (and
#: draft-irtf-cfrg-aead-limits): at most about 2**36 16-byte blocks under
#: one key for a 2**-57 advantage.  Our packets are at most 9000 + 36 bytes
#: (the vNIC's largest MTU), 566 blocks with the tag: 2**26 * 566 < 2**35.2.
#: ChaCha20-Poly1305 has no such limit below 2**64 messages; one budget
#: keeps both simple.  The 2**64 nonce space itself is never approached.
REKEY_AFTER_PACKETS = 1 << 26

_HLEN = wire.HEADER_LEN
_TAG = wire.TAG_LEN
_DATA = wire.DATA
_F_SEALED = wire.F_SEALED
_VERSION = wire.VERSION
_pack = wire.HEADER.pack
_MAX_SEQ = wire.MAX_SEQ
_MAX_PAYLOAD = wire.MAX_PAYLOAD
_OFF_SEQ = wire.OFF_SEQ
_OFF_MEMBER = wire.OFF_MEMBER
_OFF_FLAGS = wire.OFF_FLAGS
_OFF_EPOCH = wire.OFF_EPOCH
_OFF_OPCODE = wire.OFF_OPCODE
_data_header = wire.data_header
_DATA_NONCE_PREFIX = b"\x00\x00\x00\x00"  # class 0, member 0, 0x0000
_CTRL_NONCE_PREFIX = [bytes((NONCE_CONTROL, m, 0, 0)) for m in range(256)]
_ZERO = b"\x00"


# A copy of a sealed DATA datagram with the member byte replaced (the tag
# stays valid: DATA's associated data has the member byte zeroed); the one
# implementation lives with the layout in mpvpn.core.wire.
with_member = wire.with_member


def next_epoch(epoch: int) -> int:
    """The epoch after ``epoch``: 1, 2, ..., 255, 1, ... (0 is never used sealed)."""
    return epoch + 1 if epoch < MAX_EPOCH else MIN_EPOCH


CHACHA = "chacha20-poly1305"  # every peer supports it; fast without AES instructions (MIPS)
AES = "aes-256-gcm"  # ~3x faster where the CPU has AES instructions (x86 AES-NI, ARMv8 CE)
CIPHERS = (CHACHA, AES)


def cpu_has_aes(cpuinfo: str | None = None) -> bool:
    """Does this CPU have AES instructions (x86 ``aes`` flag, ARM ``aes`` feature)?"""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and "aes" in value.split():
            return True
    return False


def preferred_ciphers(cpuinfo: str | None = None) -> tuple[str, ...]:
    """Our ciphers, best first for this CPU (both are always offered)."""
    return (AES, CHACHA) if cpu_has_aes(cpuinfo) else (CHACHA, AES)


def choose_cipher(server: tuple, client: tuple) -> str | None:
    """The data-plane cipher for a session: the common first choice if both
    sides have the same one (both have AES instructions, say), else
    ChaCha20-Poly1305 if both have it, else any common one; None if none."""
    common = [c for c in client if c in server and c in CIPHERS]
    if not common:
        return None
    if server and client and server[0] == client[0] and server[0] in common:
        return server[0]
    return CHACHA if CHACHA in common else common[0]


def _aead(key: bytes, what: str, cipher: str = CHACHA):
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes")
    if cipher == CHACHA:
        return ChaCha20Poly1305(bytes(key))
    if cipher == AES:
        return AESGCM(bytes(key))
    raise ValueError(f"unknown cipher {cipher!r}; known: {', '.join(CIPHERS)}")


def _check_epoch(epoch: int) -> int:
    if not isinstance(epoch, int) or not MIN_EPOCH <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be {MIN_EPOCH}..{MAX_EPOCH} (0 means unencrypted)")
    return epoch


class Sealer:
    """Seal and open SMPU datagrams of one session.

    ``Sealer(send_key, recv_key, epoch)``: 32-byte ChaCha20-Poly1305 keys for
    each direction and the epoch (1..255) they belong to.

    Sending: :meth:`seal` (any opcode), :meth:`seal_data` (DATA, once per
    user packet) and :func:`with_member` / :meth:`seal_data_copies` for the
    per-subflow copies.  As a guard against nonce reuse, under one send key
    the DATA sequence and each member's control sequence must strictly
    increase; anything else raises ``ValueError`` (re-send the sealed bytes
    instead of sealing again).

    Receiving: :meth:`open` returns the plaintext or ``None`` (never raises)
    and counts rejections in ``bad_tag``, ``unknown_epoch``, ``not_sealed``
    and ``malformed``.  The caller's duplicate check by sequence number
    belongs *before* ``open`` and its replay state update *after* a
    successful ``open``.

    Rekey: :meth:`rotate` installs the keys of a new epoch and keeps the
    current receive key as the previous epoch until :meth:`drop_previous`.
    :attr:`sealed` counts the packets sealed under the current send key (every
    encryption: DATA once per user packet, each control datagram), so the
    control layer can rekey before the key's budget is used up
    (``REKEY_AFTER_PACKETS``); batch sealers outside this class (the C loops)
    take their sequence numbers with :meth:`reserve_data`, which counts them.
    """

    __slots__ = (
        "cipher", "_send", "send_epoch", "_send_guard_data", "_send_guard_ctrl", "_sealed",
        "_recv", "epoch", "_prev_recv", "prev_epoch", "_pending_send",
        "bad_tag", "unknown_epoch", "not_sealed", "malformed",
    )

    def __init__(self, send_key: bytes, recv_key: bytes, epoch: int, cipher: str = CHACHA):
        _check_epoch(epoch)
        self.cipher = cipher  # the AEAD of this session, for every epoch (same nonce/tag layout)
        self._send = _aead(send_key, "send_key", cipher)
        self.send_epoch = epoch  # epoch written on sealed datagrams
        self._recv = _aead(recv_key, "recv_key", cipher)
        self.epoch = epoch  # newest receive epoch
        self._prev_recv = None
        self.prev_epoch: int | None = None
        self._pending_send = None  # (aead, epoch) waiting for key confirmation
        self._send_guard_data = 0
        self._send_guard_ctrl: dict[int, int] = {}
        self._sealed = 0
        self.bad_tag = 0
        self.unknown_epoch = 0
        self.not_sealed = 0
        self.malformed = 0

    # -- sending ---------------------------------------------------------------
    def seal(self, opcode: int, member: int, session: int, seq: int, payload: bytes) -> bytes:
        """One complete sealed datagram (header with F_SEALED and the epoch,
        ciphertext, tag).  DATA is sealed with member 0 in nonce and AAD but
        carries ``member`` in its header."""
        if opcode == _DATA:
            datagram = self.seal_data(session, seq, payload)
            return datagram if member == 0 else with_member(datagram, member)
        if not 1 <= member <= wire.MAX_MEMBER:
            raise ValueError("member must be 1..255")
        if not self._send_guard_ctrl.get(member, 0) < seq <= _MAX_SEQ:
            raise ValueError(f"control seq {seq} of member {member} not increasing (nonce reuse)"
                             " or out of range")
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes too long")
        header = _pack(_VERSION, opcode, member, _F_SEALED, session, len(payload),
                       self.send_epoch, 0, seq)
        out = header + self._send.encrypt(_CTRL_NONCE_PREFIX[member] + header[_OFF_SEQ:], payload, header)
        self._send_guard_ctrl[member] = seq
        self._sealed += 1
        return out

    def seal_data(self, session: int, seq: int, payload: bytes) -> bytes:
        """Seal one user packet once.  The result carries member 0 (not valid
        on the wire); make each subflow's copy with :func:`with_member`."""
        if not self._send_guard_data < seq <= _MAX_SEQ:
            raise ValueError(f"DATA seq {seq} not increasing (nonce reuse) or out of range")
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes too long")
        header = _data_header(0, session, seq, len(payload), _F_SEALED, self.send_epoch)
        out = header + self._send.encrypt(_DATA_NONCE_PREFIX + header[_OFF_SEQ:], payload, header)
        self._send_guard_data = seq
        self._sealed += 1
        return out

    def reserve_data(self, seq: int, n: int):
        """For a batch sealer outside this class (``mpvpn.core._fastpath``'s
        ``seal_dup``): DATA sequence numbers ``seq`` .. ``seq + n - 1`` are
        about to be sealed with the current send key.  Checks they are new
        under that key (raises ``ValueError`` otherwise, as :meth:`seal_data`
        does), marks them used, counts ``n`` packets in :attr:`sealed`, and
        returns ``(encrypt, epoch)``: the AEAD's ``encrypt(nonce, data, aad)``
        and the epoch to write in their headers.  Nonces and associated data
        must be built exactly as :meth:`seal_data` builds them."""
        if n < 0 or not self._send_guard_data < seq or seq + n - 1 > _MAX_SEQ:
            raise ValueError(f"DATA seq {seq}..{seq + n - 1} not increasing (nonce reuse) "
                             "or out of range")
        if n:
            self._send_guard_data = seq + n - 1
        self._sealed += n
        return self._send.encrypt, self.send_epoch

    @property
    def sealed(self) -> int:
        """Packets sealed under the current send key (0 after a switch)."""
        return self._sealed

    def seal_data_copies(self, session: int, seq: int, payload: bytes, members) -> list[bytes]:
        """Seal one user packet once and return one datagram per member ID."""
        datagram = self.seal_data(session, seq, payload)
        return [with_member(datagram, m) for m in members]

    # -- receiving --------------------------------------------------------------
    def open(self, data: bytes, hdr: wire.Header | None = None) -> bytes | None:
        """Authenticate and decrypt a datagram; the plaintext payload or None.

        ``data`` should already have passed :func:`mpvpn.core.wire.decode` (``hdr``
        is its result and is accepted for convenience).  The nonce, the
        associated data and the key epoch are always read from ``data``
        itself, so a header object that does not belong to ``data`` cannot
        make anything authenticate.  Never raises."""
        try:
            if not isinstance(data, (bytes, bytearray)):
                data = bytes(memoryview(data))
            n = len(data)
            if n >= _HLEN and not data[_OFF_FLAGS] & _F_SEALED:
                self.not_sealed += 1
                return None
            if n < _HLEN + _TAG:
                self.malformed += 1
                return None
            epoch = data[_OFF_EPOCH]
            if epoch == self.epoch:
                aead = self._recv
            elif epoch == self.prev_epoch:
                aead = self._prev_recv
            else:
                self.unknown_epoch += 1
                return None
            if data[_OFF_OPCODE] == _DATA:
                nonce = _DATA_NONCE_PREFIX + data[_OFF_SEQ:_HLEN]
                aad = data[:_OFF_MEMBER] + _ZERO + data[_OFF_MEMBER + 1:_HLEN]
            else:
                nonce = _CTRL_NONCE_PREFIX[data[_OFF_MEMBER]] + data[_OFF_SEQ:_HLEN]
                aad = data[:_HLEN]
            try:
                plaintext = aead.decrypt(nonce, data[_HLEN:], aad)
            except InvalidTag:
                self.bad_tag += 1
                return None
            if aead is self._recv and self._pending_send is not None:
                self._confirm()  # the peer uses the new keys: so can we
            return plaintext
        except Exception:  # defensive: open() must never raise
            self.malformed += 1
            return None

    # -- rekey -------------------------------------------------------------------
    def rotate(self, new_send: bytes, new_recv: bytes, new_epoch: int, *,
               defer_send: bool = False) -> None:
        """Install the keys of ``new_epoch`` (from a fresh handshake).

        Receiving: ``new_epoch`` becomes current; the old current epoch is
        kept as the previous one (still accepted) until :meth:`drop_previous`.

        Sending: switches to the new key at once, unless ``defer_send`` --
        then datagrams keep going out under the old epoch until the first
        datagram of the new epoch from the peer authenticates (proof that
        the peer has the new keys; WireGuard's key confirmation) or
        :meth:`confirm_send` is called.  The handshake *responder* should
        defer: it has the keys before the initiator does."""
        _check_epoch(new_epoch)
        if new_epoch == self.epoch:
            raise ValueError(f"epoch {new_epoch} is already current")
        send = _aead(new_send, "new_send", self.cipher)
        recv = _aead(new_recv, "new_recv", self.cipher)
        self._prev_recv, self.prev_epoch = self._recv, self.epoch
        self._recv, self.epoch = recv, new_epoch
        if defer_send:
            self._pending_send = (send, new_epoch)
        else:
            self._pending_send = None
            self._switch_send(send, new_epoch)

    def confirm_send(self) -> None:
        """Start sending under the newest epoch now (after ``defer_send``)."""
        if self._pending_send is not None:
            self._confirm()

    def _confirm(self) -> None:
        send, epoch = self._pending_send
        self._pending_send = None
        self._switch_send(send, epoch)

    def _switch_send(self, send: ChaCha20Poly1305, epoch: int) -> None:
        self._send, self.send_epoch = send, epoch
        self._send_guard_data = 0
        self._send_guard_ctrl = {}
        self._sealed = 0

    def drop_previous(self) -> None:
        """Forget the previous epoch's receive key (its datagrams now count
        as ``unknown_epoch``).  Call once the overlap period is over."""
        self._prev_recv = None
        self.prev_epoch = None

    def data_decryptors(self):
        """For a batch opener outside this class (``mpvpn.core._fastpath``'s
        ``open_run``): ``(epoch, decrypt, prev_epoch, prev_decrypt)``, the
        AEADs' ``decrypt(nonce, data, aad)`` for the current and (if any) the
        previous receive epoch (``prev_epoch``/``prev_decrypt`` None when
        there is none).  Nonces and associated data must be built as
        :meth:`open` builds them.  Refused (RuntimeError) while a send key
        waits for confirmation: only :meth:`open` may confirm it."""
        if self._pending_send is not None:
            raise RuntimeError("a send key waits for confirmation: use open()")
        prev = self.prev_epoch
        prev_dec = (self._prev_recv.decrypt
                    if prev is not None and self._prev_recv is not None else None)
        return self.epoch, self._recv.decrypt, prev, prev_dec

    @property
    def send_pending(self) -> bool:
        """True while a deferred send key waits for confirmation."""
        return self._pending_send is not None

    def counters(self) -> dict[str, int]:
        return {"bad_tag": self.bad_tag, "unknown_epoch": self.unknown_epoch,
                "not_sealed": self.not_sealed, "malformed": self.malformed}

    def __repr__(self):
        return (f"Sealer(epoch={self.epoch}, send_epoch={self.send_epoch}, "
                f"prev_epoch={self.prev_epoch}, {self.counters()})")
