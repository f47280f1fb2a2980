"""Fuzz target: the master control connection (``mpvpn.core.control``).

The first input byte ``b0`` picks a path (``b0 & 7``) and flags
(``b0 & 0x08``: EOF at the end; ``b0 & 0x10``: feed byte by byte where it
applies; ``b0 & 0x20``: direction, path 7):

0. **FrameDecoder**: ``b1`` picks ``max_frame`` (and whether it is raised to
   the post-auth limit after the first frame, as the connection does), ``b2``
   the chunk size; the rest is a TCP byte stream.  Asserts: same frames and
   same error as an independent reference parser, bounded buffer.
1. **Server pre-auth**: a fresh ``ServerSessions`` accepts a connection and
   the rest (in chunks of ``b1`` bytes) arrives on it; then the handshake
   timer fires.  Asserts: nothing is ever sent unless the first frame is a
   genuine Noise ``NNpsk0`` message 1 (checked with an independent Noise
   responder) followed by a stamp whose MAC verifies (checked with hashlib
   here), the connection ends closed with exactly one counted reason, no
   session is ever allocated.
2. **Established, to the server** / 3. **established, to the client**:
   a client/server pair handshaken once at import (snapshot; every input
   starts from a deep copy).  The rest is split on ``0xff`` into segments;
   each is ``op`` + body and the body is usually *encrypted as a valid
   transport frame* by the peer's own cipher state, so the JSON parser,
   the schema validation and the state machine are fuzzed behind
   authentication.  Ops (``op & 7``): 0-1 send, 2 send in two TCP pieces,
   3 replay the last frame, 4 hold the frame and send it after the next one
   (reorder), 5 raw unencrypted frame (``op & 0x80``: length prefix 0xffff),
   6 flip one ciphertext bit, 7 special by ``(op >> 3) & 7``: 0 oversized
   message, 1 a genuine REKEY from the peer, 2 pump genuine traffic both
   ways, 3 advance the clock ``body[0]`` seconds and run timers, 4 EOF,
   5 the receiver starts its own rekey (collisions), 6 the receiver's LANs
   change (it sends UPDATE; the fuzzer's UPDATE may ack it).
4. **HELLO state, to the server** (fuzzes HELLO: peer validation, pairing,
   session allocation) / 5. **HELLO state, to the client** (fuzzes
   WELCOME): same ops, from a snapshot taken right after the Noise
   handshake.
6. **Client pre-auth**: the rest arrives at a client that has just sent
   message 1.  Asserts: no answer, exactly one counted end, closed.
7. **Genuine handshake message, fuzzed payload**: a real Noise peer with the
   PSK writes message 1 (to a server) or, with ``b0 & 0x20``, message 2 (to
   a client) carrying the rest as its payload, so version negotiation is
   parsed behind authentication.  Asserts: the server's answer is its
   version or a well-formed error inside message 2; one counted end.

Asserts on paths 2-5, for every frame: nothing escapes ``receive_data`` /
``handle_timer``; the defensive ``internal`` counter never moves (it would
hide a bug); a forged frame (replay, raw, tampered, out of order) and a body
that ``decode_message`` rejects both close an open connection with exactly
one counted reason and a ``ProtocolError``; a schema-valid message that
closes the connection is counted too (BYE excepted); a closed connection
only counts ``after_close`` and sends nothing; everything sent is
well-framed; the registry never keeps a session for a connection closed for
a reason other than EOF/timeout.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import random

try:
    import atheris
except ImportError:  # the plain (non-atheris) tests import this module too
    atheris = None

_INSTRUMENT = atheris is not None and __name__ == "__main__"

with atheris.instrument_imports(include=["mpvpn"]) if _INSTRUMENT else contextlib.nullcontext():
    from mpvpn.core import noise, pairing
    from mpvpn.core.controlconn import ClientConnection, ControlConfig, State
    from mpvpn.core.controlevents import ConnectionClosed, ProtocolError
    from mpvpn.core.controlmsg import (
        MAX_FRAME,
        MAX_MESSAGE,
        POSTAUTH_MAX_FRAME,
        PREAUTH_MAX_FRAME,
        PROLOGUE,
        FrameDecoder,
        Vnc,
        decode_message,
        encode_frame,
    )
    from mpvpn.core.registry import ServerSessions
    from mpvpn.core.pairing import Uplink

NAME = "control"
MAX_OPS = 48
PSK = bytes(range(32))
ADDR = ("203.0.113.9", 40000)
# counters that move without bad input
NOT_BAD = frozenset({"after_close", "rekey_started", "rekeyed", "rekey_collision", "rekey_volume"})
# control protocol 2's stamp after message 1, built here independently of
# mpvpn.core.control: sender | counter | keyed-BLAKE2s-128(BLAKE2s(label | psk), ...)
_MAC_KEY = hashlib.blake2s(b"orayboxvpn control v2 mac" + PSK).digest()


def _stamp(msg1: bytes, counter: int = 1, sender: bytes = b"fuzzfuzz") -> bytes:
    head = sender + counter.to_bytes(8, "big")
    return head + hashlib.blake2s(b"msg1" + head + msg1, key=_MAC_KEY, digest_size=16).digest()


def _stamp_ok(msg1: bytes, stamp: bytes) -> bool:
    return len(stamp) == 32 and hmac.compare_digest(
        hashlib.blake2s(b"msg1" + stamp[:16] + msg1, key=_MAC_KEY, digest_size=16).digest(),
        stamp[16:])


def client_config() -> ControlConfig:
    ups = (Uplink("wan1", "telecom", "120.22.1.2", 7000),
           Uplink("wan2", "unicom", "220.36.1.46", 7000),
           Uplink("wan3", "mobile", "61.120.1.230", 7000))
    return ControlConfig(psk=PSK, name="site1", uplinks=ups,
                         vnc=Vnc("10.99.0.2", "255.255.255.0", "02:00:00:00:00:01"),
                         lans=("192.168.1.0/24",))


def server_config() -> ControlConfig:
    ups = (Uplink("t", "telecom", "120.61.20.12", 7000),
           Uplink("u", "unicom", "180.22.154.31", 7000),
           Uplink("m", "mobile", "61.35.11.10", 7000))
    return ControlConfig(psk=PSK, name="hub", uplinks=ups, vnc=Vnc("10.99.0.1", "255.255.255.0"),
                         lans=("10.10.0.0/16",), control_port=7001)


CLIENT_CFG = client_config()
SERVER_CFG = server_config()


# --- helpers -------------------------------------------------------------------------

def _bad_count(conn) -> int:
    return sum(v for k, v in conn.counters.items() if k not in NOT_BAD)


def _frames(stream: bytes, limit: int, raise_to: int | None = None):
    """Reference framing: (frames, error, leftover) of a whole byte stream."""
    out, i, n = [], 0, len(stream)
    while n - i >= 2:
        size = (stream[i] << 8) | stream[i + 1]
        if size == 0:
            return out, "malformed", b""
        if size > limit:
            return out, "oversized", b""
        if n - i - 2 < size:
            break
        out.append(stream[i + 2:i + 2 + size])
        i += 2 + size
        if raise_to is not None:
            limit = raise_to
    return out, None, stream[i:]


def _crypto_memo(root) -> dict:
    """id -> object for every ``cryptography`` object reachable from ``root``:
    they hold no per-message state and cannot be deep-copied, so copies share them."""
    memo, seen, todo = {}, set(), [root]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (str, bytes, bytearray, int, float, bool, type(None))):
            continue
        seen.add(id(o))
        if type(o).__module__.startswith("cryptography"):
            memo[id(o)] = o
            continue
        if isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)) or type(o).__name__ == "deque":
            todo.extend(o)
        else:
            if hasattr(o, "__dict__"):
                todo.extend(vars(o).values())
            for cls in type(o).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(o, slot):
                        todo.append(getattr(o, slot))
    return memo


def _pump(a, b, now: float, rounds: int = 20) -> None:
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                dst.receive_data(data, now)
        if not moved:
            return


class _Snapshot:
    """A client/server pair at one point of the connection, copied per input."""

    def __init__(self, c, s, reg):
        self.objs = (c, s, reg)
        self.memo = _crypto_memo(self.objs)

    def copy(self):
        return copy.deepcopy(self.objs, dict(self.memo))


def _build():
    reg = ServerSessions(SERVER_CFG, rng=random.Random(1), limiter=None)
    s = reg.accept(ADDR, 0.0)
    c = ClientConnection(CLIENT_CFG, 0.0)
    msg1 = c.data_to_send()
    s.receive_data(msg1, 0.0)
    c.receive_data(s.data_to_send(), 0.0)  # msg2; the client queues HELLO
    assert c.state is State.HELLO and s.state is State.HELLO, (c.state, s.state)
    hello_frame = c.data_to_send()
    c.events(), s.events()
    # Established: a copy gets the genuine HELLO, then the WELCOME.
    c2, s2, reg2 = copy.deepcopy((c, s, reg), _crypto_memo((c, s, reg)))
    hello_pt = copy.deepcopy(s._recv_cs, _crypto_memo(s._recv_cs)).decrypt_with_ad(
        b"", hello_frame[2:])
    s2.receive_data(hello_frame, 0.0)
    welcome_frame = s2.data_to_send()
    welcome_pt = copy.deepcopy(c2._recv_cs, _crypto_memo(c2._recv_cs)).decrypt_with_ad(
        b"", welcome_frame[2:])
    c2.receive_data(welcome_frame, 0.0)
    assert c2.state is State.ESTABLISHED and s2.state is State.ESTABLISHED
    assert not c2.data_to_send() and not s2.data_to_send()
    c2.events(), s2.events()
    est = _Snapshot(c2, s2, reg2)
    # HELLO state: the HELLO is not delivered; the fuzzer's frames take its
    # nonce instead (nonce reuse, harness only).
    c._send_cs.set_nonce(0)
    hello = _Snapshot(c, s, reg)
    first, _e, _r = _frames(msg1, PREAUTH_MAX_FRAME)
    assert len(first) == 2 and _stamp_ok(*first)  # message 1 and its stamp
    return {"msg1": first[0], "first": msg1, "hello": hello, "established": est,
            "hello_pt": hello_pt, "welcome_pt": welcome_pt,
            "plan": pairing.to_wire(s2.plan, local_is_client=False),
            "client_uplinks": [u.to_json() for u in CLIENT_CFG.local_info().uplinks]}


_STATE: dict = {}


def state() -> dict:
    if not _STATE:
        _STATE.update(_build())
    return _STATE


# --- path 0: FrameDecoder -------------------------------------------------------------------

_LIMITS = (1, 2, 47, PREAUTH_MAX_FRAME, POSTAUTH_MAX_FRAME, MAX_FRAME)


def _fuzz_frames(b1: int, b2: int, stream: bytes) -> None:
    limit = _LIMITS[b1 % len(_LIMITS)]
    raise_to = POSTAUTH_MAX_FRAME if b1 & 0x80 else None
    chunk = b2 or len(stream) or 1
    d = FrameDecoder(limit)
    got = []
    for i in range(0, len(stream), chunk):
        d.feed(stream[i:i + chunk])
        while True:
            f = d.next_frame()
            if f is None:
                break
            got.append(f)
            if raise_to is not None:
                d.max_frame = raise_to
        assert d.buffered <= 2 + d.max_frame - 1 + chunk
    want, err, rest = _frames(stream, limit, raise_to)
    assert got == want, "FrameDecoder cut the stream differently from the reference"
    assert d.error == err, (d.error, err)
    assert d.buffered == len(rest), (d.buffered, len(rest))
    assert d.frames == len(want)
    if err is None:
        assert d.bytes_in == len(stream)


# --- path 1: server pre-auth --------------------------------------------------------------------

def _authentic_msg1(frame: bytes) -> bool:
    hs = noise.Handshake("NNpsk0", False, PSK, PROLOGUE)
    try:
        hs.read_message(frame)
    except noise.NoiseError:
        return False
    return True


def _fuzz_preauth(chunk: int, stream: bytes, eof: bool) -> None:
    reg = ServerSessions(SERVER_CFG, rng=random.Random(1), limiter=None)
    s = reg.accept(ADDR, 0.0)
    frames, _err, _rest = _frames(stream, PREAUTH_MAX_FRAME)
    authentic = (len(frames) >= 2 and len(frames[0]) >= 48 and _stamp_ok(frames[0], frames[1])
                 and _authentic_msg1(frames[0]))
    chunk = chunk or len(stream) or 1
    sent = b""
    now = 0.0
    for i in range(0, len(stream), chunk):
        now += 0.001
        s.receive_data(stream[i:i + chunk], now)
        sent += s.data_to_send()
        if not authentic:
            assert sent == b"", "the server answered an unauthenticated client"
        assert len(reg) == 0, "a session was allocated before HELLO"
    if eof:
        s.receive_data(b"", now)
    s.handle_timer(now + 100.0)
    sent += s.data_to_send()
    assert s.closed and s.close_reason, "pre-auth connection still open after the timeout"
    assert _bad_count(s) == 1, f"pre-auth end counted {dict(s.counters)}"
    assert "internal" not in s.counters, dict(s.counters)
    assert len(reg) == 0
    if not authentic:
        assert sent == b""
    else:
        out, err, rest = _frames(sent, MAX_FRAME)
        assert err is None and rest == b"" and len(out) >= 1
    evs = s.events()
    assert isinstance(evs[-1], ConnectionClosed), evs


# --- path 6: client pre-auth --------------------------------------------------------------------

def _fuzz_client_preauth(chunk: int, stream: bytes, eof: bool) -> None:
    c = ClientConnection(CLIENT_CFG, 0.0)
    assert c.data_to_send(), "the client sends message 1 at once"
    chunk = chunk or len(stream) or 1
    now = 0.0
    for i in range(0, len(stream), chunk):
        now += 0.001
        c.receive_data(stream[i:i + chunk], now)
        # a genuine message 2 needs this client's fresh ephemeral key: never here
        assert c.data_to_send() == b"", "the client answered an unauthenticated server"
        assert c.state in (State.HANDSHAKE, State.CLOSED)
    if eof:
        c.receive_data(b"", now)
    c.handle_timer(now + 100.0)
    assert c.closed and c.close_reason
    assert _bad_count(c) == 1, f"client pre-auth end counted {dict(c.counters)}"
    assert "internal" not in c.counters


# --- path 7: a genuine Noise handshake message with a fuzzed payload -----------------------------

MAX_HS_PAYLOAD = 600  # frames above PREAUTH_MAX_FRAME (512) are refused as oversized


def _fuzz_handshake_payload(to_client: bool, payload: bytes, eof: bool) -> None:
    """msg 1 (to a server) or msg 2 (to a client) made by a real Noise peer
    with the PSK, carrying the fuzzer's bytes as its payload: the version
    negotiation JSON is parsed behind authentication."""
    if to_client:
        conn = ClientConnection(CLIENT_CFG, 0.0)
        first, _e, _r = _frames(conn.data_to_send(), PREAUTH_MAX_FRAME)
        peer = noise.Handshake("NNpsk0", False, PSK, PROLOGUE)
        peer.read_message(first[0])
        reg = None
    else:
        reg = ServerSessions(SERVER_CFG, rng=random.Random(1), limiter=None)
        conn = reg.accept(ADDR, 0.0)
        peer = noise.Handshake("NNpsk0", True, PSK, PROLOGUE)
    msg = peer.write_message(payload)
    stamp = b"" if to_client or len(msg) > PREAUTH_MAX_FRAME else encode_frame(_stamp(msg))
    conn.receive_data(encode_frame(msg) + stamp, 0.0)
    sent = conn.data_to_send()
    assert "internal" not in conn.counters, dict(conn.counters)
    if len(msg) > PREAUTH_MAX_FRAME:
        assert conn.closed and _bad_count(conn) == 1 and sent == b""
    elif not to_client:
        # The server answers an authenticated client: version, or an error inside msg 2.
        frames, err, rest = _frames(sent, MAX_FRAME)
        assert err is None and rest == b"" and len(frames) == 1, sent[:40]
        reply = json.loads(peer.read_message(frames[0]))
        if conn.closed:
            assert set(reply) == {"error", "text"} and _bad_count(conn) == 1, reply
        else:
            assert conn.state is State.HELLO and reply == {"version": conn.version}, reply
    elif not conn.closed:
        assert conn.state is State.HELLO and sent, "client accepted msg 2 but sent no HELLO"
    else:
        assert _bad_count(conn) == 1, dict(conn.counters)
    if eof:
        conn.receive_data(b"", 0.0)
    conn.handle_timer(100.0)
    assert conn.closed and _bad_count(conn) == 1, dict(conn.counters)
    assert "internal" not in conn.counters
    if reg is not None:
        assert len(reg) == 0


# --- paths 2-5: behind authentication -------------------------------------------------------------

class _Conv:
    """One input's conversation: ``src`` (genuine peer) writes frames to ``dst``."""

    def __init__(self, snap: _Snapshot, to_server: bool):
        c, s, reg = snap.copy()
        self.c, self.s, self.reg = c, s, reg
        self.src, self.dst = (c, s) if to_server else (s, c)
        self.now = 0.0
        self.last = None
        self.held = None
        self.out = b""  # everything dst sent that src did not take

    def encrypt(self, body: bytes):
        cs = self.src._send_cs
        if cs is None or self.src.closed:
            return None
        return encode_frame(cs.encrypt_with_ad(b"", body))

    def feed(self, frame: bytes, expect_bad: bool, body: bytes | None = None,
             pieces: int = 1) -> None:
        dst = self.dst
        was_open = not dst.closed
        before = _bad_count(dst)
        after_close = dst.counters.get("after_close", 0)
        dst.events()  # drop older events: only this frame's are checked
        step = max(1, len(frame) // pieces)
        for i in range(0, len(frame), step):
            dst.receive_data(frame[i:i + step], self.now)
        self.last = frame
        self._common_checks()
        if not was_open:
            assert _bad_count(dst) == before, "a closed connection counted bad input"
            assert dst.counters.get("after_close", 0) > after_close
            assert dst.data_to_send() == b"", "a closed connection sent something"
            return
        moved = _bad_count(dst) - before
        new_evs = dst.events()
        is_bye = False
        if not expect_bad and body is not None:
            msg, _why, _text = decode_message(body, from_client=not dst.is_client)
            expect_bad = msg is None
            is_bye = msg is not None and msg["type"] == "BYE"
        if expect_bad:
            assert dst.closed, f"bad frame did not close the connection ({body!r:.80})"
            assert moved == 1, f"bad frame moved {moved} counters: {dict(dst.counters)}"
            assert any(isinstance(e, ProtocolError) for e in new_evs), new_evs
        elif dst.closed:
            # counted, unless it is the peer's own BYE
            closed = [e for e in new_evs if isinstance(e, ConnectionClosed)]
            assert closed, new_evs
            bye = is_bye and closed[0].by_peer and dst.close_reason == "bye"
            assert moved == (0 if bye else 1), \
                f"closing message moved {moved} counters: {dict(dst.counters)}"
        else:
            assert not any(isinstance(e, (ProtocolError, ConnectionClosed)) for e in new_evs)
        self.out += dst.data_to_send()

    def _common_checks(self) -> None:
        for conn in (self.c, self.s):
            assert "internal" not in conn.counters, f"internal error caught: {dict(conn.counters)}"
        if self.s.closed and self.s.close_reason not in ("eof", "timeout"):
            assert all(x.conn is not self.s for x in self.reg.sessions.values()), \
                "registry keeps a session for a closed connection"
        assert len(self.reg) <= 1

    def pump(self) -> None:
        if self.out and not self.src.closed:
            self.src.receive_data(self.out, self.now)
        self.out = b""
        _pump(self.src, self.dst, self.now)
        self._common_checks()

    def tick(self, dt: float) -> None:
        self.now += dt
        for conn in (self.dst, self.src):
            t = conn.get_timer()
            if t is not None and t <= self.now:
                conn.handle_timer(self.now)
        self.out += self.dst.data_to_send()
        genuine = self.src.data_to_send()  # e.g. the peer's KEEPALIVE
        if genuine:
            self.feed(genuine, False)
        self.reg.handle_timer(self.now)
        self._common_checks()

    def finish(self, eof: bool) -> None:
        if self.held is not None:  # nothing overtook it: it is simply the next frame
            frame, body = self.held
            self.held = None
            self.feed(frame, False, body)
        if eof and not self.dst.closed:
            self.dst.receive_data(b"", self.now)
        self.tick(1000.0)
        self.out += self.dst.data_to_send()
        _out, err, rest = _frames(self.out, MAX_FRAME)
        assert err is None and rest == b"", "the machine sent a badly framed stream"


def _fuzz_conv(snap: _Snapshot, to_server: bool, rest: bytes, eof: bool, bytewise: bool) -> None:
    cv = _Conv(snap, to_server)
    for seg in rest.split(b"\xff")[:MAX_OPS]:
        if not seg:
            continue
        op, body = seg[0], seg[1:]
        kind = op & 7
        if kind == 7:
            sub = (op >> 3) & 7
            if sub == 1:  # a genuine REKEY from the peer
                if cv.src.rekey(cv.now):
                    frames = cv.src.data_to_send()
                    cv.feed(frames, False, None)
                continue
            if sub == 2:
                cv.pump()
                continue
            if sub == 3:
                cv.tick(float(body[0] if body else 1))
                continue
            if sub == 4:
                if not cv.dst.closed:
                    cv.dst.receive_data(b"", cv.now)
                    cv.out += cv.dst.data_to_send()
                    cv._common_checks()
                continue
            if sub == 5:  # dst starts its own rekey (a REKEY from src then collides)
                cv.dst.rekey(cv.now)
                cv.out += cv.dst.data_to_send()
                continue
            if sub == 6:  # dst's own LANs change (an UPDATE from src then acks it)
                extra = "192.168.50.0/24" if cv.dst.is_client else "10.20.0.0/16"
                with contextlib.suppress(ValueError):  # not established: local misuse
                    cv.dst.send_update(cv.now, lans=list(cv.dst.local.lans) + [extra])
                cv.out += cv.dst.data_to_send()
                cv._common_checks()
                continue
            body = (body or b" ") * (MAX_MESSAGE // max(1, len(body)) + 1)
            body = body[:MAX_FRAME - noise.TAG_LEN]
        if kind == 3 and cv.last is not None:
            cv.feed(cv.last, True)
            continue
        if kind == 5:
            if op & 0x80:
                frame = b"\xff\xff" + body
            else:
                frame = encode_frame(body) if body else b"\x00\x00"
            cv.feed(frame, True)
            continue
        # a genuine peer cannot encrypt more than one Noise message holds (a
        # fuzzer's longer body crashed the harness: corpus est2-update-10000-lans)
        body = body[:MAX_FRAME - noise.TAG_LEN]
        frame = cv.encrypt(body)
        if frame is None:  # the genuine peer is gone
            break
        if kind == 6:
            bit = ((op >> 3) * 131 + len(body)) % ((len(frame) - 2) * 8)
            fb = bytearray(frame)
            fb[2 + (bit >> 3)] ^= 1 << (bit & 7)
            cv.feed(bytes(fb), True)
            continue
        if kind == 4 and cv.held is None:
            cv.held = (frame, body)
            continue
        if cv.held is not None:  # this frame overtakes the held one: both are out of order
            (held, _b), cv.held = cv.held, None
            cv.feed(frame, True)
            cv.feed(held, True)
            continue
        pieces = len(frame) if bytewise else (2 if kind == 2 else 1)
        cv.feed(frame, False, body, pieces)
    cv.finish(eof)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    b0 = data[0]
    path = b0 & 7
    eof, bytewise = bool(b0 & 0x08), bool(b0 & 0x10)
    if path == 0:
        _fuzz_frames(data[1] if len(data) > 1 else 0, data[2] if len(data) > 2 else 0, data[3:])
    elif path == 1:
        chunk = 1 if bytewise else (data[1] if len(data) > 1 else 0)
        _fuzz_preauth(chunk, data[2:], eof)
    elif path == 6:
        chunk = 1 if bytewise else (data[1] if len(data) > 1 else 0)
        _fuzz_client_preauth(chunk, data[2:], eof)
    elif path == 7:
        _fuzz_handshake_payload(bool(b0 & 0x20), data[1:MAX_HS_PAYLOAD + 1], eof)
    else:
        st = state()
        snap = st["established"] if path in (2, 3) else st["hello"]
        _fuzz_conv(snap, path in (2, 4), data[1:], eof, bytewise)


# --- seed corpus ---------------------------------------------------------------------------------

def _script(path: int, segments, flags: int = 0) -> bytes:
    return bytes([path | flags]) + b"\xff".join(segments)


def _j(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def seed_corpus() -> list[bytes]:
    st = state()
    msg1, first = encode_frame(st["msg1"]), st["first"]
    seeds = [
        bytes([0, 3, 0]) + msg1 + encode_frame(b"x" * 600),
        bytes([0, 0x84, 7]) + encode_frame(b"abc") + b"\x00\x00",
        bytes([0, 5, 1]) + b"\xff\xff" + bytes(10),
        bytes([1, 0]) + first,
        bytes([1, 7]) + first + encode_frame(bytes(60)),
        bytes([1, 0]) + first[:-1],
        bytes([1, 0]) + msg1,  # message 1 without its stamp (a control v1 client)
        bytes([1, 0]) + msg1 + encode_frame(_stamp(st["msg1"], 2)),  # a later stamp
        bytes([1, 0]) + msg1 + encode_frame(_stamp(st["msg1"])[:-1] + b"\x00"),
        bytes([1 | 0x08, 0]) + encode_frame(bytes(48)),
        bytes([1, 0]) + encode_frame(b"z" * 600),
        bytes([1, 0]) + b"\x00\x00",
    ]
    ka = _j({"type": "KEEPALIVE", "n": 1})
    kack = _j({"type": "KEEPALIVE_ACK", "n": 1})
    bye = _j({"type": "BYE", "reason": "shutdown", "text": "bye"})
    err = _j({"type": "ERROR", "code": "invalid", "text": "no"})
    rk1 = _j({"type": "REKEY", "step": 1, "epoch": 2, "hs": "QUFB" * 16})
    rk3 = _j({"type": "REKEY", "step": 3, "epoch": 2})
    ups = st["client_uplinks"]
    moved = [dict(u) for u in ups]
    moved[0]["addr"] = "120.22.1.99"
    upd_c = _j({"type": "UPDATE", "seq": 1, "uplinks": moved})
    natted = [dict(u) for u in ups]  # an uplink behind NAT with its candidates (issue 15)
    natted[0]["candidates"] = [{"kind": "host", "addr": natted[0]["addr"], "port": natted[0]["port"]},
                               {"kind": "srflx", "addr": "203.0.113.10", "port": 40000}]
    upd_n = _j({"type": "UPDATE", "seq": 1, "uplinks": natted})
    upd_l = _j({"type": "UPDATE", "seq": 1, "lans": ["192.168.1.0/24", "192.168.7.0/24"]})
    upd_s = _j({"type": "UPDATE", "ack": 0, "plan": st["plan"]})
    # direct site-to-site paths (mpvpn.core.peerdirect): an offer (only the hub's is valid),
    # a relayed handshake step and an end, both ways
    offer = _j({"type": "PEER_OFFER", "name": "site-c", "key": "QUFB" * 10 + "QUE=",
                "uplinks": natted, "session_id": 77, "initiator": True, "token": "QUFB" * 10 + "QUE=",
                "ciphers": ["chacha20-poly1305"], "mode": "duplicate", "pair_unmatched": False})
    peer_hs = _j({"type": "PEER_HS", "name": "site-c", "session_id": 77, "step": 1, "epoch": 2,
                  "hs": "QUFB" * 16})
    peer_end = _j({"type": "PEER_END", "name": "site-c", "session_id": 77, "reason": "timeout"})
    hello, welcome = st["hello_pt"], st["welcome_pt"]
    S, P = b"\x00", bytes([7 | 2 << 3])  # send, pump
    T = bytes([7 | 3 << 3])  # tick
    RK = bytes([7 | 1 << 3])
    for path in (2, 3):
        seeds += [
            _script(path, [S + ka, S + kack, S + ka]),
            _script(path, [S + (upd_c if path == 2 else upd_s), S + ka, S + ka]),
            _script(path, [S + upd_l, S + ka]),
            _script(path, [S + upd_n, S + ka]),
            _script(path, [S + bye]),
            _script(path, [S + err]),
            _script(path, [S + rk1]),
            _script(path, [S + offer, S + peer_hs, S + peer_end, S + ka]),
            _script(path, [RK, P, S + ka, P, T + b"\x05", S + ka]),
            _script(path, [RK, S + rk3, S + ka]),
            _script(path, [S + ka, b"\x03", S + ka]),  # replay
            _script(path, [b"\x04" + ka, S + kack]),  # reorder
            _script(path, [b"\x05" + ka]),  # unencrypted
            _script(path, [b"\x06" + ka]),  # tampered
            _script(path, [b"\x07" + ka]),  # oversized
            _script(path, [T + b"\x3c", T + b"\x3c", T + b"\xff", P]),
            _script(path, [S + b"{\"type\":\"KEEPALIVE\",\"n\":1,\"n\":2}"]),
            _script(path, [S + b"[" * 3000]),
            _script(path, [b"\x02" + ka, S + ka], 0x10),
            _script(path, [S + ka], 0x08),
        ]
    seeds += [
        _script(4, [S + hello, P, S + ka]),
        _script(4, [S + hello.replace(b"10.99.0.2", b"10.99.0.1")]),
        _script(4, [S + hello.replace(b"192.168.1.0/24", b"10.10.0.0/16")]),
        _script(4, [S + hello.replace(b"192.168.1.0/24", b"0.0.0.0/0")]),
        _script(4, [S + ka]),
        _script(4, [S + hello, S + hello]),
        _script(5, [S + welcome, P, S + ka]),
        _script(5, [S + welcome.replace(b'"plan":[', b'"plan":[{"member":9,"client":"wan1",'
                                                   b'"server":"t"},')]),
        _script(5, [S + welcome.replace(b"10.99.0.1", b"10.98.0.1")]),
        _script(5, [S + hello]),
    ]
    for payload in (b'{"versions":[1]}', b'{"versions":[2,3,1]}', b'{"versions":[9]}',
                    b'{"versions":"1"}', b'{"versions":[1],"x":1}', b"{}", b"", b"\x80"):
        seeds.append(bytes([7]) + payload)
    for payload in (b'{"version":1}', b'{"version":2}', b'{"error":"version","text":"no"}',
                    b'{"error":"Not a word"}', b'{"version":1,"error":"x"}', b"[]"):
        seeds.append(bytes([7 | 0x20]) + payload)
    seeds += [bytes([6, 0]) + encode_frame(bytes(80)), bytes([6 | 0x08, 0]) + b"\x00",
              bytes([6, 0]) + b"\x02\x01" + bytes(600)]
    UP = bytes([7 | 6 << 3])  # the receiver sends an UPDATE
    OWN_RK = bytes([7 | 5 << 3])  # the receiver starts a rekey
    seeds += [
        _script(3, [UP, S + _j({"type": "UPDATE", "ack": 1, "plan": st["plan"]}), S + ka]),
        _script(2, [UP, P, S + ka]),
        _script(2, [OWN_RK, RK, P, S + ka]),
        _script(3, [OWN_RK, S + rk1, P]),
    ]
    return seeds


def main(argv=None) -> None:
    from target import fuzz_main  # tests/fuzz is sys.path[0] when run as a script

    fuzz_main(TestOneInput, argv, setup=(state,))


if __name__ == "__main__":
    main()
