"""The server's session registry (hub and spoke), sans-I/O.

:class:`ServerSessions` accepts every TCP connection (bounding the ones that
have not passed the handshake gate per source and in all), opens a
:class:`ServerSession` per client site after HELLO, checks what each site
claims against the others, detaches sessions whose control connection was
lost and expires silent ones.  :class:`~mpvpn.core.controlconn.ServerConnection`
calls the methods under "from connections".  Rules: ``docs/control.md``
("ServerSessions").
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from mpvpn.core.admission import HandshakeGuard, RateLimiter
from mpvpn.core.controlconn import ControlConfig, ServerConnection, random_session_id
from mpvpn.core.controlevents import SessionFreed
from mpvpn.core.controlmsg import Bad, PeerInfo
from mpvpn.core.peercheck import overlap

#: Close reasons that leave a server session *detached* (kept until it has
#: been silent for the session timeout) rather than freed at once: the
#: control connection was lost, but the data plane may still be working.
DETACH_REASONS = frozenset({"eof", "timeout"})


def identity_of(conn: ServerConnection, peer: PeerInfo) -> tuple:
    """Who a site is on this server: the key it proved, never what it claims.

    * ``("site", section)``: it authenticated with the key of a ``config
      site`` section;
    * ``("static", public key)``: KKpsk0, the one client static key we know;
    * ``("psk", name, vNIC address)``: the one shared PSK proves only that
      it is one of the sites; a restarted router claims the same name and
      address again, so that pair stands in for the key (two routers that
      claim the same pair cannot be told apart: give each a `config site`).
    """
    if conn.site is not None:
        return ("site", conn.site)
    if conn.config.pattern == "KKpsk0" and conn.config.remote_static is not None:
        return ("static", bytes(conn.config.remote_static).hex())
    return ("psk", peer.name, peer.vnc.ip)


def describe_identity(identity: tuple) -> str:
    kind = identity[0]
    if kind == "site":
        return f"site key {identity[1]}"
    if kind == "static":
        return "static key " + identity[1][:16]
    return f"shared key as {identity[1]} {identity[2]}"


@dataclass(eq=False)
class ServerSession:
    """One client site's session on the server."""

    session_id: int
    name: str
    peer: PeerInfo
    conn: ServerConnection | None  # None once the control connection is gone (detached)
    created: float
    last_seen: float
    identity: tuple = ()  # identity_of(): the key it authenticated with

    def heard(self, now: float) -> None:
        """A control message arrived on its connection."""
        self.last_seen = now

    def update_peer(self, peer: PeerInfo) -> None:
        """The site's accepted UPDATE (checked with
        :meth:`ServerSessions.check_claims` first)."""
        self.peer = peer


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
    * A session's identity is the key it authenticated with
      (:func:`identity_of`), never the name or addresses it claims.  A new
      connection with the same identity replaces the old session (a
      restarted router; the old connection gets BYE ``replaced``); one with
      another identity never displaces it: a claim that collides with
      another identity's session (vNIC address, a LAN, the site name) is
      refused (ERROR ``vnic``, ``overlap`` or ``name``, counted) and nothing
      of the existing session changes.
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
                 max_pending_per_source: int = 32, penalty_pending: int = 4, reserved=None):
        self.local = config.local_info()  # validated up front; what new connections announce
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
        self.by_identity: dict[tuple, ServerSession] = {}
        self.counters: Counter = Counter()
        self._events: deque = deque()
        # session IDs in use elsewhere on this hub, never given to a site:
        # the direct sessions it offered (mpvpn.core.peerdirect), a callable -> set
        self._reserved = reserved

    # -- public ------------------------------------------------------------------------------------
    def reconfigure(self, config: ControlConfig) -> None:
        """Our side changed (uplink addresses, LANs): connections accepted
        from now on use ``config``; established ones were sent an UPDATE by
        their owner.  Checked like the first one; a bad one changes nothing."""
        self.local = config.local_info()
        self.config = config

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
                                            "last_seen": s.last_seen,
                                            "identity": describe_identity(s.identity)}
                             for s in self.sessions.values()},
                "pending": len(self._pending), "counters": dict(self.counters)}

    # -- from connections --------------------------------------------------------------------------
    def count(self, reason: str) -> None:
        """A connection counted ``reason`` (the registry keeps the sum)."""
        self.counters[reason] += 1

    def _evict(self, conn: ServerConnection, text: str) -> None:
        self.preauth_done(conn)
        self.counters["evicted"] += 1
        conn.close("evicted", text)  # pre-auth: sends nothing; the edge sees ConnectionClosed

    def preauth_done(self, conn: ServerConnection) -> None:
        src = self._pending.pop(conn, None)
        if src is None:
            return
        mine = self._pending_by_source.get(src)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._pending_by_source[src]

    def preauth_failed(self, conn: ServerConnection, now: float) -> None:
        if self.limiter is not None:
            self.limiter.allow(conn.peer_addr, now)  # spends a token of its source

    def check_claims(self, peer: PeerInfo, identity: tuple) -> None:
        """Refuse (raise Bad) what ``peer`` claims if it collides with a
        session of another identity: its vNIC address, a LAN, its name.
        The session of the same identity (being updated or replaced) does
        not count."""
        self._check_rule(peer, identity)
        nets = [n for n in peer.networks if n.prefixlen]
        for s in self.sessions.values():
            if s.identity == identity:
                continue
            if s.peer.vnc.ip == peer.vnc.ip:
                self.counters["claim_refused"] += 1
                raise Bad("vnic", f"vNIC address {peer.vnc.ip} is already used by another site")
            for o in s.peer.networks:
                if not o.prefixlen:
                    continue
                for n in nets:
                    if overlap(n, o):
                        self.counters["claim_refused"] += 1
                        raise Bad("overlap", f"LAN {n} overlaps a LAN of another site")
            if s.name == peer.name:
                self.counters["claim_refused"] += 1
                raise Bad("name", f"site name {peer.name} is already used by another site "
                                  "(another key or vNIC address)")

    def _check_rule(self, peer: PeerInfo, identity: tuple) -> None:
        """What the hub's `config site` section lets this site claim."""
        if identity[0] != "site":
            return
        rule = self.config.claim_rules().get(identity[1])
        if rule is None:
            return
        ip, allowed = rule
        if ip is not None and peer.vnc.interface.ip != ip:
            self.counters["claim_refused"] += 1
            raise Bad("vnic", f"this site must use vNIC address {ip} (the hub's config site "
                              f"{identity[1]}), not {peer.vnc.ip}")
        if allowed is not None:
            for n in peer.networks:
                if not any(n.version == a.version and n.subnet_of(a) for a in allowed):
                    self.counters["claim_refused"] += 1
                    raise Bad("lan", f"LAN {n} is not among the subnets this site may announce "
                                     f"({', '.join(map(str, allowed)) or 'none'}; the hub's "
                                     f"config site {identity[1]})")

    def open_session(self, conn: ServerConnection, peer: PeerInfo, now: float) -> ServerSession:
        """A new site session for ``conn`` after its HELLO; raises Bad."""
        identity = identity_of(conn, peer)
        self.check_claims(peer, identity)
        old = self.by_identity.get(identity)
        if old is None and len(self.sessions) >= self.max_sessions:
            raise Bad("busy", f"server is full ({self.max_sessions} sessions)", "busy")
        used = self.sessions if self._reserved is None else set(self.sessions) | self._reserved()
        sid = random_session_id(self.rng, used)
        if old is not None:
            self._free(old, "replaced")
            self._drop_conn(old, "replaced", "a new connection from this site replaced the session")
        s = ServerSession(sid, peer.name, peer, conn, now, now, identity)
        self.sessions[sid] = s
        self.by_identity[identity] = s
        self.counters["sessions_opened"] += 1
        return s

    def conn_closed(self, conn: ServerConnection, reason: str, now: float) -> None:
        s = conn.session
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
        if self.by_identity.get(s.identity) is s:
            del self.by_identity[s.identity]
        self.counters["sessions_freed"] += 1
        self._events.append(SessionFreed(s.session_id, s.name, reason, s.conn))

    def _drop_conn(self, s: ServerSession, reason: str, text: str) -> None:
        conn, s.conn = s.conn, None
        if conn is not None and not conn.closed:
            conn.release_session()
            conn.close(reason, text)


