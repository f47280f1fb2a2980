"""Control connection: what the server admits before any costly work
(control protocol 2), sans-I/O.

* the client's freshness stamp and MAC after its first handshake message
  (:func:`stamp_first_message`, :class:`HandshakeStamps`) and the server's
  BUSY answer (:func:`busy_reply`);
* :class:`HandshakeGuard`: which key MACed a first message, is its stamp
  fresh, is there handshake budget left (else BUSY);
* :class:`RateLimiter`: token buckets per source address for pre-auth
  *failures* (nothing is refused at accept time).

The order of the checks and why: ``docs/control.md`` ("Handshake and what
may happen before authentication").
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from mpvpn.core.controlmsg import safe_text

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

#: Pre-authentication ends that count against the source address's failure
#: budget (:class:`RateLimiter`).  A replay or BUSY does not: its MAC is good.
PREAUTH_FAILURES = frozenset({"bad_psk", "malformed", "oversized", "timeout", "eof", "no_stamp"})


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
        self.changes = 0  # records written by fresh(): the agent saves them when this moves

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
        self.changes += 1
        return True

    def records(self) -> list[tuple[str | None, bytes, int]]:
        """The freshness records, least recently used first: ``(site, sender,
        greatest counter)``.  Saved across restarts (the agent keeps them in
        its run directory), so that a first message captured before a
        restart is not answered after it either."""
        return [(site, sender, counter) for (site, sender), counter in self._seen.items()]

    def restore(self, records) -> int:
        """Take saved :meth:`records` (least recently used first), keeping the
        greater counter where we already have one.  Entries that are not
        well formed are skipped (a damaged file costs freshness records, not
        the start).  Returns the number taken."""
        taken = 0
        for rec in records:
            try:
                site, sender, counter = rec
            except (TypeError, ValueError):
                continue
            if not (site is None or isinstance(site, str)) or not isinstance(sender, bytes) \
                    or len(sender) != SENDER_LEN or type(counter) is not int \
                    or not 0 < counter <= MAX_COUNTER:
                continue
            key = (site, sender)
            self._seen[key] = max(counter, self._seen.get(key, 0))
            self._seen.move_to_end(key)
            taken += 1
        while len(self._seen) > self.max_senders:
            self._seen.popitem(last=False)
        return taken

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

    def admit(self, keys, msg1: bytes, stamp: bytes, now: float) -> Admission:
        """The whole gate for a first message ``msg1`` and its ``stamp``
        (exactly ``STAMP_LEN`` bytes), cheapest check first:

        1. MAC: one keyed hash per key in ``keys`` (``[(site, psk)]``);
           nothing is kept for a message none of them MACed (``bad_psk``);
        2. freshness: a replayed message is dropped unanswered (``replay``);
        3. budget: a genuine client we cannot serve now is told so
           (``busy``, with the BUSY frame body to send).
        """
        found = self.identify(keys, msg1, stamp)
        if found is None:
            return Admission("bad_psk")
        site, psk, key = found
        sender, counter, tag = STAMP.unpack(stamp)
        if not self.fresh(site, sender, counter):
            return Admission("replay", site)
        wait = self.take_handshake(now)
        if wait > 0:
            return Admission("busy", site, psk, busy_reply(key, tag, wait), wait)
        return Admission("ok", site, psk)


@dataclass(frozen=True)
class Admission:
    """:meth:`HandshakeGuard.admit`'s verdict: ``ok``, ``bad_psk``,
    ``replay`` or ``busy`` (then ``busy_frame`` is the reply body and
    ``wait`` the seconds the client is asked to wait)."""

    verdict: str
    site: str | None = None
    psk: bytes | None = field(default=None, repr=False)
    busy_frame: bytes = b""
    wait: float = 0.0


def check_busy_reply(mac_key_: bytes, client_mac: bytes, frame: bytes) -> float | None:
    """(client) The seconds a BUSY frame body (``BUSY_LEN`` bytes starting
    with ``BUSY_MAGIC``) asks us to wait, or None if its MAC does not answer
    our first message under our key."""
    _magic, ms, tag = BUSY.unpack(frame)
    want = _mac(mac_key_, b"busy", frame[4:8], client_mac)
    if not hmac.compare_digest(tag, want):
        return None
    return min(ms, MAX_RETRY_MS) / 1000.0


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
            return safe_text(str(host), 64)
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


