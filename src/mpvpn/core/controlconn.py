"""The control connection's two machines, client and server (sans-I/O).

No sockets, clocks or threads here: the machines take bytes and ``now``
(float seconds, any monotonic clock) and hand back bytes to send, events and
the next deadline -- the shape of h11 / aioquic:

    conn.receive_data(data, now)      # b"" means the peer closed (EOF)
    conn.data_to_send() -> bytes      # write these to the socket
    conn.get_timer() -> float | None  # call handle_timer(now) then
    conn.handle_timer(now)
    conn.next_event() -> event | None

:class:`ClientConnection` and :class:`ServerConnection` share framing,
encryption, keepalive, rekeying and close handling (:class:`_Connection`).
Around them: framing and schema in :mod:`mpvpn.core.controlmsg`, peer checks in
:mod:`mpvpn.core.peercheck`, the gate in front of the handshake in
:mod:`mpvpn.core.admission`, events in :mod:`mpvpn.core.controlevents`, the server's
sessions in :mod:`mpvpn.core.registry`.

Untrusted input never raises out of a machine: it ends in an ERROR to the
peer (once authenticated) and/or a counted drop and a terminal state with a
reason.  Local misuse (bad local configuration) raises ``ValueError``.

Design: ``docs/control.md``.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import random
from collections import Counter, deque
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING

from mpvpn.core import noise, pairing, seal
from mpvpn.core.admission import (BUSY_LEN, BUSY_MAGIC, MAC_LEN, PREAUTH_FAILURES, STAMP_LEN,
                                  HandshakeGuard, HandshakeStamps, check_busy_reply, mac_key,
                                  stamp_first_message)
from mpvpn.core.controlevents import (ConnectionClosed, DataKeys, HandshakeComplete, KeysActivated,
                                      KeysRetired, KeysRotated, PeerMessage, PeerUpdated,
                                      ProtocolError, SessionEstablished)
from mpvpn.core.controlmsg import (MAX_MESSAGE, MIN_HANDSHAKE_MSG, PEER_TYPES, POSTAUTH_MAX_FRAME,
                                   PREAUTH_MAX_FRAME, PROLOGUE, REKEY_PROLOGUE, VERSIONS, WORD_RE,
                                   Bad, FrameDecoder, PeerInfo, Vnc, dumps, encode_frame, info_json,
                                   parse_handshake_reply, parse_message, parse_versions_offer,
                                   safe_text)
from mpvpn.core.pairing import SubflowSpec, Uplink
from mpvpn.core.peercheck import build_local_info, check_peer, peer_problem

if TYPE_CHECKING:  # the registry imports this module
    from mpvpn.core.registry import ServerSession, ServerSessions


# --- the state machine -------------------------------------------------------------------------


class State(Enum):
    HANDSHAKE = "handshake"  # client: msg1 sent, waiting for msg2; server: waiting for msg1
    HELLO = "hello"  # client: HELLO sent, waiting for WELCOME; server: waiting for HELLO
    ESTABLISHED = "established"
    CLOSED = "closed"


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class Ev(Enum):
    """What moves a machine: a frame of the handshake phase, or a message
    (its ``type``) under the Noise channel."""

    MSG1 = "msg1"  # server: the client's Noise message 1 (kept until its stamp)
    STAMP = "stamp"  # server: message 1's stamp passed the gate; message 2 sent
    MSG2 = "msg2"  # client: message 2 with a common version; HELLO sent
    BUSY = "busy"  # client: the server's authenticated BUSY instead of message 2
    HELLO = "HELLO"
    WELCOME = "WELCOME"
    UPDATE = "UPDATE"
    KEEPALIVE = "KEEPALIVE"
    KEEPALIVE_ACK = "KEEPALIVE_ACK"
    REKEY = "REKEY"
    BYE = "BYE"
    ERROR = "ERROR"
    PEER_OFFER = "PEER_OFFER"
    PEER_HS = "PEER_HS"
    PEER_END = "PEER_END"


S, E = State, Ev

_CHANNEL_UP = {E.UPDATE: S.ESTABLISHED, E.KEEPALIVE: S.ESTABLISHED,
               E.KEEPALIVE_ACK: S.ESTABLISHED, E.REKEY: S.ESTABLISHED,
               E.PEER_HS: S.ESTABLISHED, E.PEER_END: S.ESTABLISHED,
               E.BYE: S.CLOSED, E.ERROR: S.CLOSED}

#: The method that handles each message event (ERROR, BYE, KEEPALIVE* and
#: REKEY are common to both roles; the others are the role's own).
_HANDLERS: dict[Ev, str] = {
    E.HELLO: "_on_hello", E.WELCOME: "_on_welcome", E.UPDATE: "_on_update",
    E.KEEPALIVE: "_on_keepalive", E.KEEPALIVE_ACK: "_on_keepalive_ack", E.REKEY: "_on_rekey",
    E.BYE: "_on_bye", E.ERROR: "_on_error",
    E.PEER_OFFER: "_on_peer", E.PEER_HS: "_on_peer", E.PEER_END: "_on_peer",
}

#: The whole control state machine of both roles, in the style of h11's
#: ``_state.py``: ``TRANSITIONS[role][state][event] -> new state``.  A
#: message whose (state, type) is not in the table is refused (ERROR
#: ``invalid``, counted ``unexpected``).  Not in the table, as h11's ERROR
#: state: any state goes to CLOSED on ``close()``, EOF, a timeout or a
#: failure (bad input, authentication, a refused peer).
TRANSITIONS: dict[Role, dict[State, dict[Ev, State]]] = {
    Role.CLIENT: {
        S.HANDSHAKE: {E.MSG2: S.HELLO, E.BUSY: S.CLOSED},
        S.HELLO: {E.WELCOME: S.ESTABLISHED, E.BYE: S.CLOSED, E.ERROR: S.CLOSED},
        S.ESTABLISHED: {**_CHANNEL_UP, E.PEER_OFFER: S.ESTABLISHED},  # (only the hub offers)
        S.CLOSED: {},
    },
    Role.SERVER: {
        S.HANDSHAKE: {E.MSG1: S.HANDSHAKE, E.STAMP: S.HELLO},
        S.HELLO: {E.HELLO: S.ESTABLISHED, E.BYE: S.CLOSED, E.ERROR: S.CLOSED},
        S.ESTABLISHED: _CHANNEL_UP,
        S.CLOSED: {},
    },
}




# --- configuration -----------------------------------------------------------------------------


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
    # server: what those sites may claim, ((name, vNIC address or None, LAN
    # subnets or None), ...) from `config site` vnc_ipaddr / lan_subnet;
    # None: not restricted (only collisions with other sites are refused)
    site_claims: tuple = ()
    # the X25519 public key of our direct site-to-site sessions, announced in
    # HELLO (None: we take no direct paths; mpvpn.core.peerdirect)
    direct_key: bytes | None = None

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
        info = build_local_info(self.name, ups, vnc, list(self.lans), self.mode, self.pair_unmatched,
                                self.control_port)
        self.claim_rules()
        if self.direct_key is not None and len(self.direct_key) != noise.KEY_LEN:
            raise ValueError(f"direct_key must be {noise.KEY_LEN} bytes")
        return replace(info, ciphers=ciphers, direct_key=self.direct_key)

    def claim_rules(self) -> dict:
        """``site_claims`` checked and normalized: ``{site: (vNIC address
        or None, tuple of networks or None)}``; raises ValueError."""
        out = {}
        for site, ip, lans in self.site_claims:
            try:
                ip = None if ip is None else ipaddress.ip_address(str(ip))
                nets = None if lans is None else tuple(ipaddress.ip_network(str(n)) for n in lans)
            except ValueError as e:
                raise ValueError(f"site {site}: {e}") from None
            out[site] = (ip, nets)
        return out


# --- helpers ---------------------------------------------------------------------------------


# The STUN magic cookie (RFC 8489 6): SMPU puts the session id where STUN
# puts the cookie (bytes 4..7), and STUN shares the uplink sockets
# (docs/nat.md), so no session may carry it.
STUN_MAGIC_COOKIE = 0x2112A442


def random_session_id(rng, used) -> int:
    """A random session ID not in ``used``, neither 0 nor the STUN magic cookie."""
    for _ in range(64):
        sid = rng.getrandbits(32)
        if sid and sid != STUN_MAGIC_COOKIE and sid not in used:
            return sid
    raise Bad("busy", "could not allocate a session ID", "busy")


def _next_epoch(e: int) -> int:
    """Key epochs cycle 1..255 (the SMPU header's epoch byte; 0 = unsealed)."""
    return e % 255 + 1


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
            except Bad as b:
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
            self._send({"type": "BYE", "reason": reason, "text": safe_text(text)})
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
        ``epoch`` (``mpvpn.core.seal.Sealer.sealed`` / ``send_epoch``; cheap, call
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

    # set by the subclasses
    ROLE: Role
    # The message that introduces the peer in state HELLO: HELLO (server side)
    # or WELCOME (client side).
    _INTRO: Ev

    def _on_frame(self, frame: bytes, now: float) -> None:
        """One complete frame: the Noise handshake first (the role's
        ``_on_handshake_frame`` tells which event it is), then one message,
        dispatched through :data:`TRANSITIONS`."""
        if self.state is State.HANDSHAKE:
            self._on_handshake_frame(frame, now)
            return
        m = self._on_message(frame, now)
        ev = Ev(m["type"])  # parse_message admits only the message types
        if ev not in TRANSITIONS[self.ROLE][self.state]:
            raise self._unexpected(m)
        getattr(self, _HANDLERS[ev])(m, now)

    def _updated_local(self, uplinks, lans, control_port):
        """Our local info with new uplinks and/or LANs (None: unchanged), for an
        UPDATE; only on an established connection."""
        if self.state is not State.ESTABLISHED:
            raise ValueError("not established")
        ups = self.local.uplinks if uplinks is None else \
            [u if isinstance(u, Uplink) else Uplink(*u) for u in uplinks]
        return build_local_info(self.local.name, ups, self.local.vnc,
                                self.local.lans if lans is None else list(lans), self.local.mode,
                                self.local.pair_unmatched, control_port)

    def _peer_updated(self, m: dict) -> PeerInfo:
        """The peer's info with the uplinks and/or LANs of its UPDATE ``m``, checked
        against ours like the first exchange (raises on a bad claim)."""
        peer = self.peer
        if "uplinks" in m:
            peer = replace(peer, uplinks=m["uplinks"])
        if "lans" in m:
            peer = replace(peer, lans=m["lans"])
        if "via" in m:  # (a hub's UPDATE only: the schema has it in no other message)
            peer = replace(peer, via=m["via"])
        check_peer(self.local, peer, self.config.allow_peer_default_route)
        return peer

    def _to(self, ev: Ev) -> None:
        """Take the table's transition for ``ev`` (a missing one is a bug)."""
        self.state = TRANSITIONS[self.ROLE][self.state][ev]

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
        pt = dumps(obj)
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
                self._send({"type": "ERROR", "code": code, "text": safe_text(text)})
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
            raise Bad("auth", "control message failed authentication", "decrypt") from None

    def _on_handshake_frame(self, frame: bytes, now: float) -> None:  # pragma: no cover
        raise NotImplementedError  # subclasses: the Noise message 1 (server) or 2 (client)

    def _on_update(self, m: dict, now: float) -> None:  # pragma: no cover
        raise NotImplementedError  # subclasses

    def _install_channel(self, keys) -> None:
        self._send_cs, self._recv_cs = keys.send, keys.recv
        self._hh = bytes(keys.handshake_hash)
        self._decoder.max_frame = POSTAUTH_MAX_FRAME

    def _established(self, now: float) -> None:
        self._to(self._INTRO)
        self.epoch = self.send_epoch = 1
        self._last_recv = now
        self._rekey_at = now + self._rekey_period()

    def _rekey_period(self) -> float:
        f = 1.0 if self.is_client else self.config.server_rekey_factor
        return self.config.rekey_interval * f

    def _on_message(self, frame: bytes, now: float) -> dict:
        pt = self._decrypt(frame)
        msg = parse_message(pt, from_client=not self.is_client)
        self._last_recv = now
        self._seen(now)
        return msg

    def _seen(self, now: float) -> None:
        pass

    # -- message handlers (the table says in which states each one runs) -------------------------
    def _on_error(self, m: dict, now: float) -> None:
        self._count("peer_error")
        self._emit(ProtocolError(m["code"], m["text"], by_peer=True))
        self._set_closed(m["code"], m["text"], by_peer=True)

    def _on_bye(self, m: dict, now: float) -> None:
        text = f"{m['reason']}: {m['text']}" if m["text"] else m["reason"]
        self._set_closed("bye", text, by_peer=True)

    def _on_keepalive(self, m: dict, now: float) -> None:
        self._send({"type": "KEEPALIVE_ACK", "n": m["n"]})

    def _on_keepalive_ack(self, m: dict, now: float) -> None:
        pass  # any message counts as life (_on_message)

    def _on_peer(self, m: dict, now: float) -> None:
        self._count("peer_messages_in")
        self._emit(PeerMessage(m))

    def send_peer(self, msg: dict, now: float) -> None:
        """Send a message about a direct site-to-site path (``msg``: a dict
        with ``type`` one of PEER_TYPES, in the wire shape; the hub sends
        PEER_OFFER, both sides PEER_HS and PEER_END).  ValueError if the
        channel is not up or the message is not one of those."""
        if self.state is not State.ESTABLISHED:
            raise ValueError("not established")
        if msg.get("type") not in PEER_TYPES or (msg["type"] == "PEER_OFFER" and self.is_client):
            raise ValueError(f"not a message this side sends: {msg.get('type')!r}")
        self._now = now
        self._count("peer_messages_out")
        self._send(msg)

    def _unexpected(self, m: dict):
        return Bad("invalid", f"unexpected {m['type']} in state {self.state.value}", "unexpected")

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
                raise Bad("invalid", f"REKEY for epoch {e}, expected {_next_epoch(self.epoch)}")
            if rk is not None:
                if not rk.initiator:
                    raise Bad("invalid", "REKEY while the peer's previous REKEY is unfinished")
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
                raise Bad("auth", "rekey handshake failed", "rekey_auth") from None
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
                raise Bad("invalid", f"unexpected REKEY answer for epoch {e}", "unexpected")
            try:
                rk.hs.read_message(m["hs"])
                keys = rk.hs.split()
            except noise.NoiseError:
                raise Bad("auth", "rekey handshake failed", "rekey_auth") from None
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
                raise Bad("invalid", f"unexpected REKEY confirmation for epoch {e}", "unexpected")
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

    ROLE = Role.CLIENT
    _INTRO = Ev.WELCOME

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
        msg1 = self._hs.write_message(dumps({"versions": list(config.versions)}))
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
        new = self._updated_local(uplinks, lans, None)
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
        retry_after = check_busy_reply(self._mac_key, self._stamp_mac, frame)
        if retry_after is None:
            self._count("bad_psk")
            self._emit(ProtocolError("auth", "the server's BUSY reply failed authentication",
                                     by_peer=False))
            self._set_closed("auth", "handshake failed", by_peer=False)
            return
        self.retry_after = retry_after
        self._count("busy")
        self._set_closed("busy", f"server busy (too many handshakes at once); it holds our key, "
                                 f"retry in {self.retry_after:g} s", by_peer=True,
                         retry_after=self.retry_after)

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
        kind, v, text = parse_handshake_reply(payload)
        if kind == "error":
            code = v
            self._count("peer_error")
            self._emit(ProtocolError(code, text, by_peer=True))
            self._set_closed(code, text, by_peer=True)
            return
        if v not in self.config.versions:
            raise Bad("version", f"server chose version {v}, we offered "
                                  f"{list(self.config.versions)}", "bad_version")
        self.version = v
        self._keys = keys
        self._emit(HandshakeComplete(v, self._hh))
        self._to(Ev.MSG2)
        self._send(dict(type="HELLO", **info_json(self.local)))

    def _on_welcome(self, m: dict, now: float) -> None:
        server = replace(m["info"], control_port=m["control_port"])
        check_peer(self.local, server, self.config.allow_peer_default_route)
        pe = server.pair_unmatched
        expected = pairing.plan(self.local.uplinks, server.uplinks, pe, None, local_is_client=True)
        if not pairing.same_pairs(expected, m["plan"], local_is_client=True):
            raise Bad("invalid", "the server's subflow plan differs from ours "
                                  "(pairing rules disagree)", "plan")
        self.session_id = m["session_id"]
        self.peer = server
        self.plan = expected
        self.pair_unmatched = pe
        self.keepalive_interval, self.keepalive_timeout = m["interval"], m["timeout"]
        cipher = server.cipher or seal.CHACHA
        if cipher not in self.local.ciphers:
            raise Bad("invalid", f"the server chose cipher {cipher!r}, we offered "
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
            raise Bad("invalid", f"UPDATE acknowledges {ack}, we sent up to {self._seq}")
        server = self._peer_updated(m)
        mine = self._uplinks_at[ack]
        expected = pairing.plan(mine, server.uplinks, self.pair_unmatched, self.plan,
                                local_is_client=True)
        if not pairing.same_pairs(expected, m["plan"], local_is_client=True):
            raise Bad("invalid", "the server's updated subflow plan differs from ours", "plan")
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

    ROLE = Role.SERVER
    _INTRO = Ev.HELLO

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
        # the other sites we last told this client we forward to (None: nothing told yet)
        self.via_sent: tuple | None = None

    def _count(self, reason: str) -> None:
        self.counters[reason] += 1
        if self.registry is not None:
            self.registry.count(reason)

    def send_update(self, now: float, uplinks=None, lans=None, via=None) -> None:
        """Our uplinks and/or LANs changed, or (hub, ``via``: ViaSites) the
        other sites we forward to for this client: re-plan and tell the client.
        Raises ValueError if the new local info is invalid or clashes with
        the client's."""
        self._now = now
        new = self._updated_local(uplinks, lans, self.local.control_port)
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
        if via is not None:
            msg["via"] = [v.to_json() for v in via]
            self.via_sent = tuple(via)
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
            self.registry.preauth_failed(self, self._now)
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

    def _on_msg1(self, frame: bytes, now: float) -> None:
        if self._msg1 is None:  # the Noise message; its stamp and MAC follow
            if len(frame) < MIN_HANDSHAKE_MSG:
                self._abort("malformed", "first handshake message too short")
                return
            self._msg1 = frame
            self._to(Ev.MSG1)
            return
        msg1, self._msg1 = self._msg1, None
        if len(frame) != STAMP_LEN:
            self._abort("malformed", "first handshake message without a valid stamp")
            return
        cfg = self.config
        # MAC (one keyed hash per accepted key), freshness, handshake budget:
        # nothing costly before all three pass.
        gate = self._guard.admit(cfg.keys(), msg1, frame, now)
        if gate.verdict == "bad_psk":
            self._abort("bad_psk", "first handshake message failed authentication")
            return
        if gate.verdict == "replay":  # dropped unanswered
            self._abort("replay", "replayed first handshake message")
            return
        if gate.verdict == "busy":  # a genuine client we cannot serve now learns so
            self._out += encode_frame(gate.busy_frame)
            self._count("busy_handshake")
            self._set_closed("busy", "handshake budget exhausted; told the client to retry",
                             by_peer=False, retry_after=gate.wait)
            return
        site, psk = gate.site, gate.psk
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
            offered = parse_versions_offer(payload)
            common = offered & set(cfg.versions)
            if not common:
                err = ("version", f"no common protocol version: client offers "
                                  f"{sorted(offered)}, server speaks {list(cfg.versions)}",
                       "bad_version")
        except Bad as b:
            err = ("invalid", f"bad handshake payload: {b.text}", "malformed")
        if err:
            # Authenticated client we cannot serve: say why inside the
            # (encrypted, authenticated) second handshake message, then close.
            code, text, count = err
            reply = dumps({"error": code, "text": safe_text(text, 160)})
            self._out += encode_frame(hs.write_message(reply))
            self._count(count)
            self._emit(ProtocolError(code, text, by_peer=False))
            self._set_closed(code, text, by_peer=False)
            return
        self.version = max(common)
        self._out += encode_frame(hs.write_message(dumps({"version": self.version})))
        self._last_sent = now
        keys = hs.split()
        self._install_channel(keys)
        self._to(Ev.STAMP)
        self._deadline = now + cfg.handshake_timeout
        self._emit(HandshakeComplete(self.version, self._hh))

    def _on_hello(self, m: dict, now: float) -> None:
        client = m["info"]
        check_peer(self.local, client, self.config.allow_peer_default_route)
        pe = bool(self.config.pair_unmatched or client.pair_unmatched)
        plan = pairing.plan(self.local.uplinks, client.uplinks, pe, None, local_is_client=False)
        if self.registry is not None:
            self._session = self.registry.open_session(self, client, now)
            sid = self._session.session_id
        else:
            sid = random_session_id(self._rng, ())
        self.session_id = sid
        self.peer = client
        self.plan = plan
        self.pair_unmatched = pe
        cipher = seal.choose_cipher(self.local.ciphers, client.ciphers)
        if cipher is None:  # cannot happen between our versions: both always offer ChaCha20
            raise Bad("invalid", f"no common data cipher (client offers {list(client.ciphers)})")
        self.cipher = cipher
        welcome = dict(type="WELCOME", session_id=sid, **info_json(self.local))
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
            raise Bad("invalid", f"UPDATE seq {seq}, expected {self._peer_seq + 1}")
        client = self._peer_updated(m)
        if self.registry is not None:
            mine = self._session.identity if self._session is not None else ()
            self.registry.check_claims(client, mine)
        new_plan = pairing.plan(self.local.uplinks, client.uplinks, self.pair_unmatched,
                                self.plan, local_is_client=False)
        d = pairing.diff(self.plan, new_plan)
        self._peer_seq = seq
        self.peer, self.plan = client, new_plan
        if self._session is not None:
            self._session.update_peer(client)
        self._send({"type": "UPDATE", "ack": seq,
                    "plan": pairing.to_wire(new_plan, local_is_client=False)})
        self._emit(PeerUpdated(client, list(new_plan), d, "peer"))

    @property
    def session(self):
        """The registry's :class:`~mpvpn.core.registry.ServerSession` of this
        connection (None before HELLO, without a registry, or once the
        registry let go of it)."""
        return self._session

    def release_session(self) -> None:
        """(registry) The session is no longer this connection's."""
        self._session = None

    def _seen(self, now: float) -> None:
        if self._session is not None:
            self._session.heard(now)

    def _leave_preauth(self) -> None:
        if self.registry is not None:
            self.registry.preauth_done(self)

    def _on_closed(self, reason: str) -> None:
        self._keys_for_session = None
        self._msg1 = None
        if self.registry is not None:
            self.registry.preauth_done(self)
            self.registry.conn_closed(self, reason, self._now)


