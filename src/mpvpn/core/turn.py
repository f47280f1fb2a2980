"""TURN (RFC 8656) client over UDP, sans-I/O; and an ordered relay list.

:class:`TurnClient` holds one allocation on one relay server:

* **Allocate** with the long-term credential mechanism: the first request
  goes without credentials, the server's 401 brings REALM and NONCE, the
  request is repeated with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
  A 438 (stale nonce) repeats the request with the new nonce (a few times
  at most).  A second 401, 486 (allocation quota), 508 (insufficient
  capacity), 437, 403, 440/442, a 3xx redirect (not followed) or no
  answer at all end in a :class:`Failed` event whose ``reason`` says what
  happened in words.
* **Refresh** before the allocation expires (at ``max(lifetime/2,
  lifetime - 60 s)``), and ``Refresh(LIFETIME=0)`` on :meth:`close`.
* **CreatePermission** and **ChannelBind** (channel numbers
  0x4000-0x4FFF) per peer, both refreshed before they expire (permission
  300 s, channel 600 s; a ChannelBind refreshes the permission too).
* **ChannelData** framing for bound peers; Send / Data indications while a
  channel is not (yet) bound.  ChannelData over UDP is sent unpadded (RFC
  8656 12.5 allows it); up to 3 bytes of padding are accepted on input.

User datagrams are opaque: the relay carries our already-sealed SMPU
datagrams and sees nothing else.  Bytes and ``now`` in, datagrams (all to
the relay server), events and the next deadline out.  Anything malformed,
unsolicited, from another source, or with a wrong MESSAGE-INTEGRITY is a
counted drop (``drops`` by reason), never an exception.

:class:`RelayList` is the seed-003 part: relays in the configured order,
the next one when one fails, failed ones retried after a pause.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mpvpn.core import stun
from mpvpn.core.stun import (Addr, Retransmit, StunError, decode, decode_address, decode_error_code,
                             decode_text, decode_u32, encode, encode_address, format_addr,
                             long_term_key, new_txid, normalize_addr)

CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF
UDP_TRANSPORT = 17
PERMISSION_LIFETIME = 300.0
CHANNEL_LIFETIME = 600.0
PERMISSION_REFRESH = 240.0      # re-install a minute early
CHANNEL_REFRESH = 240.0         # ChannelBind refreshes the permission too
MAX_438_RETRIES = 3
MAX_DATAGRAM = 65535

# Words for the error codes a relay gives (RFC 8489 14.8, RFC 8656 19).
ERROR_WORDS = {
    300: "relay redirects to another server (not followed)",
    400: "relay rejected the request as malformed",
    401: "relay rejected our credentials (wrong username or password)",
    403: "relay forbids this (account not allowed, or peer address denied)",
    420: "relay does not understand a mandatory attribute",
    437: "allocation mismatch (the relay does not know this allocation)",
    438: "stale nonce, repeatedly",
    440: "relay does not support this address family",
    441: "relay says the credentials do not match the allocation",
    442: "relay does not support UDP relaying",
    486: "allocation quota reached on the relay",
    500: "relay internal error",
    508: "relay has insufficient capacity",
}


def describe_error(code: int, reason: str) -> str:
    words = ERROR_WORDS.get(code, "relay refused the request")
    return f"{words} ({code}{' ' + reason if reason else ''})"


# --------------------------------------------------------------------------
# ChannelData


def is_channel_data(data: bytes) -> bool:
    """First two bits 01: ChannelData (RFC 8656 12.4), not STUN (00)."""
    return len(data) >= 4 and 0x40 <= data[0] <= 0x4F


def encode_channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError("channel number must be 0x4000..0x4fff")
    if len(payload) > 0xFFFF:
        raise ValueError("payload too long for ChannelData")
    out = struct.pack("!HH", channel, len(payload)) + payload
    return out + bytes(-len(out) % 4) if pad else out


def decode_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel, payload); StunError if the framing is wrong.  Over UDP the
    datagram may carry up to 3 bytes of padding after the payload."""
    if len(data) < 4:
        raise StunError("ChannelData shorter than 4 bytes")
    channel, length = struct.unpack_from("!HH", data, 0)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise StunError(f"channel 0x{channel:04x} outside 0x4000..0x4fff")
    extra = len(data) - 4 - length
    if extra < 0:
        raise StunError("ChannelData length runs past the datagram")
    if extra > 3:
        raise StunError("ChannelData has more than 3 bytes after the payload")
    return channel, bytes(data[4:4 + length])


# --------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class Allocated:
    relayed: Addr           # the relayed transport address peers send to
    mapped: Addr | None     # our own public mapping as the relay sees it
    lifetime: int


@dataclass(frozen=True)
class Failed:
    reason: str
    code: int | None = None


@dataclass(frozen=True)
class PeerReady:
    peer: Addr
    channel: int | None     # None: permission only (Send/Data indications)


@dataclass(frozen=True)
class PeerFailed:
    peer: Addr
    reason: str


@dataclass(frozen=True)
class Data:
    peer: Addr
    payload: bytes


@dataclass(frozen=True)
class Closed:
    reason: str


# --------------------------------------------------------------------------
# the client


@dataclass
class _Request:
    method: int
    attrs: list             # without the auth attributes
    purpose: str            # "allocate", "refresh", "release", "permission", "channel"
    peer: Addr | None = None
    auth: bool = True
    stale_retries: int = 0
    keyed: bool = False     # sent with USERNAME/REALM/NONCE/MESSAGE-INTEGRITY
    txid: bytes = b""
    data: bytes = b""
    timer: Retransmit | None = None


@dataclass
class _Peer:
    addr: Addr
    channel: int | None
    permission: bool = False
    bound: bool = False
    refresh_at: float | None = None
    pending: bool = False


class TurnClient:
    """One UDP allocation on one TURN server.  See the module docstring.

    States: ``idle`` -> ``allocating`` -> ``allocated`` -> ``closing`` ->
    ``closed``; any -> ``failed``."""

    def __init__(self, server: Sequence, username: str, password: str, *,
                 lifetime: int = 600, software: str | None = None,
                 rto: float = 0.5, rc: int = 7, rm: int = 16, use_channels: bool = True,
                 relay_family: int | None = None,
                 rng: Callable[[int], bytes] = os.urandom):
        self.server = normalize_addr(server)
        # The relayed address's family: the server's unless told (RFC 8656
        # 7.1: without REQUESTED-ADDRESS-FAMILY the server relays over IPv4,
        # which an IPv6-only relay refuses with 440).
        self.relay_family = relay_family or (6 if ":" in self.server[0] else 4)
        if self.relay_family not in (4, 6):
            raise ValueError("relay_family must be 4 or 6")
        self.username, self._password = username, password
        self.requested_lifetime = int(lifetime)
        self.software = software
        self.rto, self.rc, self.rm = rto, rc, rm
        self.use_channels = use_channels
        self._rng = rng
        self.state = "idle"
        self.realm: str | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._requests: dict[bytes, _Request] = {}
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list = []
        self._peers: dict[Addr, _Peer] = {}
        self._by_channel: dict[int, _Peer] = {}
        self._next_channel = CHANNEL_MIN
        self.relayed: Addr | None = None
        self.mapped: Addr | None = None
        self.lifetime = 0
        self._refresh_at: float | None = None
        self._expires_at: float | None = None
        self.failure: Failed | None = None
        self.drops: dict[str, int] = {}
        self.counters = {"sent_channel": 0, "sent_indication": 0, "recv_channel": 0,
                         "recv_indication": 0, "refreshes": 0, "stale_nonce": 0}

    # ---- public API ------------------------------------------------------

    def start(self, now: float) -> None:
        if self.state != "idle":
            raise RuntimeError(f"start() in state {self.state}")
        self.state = "allocating"
        self._send(_Request(stun.ALLOCATE, self._allocate_attrs(), "allocate", auth=False), now)

    def add_peer(self, peer: Sequence, now: float) -> None:
        """Install a permission for ``peer`` and (with ``use_channels``) bind
        a channel to it.  :class:`PeerReady` says when it is usable.  Peers
        added before the allocation exists are set up once it does."""
        addr = normalize_addr(peer)
        if addr in self._peers:
            return
        channel = None
        if self.use_channels:
            if self._next_channel > CHANNEL_MAX:
                raise RuntimeError("no channel numbers left")
            channel = self._next_channel
            self._next_channel += 1
        p = _Peer(addr, channel)
        self._peers[addr] = p
        if channel is not None:
            self._by_channel[channel] = p
        if self.state == "allocated":
            self._setup_peer(p, now)

    def send(self, peer: Sequence, payload: bytes, now: float) -> bool:
        """Queue one user datagram for ``peer`` through the relay.  False
        (counted) when the allocation or the peer's permission is not there."""
        try:
            addr = normalize_addr(peer)
        except (ValueError, TypeError, IndexError):
            self._drop("send_bad_peer")
            return False
        p = self._peers.get(addr)
        if self.state != "allocated" or p is None or not p.permission:
            self._drop("send_not_ready")
            return False
        if p.bound and p.channel is not None:
            self._out.append((encode_channel_data(p.channel, payload), self.server))
            self.counters["sent_channel"] += 1
        else:
            txid = new_txid(self._rng)
            attrs = [(stun.XOR_PEER_ADDRESS, encode_address(addr, xor=True, txid=txid)),
                     (stun.DATA_ATTR, payload)]
            self._out.append((encode(stun.SEND, stun.INDICATION, txid, attrs), self.server))
            self.counters["sent_indication"] += 1
        return True

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with LIFETIME 0)."""
        if self.state in ("closed", "failed", "closing"):
            return
        if self.state != "allocated":
            self._requests.clear()
            self._set_closed("closed before the allocation existed")
            return
        self.state = "closing"
        self._requests.clear()
        self._send(_Request(stun.REFRESH, [(stun.LIFETIME, struct.pack("!I", 0))], "release"), now)

    def has_transaction(self, txid: bytes) -> bool:
        """Is a request with this transaction id waiting for its answer?
        (For a socket shared with a STUN client talking to the same server.)"""
        return txid in self._requests

    def refresh_now(self, now: float) -> bool:
        """Refresh the allocation at the next :meth:`on_timer` (a liveness
        check: ``expires_at`` moves when the relay answers; a relay that lost
        the allocation answers 437, which ends it).  False unless allocated."""
        if self.state != "allocated":
            return False
        if not self._pending("refresh"):
            self._refresh_at = now
        return True

    def on_datagram(self, data: bytes, src: Sequence, now: float) -> None:
        if len(data) > MAX_DATAGRAM:
            self._drop("oversized")
            return
        if not stun.came_from(src, self.server):
            self._drop("wrong_source")
            return
        if is_channel_data(data):
            self._on_channel_data(data)
            return
        try:
            msg = decode(data)
        except StunError:
            self._drop("malformed")
            return
        if msg.check_fingerprint() is False:
            self._drop("bad_fingerprint")
            return
        if msg.cls == stun.INDICATION:
            self._on_indication(msg)
            return
        if msg.cls not in (stun.SUCCESS, stun.ERROR):
            self._drop("unexpected_request")
            return
        req = self._requests.get(msg.txid)
        if req is None or req.method != msg.method:
            self._drop("unknown_transaction")
            return
        self._on_response(req, msg, now)

    def on_timer(self, now: float) -> None:
        for txid, req in list(self._requests.items()):
            if txid not in self._requests:
                continue
            what = req.timer.due(now)
            if what == "send":
                self._out.append((req.data, self.server))
            elif what == "timeout":
                del self._requests[txid]
                self._on_timeout(req, now)
        if self.state != "allocated":
            return
        if self._expires_at is not None and now >= self._expires_at:
            self._fail("allocation expired: refreshes were not answered", None)
            return
        if self._refresh_at is not None and now >= self._refresh_at and not self._pending("refresh"):
            self._refresh_at = None
            self.counters["refreshes"] += 1
            self._send(_Request(stun.REFRESH, [(stun.LIFETIME, struct.pack(
                "!I", self.requested_lifetime))], "refresh"), now)
        for p in self._peers.values():
            if not p.pending and p.refresh_at is not None and now >= p.refresh_at:
                self._setup_peer(p, now, refresh=True)

    def next_deadline(self) -> float | None:
        times = [r.timer.next_deadline() for r in self._requests.values()]
        if self.state == "allocated":
            times += [t for t in (self._refresh_at, self._expires_at) if t is not None]
            times += [p.refresh_at for p in self._peers.values()
                      if p.refresh_at is not None and not p.pending]
        return min(times) if times else None

    def take_outgoing(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def take_events(self) -> list:
        ev, self._events = self._events, []
        return ev

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered or timed out."""
        return len(self._requests)

    @property
    def expires_at(self) -> float | None:
        """When the allocation expires unless refreshed (client clock)."""
        return self._expires_at

    def peer_state(self, peer: Sequence) -> dict | None:
        p = self._peers.get(normalize_addr(peer))
        if p is None:
            return None
        return {"permission": p.permission, "channel": p.channel if p.bound else None}

    def status(self) -> dict:
        return {"server": format_addr(self.server), "state": self.state,
                "relayed": format_addr(self.relayed) if self.relayed else None,
                "lifetime": self.lifetime,
                "reason": self.failure.reason if self.failure else None,
                "peers": len(self._peers), "drops": dict(self.drops), **self.counters}

    # ---- requests --------------------------------------------------------

    def _allocate_attrs(self) -> list:
        attrs = [(stun.REQUESTED_TRANSPORT, struct.pack("!B3x", UDP_TRANSPORT)),
                 (stun.LIFETIME, struct.pack("!I", self.requested_lifetime))]
        if self.relay_family == 6:
            attrs.append((stun.REQUESTED_ADDRESS_FAMILY, struct.pack("!B3x", stun.FAMILY_IPV6)))
        return attrs

    def _pending(self, purpose: str) -> bool:
        return any(r.purpose == purpose for r in self._requests.values())

    def _send(self, req: _Request, now: float) -> None:
        req.txid = new_txid(self._rng)
        attrs = list(req.attrs)
        if req.peer is not None:
            attrs.insert(0, (stun.XOR_PEER_ADDRESS,
                             encode_address(req.peer, xor=True, txid=req.txid)))
        if self.software:
            attrs.append((stun.SOFTWARE, self.software.encode()[:stun.MAX_SOFTWARE_BYTES]))
        key = None
        if req.auth and self._key is not None:
            attrs += [(stun.USERNAME, self.username.encode()),
                      (stun.REALM, self.realm.encode()),
                      (stun.NONCE, self._nonce)]
            key = self._key
        req.keyed = key is not None
        req.data = encode(req.method, stun.REQUEST, req.txid, attrs, integrity=key,
                          fingerprint=True)
        req.timer = Retransmit(now, self.rto, self.rc, self.rm)
        req.timer.due(now)
        self._requests[req.txid] = req
        self._out.append((req.data, self.server))

    def _setup_peer(self, p: _Peer, now: float, refresh: bool = False) -> None:
        p.pending = True
        p.refresh_at = None
        if p.channel is not None and (p.permission or refresh):
            self._send(_Request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, struct.pack(
                "!HH", p.channel, 0))], "channel", peer=p.addr), now)
        else:
            self._send(_Request(stun.CREATE_PERMISSION, [], "permission", peer=p.addr), now)

    # ---- responses -------------------------------------------------------

    def _on_response(self, req: _Request, msg: stun.Message, now: float) -> None:
        if msg.cls == stun.SUCCESS:
            if req.keyed and not msg.check_integrity(self._key):
                self._drop("bad_integrity")
                return
            del self._requests[msg.txid]
            try:
                self._on_success(req, msg, now)
            except StunError:
                self._drop("malformed")
                self._fail_request(req, "relay answered with a malformed success response",
                                   None, now)
            return
        try:
            code, reason = decode_error_code(msg.get(stun.ERROR_CODE) or b"")
        except StunError:
            self._drop("malformed")
            return
        # RFC 8489 9.2.5: to a request that carried credentials, every error
        # but 401/438 (which cannot be protected) must carry a valid
        # MESSAGE-INTEGRITY; anything else is discarded (retransmits go on),
        # so a forged 486/508/437 cannot end an allocation.
        if req.keyed and code not in (401, 438) and not msg.check_integrity(self._key):
            self._drop("bad_integrity")
            return
        del self._requests[msg.txid]
        if code == 401:
            realm, nonce = msg.get(stun.REALM), msg.get(stun.NONCE)
            if req.keyed:
                # Our credentials were there and were refused.
                self._fail_request(req, describe_error(code, reason), code, now)
                return
            if realm is None or nonce is None:
                self._fail_request(req, "relay answered 401 without REALM/NONCE", code, now)
                return
            try:
                self._learn_nonce(realm, nonce)
            except StunError as e:
                self._fail_request(req, f"relay sent a bad REALM/NONCE: {e}", code, now)
                return
            req.auth = True
            self._send(req, now)
            return
        if code == 438 and req.keyed:
            nonce = msg.get(stun.NONCE)
            if nonce is None or req.stale_retries >= MAX_438_RETRIES:
                self._fail_request(req, describe_error(code, reason), code, now)
                return
            try:
                self._learn_nonce(msg.get(stun.REALM) or self.realm.encode(), nonce)
            except StunError as e:
                self._fail_request(req, f"relay sent a bad NONCE: {e}", code, now)
                return
            req.stale_retries += 1
            self.counters["stale_nonce"] += 1
            self._send(req, now)
            return
        self._fail_request(req, describe_error(code, reason), code, now)

    def _learn_nonce(self, realm: bytes, nonce: bytes) -> None:
        realm_s = decode_text(realm, stun.MAX_REALM_BYTES, "REALM")
        decode_text(nonce, stun.MAX_NONCE_BYTES, "NONCE")
        if self.realm != realm_s or self._key is None:
            self.realm = realm_s
            self._key = long_term_key(self.username, realm_s, self._password)
        self._nonce = nonce

    def _on_success(self, req: _Request, msg: stun.Message, now: float) -> None:
        if req.purpose == "allocate":
            value = msg.get(stun.XOR_RELAYED_ADDRESS)
            if value is None:
                raise StunError("no XOR-RELAYED-ADDRESS")
            relayed = decode_address(value, xor=True, txid=msg.txid)
            mv = msg.get(stun.XOR_MAPPED_ADDRESS)
            mapped = decode_address(mv, xor=True, txid=msg.txid) if mv is not None else None
            lifetime = decode_u32(msg.get(stun.LIFETIME) or b"", "LIFETIME")
            self.relayed, self.mapped = relayed, mapped
            self.state = "allocated"
            self._set_lifetime(lifetime, now)
            self._events.append(Allocated(relayed, mapped, lifetime))
            for p in self._peers.values():
                self._setup_peer(p, now)
        elif req.purpose == "refresh":
            lifetime = decode_u32(msg.get(stun.LIFETIME) or b"", "LIFETIME")
            self._set_lifetime(lifetime, now)
        elif req.purpose == "release":
            self._set_closed("released")
        elif req.purpose in ("permission", "channel"):
            p = self._peers.get(req.peer)
            if p is None:
                return
            p.permission = True
            p.pending = False
            if req.purpose == "channel":
                first = not p.bound
                p.bound = True
                p.refresh_at = now + CHANNEL_REFRESH
                if first:
                    self._events.append(PeerReady(p.addr, p.channel))
            else:
                self._events.append(PeerReady(p.addr, None))
                if p.channel is not None:
                    self._setup_peer(p, now)     # now bind the channel
                else:
                    p.refresh_at = now + PERMISSION_REFRESH

    def _set_lifetime(self, lifetime: int, now: float) -> None:
        if lifetime <= 0:
            raise StunError("LIFETIME 0 in a success response")
        self.lifetime = lifetime
        self._expires_at = now + lifetime
        self._refresh_at = now + max(lifetime / 2, lifetime - 60)

    def _on_timeout(self, req: _Request, now: float) -> None:
        secs = req.timer.timeout_at - req.timer.start
        if req.purpose == "release":
            self._set_closed(f"release not answered after {secs:g} s")
            return
        self._fail_request(req, f"no answer from relay {format_addr(self.server)} "
                                f"after {secs:g} s", None, now)

    def _fail_request(self, req: _Request, reason: str, code: int | None, now: float) -> None:
        if req.purpose in ("allocate", "refresh"):
            if req.purpose == "refresh" and code is None and self._expires_at is not None \
                    and now < self._expires_at - 1:
                # one lost refresh exchange: try again while the allocation lives
                self._refresh_at = now
                return
            self._fail(("allocation failed: " if req.purpose == "allocate"
                        else "refresh failed: ") + reason, code)
        elif req.purpose == "release":
            self._set_closed("released" if code == 437 else f"release refused: {reason}")
        else:
            p = self._peers.get(req.peer)
            if p is not None:
                p.pending = False
                if code == 437:
                    self._fail("allocation lost: " + reason, code)
                    return
                self._events.append(PeerFailed(p.addr, reason))

    def _fail(self, reason: str, code: int | None) -> None:
        self.state = "failed"
        self._requests.clear()
        self.failure = Failed(reason, code)
        self._events.append(self.failure)

    def _set_closed(self, reason: str) -> None:
        self.state = "closed"
        self._events.append(Closed(reason))

    # ---- data ------------------------------------------------------------

    def _on_channel_data(self, data: bytes) -> None:
        try:
            channel, payload = decode_channel_data(data)
        except StunError:
            self._drop("malformed_channel_data")
            return
        p = self._by_channel.get(channel)
        if p is None or not p.bound:
            self._drop("unknown_channel")
            return
        self.counters["recv_channel"] += 1
        self._events.append(Data(p.addr, payload))

    def _on_indication(self, msg: stun.Message) -> None:
        if msg.method != stun.DATA:
            self._drop("unexpected_indication")
            return
        pv, payload = msg.get(stun.XOR_PEER_ADDRESS), msg.get(stun.DATA_ATTR)
        if pv is None or payload is None:
            self._drop("malformed")
            return
        try:
            peer = decode_address(pv, xor=True, txid=msg.txid)
        except StunError:
            self._drop("malformed")
            return
        p = self._peers.get(peer)
        if p is None or not p.permission:
            self._drop("unknown_peer")
            return
        self.counters["recv_indication"] += 1
        self._events.append(Data(peer, payload))

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


# --------------------------------------------------------------------------
# relay list (seed 003: "try the next node when one fails")


@dataclass(frozen=True)
class Relay:
    address: Addr
    username: str
    password: str = field(repr=False)


class RelayList:
    """Relays in the configured order.  :meth:`pick` gives the first relay
    that has not failed within ``retry_after`` seconds (None when all have);
    :meth:`failed` records why one failed and moves on; :meth:`succeeded`
    clears its record.  Reasons stay for the status output."""

    def __init__(self, relays: Sequence[Relay], *, retry_after: float = 60.0):
        self.relays = list(relays)
        self.retry_after = float(retry_after)
        self._failed_at: dict[int, float] = {}
        self.reasons: dict[int, str] = {}

    def pick(self, now: float) -> Relay | None:
        for i, relay in enumerate(self.relays):
            t = self._failed_at.get(i)
            if t is None or now - t >= self.retry_after:
                return relay
        return None

    def next_retry(self) -> float | None:
        """When the earliest failed relay becomes eligible again."""
        if not self._failed_at:
            return None
        return min(self._failed_at.values()) + self.retry_after

    def _index(self, relay: Relay) -> int:
        for i, r in enumerate(self.relays):
            if r is relay or r == relay:
                return i
        raise ValueError("not one of this list's relays")

    def failed(self, relay: Relay, reason: str, now: float) -> None:
        i = self._index(relay)
        self._failed_at[i] = now
        self.reasons[i] = reason

    def succeeded(self, relay: Relay) -> None:
        i = self._index(relay)
        self._failed_at.pop(i, None)
        self.reasons.pop(i, None)

    def status(self, now: float) -> list[dict]:
        return [{"address": format_addr(r.address),
                 "failed": i in self._failed_at and now - self._failed_at[i] < self.retry_after,
                 "reason": self.reasons.get(i)} for i, r in enumerate(self.relays)]
