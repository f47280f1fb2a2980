"""The master TCP control connection (seed 001, step 1), sans-I/O.

No sockets, clocks or threads here: the machines take bytes and ``now``
(float seconds, any monotonic clock) and hand back bytes to send, events and
the next deadline -- the shape of h11 / aioquic:

    conn.receive_data(data, now)      # b"" means the peer closed (EOF)
    conn.data_to_send() -> bytes      # write these to the socket
    conn.get_timer() -> float | None  # call handle_timer(now) then
    conn.handle_timer(now)
    conn.next_event() -> event | None

Contents:

* framing: ``u16`` big-endian length + body (:class:`FrameDecoder`,
  :func:`encode_frame`);
* the cheap gate in front of the handshake (control protocol 2): the
  client's first message is followed by a freshness stamp and a MAC keyed
  from the PSK (:class:`HandshakeStamps`, :class:`HandshakeGuard`); the
  server checks both, and its budget of handshake work, before any X25519
  operation, and answers a genuine client it is too busy for with BUSY;
* the Noise handshake (``NNpsk0``, optionally ``KKpsk0``; ``mpvpn.noise``)
  with version negotiation in its two payloads;
* post-handshake messages: one JSON object per Noise transport message,
  strictly validated (:func:`decode_message`);
* peer validation (vNIC subnet, LAN overlap, default routes);
* :class:`ClientConnection`, :class:`ServerConnection`, the server's
  :class:`ServerSessions` registry, the per-source :class:`RateLimiter` and
  the client's :class:`ClientReconnect` policy.

Untrusted input never raises out of a machine: it ends in an ERROR to the
peer (once authenticated) and/or a counted drop and a terminal state with a
reason.  Local misuse (bad local configuration) raises ``ValueError``.

Design and message schema: ``docs/control.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
import os
import random
import re
import struct
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from enum import Enum

from mpvpn import noise, pairing, seal
from mpvpn.pairing import PlanDiff, SubflowSpec, Uplink

__all__ = [
    "PROLOGUE", "VERSIONS", "ControlConfig", "Vnc", "PeerInfo", "DataKeys",
    "FrameDecoder", "encode_frame", "decode_message", "check_peer", "peer_problem",
    "ServerSession",
    "ClientConnection", "ServerConnection", "ServerSessions", "RateLimiter",
    "HandshakeStamps", "HandshakeGuard", "ClientReconnect", "State",
    "HandshakeComplete", "SessionEstablished", "PeerUpdated", "KeysRotated",
    "KeysActivated", "KeysRetired", "ConnectionClosed", "ProtocolError", "SessionFreed",
]

# --- constants -----------------------------------------------------------------

PROLOGUE = b"orayboxvpn control v1"
REKEY_PROLOGUE = b"orayboxvpn control v1 rekey"
# Control protocol versions this build speaks.  Version 2 added the
# freshness stamp and MAC after the first handshake message and the BUSY
# reply; a version-1 peer cannot talk to it (see docs/control.md).
VERSIONS = (2,)

MAX_FRAME = 65535  # u16 length prefix
LEN_PREFIX = 2
# Before the handshake completes a frame is one Noise handshake message:
# 32 (e) + JSON payload + 16 (tag).  Payloads are tiny; 512 leaves room.
PREAUTH_MAX_FRAME = 512
MIN_HANDSHAKE_MSG = noise.KEY_LEN + noise.TAG_LEN  # 48: e + tag of an empty payload
MAX_MESSAGE = 16384  # plaintext JSON of one post-handshake message
POSTAUTH_MAX_FRAME = MAX_MESSAGE + noise.TAG_LEN

# The client's second frame (control protocol 2): the first message's
# freshness stamp and MAC, ``sender(8) | counter u64 | mac(16)``, where
# mac = keyed-BLAKE2s-128(mac_key(psk), "msg1" | sender | counter | message 1)
# (WireGuard's mac1, keyed from the PSK instead of the responder's static key).
SENDER_LEN = 8
MAC_LEN = 16
STAMP = struct.Struct("!8sQ16s")
STAMP_LEN = STAMP.size  # 32
MAC_LABEL = b"orayboxvpn control v2 mac"
MAX_COUNTER = (1 << 64) - 1
# The server's answer to a genuine first message it has no handshake budget
# for: ``"BUSY" | retry_after_ms u32 | mac(16)``, mac over "busy" | retry |
# the client's MAC (so it answers that very message and proves the PSK).
BUSY_MAGIC = b"BUSY"
BUSY = struct.Struct("!4sI16s")
BUSY_LEN = BUSY.size  # 24 (a Noise message 2 is at least 48)
MAX_RETRY_MS = 60_000

MAX_UPLINKS = 16
MAX_LANS = 32
MAX_VERSIONS = 16
MAX_TEXT = 256
MAX_PLAN = 255

WORD_RE = re.compile(r"[a-z0-9_-]{1,32}")  # carrier type, mode, error code, BYE reason
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # site name
UPLINK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # uplink (smpu section) name
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

#: ERROR codes we send.  Peers may send other words; they are shown as given.
ERROR_CODES = ("version", "auth", "invalid", "overlap", "vnic", "route", "busy",
               "internal", "timeout")

#: Close reasons that leave a server session *detached* (kept until it has
#: been silent for the session timeout) rather than freed at once: the
#: control connection was lost, but the data plane may still be working.
DETACH_REASONS = frozenset({"eof", "timeout"})

#: Pre-authentication ends that count against the source address's failure
#: budget (:class:`RateLimiter`).  A replay or BUSY does not: its MAC is good.
PREAUTH_FAILURES = frozenset({"bad_psk", "malformed", "oversized", "timeout", "eof", "no_stamp"})


class State(Enum):
    HANDSHAKE = "handshake"  # client: msg1 sent, waiting for msg2; server: waiting for msg1
    HELLO = "hello"  # client: HELLO sent, waiting for WELCOME; server: waiting for HELLO
    ESTABLISHED = "established"
    CLOSED = "closed"


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True)
class DataKeys:
    """Per-direction data-plane keys (32 bytes each) for one key epoch."""

    epoch: int
    send: bytes = field(repr=False)
    recv: bytes = field(repr=False)


@dataclass(frozen=True)
class HandshakeComplete:
    version: int
    handshake_hash: bytes = field(repr=False)


@dataclass(frozen=True)
class SessionEstablished:
    session_id: int
    peer: PeerInfo
    plan: list  # list[SubflowSpec], our orientation (local = our uplink)
    keys: DataKeys
    epoch: int
    version: int
    cipher: str = "chacha20-poly1305"  # the data-plane AEAD (mpvpn.seal.CIPHERS)


@dataclass(frozen=True)
class PeerUpdated:
    """The plan and/or the peer's info changed (``origin`` 'peer': the peer
    sent UPDATE; 'local': our own send_update re-planned)."""

    peer: PeerInfo
    plan: list
    diff: PlanDiff
    origin: str = "peer"


@dataclass(frozen=True)
class KeysRotated:
    """New data keys for ``epoch``.  Install them for receiving at once and
    keep ``previous_epoch``'s.  If ``sending`` is true, send with them from
    now on; otherwise keep sending with the previous epoch until
    :class:`KeysActivated` (we answered the peer's rekey and do not yet know
    that the peer has the new keys)."""

    epoch: int
    keys: DataKeys
    previous_epoch: int
    sending: bool


@dataclass(frozen=True)
class KeysActivated:
    """Start sending with ``epoch`` (the peer confirmed it holds the keys)."""

    epoch: int


@dataclass(frozen=True)
class KeysRetired:
    """Drop the keys of ``epoch``: the overlap after a rotation is over."""

    epoch: int


@dataclass(frozen=True)
class ConnectionClosed:
    """Terminal.  Flush ``data_to_send()`` (it may hold a BYE or ERROR),
    then close the socket.  ``retry_after`` (seconds) is set when the server
    answered BUSY: it holds our key but had no handshake budget left, so
    try again that soon rather than backing off."""

    reason: str
    text: str
    by_peer: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class ProtocolError:
    """An ERROR: detected by us and sent (``by_peer`` False) or received
    from the peer (``by_peer`` True).  Always followed by ConnectionClosed."""

    code: str
    text: str
    by_peer: bool


@dataclass(frozen=True)
class SessionFreed:
    """(ServerSessions) a session is gone: free its session ID, keys,
    routes and subflows."""

    session_id: int
    name: str
    reason: str
    conn: object = field(default=None, repr=False, compare=False)  # its ServerConnection, if any


# --- data model -------------------------------------------------------------------


@dataclass(frozen=True)
class Vnc:
    """A side's virtual NIC: address, netmask (dotted quad for IPv4 or a
    prefix length), optional MAC (a tun device has none)."""

    ip: str
    netmask: str
    mac: str | None = None

    @property
    def interface(self):
        return ipaddress.ip_interface(f"{self.ip}/{self.netmask}")

    def to_json(self) -> dict:
        d = {"ip": self.ip, "netmask": self.netmask}
        if self.mac is not None:
            d["mac"] = self.mac
        return d


@dataclass(frozen=True)
class PeerInfo:
    """What one side announces (HELLO / WELCOME / UPDATE)."""

    name: str
    uplinks: tuple  # tuple[Uplink, ...]
    vnc: Vnc
    lans: tuple = ()  # normalized CIDR strings
    mode: str = "duplicate"
    pair_unmatched: bool = False
    control_port: int | None = None  # server only: where its control listener is
    # data-plane AEADs this side can use, best first (HELLO), and the one the
    # server chose for the session (WELCOME); peers without them mean ChaCha20
    ciphers: tuple = (seal.CHACHA,)
    cipher: str | None = None

    @property
    def networks(self):
        return [ipaddress.ip_network(x) for x in self.lans]


@dataclass
class ControlConfig:
    """Configuration of one side (client or server).

    ``psk``: 32 bytes (``noise.load_psk(base.psk)``).  ``pattern``
    ``"NNpsk0"`` (PSK only) or ``"KKpsk0"`` (also X25519 static keys:
    ``static_key`` our private, ``remote_static`` the peer's public).
    Keepalive settings of the server are sent in WELCOME and adopted by the
    client.  ``rekey_interval`` is the client's period; the server uses
    ``server_rekey_factor`` times it as a backstop so the client normally
    drives rekeying and collisions stay rare.
    """

    psk: bytes
    name: str
    uplinks: tuple = ()  # Uplink or (name, type, addr, port)
    vnc: Vnc | None = None
    lans: tuple = ()
    mode: str = "duplicate"
    pair_unmatched: bool = False
    allow_peer_default_route: bool = False
    ciphers: tuple | None = None  # data-plane AEADs, best first; None: seal.preferred_ciphers()
    versions: tuple = VERSIONS
    control_port: int | None = None
    handshake_timeout: float = 10.0
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    rekey_interval: float = 120.0
    server_rekey_factor: float = 1.5
    rekey_packets: int = seal.REKEY_AFTER_PACKETS  # per send key; see note_sealed
    key_overlap: float = 10.0
    pattern: str = "NNpsk0"
    static_key: bytes | None = None
    remote_static: bytes | None = None
    # server: client sites' own keys, ((name, psk), ...), tried after ``psk``
    # (which may then be None: only site keys are accepted)
    site_psks: tuple = ()

    def keys(self) -> list:
        """The PSKs a server accepts, ``[(site name or None, psk), ...]``."""
        out = [(None, self.psk)] if self.psk is not None else []
        return out + [(n, k) for n, k in self.site_psks]

    def local_info(self) -> PeerInfo:
        """Validate and normalize our own side; raises ValueError."""
        keys = self.keys()
        if not keys or any(not isinstance(k, (bytes, bytearray)) or len(k) != noise.KEY_LEN for _n, k in keys):
            raise ValueError(f"psk must be {noise.KEY_LEN} bytes")
        if self.site_psks and self.pattern != "NNpsk0":
            raise ValueError("per-site keys work with NNpsk0 only (no static keys)")
        if self.pattern not in ("NNpsk0", "KKpsk0"):
            raise ValueError(f"unknown pattern {self.pattern!r}")
        if not self.versions or any(type(v) is not int or not 1 <= v <= 255 for v in self.versions):
            raise ValueError("versions must be a non-empty tuple of ints 1..255")
        if not 0 < self.keepalive_interval < self.keepalive_timeout:
            raise ValueError("need 0 < keepalive_interval < keepalive_timeout")
        if self.vnc is None:
            raise ValueError("vnc is required")
        ups = [u if isinstance(u, Uplink) else Uplink(*u) for u in self.uplinks]
        vnc = self.vnc if isinstance(self.vnc, Vnc) else Vnc(*self.vnc)
        ciphers = tuple(self.ciphers) if self.ciphers is not None else seal.preferred_ciphers()
        if not ciphers or any(c not in seal.CIPHERS for c in ciphers):
            raise ValueError(f"ciphers must be a non-empty subset of {seal.CIPHERS}")
        info = _local_info(self.name, ups, vnc, list(self.lans), self.mode, self.pair_unmatched,
                           self.control_port)
        return replace(info, ciphers=ciphers)


def _local_info(name, uplinks, vnc, lans, mode, pair_unmatched, control_port) -> PeerInfo:
    d = {"name": name, "uplinks": [u.to_json() for u in uplinks], "vnc": vnc.to_json(),
         "lans": list(lans), "mode": mode}
    try:
        info = _parse_info(d, "local")
        _check_vnc(info.vnc, "our")
        _check_lan_list(info, "our")
        nets = info.networks
        vnet = info.vnc.interface.network
        for n in nets:
            if n.prefixlen and _overlap(n, vnet):
                raise _Bad("overlap", f"our LAN {n} overlaps our vNIC subnet {vnet}")
    except _Bad as b:
        raise ValueError(f"local configuration: {b.text}") from None
    if control_port is not None and (type(control_port) is not int or not 1 <= control_port <= 65535):
        raise ValueError("control_port must be 1..65535")
    return replace(info, pair_unmatched=bool(pair_unmatched), control_port=control_port)


# --- framing ----------------------------------------------------------------------


def encode_frame(body: bytes) -> bytes:
    """``u16`` big-endian length + body."""
    n = len(body)
    if not 0 < n <= MAX_FRAME:
        raise ValueError(f"frame body of {n} bytes (must be 1..{MAX_FRAME})")
    return n.to_bytes(2, "big") + bytes(body)


class FrameDecoder:
    """Cuts a TCP byte stream into frames.

    ``feed(data)`` appends; ``next_frame()`` returns the next complete frame
    body or None (need more bytes, or failed).  On bad input ``error`` is
    set to ``"oversized"`` (length prefix above ``max_frame``) or
    ``"malformed"`` (zero length) and the decoder stays failed.  After every
    complete frame has been taken, at most ``LEN_PREFIX + max_frame - 1``
    bytes stay buffered; ``max_frame`` may be changed between frames (the
    control connection raises it once the peer has authenticated).
    """

    __slots__ = ("max_frame", "error", "_buf", "frames", "bytes_in")

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self.error: str | None = None
        self._buf = bytearray()
        self.frames = 0
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data) -> None:
        if self.error is None:
            self._buf += data
            self.bytes_in += len(data)

    def next_frame(self) -> bytes | None:
        if self.error is not None:
            return None
        buf = self._buf
        if len(buf) < LEN_PREFIX:
            return None
        n = (buf[0] << 8) | buf[1]
        if n == 0:
            self._fail("malformed")
            return None
        if n > self.max_frame:
            self._fail("oversized")
            return None
        if len(buf) < LEN_PREFIX + n:
            return None
        body = bytes(buf[LEN_PREFIX:LEN_PREFIX + n])
        del buf[:LEN_PREFIX + n]
        self.frames += 1
        return body

    def _fail(self, why: str) -> None:
        self.error = why
        self._buf = bytearray()


# --- the gate in front of the handshake (control protocol 2) ---------------------------


def mac_key(psk: bytes) -> bytes:
    """The key of the first message's MAC: BLAKE2s(label | psk) (as
    WireGuard's HASH(LABEL_MAC1 | public key))."""
    return hashlib.blake2s(MAC_LABEL + bytes(psk)).digest()


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hashlib.blake2s(key=key, digest_size=MAC_LEN)
    for p in parts:
        h.update(p)
    return h.digest()


def stamp_first_message(psk: bytes, msg1: bytes, sender: bytes, counter: int) -> bytes:
    """The client's second frame: ``sender | counter | MAC``."""
    if len(sender) != SENDER_LEN or not 0 < counter <= MAX_COUNTER:
        raise ValueError("bad freshness stamp")
    head = sender + counter.to_bytes(8, "big")
    return head + _mac(mac_key(psk), b"msg1", head, msg1)


def busy_reply(key: bytes, client_mac: bytes, retry_after: float) -> bytes:
    """The server's BUSY frame body for the first message carrying ``client_mac``."""
    ms = max(0, min(MAX_RETRY_MS, int(retry_after * 1000 + 0.5)))
    retry = ms.to_bytes(4, "big")
    return BUSY.pack(BUSY_MAGIC, ms, _mac(key, b"busy", retry, client_mac))


class HandshakeStamps:
    """The client's freshness stamps for its first handshake messages.

    One per agent process: a random 8-byte ``sender`` and a ``counter``
    that grows by one per connection attempt.  The server keeps the greatest
    counter it has seen per (key, sender) and drops a first message that is
    not newer (a replay) before any costly work.  A restarted client picks
    a new sender, so it never needs to remember anything, and no clock is
    involved (routers often boot without a real-time clock)."""

    def __init__(self, sender: bytes | None = None):
        self.sender = os.urandom(SENDER_LEN) if sender is None else bytes(sender)
        if len(self.sender) != SENDER_LEN:
            raise ValueError(f"sender must be {SENDER_LEN} bytes")
        self.counter = 0

    def next(self) -> tuple[bytes, int]:
        self.counter += 1
        return self.sender, self.counter


class HandshakeGuard:
    """What a server checks a first handshake message against before it does
    anything costly.  Sans-I/O.

    * :meth:`identify`: which of our keys MACed the message (one keyed
      BLAKE2s per key; a hub tries each site's key);
    * :meth:`fresh`: is its counter newer than any seen from that (key,
      sender)?  (records it; at most ``max_senders`` senders, least
      recently used forgotten: only holders of a key can add senders);
    * :meth:`take_handshake`: the global budget of handshakes answered (each
      costs X25519 operations), ``rate`` per second up to ``burst``;
      returns 0 (go) or the seconds until the next one is free (BUSY).
    """

    def __init__(self, rate: float = 50.0, burst: float = 100.0, max_senders: int = 4096):
        if rate <= 0 or burst < 1 or max_senders < 1:
            raise ValueError("need rate > 0, burst >= 1, max_senders >= 1")
        self.rate, self.burst, self.max_senders = rate, burst, max_senders
        self._tokens = burst
        self._last: float | None = None
        self._seen: OrderedDict = OrderedDict()  # (site, sender) -> greatest counter
        self._keys: dict = {}  # psk -> mac key

    def mac_key(self, psk: bytes) -> bytes:
        k = self._keys.get(psk)
        if k is None:
            if len(self._keys) > 1024:
                self._keys.clear()
            k = self._keys[psk] = mac_key(psk)
        return k

    def identify(self, keys, msg1: bytes, stamp: bytes):
        """``(site, psk, mac key)`` of the key in ``keys`` (``[(site, psk)]``)
        whose MAC ``stamp`` carries, or None."""
        got = stamp[-MAC_LEN:]
        data = b"msg1" + stamp[:-MAC_LEN] + msg1  # as _mac(k, b"msg1", head, msg1)
        blake2s, compare = hashlib.blake2s, hmac.compare_digest
        for site, psk in keys:
            k = self.mac_key(psk)
            if compare(blake2s(data, key=k, digest_size=MAC_LEN).digest(), got):
                return site, psk, k
        return None

    def fresh(self, site, sender: bytes, counter: int) -> bool:
        key = (site, sender)
        last = self._seen.get(key)
        if last is not None and counter <= last:
            return False
        self._seen[key] = counter
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_senders:
            self._seen.popitem(last=False)
        return True

    def take_handshake(self, now: float) -> float:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def __len__(self) -> int:
        return len(self._seen)


# --- message parsing and validation --------------------------------------------------


class _Bad(Exception):
    """Internal: bad peer input.  ``code`` goes into ERROR, ``count`` names
    the counter (defaults to ``code``)."""

    def __init__(self, code: str, text: str, count: str | None = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.count = count or code


def _safe(s, limit: int = MAX_TEXT) -> str:
    """Printable ASCII only (peer text goes to logs and LuCI)."""
    if not isinstance(s, str):
        s = repr(s)
    out = "".join(c if " " <= c <= "~" else "?" for c in s[:limit])
    return out


def _obj(v, what: str, req: frozenset | set, opt: frozenset | set = frozenset()) -> dict:
    if type(v) is not dict:
        raise _Bad("invalid", f"{what}: expected an object")
    for k in v:
        if k not in req and k not in opt:
            raise _Bad("invalid", f"{what}: unknown field {_safe(k, 32)!r}")
    for k in req:
        if k not in v:
            raise _Bad("invalid", f"{what}: missing field {k!r}")
    return v


def _int(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad("invalid", f"{what}: expected an integer {lo}..{hi}")
    return v


def _num(v, what: str, lo: float, hi: float) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
        raise _Bad("invalid", f"{what}: expected a number {lo}..{hi}")
    return float(v)


def _bool(v, what: str) -> bool:
    if type(v) is not bool:
        raise _Bad("invalid", f"{what}: expected true or false")
    return v


def _str(v, what: str, limit: int) -> str:
    if type(v) is not str or len(v) > limit:
        raise _Bad("invalid", f"{what}: expected a string of at most {limit} characters")
    return v


def _match(v, what: str, rx: re.Pattern, desc: str) -> str:
    if type(v) is not str or not rx.fullmatch(v):
        raise _Bad("invalid", f"{what}: expected {desc}")
    return v


def _list(v, what: str, limit: int) -> list:
    if type(v) is not list or len(v) > limit:
        raise _Bad("invalid", f"{what}: expected a list of at most {limit} items")
    return v


def _ip(v, what: str):
    s = _str(v, what, 45)
    if "%" in s or "/" in s:
        raise _Bad("invalid", f"{what}: expected a plain IP address")
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        raise _Bad("invalid", f"{what}: {_safe(s, 45)!r} is not an IP address") from None


def _parse_uplink(v, what: str) -> Uplink:
    d = _obj(v, what, {"name", "type", "addr", "port"})
    name = _match(d["name"], f"{what}.name", UPLINK_RE, "an uplink name [A-Za-z0-9_.-]{1,32}")
    typ = _match(d["type"], f"{what}.type", WORD_RE, "a carrier type [a-z0-9_-]{1,32}")
    addr = _ip(d["addr"], f"{what}.addr")
    if addr.is_unspecified or addr.is_multicast:
        raise _Bad("invalid", f"{what}.addr: {addr} is not a unicast address")
    port = _int(d["port"], f"{what}.port", 1, 65535)
    return Uplink(name, typ, str(addr), port)


def _parse_uplinks(v, what: str) -> tuple:
    items = _list(v, what, MAX_UPLINKS)
    ups = tuple(_parse_uplink(x, f"{what}[{i}]") for i, x in enumerate(items))
    names = [u.name for u in ups]
    if len(set(names)) != len(names):
        raise _Bad("invalid", f"{what}: uplink names are not unique")
    eps = [(u.addr, u.port) for u in ups]
    if len(set(eps)) != len(eps):
        raise _Bad("invalid", f"{what}: two uplinks share one address and port")
    return ups


def _parse_vnc(v, what: str) -> Vnc:
    d = _obj(v, what, {"ip", "netmask"}, {"mac"})
    ip = _ip(d["ip"], f"{what}.ip")
    mask = _str(d["netmask"], f"{what}.netmask", 45)
    if "/" in mask or "%" in mask:
        raise _Bad("invalid", f"{what}.netmask: expected a netmask or prefix length")
    try:
        iface = ipaddress.ip_interface(f"{ip}/{mask}")
    except ValueError:
        raise _Bad("invalid", f"{what}.netmask: {_safe(mask, 45)!r} is not a valid netmask") from None
    mac = d.get("mac")
    if mac is not None:
        mac = _match(mac.lower() if type(mac) is str else mac, f"{what}.mac", MAC_RE,
                     "a MAC address aa:bb:cc:dd:ee:ff")
    netmask = str(iface.netmask) if iface.version == 4 else str(iface.network.prefixlen)
    return Vnc(str(iface.ip), netmask, mac)


def _parse_lans(v, what: str) -> tuple:
    items = _list(v, what, MAX_LANS)
    out = []
    for i, x in enumerate(items):
        s = _str(x, f"{what}[{i}]", 49)
        if "%" in s or "/" not in s:
            raise _Bad("invalid", f"{what}[{i}]: expected a CIDR subnet like 192.168.1.0/24")
        try:
            net = ipaddress.ip_network(s, strict=True)
        except ValueError:
            raise _Bad("invalid", f"{what}[{i}]: {_safe(s, 49)!r} is not a CIDR subnet "
                                  "(host bits must be zero)") from None
        out.append(str(net))
    return tuple(out)


def _parse_options(v, what: str) -> dict:
    d = _obj(v, what, set(), {"pair_unmatched", "ciphers", "cipher"})
    out = {"pair_unmatched": _bool(d.get("pair_unmatched", False), f"{what}.pair_unmatched"),
           "ciphers": (seal.CHACHA,), "cipher": None}
    if "ciphers" in d:
        items = _list(d["ciphers"], f"{what}.ciphers", 8)
        words = tuple(_match(c, f"{what}.ciphers[]", WORD_RE, "a cipher name") for c in items)
        if not words or len(set(words)) != len(words):
            raise _Bad("invalid", f"{what}.ciphers must be a non-empty list without repeats")
        out["ciphers"] = words  # unknown names are allowed (newer peers) and never chosen
    if "cipher" in d:
        out["cipher"] = _match(d["cipher"], f"{what}.cipher", WORD_RE, "a cipher name")
    return out


def _parse_info(d: dict, what: str) -> PeerInfo:
    name = _match(d["name"], f"{what}.name", NODE_RE, "a site name [A-Za-z0-9_.-]{1,64}")
    uplinks = _parse_uplinks(d["uplinks"], f"{what}.uplinks")
    vnc = _parse_vnc(d["vnc"], f"{what}.vnc")
    lans = _parse_lans(d["lans"], f"{what}.lans")
    mode = _match(d["mode"], f"{what}.mode", WORD_RE, "a mode word [a-z0-9_-]{1,32}")
    opts = _parse_options(d.get("options", {}), f"{what}.options")
    return PeerInfo(name, uplinks, vnc, lans, mode, opts["pair_unmatched"],
                    ciphers=opts["ciphers"], cipher=opts["cipher"])


def _parse_plan(v, what: str) -> list:
    items = _list(v, what, MAX_PLAN)
    out = []
    for i, x in enumerate(items):
        d = _obj(x, f"{what}[{i}]", {"member", "client", "server"})
        out.append({"member": _int(d["member"], f"{what}[{i}].member", 1, pairing.MAX_MEMBER),
                    "client": _match(d["client"], f"{what}[{i}].client", UPLINK_RE, "an uplink name"),
                    "server": _match(d["server"], f"{what}[{i}].server", UPLINK_RE, "an uplink name")})
    return out


def _parse_hs(v, what: str) -> bytes:
    s = _str(v, what, 700)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad("invalid", f"{what}: not base64") from None
    if not MIN_HANDSHAKE_MSG <= len(raw) <= PREAUTH_MAX_FRAME:
        raise _Bad("invalid", f"{what}: handshake message of {len(raw)} bytes")
    return raw


_INFO_FIELDS = {"name", "uplinks", "vnc", "lans", "mode"}
_SCHEMA_REQ = {
    "HELLO": _INFO_FIELDS,
    "WELCOME": _INFO_FIELDS | {"session_id", "plan", "keepalive"},
    "KEEPALIVE": {"n"},
    "KEEPALIVE_ACK": {"n"},
    "BYE": {"reason"},
    "ERROR": {"code"},
    "REKEY": {"step", "epoch"},
}
_SCHEMA_OPT = {
    "HELLO": {"options"},
    "WELCOME": {"options", "control_port"},
    "BYE": {"text"},
    "ERROR": {"text"},
    "REKEY": {"hs"},
}


def _no_dups(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key")
        d[k] = v
    return d


def _no_constants(name):
    raise ValueError(f"{name} is not allowed")


def _loads(data) -> dict:
    if len(data) > MAX_MESSAGE:
        raise _Bad("invalid", f"message of {len(data)} bytes exceeds {MAX_MESSAGE}", "oversized")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_dups,
                         parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
        raise _Bad("invalid", "message is not a JSON object", "malformed") from None
    if type(obj) is not dict:
        raise _Bad("invalid", "message is not a JSON object", "malformed")
    return obj


def _parse(data, from_client: bool) -> dict:
    """Parse and validate one post-handshake message; raises _Bad."""
    obj = _loads(data)
    t = obj.get("type")
    if type(t) is not str or t not in ("HELLO", "WELCOME", "UPDATE", "KEEPALIVE",
                                       "KEEPALIVE_ACK", "BYE", "ERROR", "REKEY"):
        raise _Bad("invalid", f"unknown message type {_safe(t, 32)!r}")
    if (t == "HELLO" and not from_client) or (t == "WELCOME" and from_client):
        raise _Bad("invalid", f"{t} in the wrong direction")
    if t == "UPDATE":
        if from_client:
            d = _obj(obj, t, {"type", "seq"}, {"uplinks", "lans"})
            if "uplinks" not in d and "lans" not in d:
                raise _Bad("invalid", "UPDATE: nothing to update")
        else:
            d = _obj(obj, t, {"type", "ack", "plan"}, {"uplinks", "lans"})
    else:
        d = _obj(obj, t, _SCHEMA_REQ[t] | {"type"}, _SCHEMA_OPT.get(t, set()))
    m = {"type": t}
    if t in ("HELLO", "WELCOME"):
        m["info"] = _parse_info(d, t)
    if t == "WELCOME":
        m["session_id"] = _int(d["session_id"], "WELCOME.session_id", 1, 0xFFFFFFFF)
        m["plan"] = _parse_plan(d["plan"], "WELCOME.plan")
        ka = _obj(d["keepalive"], "WELCOME.keepalive", {"interval", "timeout"})
        m["interval"] = _num(ka["interval"], "keepalive.interval", 0.05, 600)
        m["timeout"] = _num(ka["timeout"], "keepalive.timeout", 0.1, 3600)
        if m["timeout"] <= m["interval"]:
            raise _Bad("invalid", "keepalive.timeout must exceed keepalive.interval")
        cp = d.get("control_port")
        m["control_port"] = None if cp is None else _int(cp, "WELCOME.control_port", 1, 65535)
    elif t == "UPDATE":
        if from_client:
            m["seq"] = _int(d["seq"], "UPDATE.seq", 1, 2**53)
        else:
            m["ack"] = _int(d["ack"], "UPDATE.ack", 0, 2**53)
            m["plan"] = _parse_plan(d["plan"], "UPDATE.plan")
        if "uplinks" in d:
            m["uplinks"] = _parse_uplinks(d["uplinks"], "UPDATE.uplinks")
        if "lans" in d:
            m["lans"] = _parse_lans(d["lans"], "UPDATE.lans")
    elif t in ("KEEPALIVE", "KEEPALIVE_ACK"):
        m["n"] = _int(d["n"], f"{t}.n", 0, 2**53)
    elif t == "BYE":
        m["reason"] = _match(d["reason"], "BYE.reason", WORD_RE, "a reason word")
        m["text"] = _safe(_str(d.get("text", ""), "BYE.text", MAX_TEXT))
    elif t == "ERROR":
        m["code"] = _match(d["code"], "ERROR.code", WORD_RE, "an error code word")
        m["text"] = _safe(_str(d.get("text", ""), "ERROR.text", MAX_TEXT))
    elif t == "REKEY":
        m["step"] = _int(d["step"], "REKEY.step", 1, 3)
        m["epoch"] = _int(d["epoch"], "REKEY.epoch", 1, 255)
        if m["step"] in (1, 2):
            if "hs" not in d:
                raise _Bad("invalid", "REKEY: missing field 'hs'")
            m["hs"] = _parse_hs(d["hs"], "REKEY.hs")
        elif "hs" in d:
            raise _Bad("invalid", "REKEY step 3 carries no handshake message")
    return m


def decode_message(data, from_client: bool) -> tuple[dict | None, str | None, str]:
    """Parse one decrypted control message.

    Returns ``(message, None, "")`` or ``(None, counter_reason, text)`` with
    ``counter_reason`` one of ``malformed``, ``oversized``, ``invalid``.
    Never raises.
    """
    try:
        return _parse(data, from_client), None, ""
    except _Bad as b:
        return None, b.count, b.text
    except Exception as exc:  # pragma: no cover - defensive
        return None, "internal", type(exc).__name__


def _info_json(info: PeerInfo) -> dict:
    return {"name": info.name, "uplinks": [u.to_json() for u in info.uplinks],
            "vnc": info.vnc.to_json(), "lans": list(info.lans), "mode": info.mode,
            "options": {"pair_unmatched": info.pair_unmatched, "ciphers": list(info.ciphers)}}


# --- peer validation ---------------------------------------------------------------------


def _overlap(a, b) -> bool:
    return a.version == b.version and a.overlaps(b)


def _check_vnc(v: Vnc, who: str) -> None:
    iface = v.interface
    p, net = iface.network.prefixlen, iface.network
    if iface.version == 4:
        if p > 31:
            raise _Bad("vnic", f"{who} vNIC {iface} leaves no room for a peer")
        if p <= 30 and iface.ip in (net.network_address, net.broadcast_address):
            raise _Bad("vnic", f"{who} vNIC address {iface.ip} is the network or broadcast "
                               f"address of {net}")
    else:
        if p > 127:
            raise _Bad("vnic", f"{who} vNIC {iface} leaves no room for a peer")
        if iface.ip == net.network_address:
            raise _Bad("vnic", f"{who} vNIC address {iface.ip} is the subnet-router anycast "
                               f"address of {net}")


def _check_lan_list(info: PeerInfo, who: str) -> None:
    nets = info.networks
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if _overlap(a, b):
                raise _Bad("invalid", f"{who} LAN subnets {a} and {b} overlap each other")


def check_peer(local: PeerInfo, peer: PeerInfo, allow_default_route: bool = False) -> None:
    """Validate what the peer announced against our side; raises ``_Bad``
    with code ``vnic``, ``overlap``, ``route`` or ``invalid``.  Use
    :func:`peer_problem` for a non-raising variant."""
    mine, theirs = local.vnc.interface, peer.vnc.interface
    if theirs.network != mine.network:
        raise _Bad("vnic", f"peer vNIC {theirs} is not in our vNIC subnet {mine.network}")
    if theirs.ip == mine.ip:
        raise _Bad("vnic", f"peer vNIC address {theirs.ip} equals ours")
    _check_vnc(peer.vnc, "peer")
    _check_lan_list(peer, "peer")
    ours = local.networks
    uplink_addrs = [ipaddress.ip_address(u.addr) for u in (*local.uplinks, *peer.uplinks)]
    for n in peer.networks:
        if n.prefixlen == 0:
            if not allow_default_route:
                raise _Bad("route", f"peer LAN {n} is a default route (not allowed by our "
                                    "configuration)")
            continue
        for o in ours:
            if o.prefixlen and _overlap(n, o):
                raise _Bad("overlap", f"peer LAN {n} overlaps our LAN {o}")
        if _overlap(n, mine.network):
            raise _Bad("overlap", f"peer LAN {n} overlaps the vNIC subnet {mine.network}")
        for a in uplink_addrs:
            if a.version == n.version and a in n:
                raise _Bad("overlap", f"peer LAN {n} contains uplink address {a} (the tunnel "
                                      "would route its own packets into itself)")


def peer_problem(local: PeerInfo, peer: PeerInfo, allow_default_route: bool = False):
    """``None`` or ``(code, text)``."""
    try:
        check_peer(local, peer, allow_default_route)
    except _Bad as b:
        return b.code, b.text
    return None


# --- helpers ---------------------------------------------------------------------------------


def _next_epoch(e: int) -> int:
    """Key epochs cycle 1..255 (the SMPU header's epoch byte; 0 = unsealed)."""
    return e % 255 + 1


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass
class _Rekey:
    initiator: bool
    epoch: int
    started: float
    previous: int
    hs: object = None
    keys: object = None  # responder: the new SessionKeys (recv side switches at step 3)


class _Connection:
    """What client and server share: framing, encryption, keepalive,
    rekeying, close handling.  Not used directly."""

    is_client = False

    def __init__(self, config: ControlConfig, now: float, local: PeerInfo | None = None):
        self.config = config
        self.local = local if local is not None else config.local_info()
        self.state = State.HANDSHAKE
        self.counters: Counter = Counter()
        self.close_reason: str | None = None
        self.close_text = ""
        self.version: int | None = None
        self.session_id: int | None = None
        self.peer: PeerInfo | None = None
        self.plan: list[SubflowSpec] = []
        self.epoch = 0  # newest data-key epoch installed (receive side)
        self.send_epoch = 0  # epoch the data plane sends with
        self._psk = config.psk  # the key this connection authenticated with (rekeys use it too)
        self.site: str | None = None  # server: the `config site` whose key the client used
        self.keepalive_interval = config.keepalive_interval
        self.keepalive_timeout = config.keepalive_timeout
        self.pair_unmatched = False
        self.cipher: str | None = None  # data-plane AEAD of the session (after WELCOME)
        self._out = bytearray()
        self._events: deque = deque()
        self._decoder = FrameDecoder(PREAUTH_MAX_FRAME)
        self._now = now
        self._deadline = now + config.handshake_timeout  # before ESTABLISHED
        self._send_cs = None
        self._recv_cs = None
        self._hh = b""
        self._last_sent = now
        self._last_recv = now
        self._ka_n = 0
        self._rk: _Rekey | None = None
        self._rekey_at = math.inf
        self._retire: tuple[int, float] | None = None

    # -- public API ----------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def events(self) -> list:
        out = list(self._events)
        self._events.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the socket; ``b""`` means EOF.  Never raises for any
        input.  The I/O edge should read in chunks of at most 64 KiB."""
        self._now = now
        if self.state is State.CLOSED:
            if data:
                self.counters["after_close"] += 1
            return
        if not data:
            self._on_eof()
            return
        self._decoder.feed(data)
        while self.state is not State.CLOSED:
            try:
                frame = self._decoder.next_frame()
                if frame is None:
                    if self._decoder.error:
                        self._frame_error(self._decoder.error)
                    break
                self._on_frame(frame, now)
            except _Bad as b:
                self._fail(b.code, b.text, b.count)
            except Exception as exc:  # a bug must not kill the process
                self._fail("internal", f"internal error ({type(exc).__name__})", "internal")

    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        if self.state is not State.ESTABLISHED:
            return self._deadline
        t = min(self._last_recv + self.keepalive_timeout,
                self._last_sent + self.keepalive_interval, self._rekey_at)
        if self._rk is not None:
            t = min(t, self._rk.started + self.keepalive_timeout)
        if self._retire is not None:
            t = min(t, self._retire[1])
        return t

    def handle_timer(self, now: float) -> None:
        self._now = now
        try:
            self._timer(now)
        except Exception as exc:  # pragma: no cover - defensive
            self._fail("internal", f"internal error ({type(exc).__name__})", "internal")

    def close(self, reason: str = "closed", text: str = "") -> None:
        """Clean local close: BYE (if the channel is up), then terminal."""
        if self.state is State.CLOSED:
            return
        if not WORD_RE.fullmatch(reason):
            raise ValueError("reason must be a word [a-z0-9_-]{1,32}")
        if self._send_cs is not None:
            self._send({"type": "BYE", "reason": reason, "text": _safe(text)})
        self._set_closed(reason, text, by_peer=False)

    def rekey(self, now: float) -> bool:
        """Start a rekey now (either side may).  False if not established or
        one is already running."""
        self._now = now
        if self.state is not State.ESTABLISHED or self._rk is not None:
            return False
        self._start_rekey(now)
        return True

    def note_sealed(self, epoch: int, count: int, now: float) -> bool:
        """The data plane has sealed ``count`` packets under its send key of
        ``epoch`` (``mpvpn.seal.Sealer.sealed`` / ``send_epoch``; cheap, call
        it after each batch).  Starts the same rekey the timer starts once
        ``count`` reaches ``rekey_packets``; True if it did.  A count for an
        epoch we no longer send with is ignored."""
        if (count < self.config.rekey_packets or epoch != self.send_epoch
                or self.state is not State.ESTABLISHED or self._rk is not None):
            return False
        self._now = now
        self._count("rekey_volume")
        self._start_rekey(now)
        return True

    # The message that introduces the peer in state HELLO: HELLO (server side)
    # or WELCOME (client side); set by the subclasses.
    _INTRO = ""

    def _on_frame(self, frame: bytes, now: float) -> None:
        """One complete frame: the Noise handshake first, then one message."""
        if self.state is State.HANDSHAKE:
            self._on_handshake_frame(frame, now)
            return
        m = self._on_message(frame, now)
        if self._common(m, now):
            return
        t = m["type"]
        if self.state is State.HELLO and t == self._INTRO:
            self._on_intro(m, now)
        elif self.state is State.ESTABLISHED and t == "UPDATE":
            self._on_update(m, now)
        else:
            raise self._unexpected(m)

    def status(self) -> dict:
        return {"state": self.state.value, "session_id": self.session_id,
                "peer": self.peer.name if self.peer else None, "version": self.version,
                "epoch": self.epoch, "send_epoch": self.send_epoch,
                "subflows": len(self.plan), "close_reason": self.close_reason,
                "close_text": self.close_text, "counters": dict(self.counters)}

    # -- internals ----------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        self.counters[reason] += 1

    def _send(self, obj: dict) -> None:
        pt = _dumps(obj)
        if len(pt) > MAX_MESSAGE:  # pragma: no cover - our messages are bounded
            raise ValueError("control message too large")
        self._out += encode_frame(self._send_cs.encrypt_with_ad(b"", pt))
        self._last_sent = self._now

    def _emit(self, ev) -> None:
        self._events.append(ev)

    def _set_closed(self, reason: str, text: str, by_peer: bool,
                    retry_after: float | None = None) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason, self.close_text = reason, text
        self._send_cs = self._recv_cs = None
        self._rk = None
        self._emit(ConnectionClosed(reason, text, by_peer, retry_after))
        self._on_closed(reason)

    def _on_closed(self, reason: str) -> None:
        pass

    def _fail(self, code: str, text: str, count: str | None = None, send: bool = True) -> None:
        """We detected bad input or a local failure: ERROR (if possible), close."""
        if self.state is State.CLOSED:
            return
        self._count(count or code)
        self._emit(ProtocolError(code, text, by_peer=False))
        if send and self._send_cs is not None:
            try:
                self._send({"type": "ERROR", "code": code, "text": _safe(text)})
            except Exception:  # pragma: no cover
                pass
        self._set_closed(code, text, by_peer=False)

    def _frame_error(self, why: str) -> None:
        limit = self._decoder.max_frame
        text = (f"frame longer than {limit} bytes" if why == "oversized"
                else "zero-length frame")
        self._fail("invalid", text, why)

    def _on_eof(self) -> None:
        self._count("eof")
        self._set_closed("eof", "peer closed the connection without BYE", by_peer=True)

    def _decrypt(self, frame: bytes) -> bytes:
        try:
            return self._recv_cs.decrypt_with_ad(b"", frame)
        except Exception:
            raise _Bad("auth", "control message failed authentication", "decrypt") from None

    def _on_handshake_frame(self, frame: bytes, now: float) -> None:  # pragma: no cover
        raise NotImplementedError  # subclasses: the Noise message 1 (server) or 2 (client)

    def _on_intro(self, m: dict, now: float) -> None:  # pragma: no cover
        raise NotImplementedError  # subclasses: HELLO (server) or WELCOME (client)

    def _install_channel(self, keys) -> None:
        self._send_cs, self._recv_cs = keys.send, keys.recv
        self._hh = bytes(keys.handshake_hash)
        self._decoder.max_frame = POSTAUTH_MAX_FRAME

    def _established(self, now: float) -> None:
        self.state = State.ESTABLISHED
        self.epoch = self.send_epoch = 1
        self._last_recv = now
        self._rekey_at = now + self._rekey_period()

    def _rekey_period(self) -> float:
        f = 1.0 if self.is_client else self.config.server_rekey_factor
        return self.config.rekey_interval * f

    def _on_message(self, frame: bytes, now: float) -> dict:
        pt = self._decrypt(frame)
        msg = _parse(pt, from_client=not self.is_client)
        self._last_recv = now
        self._seen(now)
        return msg

    def _seen(self, now: float) -> None:
        pass

    def _common(self, m: dict, now: float) -> bool:
        """Messages valid in any post-handshake state.  True if handled."""
        t = m["type"]
        if t == "ERROR":
            self._count("peer_error")
            self._emit(ProtocolError(m["code"], m["text"], by_peer=True))
            self._set_closed(m["code"], m["text"], by_peer=True)
            return True
        if t == "BYE":
            text = f"{m['reason']}: {m['text']}" if m["text"] else m["reason"]
            self._set_closed("bye", text, by_peer=True)
            return True
        if self.state is not State.ESTABLISHED:
            return False
        if t == "KEEPALIVE":
            self._send({"type": "KEEPALIVE_ACK", "n": m["n"]})
            return True
        if t == "KEEPALIVE_ACK":
            return True
        if t == "REKEY":
            self._on_rekey(m, now)
            return True
        return False

    def _unexpected(self, m: dict):
        return _Bad("invalid", f"unexpected {m['type']} in state {self.state.value}", "unexpected")

    # -- timers -------------------------------------------------------------------------------
    def _timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is not State.ESTABLISHED:
            if now >= self._deadline:
                self._timeout(f"handshake not finished within {self.config.handshake_timeout:g} s")
            return
        if now >= self._last_recv + self.keepalive_timeout:
            self._timeout(f"nothing heard from the peer for {self.keepalive_timeout:g} s")
            return
        if self._rk is not None and now >= self._rk.started + self.keepalive_timeout:
            self._fail("timeout", "rekey not answered in time", "rekey_timeout")
            return
        if self._retire is not None and now >= self._retire[1]:
            self._emit(KeysRetired(self._retire[0]))
            self._retire = None
        if self._rk is None and now >= self._rekey_at:
            self._start_rekey(now)
        if now >= self._last_sent + self.keepalive_interval:
            self._ka_n += 1
            self._send({"type": "KEEPALIVE", "n": self._ka_n})

    def _timeout(self, text: str) -> None:
        self._count("timeout")
        self._set_closed("timeout", text, by_peer=False)

    # -- rekey ---------------------------------------------------------------------------------
    def _rekey_prologue(self, epoch: int) -> bytes:
        return (REKEY_PROLOGUE + self._hh + (self.session_id or 0).to_bytes(4, "big")
                + bytes([epoch]))

    def _start_rekey(self, now: float) -> None:
        e = _next_epoch(self.epoch)
        hs = noise.Handshake("NNpsk0", True, self._psk, self._rekey_prologue(e))
        msg = hs.write_message(b"")
        self._rk = _Rekey(True, e, now, self.epoch, hs)
        self._count("rekey_started")
        self._send({"type": "REKEY", "step": 1, "epoch": e,
                    "hs": base64.b64encode(msg).decode("ascii")})

    def _on_rekey(self, m: dict, now: float) -> None:
        step, e = m["step"], m["epoch"]
        rk = self._rk
        if step == 1:
            if e != _next_epoch(self.epoch if rk is None or rk.initiator else rk.previous):
                raise _Bad("invalid", f"REKEY for epoch {e}, expected {_next_epoch(self.epoch)}")
            if rk is not None:
                if not rk.initiator:
                    raise _Bad("invalid", "REKEY while the peer's previous REKEY is unfinished")
                # Collision: both sides started.  The client's rekey wins.
                self._count("rekey_collision")
                if self.is_client:
                    return  # the server will answer ours
                self._rk = rk = None
            hs = noise.Handshake("NNpsk0", False, self._psk, self._rekey_prologue(e))
            try:
                hs.read_message(m["hs"])
                reply = hs.write_message(b"")
                keys = hs.split()
            except noise.NoiseError:
                raise _Bad("auth", "rekey handshake failed", "rekey_auth") from None
            self._send({"type": "REKEY", "step": 2, "epoch": e,
                        "hs": base64.b64encode(reply).decode("ascii")})
            # Step 2 is the last message we send under the old control key.
            self._send_cs = keys.send
            prev = self.epoch
            self._rk = _Rekey(False, e, now, prev, keys=keys)
            self.epoch = e
            self._emit(KeysRotated(e, DataKeys(e, keys.data_send_key, keys.data_recv_key),
                                   prev, sending=False))
        elif step == 2:
            if rk is None or not rk.initiator or rk.epoch != e:
                raise _Bad("invalid", f"unexpected REKEY answer for epoch {e}", "unexpected")
            try:
                rk.hs.read_message(m["hs"])
                keys = rk.hs.split()
            except noise.NoiseError:
                raise _Bad("auth", "rekey handshake failed", "rekey_auth") from None
            # Step 2 was the last message under the old receive key, step 3
            # is the last we send under the old send key.
            self._recv_cs = keys.recv
            self._send({"type": "REKEY", "step": 3, "epoch": e})
            self._send_cs = keys.send
            self._hh = bytes(keys.handshake_hash)
            prev = self.epoch
            self.epoch = self.send_epoch = e
            self._rk = None
            self._emit(KeysRotated(e, DataKeys(e, keys.data_send_key, keys.data_recv_key),
                                   prev, sending=True))
            self._activated(now, prev)
        else:
            if rk is None or rk.initiator or rk.epoch != e:
                raise _Bad("invalid", f"unexpected REKEY confirmation for epoch {e}", "unexpected")
            self._recv_cs = rk.keys.recv  # step 3 was the last under the old key
            self._hh = bytes(rk.keys.handshake_hash)
            self.send_epoch = e
            self._rk = None
            self._emit(KeysActivated(e))
            self._activated(now, rk.previous)

    def _activated(self, now: float, prev: int) -> None:
        self._count("rekeyed")
        if self._retire is not None:
            self._emit(KeysRetired(self._retire[0]))
        self._retire = (prev, now + self.config.key_overlap)
        self._rekey_at = now + self._rekey_period()


# --- client -----------------------------------------------------------------------------------


class ClientConnection(_Connection):
    """The client side of one control connection (create it once TCP is
    connected; it queues the first handshake message at once).

    ``stamps``: the process's :class:`HandshakeStamps` (one per agent, shared
    by its connection attempts); a fresh one if omitted."""

    _INTRO = "WELCOME"

    is_client = True

    def __init__(self, config: ControlConfig, now: float, stamps: HandshakeStamps | None = None):
        super().__init__(config, now)
        self._hs = noise.Handshake(config.pattern, True, config.psk, PROLOGUE,
                                   s=config.static_key, rs=config.remote_static)
        self._keys = None
        self._seq = 0  # our UPDATE sequence
        self._acked = 0
        self._uplinks_at = {0: self.local.uplinks}  # our uplinks as of each UPDATE seq
        self.retry_after: float | None = None  # set when the server answered BUSY
        msg1 = self._hs.write_message(_dumps({"versions": list(config.versions)}))
        sender, counter = (stamps if stamps is not None else HandshakeStamps()).next()
        stamp = stamp_first_message(config.psk, msg1, sender, counter)
        self._mac_key = mac_key(config.psk)
        self._stamp_mac = stamp[-MAC_LEN:]
        self._out += encode_frame(msg1) + encode_frame(stamp)
        self._last_sent = now
        self.server_addresses: list[tuple[str, int]] = []

    def send_update(self, now: float, uplinks=None, lans=None) -> None:
        """Our uplinks and/or LAN subnets changed: tell the server.  The plan
        changes when the server answers (PeerUpdated)."""
        self._now = now
        if self.state is not State.ESTABLISHED:
            raise ValueError("not established")
        ups = self.local.uplinks if uplinks is None else \
            [u if isinstance(u, Uplink) else Uplink(*u) for u in uplinks]
        new = _local_info(self.local.name, ups, self.local.vnc,
                          self.local.lans if lans is None else list(lans), self.local.mode,
                          self.local.pair_unmatched, None)
        if self._seq - self._acked >= 64:
            raise ValueError("too many unacknowledged updates")
        self._seq += 1
        self._uplinks_at[self._seq] = new.uplinks
        self.local = new
        msg = {"type": "UPDATE", "seq": self._seq}
        if uplinks is not None:
            msg["uplinks"] = [u.to_json() for u in new.uplinks]
        if lans is not None:
            msg["lans"] = list(new.lans)
        if len(msg) == 2:
            msg["uplinks"] = [u.to_json() for u in new.uplinks]
        self._send(msg)

    def _learn(self, server: PeerInfo) -> None:
        # (addr, port) of the server's other uplinks for ClientReconnect; the
        # port is None when the server did not say (use the one that worked).
        self.server_addresses = [(u.addr, server.control_port) for u in server.uplinks]

    def _on_closed(self, reason: str) -> None:
        self._hs = None
        self._keys = None

    def _on_eof(self) -> None:
        if self.state is State.HANDSHAKE:
            # A server that holds our key answers (message 2 or BUSY); it
            # closes silently only on a MAC that none of its keys makes.
            self._count("auth")
            self._emit(ProtocolError("auth", "server closed the connection during the handshake: "
                                             "wrong PSK or static key (or not an orayboxvpn "
                                             "server speaking control protocol 2)", by_peer=True))
            self._set_closed("auth", "handshake rejected by the server", by_peer=True)
        else:
            super()._on_eof()

    def _on_handshake_frame(self, frame: bytes, now: float) -> None:
        if len(frame) == BUSY_LEN and frame[:4] == BUSY_MAGIC:
            self._on_busy(frame)
        else:
            self._on_msg2(frame, now)

    def _on_busy(self, frame: bytes) -> None:
        _magic, ms, tag = BUSY.unpack(frame)
        want = _mac(self._mac_key, b"busy", frame[4:8], self._stamp_mac)
        if not hmac.compare_digest(tag, want):
            self._count("bad_psk")
            self._emit(ProtocolError("auth", "the server's BUSY reply failed authentication",
                                     by_peer=False))
            self._set_closed("auth", "handshake failed", by_peer=False)
            return
        self.retry_after = min(ms, MAX_RETRY_MS) / 1000.0
        self._count("busy")
        self._set_closed("busy", f"server busy (too many handshakes at once); it holds our key, "
                                 f"retry in {self.retry_after:g} s", by_peer=True,
                         retry_after=self.retry_after)

    def _on_intro(self, m: dict, now: float) -> None:
        self._on_welcome(m, now)

    def _on_msg2(self, frame: bytes, now: float) -> None:
        try:
            payload = self._hs.read_message(frame)
        except noise.NoiseError:
            self._count("bad_psk")
            self._emit(ProtocolError("auth", "the server's handshake reply failed authentication "
                                             "(wrong PSK or keys?)", by_peer=False))
            self._set_closed("auth", "handshake failed", by_peer=False)
            return
        keys = self._hs.split()
        self._hs = None
        self._install_channel(keys)
        try:
            obj = _loads(payload)
            if "error" in obj:
                d = _obj(obj, "handshake reply", {"error"}, {"text"})
                code = _match(d["error"], "error", WORD_RE, "an error code")
                text = _safe(_str(d.get("text", ""), "text", MAX_TEXT))
                self._count("peer_error")
                self._emit(ProtocolError(code, text, by_peer=True))
                self._set_closed(code, text, by_peer=True)
                return
            d = _obj(obj, "handshake reply", {"version"})
            v = _int(d["version"], "version", 1, 255)
        except _Bad as b:
            raise _Bad("invalid", f"bad handshake reply: {b.text}", "malformed") from None
        if v not in self.config.versions:
            raise _Bad("version", f"server chose version {v}, we offered "
                                  f"{list(self.config.versions)}", "bad_version")
        self.version = v
        self._keys = keys
        self._emit(HandshakeComplete(v, self._hh))
        self.state = State.HELLO
        self._send(dict(type="HELLO", **_info_json(self.local)))

    def _on_welcome(self, m: dict, now: float) -> None:
        server = replace(m["info"], control_port=m["control_port"])
        check_peer(self.local, server, self.config.allow_peer_default_route)
        pe = server.pair_unmatched
        expected = pairing.plan(self.local.uplinks, server.uplinks, pe, None, local_is_client=True)
        if not pairing.same_pairs(expected, m["plan"], local_is_client=True):
            raise _Bad("invalid", "the server's subflow plan differs from ours "
                                  "(pairing rules disagree)", "plan")
        self.session_id = m["session_id"]
        self.peer = server
        self.plan = expected
        self.pair_unmatched = pe
        self.keepalive_interval, self.keepalive_timeout = m["interval"], m["timeout"]
        cipher = server.cipher or seal.CHACHA
        if cipher not in self.local.ciphers:
            raise _Bad("invalid", f"the server chose cipher {cipher!r}, we offered "
                                  f"{list(self.local.ciphers)}")
        self.cipher = cipher
        self._learn(server)
        self._established(now)
        keys = self._keys
        self._keys = None
        self._emit(SessionEstablished(self.session_id, server, list(expected),
                                      DataKeys(1, keys.data_send_key, keys.data_recv_key), 1,
                                      self.version, cipher))

    def _on_update(self, m: dict, now: float) -> None:
        ack = m["ack"]
        if not self._acked <= ack <= self._seq:
            raise _Bad("invalid", f"UPDATE acknowledges {ack}, we sent up to {self._seq}")
        server = self.peer
        if "uplinks" in m:
            server = replace(server, uplinks=m["uplinks"])
        if "lans" in m:
            server = replace(server, lans=m["lans"])
        check_peer(self.local, server, self.config.allow_peer_default_route)
        mine = self._uplinks_at[ack]
        expected = pairing.plan(mine, server.uplinks, self.pair_unmatched, self.plan,
                                local_is_client=True)
        if not pairing.same_pairs(expected, m["plan"], local_is_client=True):
            raise _Bad("invalid", "the server's updated subflow plan differs from ours", "plan")
        for s in [s for s in self._uplinks_at if s < ack]:
            del self._uplinks_at[s]
        self._acked = ack
        d = pairing.diff(self.plan, expected)
        self.peer, self.plan = server, expected
        self._learn(server)
        self._emit(PeerUpdated(server, list(expected), d, "peer"))


# --- server ------------------------------------------------------------------------------------


class ServerConnection(_Connection):
    """The server side of one accepted TCP connection.

    Until the client's first handshake message passes the gate (its MAC under
    one of our keys, a fresh stamp, handshake budget), it holds nothing but
    a frame buffer and that message; no Noise state, no session, no reply.
    Get one from :meth:`ServerSessions.accept` (registry, pre-auth limits) or
    build it directly (then ``rng`` picks the session ID and ``guard`` is
    its own).
    """

    _INTRO = "HELLO"

    is_client = False

    def __init__(self, config: ControlConfig, now: float, registry: ServerSessions | None = None,
                 peer_addr=None, rng: random.Random | None = None,
                 guard: HandshakeGuard | None = None):
        # With a registry, share its validated local info: an accepted but
        # unauthenticated connection costs a frame buffer and little else.
        super().__init__(config, now, registry.local if registry is not None else None)
        self.registry = registry
        self.peer_addr = peer_addr
        self._rng = rng or random.SystemRandom()
        self._guard = guard if guard is not None else (
            registry.guard if registry is not None else HandshakeGuard())
        self._msg1: bytes | None = None  # the first frame, until its stamp arrives
        self._session: ServerSession | None = None
        self._peer_seq = 0
        self._keys_for_session = None

    def _count(self, reason: str) -> None:
        self.counters[reason] += 1
        if self.registry is not None:
            self.registry.counters[reason] += 1

    def send_update(self, now: float, uplinks=None, lans=None) -> None:
        """Our uplinks and/or LANs changed: re-plan and tell the client.
        Raises ValueError if the new local info is invalid or clashes with
        the client's."""
        self._now = now
        if self.state is not State.ESTABLISHED:
            raise ValueError("not established")
        ups = self.local.uplinks if uplinks is None else \
            [u if isinstance(u, Uplink) else Uplink(*u) for u in uplinks]
        new = _local_info(self.local.name, ups, self.local.vnc,
                          self.local.lans if lans is None else list(lans), self.local.mode,
                          self.local.pair_unmatched, self.local.control_port)
        problem = peer_problem(new, self.peer, self.config.allow_peer_default_route)
        if problem:
            raise ValueError(problem[1])
        new_plan = pairing.plan(new.uplinks, self.peer.uplinks, self.pair_unmatched, self.plan,
                                local_is_client=False)
        d = pairing.diff(self.plan, new_plan)
        self.local, self.plan = new, new_plan
        msg = {"type": "UPDATE", "ack": self._peer_seq,
               "plan": pairing.to_wire(new_plan, local_is_client=False)}
        if uplinks is not None:
            msg["uplinks"] = [u.to_json() for u in new.uplinks]
        if lans is not None:
            msg["lans"] = list(new.lans)
        self._send(msg)
        self._emit(PeerUpdated(self.peer, list(new_plan), d, "local"))

    # -- pre-auth -------------------------------------------------------------------------------
    def _frame_error(self, why: str) -> None:
        if self.state is State.HANDSHAKE:
            self._abort(why, "first handshake message " +
                        ("too long" if why == "oversized" else "malformed"))
        else:
            super()._frame_error(why)

    def _abort(self, reason: str, text: str) -> None:
        """Pre-auth end: count, send nothing, close."""
        self._count(reason)
        if self.registry is not None and reason in PREAUTH_FAILURES:
            self.registry._preauth_failed(self, self._now)
        self._set_closed(reason, text, by_peer=False)

    def _timeout(self, text: str) -> None:
        if self.state is State.HANDSHAKE and self._msg1 is not None:
            # what a client older than control protocol 2 does: message 1 alone
            self._abort("no_stamp", "a first handshake message without the stamp of control "
                                    "protocol 2 (a client of an older release?)")
        elif self.state is State.HANDSHAKE:
            self._abort("timeout", text)
        else:
            super()._timeout(text)

    def _on_eof(self) -> None:
        if self.state is State.HANDSHAKE:
            self._abort("eof", "client closed the connection before the handshake")
        else:
            super()._on_eof()

    def _on_handshake_frame(self, frame: bytes, now: float) -> None:
        self._on_msg1(frame, now)

    def _on_intro(self, m: dict, now: float) -> None:
        self._on_hello(m, now)

    def _on_msg1(self, frame: bytes, now: float) -> None:
        if self._msg1 is None:  # the Noise message; its stamp and MAC follow
            if len(frame) < MIN_HANDSHAKE_MSG:
                self._abort("malformed", "first handshake message too short")
                return
            self._msg1 = frame
            return
        msg1, self._msg1 = self._msg1, None
        if len(frame) != STAMP_LEN:
            self._abort("malformed", "first handshake message without a valid stamp")
            return
        cfg, guard = self.config, self._guard
        # 1. MAC: one keyed hash per accepted key (a hub's sites each have
        # their own); nothing is kept for a message none of them MACed.
        found = guard.identify(cfg.keys(), msg1, frame)
        if found is None:
            self._abort("bad_psk", "first handshake message failed authentication")
            return
        site, psk, key = found
        sender, counter, tag = STAMP.unpack(frame)
        # 2. Freshness: a replayed message is dropped unanswered.
        if not guard.fresh(site, sender, counter):
            self._abort("replay", "replayed first handshake message")
            return
        # 3. Budget: a genuine client we cannot serve now learns so (BUSY).
        wait = guard.take_handshake(now)
        if wait > 0:
            self._out += encode_frame(busy_reply(key, tag, wait))
            self._count("busy_handshake")
            self._set_closed("busy", "handshake budget exhausted; told the client to retry",
                             by_peer=False, retry_after=wait)
            return
        hs = noise.Handshake(cfg.pattern, False, psk, PROLOGUE, s=cfg.static_key,
                             rs=cfg.remote_static)
        try:
            payload = hs.read_message(msg1)
        except noise.NoiseError:  # MACed by a key holder, yet not a valid message 1
            self._abort("bad_psk", "first handshake message failed authentication")
            return
        self._psk, self.site = psk, site
        self._leave_preauth()
        # Authenticated by the PSK and fresh from here on.
        err = None
        try:
            d = _obj(_loads(payload), "handshake", {"versions"})
            offered = _list(d["versions"], "versions", MAX_VERSIONS)
            offered = {_int(v, "versions[]", 1, 255) for v in offered}
            common = offered & set(cfg.versions)
            if not common:
                err = ("version", f"no common protocol version: client offers "
                                  f"{sorted(offered)}, server speaks {list(cfg.versions)}",
                       "bad_version")
        except _Bad as b:
            err = ("invalid", f"bad handshake payload: {b.text}", "malformed")
        if err:
            # Authenticated client we cannot serve: say why inside the
            # (encrypted, authenticated) second handshake message, then close.
            code, text, count = err
            reply = _dumps({"error": code, "text": _safe(text, 160)})
            self._out += encode_frame(hs.write_message(reply))
            self._count(count)
            self._emit(ProtocolError(code, text, by_peer=False))
            self._set_closed(code, text, by_peer=False)
            return
        self.version = max(common)
        self._out += encode_frame(hs.write_message(_dumps({"version": self.version})))
        self._last_sent = now
        keys = hs.split()
        self._install_channel(keys)
        self.state = State.HELLO
        self._deadline = now + cfg.handshake_timeout
        self._emit(HandshakeComplete(self.version, self._hh))

    def _on_hello(self, m: dict, now: float) -> None:
        client = m["info"]
        check_peer(self.local, client, self.config.allow_peer_default_route)
        pe = bool(self.config.pair_unmatched or client.pair_unmatched)
        plan = pairing.plan(self.local.uplinks, client.uplinks, pe, None, local_is_client=False)
        if self.registry is not None:
            sid = self.registry._open(self, client, now)
        else:
            sid = _random_sid(self._rng, ())
        self.session_id = sid
        self.peer = client
        self.plan = plan
        self.pair_unmatched = pe
        cipher = seal.choose_cipher(self.local.ciphers, client.ciphers)
        if cipher is None:  # cannot happen between our versions: both always offer ChaCha20
            raise _Bad("invalid", f"no common data cipher (client offers {list(client.ciphers)})")
        self.cipher = cipher
        welcome = dict(type="WELCOME", session_id=sid, **_info_json(self.local))
        welcome["options"] = {"pair_unmatched": pe, "ciphers": list(self.local.ciphers),
                              "cipher": cipher}
        welcome["plan"] = pairing.to_wire(plan, local_is_client=False)
        welcome["keepalive"] = {"interval": self.keepalive_interval,
                                "timeout": self.keepalive_timeout}
        if self.local.control_port:
            welcome["control_port"] = self.local.control_port
        self._send(welcome)
        self._established(now)
        keys = self._keys_for_session
        self._emit(SessionEstablished(sid, client, list(plan),
                                      DataKeys(1, keys.data_send_key, keys.data_recv_key), 1,
                                      self.version, cipher))

    def _install_channel(self, keys) -> None:
        super()._install_channel(keys)
        self._keys_for_session = keys

    def _on_update(self, m: dict, now: float) -> None:
        seq = m["seq"]
        if seq != self._peer_seq + 1:
            raise _Bad("invalid", f"UPDATE seq {seq}, expected {self._peer_seq + 1}")
        client = self.peer
        if "uplinks" in m:
            client = replace(client, uplinks=m["uplinks"])
        if "lans" in m:
            client = replace(client, lans=m["lans"])
        check_peer(self.local, client, self.config.allow_peer_default_route)
        if self.registry is not None:
            self.registry._check_conflicts(client, exclude=self._session)
        new_plan = pairing.plan(self.local.uplinks, client.uplinks, self.pair_unmatched,
                                self.plan, local_is_client=False)
        d = pairing.diff(self.plan, new_plan)
        self._peer_seq = seq
        self.peer, self.plan = client, new_plan
        if self._session is not None:
            self._session.peer = client
        self._send({"type": "UPDATE", "ack": seq,
                    "plan": pairing.to_wire(new_plan, local_is_client=False)})
        self._emit(PeerUpdated(client, list(new_plan), d, "peer"))

    def _seen(self, now: float) -> None:
        if self._session is not None:
            self._session.last_seen = now

    def _leave_preauth(self) -> None:
        if self.registry is not None:
            self.registry._preauth_done(self)

    def _on_closed(self, reason: str) -> None:
        self._keys_for_session = None
        self._msg1 = None
        if self.registry is not None:
            self.registry._preauth_done(self)
            self.registry._conn_closed(self, reason, self._now)


# --- the server's session registry ----------------------------------------------------------


@dataclass(eq=False)
class ServerSession:
    """One client site's session on the server."""

    session_id: int
    name: str
    peer: PeerInfo
    conn: ServerConnection | None  # None once the control connection is gone (detached)
    created: float
    last_seen: float


def _random_sid(rng, used) -> int:
    for _ in range(64):
        sid = rng.getrandbits(32)
        if sid and sid not in used:
            return sid
    raise _Bad("busy", "could not allocate a session ID", "busy")


_DEFAULT = object()


class ServerSessions:
    """All sessions of one server process (hub and spoke).

    * :meth:`accept` is called for every accepted TCP connection and returns
      its :class:`ServerConnection`.  Nothing is refused at accept time (a
      genuine client may share its address with junk: a NAT, a CGNAT).
      Instead, connections that have not yet passed the handshake gate
      (:class:`HandshakeGuard`) are bounded: at most
      ``max_pending_per_source`` per source address (IPv6: per /64) and
      ``max_pending`` in all, the oldest closed first (``evicted``); a
      source whose failures (bad MAC, malformed, timeout...) exceed its
      ``limiter`` budget gets only ``penalty_pending`` of them.  A genuine
      client sends its first message at once, so only junk grows old.
      A first message whose MAC is good bypasses all of this; the guard's
      global handshake budget may still answer it BUSY.
    * Session IDs are random, nonzero and unique (``rng`` injectable).
    * A client that reconnects with the same site name replaces its old
      session (the old connection gets BYE ``replaced``).
    * When a control connection is lost (EOF, keepalive timeout) its session
      is *detached*, not freed: the data plane may still carry traffic and
      the client is reconnecting.  Any session silent (no control message,
      no :meth:`touch` from the data plane) for ``session_timeout`` is
      expired.  Every end of a session is reported once as
      :class:`SessionFreed` through :meth:`next_event`.
    """

    def __init__(self, config: ControlConfig, *, rng: random.Random | None = None,
                 max_sessions: int = 256, session_timeout: float = 90.0, limiter=_DEFAULT,
                 guard: HandshakeGuard | None = None, max_pending: int = 1024,
                 max_pending_per_source: int = 32, penalty_pending: int = 4):
        self.local = config.local_info()  # validate our config up front
        self.config = config
        self.rng = rng or random.SystemRandom()
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        # per-source budget of pre-auth *failures* (not of connections)
        self.limiter: RateLimiter | None = RateLimiter() if limiter is _DEFAULT else limiter
        self.guard = guard if guard is not None else HandshakeGuard()
        if not 1 <= penalty_pending <= max_pending_per_source <= max_pending:
            raise ValueError("need 1 <= penalty_pending <= max_pending_per_source <= max_pending")
        self.max_pending, self.max_pending_per_source = max_pending, max_pending_per_source
        self.penalty_pending = penalty_pending
        self._pending: OrderedDict = OrderedDict()  # pre-auth ServerConnection -> source key
        self._pending_by_source: dict[str, OrderedDict] = {}
        self._keyer = self.limiter if self.limiter is not None else RateLimiter()
        self.sessions: dict[int, ServerSession] = {}
        self.by_name: dict[str, ServerSession] = {}
        self.counters: Counter = Counter()
        self._events: deque = deque()

    # -- public ------------------------------------------------------------------------------------
    def accept(self, peer_addr, now: float) -> ServerConnection:
        src = self._keyer.key(peer_addr)
        quota = self.max_pending_per_source
        if self.limiter is not None and self.limiter.exhausted(peer_addr, now):
            quota = self.penalty_pending
        mine = self._pending_by_source.get(src)
        while mine and len(mine) >= quota:
            self._evict(next(iter(mine)), "too many unauthenticated connections from its source")
        while len(self._pending) >= self.max_pending:
            self._evict(next(iter(self._pending)), "too many unauthenticated connections")
        self.counters["accepted"] += 1
        conn = ServerConnection(self.config, now, registry=self, peer_addr=peer_addr, rng=self.rng)
        self._pending[conn] = src
        self._pending_by_source.setdefault(src, OrderedDict())[conn] = None
        return conn

    @property
    def pending(self) -> int:
        """Connections that have not passed the handshake gate yet."""
        return len(self._pending)

    def touch(self, session_id: int, now: float) -> bool:
        """The data plane heard from this session (keeps it from expiring)."""
        s = self.sessions.get(session_id)
        if s is None:
            return False
        if now > s.last_seen:
            s.last_seen = now
        return True

    def get(self, session_id: int) -> ServerSession | None:
        return self.sessions.get(session_id)

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, session_id) -> bool:
        return session_id in self.sessions

    def next_event(self):
        return self._events.popleft() if self._events else None

    def events(self) -> list:
        out = list(self._events)
        self._events.clear()
        return out

    def get_timer(self) -> float | None:
        if not self.sessions:
            return None
        return min(s.last_seen for s in self.sessions.values()) + self.session_timeout

    def handle_timer(self, now: float) -> None:
        for s in list(self.sessions.values()):
            if now >= s.last_seen + self.session_timeout:
                self._free(s, "expired")
                self._drop_conn(s, "expired", "session silent for too long")

    def close_all(self, reason: str = "shutdown") -> None:
        for s in list(self.sessions.values()):
            self._free(s, reason)
            self._drop_conn(s, reason, "server shutting down")

    def status(self) -> dict:
        return {"sessions": {s.session_id: {"name": s.name, "attached": s.conn is not None,
                                            "last_seen": s.last_seen}
                             for s in self.sessions.values()},
                "pending": len(self._pending), "counters": dict(self.counters)}

    # -- from connections --------------------------------------------------------------------------
    def _evict(self, conn: ServerConnection, text: str) -> None:
        self._preauth_done(conn)
        self.counters["evicted"] += 1
        conn.close("evicted", text)  # pre-auth: sends nothing; the edge sees ConnectionClosed

    def _preauth_done(self, conn: ServerConnection) -> None:
        src = self._pending.pop(conn, None)
        if src is None:
            return
        mine = self._pending_by_source.get(src)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._pending_by_source[src]

    def _preauth_failed(self, conn: ServerConnection, now: float) -> None:
        if self.limiter is not None:
            self.limiter.allow(conn.peer_addr, now)  # spends a token of its source

    def _check_conflicts(self, peer: PeerInfo, exclude: ServerSession | None = None) -> None:
        nets = [n for n in peer.networks if n.prefixlen]
        for s in self.sessions.values():
            if s is exclude or s.name == peer.name:
                continue
            if s.peer.vnc.ip == peer.vnc.ip:
                raise _Bad("vnic", f"vNIC address {peer.vnc.ip} is already used by another site")
            for o in s.peer.networks:
                if not o.prefixlen:
                    continue
                for n in nets:
                    if _overlap(n, o):
                        raise _Bad("overlap", f"LAN {n} overlaps a LAN of another site")

    def _open(self, conn: ServerConnection, peer: PeerInfo, now: float) -> int:
        self._check_conflicts(peer)
        old = self.by_name.get(peer.name)
        if old is None and len(self.sessions) >= self.max_sessions:
            raise _Bad("busy", f"server is full ({self.max_sessions} sessions)", "busy")
        sid = _random_sid(self.rng, self.sessions)
        if old is not None:
            self._free(old, "replaced")
            self._drop_conn(old, "replaced", "a new connection from this site replaced the session")
        s = ServerSession(sid, peer.name, peer, conn, now, now)
        self.sessions[sid] = s
        self.by_name[peer.name] = s
        conn._session = s
        self.counters["sessions_opened"] += 1
        return sid

    def _conn_closed(self, conn: ServerConnection, reason: str, now: float) -> None:
        s = conn._session
        if s is None or self.sessions.get(s.session_id) is not s or s.conn is not conn:
            return
        if reason in DETACH_REASONS:
            s.conn = None
            self.counters["sessions_detached"] += 1
            return
        self._free(s, reason)
        s.conn = None

    def _free(self, s: ServerSession, reason: str) -> None:
        if self.sessions.get(s.session_id) is not s:
            return
        del self.sessions[s.session_id]
        if self.by_name.get(s.name) is s:
            del self.by_name[s.name]
        self.counters["sessions_freed"] += 1
        self._events.append(SessionFreed(s.session_id, s.name, reason, s.conn))

    def _drop_conn(self, s: ServerSession, reason: str, text: str) -> None:
        conn, s.conn = s.conn, None
        if conn is not None and not conn.closed:
            conn._session = None
            conn.close(reason, text)


# --- rate limiting ------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets keyed by source address (IPv4 address, IPv6 /64),
    ``rate`` tokens per second up to ``burst``; at most ``max_entries``
    buckets (least recently used evicted first).  Sans-I/O."""

    def __init__(self, rate: float = 2.0, burst: float = 10.0, max_entries: int = 4096,
                 ipv6_prefix: int = 64):
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("need rate > 0, burst >= 1, max_entries >= 1")
        self.rate, self.burst, self.max_entries = rate, burst, max_entries
        self.ipv6_prefix = ipv6_prefix
        self._table: OrderedDict = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._table)

    def key(self, addr) -> str:
        host = addr[0] if isinstance(addr, (tuple, list)) and addr else addr
        try:
            ip = ipaddress.ip_address(host)
        except (ValueError, TypeError):
            return _safe(str(host), 64)
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
        return str(ip)

    def exhausted(self, addr, now: float) -> bool:
        """True if ``addr``'s bucket has no whole token (nothing is spent)."""
        b = self._table.get(self.key(addr))
        if b is None:
            return False
        tokens, last = b
        return min(self.burst, tokens + max(0.0, now - last) * self.rate) < 1.0

    def allow(self, addr, now: float) -> bool:
        k = self.key(addr)
        b = self._table.get(k)
        if b is None:
            if len(self._table) >= self.max_entries:
                self._table.popitem(last=False)
                self.evictions += 1
            tokens = self.burst
        else:
            tokens, last = b
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
            self._table.move_to_end(k)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._table[k] = (tokens, now)
        return ok


# --- client reconnect policy ---------------------------------------------------------------------

#: Failures that retrying soon cannot fix (configuration): wait ``cap``.
CONFIG_FAILURES = frozenset({"auth", "version", "vnic", "overlap", "route", "invalid"})


class ClientReconnect:
    """Where and when the client (re)connects its control connection.

    Rotates through the configured server addresses and, after the first
    success, also the server's uplink addresses learned from WELCOME
    (so losing the carrier that carried the control connection does not lose
    control).  After every failure it moves to the next address; the delay
    doubles after each full round of failures (``base``, ``base*factor``,
    ... up to ``cap``), reduced by up to ``jitter`` (a fraction) at random.
    Configuration failures (``CONFIG_FAILURES``) wait ``cap`` at once,
    except a first ``auth`` after anything else: a server closes silently on
    a wrong key, but also on a first message it never read (its connection
    pushed out by junk from our address, a copy raced ahead by someone on
    the path), so one ``auth`` is retried on the ordinary backoff and only a
    second one in a row waits ``cap``.
    A server that answered BUSY (it holds our key, but is out of handshake
    budget) is tried again at the same address after the delay it asked
    for, clamped to ``busy_min``..``busy_max`` and lengthened by up to
    ``jitter`` at random (so clients it turned away do not return in step);
    that is not counted as a failure.

    Sans-I/O: ``get_timer()`` says when to call ``handle_timer(now)``, which
    returns the address to connect to; report the outcome with
    ``failed(now, reason)`` (connect failed, or the connection ended) or
    ``established(now, learned)``.
    """

    def __init__(self, servers, now: float = 0.0, *, base: float = 1.0, factor: float = 2.0,
                 cap: float = 60.0, jitter: float = 0.3, rng: random.Random | None = None,
                 busy_min: float = 0.05, busy_max: float = 2.0):
        self.configured = [(str(h), int(p)) for h, p in servers]
        if not self.configured:
            raise ValueError("no server address configured")
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter < 1")
        self.base, self.factor, self.cap, self.jitter = base, factor, cap, jitter
        if not 0 < busy_min <= busy_max:
            raise ValueError("need 0 < busy_min <= busy_max")
        self.busy_min, self.busy_max = busy_min, busy_max
        self.busy = 0  # BUSY answers received
        # (now, what) of the last attempts and outcomes: "connect host:port",
        # "established", "busy", "failed <reason>" (the agent's own record)
        self.history: deque = deque(maxlen=32)
        self.rng = rng or random.Random()
        self.learned: list[tuple[str, int]] = []
        self.state = "waiting"  # waiting | connecting | connected
        self.failures = 0  # consecutive, since the last success
        self._auth = 0  # consecutive auth failures
        self.attempts = 0
        self.current: tuple[str, int] | None = None
        self._index = 0
        self._next = now

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.configured + [a for a in self.learned if a not in self.configured]

    def get_timer(self) -> float | None:
        return self._next if self.state == "waiting" else None

    def handle_timer(self, now: float) -> tuple[str, int] | None:
        if self.state != "waiting" or now < self._next:
            return None
        addrs = self.addresses
        self.current = addrs[self._index % len(addrs)]
        self.state = "connecting"
        self.attempts += 1
        self.history.append((now, f"connect {self.current[0]}:{self.current[1]}"))
        return self.current

    def established(self, now: float, learned=()) -> None:
        self.state = "connected"
        self.failures = 0
        self._auth = 0
        self.history.append((now, "established"))
        for a in learned:
            port = a[1] if a[1] is not None else (self.current[1] if self.current else None)
            if port is None:
                continue
            a = (str(a[0]), int(port))
            if a not in self.learned and a not in self.configured:
                self.learned.append(a)
        addrs = self.addresses
        if self.current in addrs:
            self._index = addrs.index(self.current)

    def failed(self, now: float, reason: str = "", retry_after: float | None = None) -> float:
        """The attempt failed or the connection ended; returns the delay.
        ``retry_after``: the server answered BUSY and asked for this delay."""
        self.state = "waiting"
        if retry_after is not None:
            self.busy += 1
            self.history.append((now, "busy"))
            delay = min(self.busy_max, max(self.busy_min, retry_after))
            delay *= 1.0 + self.jitter * self.rng.random()
            self._next = now + delay
            return delay
        self.history.append((now, f"failed {reason}"))
        n = len(self.addresses)
        self.failures += 1
        self._index = (self._index + 1) % n
        self._auth = self._auth + 1 if reason == "auth" else 0
        if reason in CONFIG_FAILURES and not (reason == "auth" and self._auth == 1):
            delay = self.cap
        else:
            rounds = (self.failures - 1) // n
            delay = min(self.cap, self.base * self.factor ** min(rounds, 64))
        delay *= 1.0 - self.jitter * self.rng.random()
        self.state = "waiting"
        self._next = now + delay
        return delay
