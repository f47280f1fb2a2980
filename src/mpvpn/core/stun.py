"""STUN (RFC 8489) messages and a per-uplink Binding client, sans-I/O.

Two layers:

* The codec: :func:`decode` turns one datagram into a :class:`Message` or
  raises :class:`StunError` (a ``ValueError``) saying what is wrong;
  :func:`encode` builds a datagram, optionally with MESSAGE-INTEGRITY
  (HMAC-SHA1), MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.  Every length is
  checked against the bytes actually present; attribute values are padded
  to 4 bytes (padding content is ignored on input, zero on output).
  The attribute helpers (:func:`decode_address`, :func:`encode_address`,
  :func:`decode_error_code`, ...) are shared with :mod:`mpvpn.core.turn`.
* :class:`BindingClient`: one per uplink.  Bytes and ``now`` in, datagrams
  and the next deadline out; it never touches a socket or a clock.  It
  learns the uplink's public mapping (XOR-MAPPED-ADDRESS) from the
  configured servers and classifies the NAT's mapping behaviour from two
  mappings (two servers, or one server's RFC 5780 OTHER-ADDRESS):
  ``none`` / ``endpoint-independent`` / ``endpoint-dependent`` /
  ``unknown``.  Malformed, oversized, unsolicited or misdirected answers are
  counted drops (``drops`` by reason), never exceptions.

Retransmission follows RFC 8489 section 6.2.1 (:class:`Retransmit`): the
request goes out at 0, RTO, 3 RTO, 7 RTO ... (Rc sends, the interval
doubling), and the transaction fails Rm * RTO after the last send; with the
defaults (RTO 0.5 s, Rc 7, Rm 16) at 39.5 s.

Only the standard library is used (hmac, hashlib, zlib, ipaddress, os); see
docs/nat.md for why.  Usernames and passwords are used as given (UTF-8); the
OpaqueString/SASLprep preparation of RFC 8265/4013 is not applied, so
credentials should be ASCII.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E
MAX_MESSAGE = HEADER_LEN + 0xFFFC   # the 16-bit length, a multiple of 4
MAX_ATTRIBUTES = 128                # more is not a message we want to walk

# classes
REQUEST, INDICATION, SUCCESS, ERROR = 0b00, 0b01, 0b10, 0b11
CLASS_NAMES = {REQUEST: "request", INDICATION: "indication", SUCCESS: "success", ERROR: "error"}

# methods (RFC 8489, RFC 8656)
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# attributes
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C

FAMILY_IPV4, FAMILY_IPV6 = 0x01, 0x02
MAX_REASON_BYTES = 763      # ERROR-CODE reason phrase (RFC 8489 14.8)
MAX_SOFTWARE_BYTES = 763
MAX_USERNAME_BYTES = 513
MAX_REALM_BYTES = 763
MAX_NONCE_BYTES = 763

Addr = tuple  # (ip: str, port: int)


class StunError(ValueError):
    """A datagram is not a well-formed STUN message (the text says why)."""


# --------------------------------------------------------------------------
# header


def message_type(method: int, cls: int) -> int:
    if not 0 <= method <= 0xFFF or cls not in CLASS_NAMES:
        raise ValueError("method must be 0..0xfff, class 0..3")
    return ((method & 0x00F) | ((method & 0x070) << 1) | ((method & 0xF80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def split_type(mtype: int) -> tuple[int, int]:
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)
    return method, cls


def looks_like_stun(data: bytes) -> bool:
    """Cheap demultiplexing test for a datagram on a shared socket: the top
    two bits zero, the magic cookie, a length that matches (RFC 8489 §7)."""
    return (len(data) >= HEADER_LEN and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES
            and len(data) == HEADER_LEN + ((data[2] << 8) | data[3]) and data[3] & 3 == 0)


# --------------------------------------------------------------------------
# messages


@dataclass
class Message:
    """A decoded (or to-be-encoded) STUN message.

    ``attrs`` keeps every attribute in wire order as ``(type, value)``.
    For a decoded message ``raw`` is the datagram and ``offsets[i]`` is where
    attribute ``i``'s header starts in it (for integrity checks)."""

    method: int
    cls: int
    txid: bytes
    attrs: list = field(default_factory=list)
    raw: bytes = b""
    offsets: list = field(default_factory=list)

    def get(self, atype: int) -> bytes | None:
        """First value of an attribute, or None."""
        for t, v in self.attrs:
            if t == atype:
                return v
        return None

    def get_all(self, atype: int) -> list[bytes]:
        return [v for t, v in self.attrs if t == atype]

    def has(self, atype: int) -> bool:
        return any(t == atype for t, _ in self.attrs)

    def _index(self, atype: int) -> int | None:
        for i, (t, _) in enumerate(self.attrs):
            if t == atype:
                return i
        return None

    # ---- integrity -------------------------------------------------------

    def _covered(self, atype: int, tag_len: int) -> tuple[bytes, bytes] | None:
        """(bytes the tag covers with the length patched, the tag) for the
        first ``atype`` attribute of a decoded message, or None."""
        i = self._index(atype)
        if i is None or not self.raw:
            return None
        off = self.offsets[i]
        value = self.attrs[i][1]
        if len(value) != tag_len:
            return None
        length = off - HEADER_LEN + 4 + tag_len
        covered = self.raw[:2] + struct.pack("!H", length) + self.raw[4:off]
        return covered, value

    def check_integrity(self, key: bytes) -> bool:
        """True iff the message has a MESSAGE-INTEGRITY that is right for
        ``key`` (RFC 8489 14.5; the short-term key is the password, the
        long-term key :func:`long_term_key`)."""
        got = self._covered(MESSAGE_INTEGRITY, 20)
        if got is None:
            return False
        covered, tag = got
        return hmac.compare_digest(hmac.new(key, covered, hashlib.sha1).digest(), tag)

    def check_integrity_sha256(self, key: bytes) -> bool:
        """True iff MESSAGE-INTEGRITY-SHA256 (full 32-byte tag) is right."""
        got = self._covered(MESSAGE_INTEGRITY_SHA256, 32)
        if got is None:
            return False
        covered, tag = got
        return hmac.compare_digest(hmac.new(key, covered, hashlib.sha256).digest(), tag)

    def check_fingerprint(self) -> bool | None:
        """None without FINGERPRINT, else whether its CRC-32 is right."""
        got = self._covered(FINGERPRINT, 4)
        if got is None:
            return None if not self.has(FINGERPRINT) else False
        covered, value = got
        return struct.unpack("!I", value)[0] == fingerprint_of(covered)


def fingerprint_of(data: bytes) -> int:
    return (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def long_term_key(username: str, realm: str, password: str, algorithm: str = "md5") -> bytes:
    """Key for the long-term credential mechanism (RFC 8489 9.2.2)."""
    text = f"{username}:{realm}:{password}".encode()
    if algorithm == "md5":
        return hashlib.md5(text).digest()  # noqa: S324 - mandated by the RFC
    if algorithm == "sha256":
        return hashlib.sha256(text).digest()
    raise ValueError(f"unknown password algorithm {algorithm!r}")


def new_txid(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    txid = rng(12)
    if len(txid) != 12:
        raise ValueError("a transaction id is 12 bytes")
    return bytes(txid)


def decode(data: bytes, *, max_len: int = MAX_MESSAGE) -> Message:
    """Parse one datagram.  Raises StunError with the reason.

    Checks: size bounds, the top two bits, the magic cookie, the length
    field against the datagram, every attribute's length against what is
    left (with its padding), the attribute count, and the RFC's ordering
    rule: after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and
    FINGERPRINT are taken (anything else there is ignored, RFC 8489 14.5),
    and FINGERPRINT must be last."""
    n = len(data)
    if n < HEADER_LEN:
        raise StunError(f"short datagram ({n} bytes, a header is {HEADER_LEN})")
    if n > max_len:
        raise StunError(f"oversized datagram ({n} bytes, limit {max_len})")
    mtype, length, cookie = struct.unpack_from("!HHI", data, 0)
    if mtype & 0xC000:
        raise StunError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("wrong magic cookie")
    if length & 3:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_LEN + length != n:
        raise StunError(f"message length {length} does not match the datagram ({n - HEADER_LEN})")
    method, cls = split_type(mtype)
    msg = Message(method, cls, bytes(data[8:20]), raw=bytes(data))
    pos = HEADER_LEN
    seen_mi = seen_fp = False
    while pos < n:
        if seen_fp:
            raise StunError("attribute after FINGERPRINT")
        if len(msg.attrs) >= MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if n - pos < 4:
            raise StunError("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", data, pos)
        padded = (alen + 3) & ~3
        if pos + 4 + padded > n:
            raise StunError(f"attribute 0x{atype:04x} length {alen} runs past the message")
        value = bytes(data[pos + 4:pos + 4 + alen])
        if atype == FINGERPRINT:
            if alen != 4:
                raise StunError("FINGERPRINT is not 4 bytes")
            seen_fp = True
        if not seen_mi or atype in (MESSAGE_INTEGRITY_SHA256, FINGERPRINT):
            msg.attrs.append((atype, value))
            msg.offsets.append(pos)
        if atype == MESSAGE_INTEGRITY:
            seen_mi = True
        pos += 4 + padded
    return msg


def _attr(atype: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"attribute 0x{atype:04x} too long ({len(value)} bytes)")
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


def encode(method: int, cls: int, txid: bytes, attrs: Iterable[tuple[int, bytes]] = (), *,
           integrity: bytes | None = None, integrity_sha256: bytes | None = None,
           fingerprint: bool = False) -> bytes:
    """Build a datagram.  ``integrity`` / ``integrity_sha256`` are HMAC keys;
    the tags and FINGERPRINT are appended in the RFC's order."""
    if len(txid) != 12:
        raise ValueError("a transaction id is 12 bytes")
    body = b"".join(_attr(t, v) for t, v in attrs)
    mtype = message_type(method, cls)

    def header(extra: int) -> bytes:
        length = len(body) + extra
        if length > 0xFFFF:
            raise ValueError("message too long")
        return struct.pack("!HHI", mtype, length, MAGIC_COOKIE) + txid

    if integrity is not None:
        tag = hmac.new(integrity, header(24) + body, hashlib.sha1).digest()
        body += _attr(MESSAGE_INTEGRITY, tag)
    if integrity_sha256 is not None:
        tag = hmac.new(integrity_sha256, header(36) + body, hashlib.sha256).digest()
        body += _attr(MESSAGE_INTEGRITY_SHA256, tag)
    if fingerprint:
        crc = fingerprint_of(header(8) + body)
        body += _attr(FINGERPRINT, struct.pack("!I", crc))
    return header(0) + body


# --------------------------------------------------------------------------
# attribute values


def decode_address(value: bytes, *, xor: bool, txid: bytes = b"") -> Addr:
    """(ip, port) from a (XOR-)MAPPED-ADDRESS-style value; StunError if bad."""
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    family, port = value[1], struct.unpack_from("!H", value, 2)[0]
    if family == FAMILY_IPV4:
        if len(value) != 8:
            raise StunError("IPv4 address attribute is not 8 bytes")
        raw = value[4:8]
        if xor:
            raw = bytes(a ^ b for a, b in zip(raw, _COOKIE_BYTES))
    elif family == FAMILY_IPV6:
        if len(value) != 20:
            raise StunError("IPv6 address attribute is not 20 bytes")
        raw = value[4:20]
        if xor:
            if len(txid) != 12:
                raise StunError("XOR IPv6 address needs the transaction id")
            raw = bytes(a ^ b for a, b in zip(raw, _COOKIE_BYTES + txid))
    else:
        raise StunError(f"unknown address family 0x{family:02x}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
    return str(ipaddress.ip_address(raw)), port


def encode_address(addr: Addr, *, xor: bool, txid: bytes = b"") -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = int(addr[1])
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port out of range")
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + (txid if ip.version == 6 else b"")
        if ip.version == 6 and len(txid) != 12:
            raise ValueError("XOR IPv6 address needs the transaction id")
        raw = bytes(a ^ b for a, b in zip(raw, mask))
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    return struct.pack("!BBH", 0, family, port) + raw


def printable(text: str, limit: int = 128) -> str:
    """Text from the network reduced to printable characters for logs and
    status (no control characters, no terminal escapes), at most ``limit``."""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def decode_error_code(value: bytes) -> tuple[int, str]:
    """(code 300..699, reason) from ERROR-CODE; StunError if bad.  The
    reason is reduced to printable characters (coturn pads it with NULs)."""
    if len(value) < 4:
        raise StunError("ERROR-CODE shorter than 4 bytes")
    if len(value) - 4 > MAX_REASON_BYTES:
        raise StunError("ERROR-CODE reason too long")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunError(f"ERROR-CODE out of range (class {klass}, number {number})")
    return klass * 100 + number, printable(value[4:].decode("utf-8", "replace"))


def encode_error_code(code: int, reason: str = "") -> bytes:
    if not 300 <= code <= 699:
        raise ValueError("error code must be 300..699")
    text = reason.encode()[:MAX_REASON_BYTES]
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


def decode_text(value: bytes, limit: int, what: str) -> str:
    if len(value) > limit:
        raise StunError(f"{what} longer than {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{what} is not UTF-8") from None


def decode_u32(value: bytes, what: str) -> int:
    if len(value) != 4:
        raise StunError(f"{what} is not 4 bytes")
    return struct.unpack("!I", value)[0]


def normalize_addr(addr: Sequence) -> Addr:
    """(ip, port) with the ip in canonical text form (sockets may give longer
    tuples for IPv6; addresses compare by value)."""
    return str(ipaddress.ip_address(addr[0])), int(addr[1])


def came_from(src: Sequence, expected: Addr) -> bool:
    """Whether a datagram's source ``src`` (as a socket gives it; untrusted shape)
    is the address ``expected`` (normalised)."""
    try:
        return normalize_addr(src) == expected
    except (ValueError, TypeError, IndexError):
        return False


# --------------------------------------------------------------------------
# retransmission


class Retransmit:
    """RFC 8489 6.2.1 schedule for one request over UDP.

    Sends happen at ``start + RTO * (2**k - 1)`` for k = 0..Rc-1; the
    transaction times out ``Rm * RTO`` after the last send."""

    def __init__(self, now: float, rto: float = 0.5, rc: int = 7, rm: int = 16):
        if rto <= 0 or rc < 1 or rm < 1:
            raise ValueError("RTO > 0, Rc >= 1, Rm >= 1")
        self.start = now
        self.rto, self.rc, self.rm = rto, rc, rm
        self.sent = 0

    def send_times(self) -> list[float]:
        return [self.start + self.rto * (2 ** k - 1) for k in range(self.rc)]

    @property
    def timeout_at(self) -> float:
        return self.start + self.rto * (2 ** (self.rc - 1) - 1) + self.rm * self.rto

    def next_deadline(self) -> float:
        if self.sent < self.rc:
            return self.start + self.rto * (2 ** self.sent - 1)
        return self.timeout_at

    def due(self, now: float) -> str | None:
        """"send" (transmit now, once), "timeout", or None.  A late caller
        gets one send per call, never a burst."""
        if now < self.next_deadline():
            return None
        if self.sent < self.rc:
            self.sent += 1
            return "send"
        return "timeout"


# --------------------------------------------------------------------------
# the Binding client

NAT_NONE = "none"
NAT_EIM = "endpoint-independent"
NAT_EDM = "endpoint-dependent"
NAT_UNKNOWN = "unknown"
NAT_KINDS = (NAT_NONE, NAT_EIM, NAT_EDM, NAT_UNKNOWN)

MAX_BINDING_RESPONSE = 1500


@dataclass
class _Probe:
    txid: bytes
    dest: Addr
    data: bytes
    timer: Retransmit
    via_other: bool = False     # sent to a server's RFC 5780 OTHER-ADDRESS


@dataclass(frozen=True)
class BindingResult:
    public: Addr | None             # first mapping learnt (XOR-MAPPED-ADDRESS)
    nat: str                        # one of NAT_KINDS
    mappings: tuple                 # ((server, mapping), ...) in arrival order
    other_address: Addr | None      # first server's RFC 5780 OTHER-ADDRESS
    error: str | None               # why there is no answer / no classification
    at: float                       # when the round ended


class BindingClient:
    """Learns one uplink's public mapping and NAT mapping behaviour.

    ``servers``: resolved ``(ip, port)`` STUN servers (DNS is the I/O edge's
    business).  ``local``: the uplink socket's own address, to recognise
    "no NAT" (``None`` if unknown: then ``none`` is never concluded).

    Drive it with :meth:`start` (or :meth:`recheck`), :meth:`on_datagram`
    for each datagram the edge classified as STUN from the uplink socket,
    and :meth:`on_timer` at :meth:`next_deadline`; send what
    :meth:`take_outgoing` returns from the same socket.  :attr:`result`
    holds the last finished round; :meth:`take_events` yields each new
    result once.

    A round sends a Binding request to every server at once (at most
    ``max_servers``).  When only one server is configured and its answer
    carries OTHER-ADDRESS (RFC 5780), a second request goes to that address
    (other IP, same port: RFC 5780 test II).  The round ends as soon as two
    mappings (or a mapping equal to ``local``) are known, else when every
    request has been answered or has timed out.  The next round starts
    ``recheck_interval`` later."""

    def __init__(self, servers: Sequence[Sequence], local: Sequence | None = None, *,
                 rto: float = 0.5, rc: int = 7, rm: int = 16, recheck_interval: float = 300.0,
                 max_servers: int = 4, software: str | None = None,
                 rng: Callable[[int], bytes] = os.urandom):
        self.servers = [normalize_addr(s) for s in servers][:max_servers]
        self.local = normalize_addr(local) if local is not None else None
        self.rto, self.rc, self.rm = rto, rc, rm
        self.recheck_interval = float(recheck_interval)
        self.software = software
        self._rng = rng
        self._probes: dict[bytes, _Probe] = {}
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list[BindingResult] = []
        self._mappings: list[tuple[Addr, Addr]] = []
        self._other: Addr | None = None
        self._errors: list[str] = []
        self._next_round: float | None = None
        self.result: BindingResult | None = None
        self.rounds = 0
        self.drops: dict[str, int] = {}
        self.timeouts = 0

    # ---- driving -------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin a round now (also: after SIGHUP or a hotplug event)."""
        self._probes.clear()
        self._mappings, self._other, self._errors = [], None, []
        self._next_round = None
        self.rounds += 1
        if not self.servers:
            self._finish(now, "no STUN servers configured")
            return
        for server in self.servers:
            self._send_probe(server, now)

    recheck = start

    @property
    def busy(self) -> bool:
        return bool(self._probes)

    def next_deadline(self) -> float | None:
        times = [p.timer.next_deadline() for p in self._probes.values()]
        if self._next_round is not None:
            times.append(self._next_round)
        return min(times) if times else None

    def on_timer(self, now: float) -> None:
        for txid, probe in list(self._probes.items()):
            what = probe.timer.due(now)
            if what == "send":
                self._out.append((probe.data, probe.dest))
            elif what == "timeout":
                del self._probes[txid]
                self.timeouts += 1
                self._errors.append(f"no answer from {_fmt(probe.dest)}")
        if self._next_round is not None and now >= self._next_round:
            self.start(now)         # the new round's first requests go out now
            return
        self._maybe_finish(now)

    def on_datagram(self, data: bytes, src: Sequence, now: float) -> None:
        """A datagram from the uplink socket that looks like STUN."""
        if len(data) > MAX_BINDING_RESPONSE:
            self._drop("oversized")
            return
        try:
            msg = decode(data, max_len=MAX_BINDING_RESPONSE)
        except StunError:
            self._drop("malformed")
            return
        if msg.method != BINDING or msg.cls not in (SUCCESS, ERROR):
            self._drop("not_a_binding_response")
            return
        probe = self._probes.get(msg.txid)
        if probe is None:
            self._drop("unknown_transaction")
            return
        if not came_from(src, probe.dest):
            self._drop("wrong_source")
            return
        if msg.check_fingerprint() is False:
            self._drop("bad_fingerprint")
            return
        if msg.cls == ERROR:
            try:
                code, reason = decode_error_code(msg.get(ERROR_CODE) or b"")
            except StunError:
                self._drop("malformed")
                return
            del self._probes[msg.txid]
            self._errors.append(f"{_fmt(probe.dest)} answered {code} {reason}".rstrip())
            self._maybe_finish(now)
            return
        try:
            value = msg.get(XOR_MAPPED_ADDRESS)
            if value is not None:
                mapped = decode_address(value, xor=True, txid=msg.txid)
            else:
                value = msg.get(MAPPED_ADDRESS)
                if value is None:
                    raise StunError("no mapped address")
                mapped = decode_address(value, xor=False)
            other_v = msg.get(OTHER_ADDRESS)
            other = decode_address(other_v, xor=False) if other_v is not None else None
        except StunError:
            self._drop("malformed")
            return
        del self._probes[msg.txid]
        self._mappings.append((probe.dest, mapped))
        if other is not None and self._other is None and not probe.via_other:
            self._other = other
            if (len(self.servers) == 1 and other[0] != probe.dest[0]
                    and not (self.local is not None and mapped == self.local)):
                self._send_probe((other[0], probe.dest[1]), now, via_other=True)
        self._maybe_finish(now)

    def take_outgoing(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[BindingResult]:
        ev, self._events = self._events, []
        return ev

    # ---- internals -----------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _send_probe(self, dest: Addr, now: float, via_other: bool = False) -> None:
        txid = new_txid(self._rng)
        attrs = []
        if self.software:
            attrs.append((SOFTWARE, self.software.encode()[:MAX_SOFTWARE_BYTES]))
        data = encode(BINDING, REQUEST, txid, attrs, fingerprint=True)
        probe = _Probe(txid, dest, data, Retransmit(now, self.rto, self.rc, self.rm), via_other)
        self._probes[txid] = probe
        probe.timer.due(now)            # the first send is due at once
        self._out.append((data, dest))

    def _maybe_finish(self, now: float) -> None:
        if self._next_round is not None:
            return
        enough = len(self._mappings) >= 2 or (
            self.local is not None and any(m == self.local for _, m in self._mappings))
        if enough or not self._probes:
            self._probes.clear()
            self._finish(now, None)

    def _finish(self, now: float, error: str | None) -> None:
        mappings = tuple(self._mappings)
        public = mappings[0][1] if mappings else None
        if not mappings:
            nat = NAT_UNKNOWN
            error = error or ("; ".join(self._errors) or "no STUN server answered")
        elif self.local is not None and all(m == self.local for _, m in mappings):
            nat = NAT_NONE
        elif len(mappings) < 2:
            nat = NAT_UNKNOWN
            error = "only one mapping learnt (a second server or RFC 5780 OTHER-ADDRESS is needed)"
            if self._errors:
                error += ": " + "; ".join(self._errors)
        elif all(m == mappings[0][1] for _, m in mappings):
            nat = NAT_EIM
        else:
            nat = NAT_EDM
        self.result = BindingResult(public, nat, mappings, self._other, error, now)
        self._events.append(self.result)
        self._next_round = now + self.recheck_interval

    def status(self) -> dict:
        r = self.result
        return {
            "public": _fmt(r.public) if r and r.public else None,
            "nat": r.nat if r else NAT_UNKNOWN,
            "error": r.error if r else None,
            "rounds": self.rounds,
            "timeouts": self.timeouts,
            "drops": dict(self.drops),
        }


def _fmt(addr: Addr | None) -> str:
    if addr is None:
        return "-"
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


format_addr = _fmt
