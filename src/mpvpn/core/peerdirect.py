"""Direct site-to-site paths (issue 16), sans-I/O: who is offered a
direct path, the relayed key handshake, and the bounds on both.

Two sites A and C of one hub (``base.hub_forward``) that talk to each
other through it may open a session of their own, with subflows straight
between their carriers (docs/control.md "Direct paths between sites"):

1. **Offer** (:class:`DirectBroker`, the hub): a pair whose packets the hub
   forwarded during the last round (:meth:`mpvpn.core.hubforward.HubForward.take_pairs`)
   and whose two sites announced a direct key (HELLO ``options.direct_key``:
   the site allows direct paths) gets a ``PEER_OFFER`` on each site's
   control channel: the other site's name, its direct key (the hub vouches
   "site C proved its site key and announced direct key K"), its uplinks
   with their NAT candidates, a session ID free on the hub (so free on both
   sites, whose hub sessions the hub numbered), which side initiates, the
   ciphers, and a random 32-byte token.
2. **Handshake** (:class:`DirectPeers`, each site): a Noise ``KKpsk0``
   handshake between the two sites' direct keys, psk = the token, prologue
   = protocol label, session ID and both names.  Its two messages travel as
   ``PEER_HS`` through the hub's control channels, opaque to the hub: the
   hub knows the token but neither private key, so it cannot compute the
   session's keys (docs/security.md says what an *active* hub could do).
3. **Data**: each site opens a data session (mpvpn.core.smpu) with the keys
   of that handshake, per-carrier subflows by the client-server pairing
   rules (the initiator as client), hole punching towards the candidates
   (mpvpn.core.candidates) -- that part is the agent's
   (mpvpn.agent.directpeers).

Bounds: the hub offers at most :data:`MAX_OFFERS_PER_ROUND` pairs per
round and :data:`MAX_PAIRS_PER_SITE` live pairs per site; a pair whose
offer ended (timeout, failure, a site gave up) is offered again only
after a backoff that doubles (:data:`RETRY_MIN` .. :data:`RETRY_MAX`).  A
site's ``PEER_HS`` is relayed only for a live offer it is part of, each
step once and in order, else refused with a reason (``PEER_END``) and
counted.  A site takes offers only from its hub, for a site the hub
forwards to, at most :data:`MAX_DIRECT` at once, with a session ID of its
own not in use; anything else is refused (``PEER_END`` with the reason)
and counted.

Nothing here touches a socket or a clock: messages and ``now`` in,
messages out.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from mpvpn.core import noise, seal
from mpvpn.core.controlconn import STUN_MAGIC_COOKIE
from mpvpn.core.controlmsg import b64

PROLOGUE = b"orayboxvpn direct v1"

OFFER_INTERVAL = 1.0  # the hub looks at the pairs that talk through it this often
MAX_OFFERS_PER_ROUND = 8  # new pairs offered per round
MAX_PAIRS_PER_SITE = 32  # live pairs one site takes part in (the hub's bound)
HS_TIMEOUT = 10.0  # an offer whose two handshake messages were not relayed by then ends
RETRY_MIN = 30.0  # a pair whose offer ended is offered again after this ...
RETRY_MAX = 600.0  # ... doubling up to this
MAX_DIRECT = 32  # direct peers one site keeps at once
OPEN_TIMEOUT = 20.0  # a site gives up a direct session not up this long after its keys
DOWN_TIMEOUT = 60.0  # ... or down this long (its traffic went back to the hub at once)
MAX_REFUSALS = 10  # refusals the hub answers per site per second (the rest: counted only)
MIN_REKEY_GAP = 1.0  # the hub relays a pair's rekeys at most this often (a flood bound)
PIN_REASONS = ("key_mismatch", "not_pinned")  # a site's refusals by its pins (base.direct_peer_key)
DIRECT_QUIET = 3.0  # (hub status) a keyed pair it forwarded nothing between for this long: "direct"
KEY_OVERLAP = 10.0  # a site keeps the previous epoch's receive key this long after a rekey


def next_epoch(e: int) -> int:
    """Key epochs cycle 1..255 (the SMPU header's epoch byte; 0 = unsealed)."""
    return e % 255 + 1


def _key(a: str, b: str) -> tuple:
    return (a, b) if a < b else (b, a)


def end_message(name: str, session_id: int, reason: str, text: str = "") -> dict:
    return {"type": "PEER_END", "name": name, "session_id": session_id, "reason": reason,
            "text": text}


# ------------------------------------------------------------------ the hub


@dataclass(frozen=True)
class SiteView:
    """What the hub knows of a site for direct paths (from its session)."""

    name: str
    key: bytes | None  # its direct key; None: it takes no direct paths
    uplinks: tuple  # pairing.Uplink, with candidates
    ciphers: tuple
    mode: str
    pair_unmatched: bool


@dataclass
class Pair:
    """One offered (then keyed) direct pair on the hub: ``initiator`` and
    ``responder`` are site names."""

    initiator: str
    responder: str
    session_id: int
    offered: float
    token: bytes = b""
    steps: set = field(default_factory=set)  # handshake steps relayed (1, 2) of ``epoch``
    epoch: int = 1  # the handshake being relayed: 1, then each rekey's
    keyed: bool = False  # the first handshake went through
    rekeyed: float = 0.0  # when the last handshake (first or rekey) started

    def other(self, name: str) -> str:
        return self.responder if name == self.initiator else self.initiator


class DirectBroker:
    """The hub's side (see the module docstring).  ``enabled``: the hub's
    ``base.direct`` (with ``base.hub_forward``)."""

    def __init__(self, enabled: bool, rng: random.Random | None = None):
        self.enabled = enabled
        self._rng = rng or random.SystemRandom()
        self._pairs: dict[int, Pair] = {}  # session id -> pair
        self._by_key: dict[tuple, Pair] = {}
        self._retry: dict[tuple, tuple[float, float]] = {}  # key -> (not before, next backoff)
        self._next_round = 0.0
        self._moved: set = set()  # sites whose uplinks or candidates changed since the last round
        self._refusals: dict = {}  # site -> (second, refusals answered in it)
        self._forwarded: dict = {}  # live pair's key -> the round that last saw the hub forward for it
        self.counters: Counter = Counter()

    # -- offers ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The next stalled offer's end (the rounds come with the agent's timers;
        a stalled rekey is the sites' business)."""
        t = [p.offered + HS_TIMEOUT for p in self._pairs.values() if not p.keyed]
        return min(t) if t else None

    def session_ids(self) -> set:
        """The session IDs of the live pairs (the hub's registry gives them to no site)."""
        return set(self._pairs)

    def set_enabled(self, enabled: bool, now: float) -> list:
        """``base.direct`` / ``hub_forward`` changed: off ends every pair."""
        was, self.enabled = self.enabled, enabled
        return self.disable(now) if was and not enabled else []

    def round_due(self, now: float) -> bool:
        """Is it time for :meth:`offers`?"""
        return self.enabled and now >= self._next_round

    def offers(self, sites: dict, talking, used_ids, now: float) -> list:
        """``sites``: name -> SiteView of every site session; ``talking``:
        (name, name) pairs the hub forwarded between since the last round;
        ``used_ids``: session IDs in use on the hub.  Returns ``[(site name,
        message), ...]`` to send (two PEER_OFFERs per new pair)."""
        out: list = []
        if not self.round_due(now):
            return out
        self._next_round = now + OFFER_INTERVAL
        talking = {_key(x, y) for x, y in talking if x != y}
        for key in talking & self._by_key.keys():
            self._forwarded[key] = now
        out += self._updates(sites)
        load = Counter()
        for p in self._pairs.values():
            load[p.initiator] += 1
            load[p.responder] += 1
        made = 0
        for a, b in sorted(talking):
            key = (a, b)
            if key in self._by_key:
                continue
            sa, sb = sites.get(a), sites.get(b)
            if sa is None or sb is None or sa.key is None or sb.key is None:
                continue
            retry = self._retry.get(key)
            if retry is not None and now < retry[0]:
                continue
            if made >= MAX_OFFERS_PER_ROUND:
                self.counters["direct_offers_deferred"] += 1
                continue
            if load[a] >= MAX_PAIRS_PER_SITE or load[b] >= MAX_PAIRS_PER_SITE:
                self.counters["direct_pairs_limited"] += 1
                continue
            sid = self._session_id(set(used_ids))
            token = self._rng.getrandbits(256).to_bytes(32, "big")
            pair = Pair(a, b, sid, now, token)  # (the smaller name initiates)
            self._pairs[sid] = pair
            self._by_key[key] = pair
            self._forwarded[key] = now  # (it was offered because the hub forwarded for it)
            load[a] += 1
            load[b] += 1
            made += 1
            self.counters["direct_offers"] += 1
            out.append((a, self._offer(sb, pair, True, token, sa)))
            out.append((b, self._offer(sa, pair, False, token, sb)))
        return out

    def site_moved(self, name: str) -> None:
        """Site ``name``'s uplinks or their candidates changed (its UPDATE):
        its pairs' other sites get them in the next round (a PEER_OFFER with
        the pair's session ID: an update, not a new pair)."""
        self._moved.add(name)

    def _updates(self, sites: dict) -> list:
        out = []
        moved, self._moved = self._moved, set()
        for pair in self._pairs.values():
            for name in (pair.initiator, pair.responder):
                other = pair.other(name)
                if name in moved and name in sites and other in sites and sites[name].key is not None:
                    self.counters["direct_updates"] += 1
                    out.append((other, self._offer(sites[name], pair, other == pair.initiator,
                                                   pair.token, sites[other])))
        return out

    def _session_id(self, used: set) -> int:
        for _ in range(64):
            sid = self._rng.getrandbits(32)
            if sid and sid != STUN_MAGIC_COOKIE and sid not in used and sid not in self._pairs:
                return sid
        raise RuntimeError("no free session ID")  # 2**32 IDs, a few hundred in use

    @staticmethod
    def _offer(other: SiteView, pair: Pair, initiator: bool, token: bytes, me: SiteView) -> dict:
        return {"type": "PEER_OFFER", "name": other.name, "key": b64(other.key),
                "uplinks": [u.to_json() for u in other.uplinks], "session_id": pair.session_id,
                "initiator": initiator, "token": b64(token), "ciphers": list(other.ciphers),
                "mode": other.mode, "pair_unmatched": bool(other.pair_unmatched or me.pair_unmatched)}

    # -- what sites send ----------------------------------------------------------------------
    def on_message(self, site: str, m: dict, now: float) -> list:
        """A PEER_HS or PEER_END from ``site`` (the name its session goes by):
        ``[(site name, message), ...]`` to send (relayed, or the refusal)."""
        t = m["type"]
        pair = self._pairs.get(m["session_id"])
        if pair is None or site not in (pair.initiator, pair.responder) or pair.other(site) != m["name"]:
            self.counters["direct_refused"] += 1
            if t == "PEER_END" or not self._may_answer(site, now):  # (an end needs no answer)
                return []
            return [(site, end_message(m["name"], m["session_id"], "no_offer",
                                       "no direct pair with that site and session"))]
        other = pair.other(site)
        if t == "PEER_END":
            self._end(pair, now, failed=m["reason"] != "closed")
            self.counters["direct_ended"] += 1
            if m["reason"] in PIN_REASONS:  # (a site refused the key we passed on)
                self.counters[f"direct_ended_{m['reason']}"] += 1
            return [(other, end_message(site, pair.session_id, m["reason"], m["text"]))]
        step, epoch = m["step"], m["epoch"]
        want = (1 if site == pair.initiator else 2)
        rekey = (pair.keyed and epoch == next_epoch(pair.epoch) and step == 1
                 and now >= pair.rekeyed + MIN_REKEY_GAP)
        if step != want or (not rekey and (epoch != pair.epoch or step in pair.steps
                                           or (step == 2 and 1 not in pair.steps))):
            self.counters["direct_refused"] += 1
            self._end(pair, now, failed=True)
            text = f"handshake step {step} of epoch {epoch} out of order"
            return [(site, end_message(other, pair.session_id, "refused", text)),
                    (other, end_message(site, pair.session_id, "refused", text))]
        if rekey:
            pair.epoch, pair.steps = epoch, set()
            self.counters["direct_rekeys"] += 1
        if step == 1:
            pair.rekeyed = now
        pair.steps.add(step)
        self.counters["direct_relayed"] += 1
        if pair.steps == {1, 2} and not pair.keyed:
            pair.keyed = True
            self._retry.pop(_key(pair.initiator, pair.responder), None)
        return [(other, {"type": "PEER_HS", "name": site, "session_id": pair.session_id,
                         "step": step, "epoch": epoch, "hs": b64(m["hs"])})]

    def _may_answer(self, site: str, now: float) -> bool:
        """At most MAX_REFUSALS answered refusals per site per second."""
        sec = int(now)
        start, n = self._refusals.get(site, (sec, 0))
        if start != sec:
            n = 0
        if n >= MAX_REFUSALS:
            self.counters["direct_refused_quiet"] += 1
            return False
        self._refusals[site] = (sec, n + 1)
        return True

    def site_gone(self, name: str, now: float) -> list:
        """``name``'s session ended: its pairs end; the other sides are told."""
        out = []
        for pair in [p for p in self._pairs.values() if name in (p.initiator, p.responder)]:
            self._end(pair, now, failed=False)
            out.append((pair.other(name), end_message(name, pair.session_id, "peer_left",
                                                      "the site left the hub")))
        for key in [k for k in self._retry if name in k]:
            del self._retry[key]
        self._refusals.pop(name, None)
        return out

    def disallow(self, name: str, now: float) -> list:
        """Site ``name`` may no longer go direct (the hub's `config site`
        ``direct 0`` on reload): its pairs end, both sides told."""
        out = []
        for pair in [p for p in self._pairs.values() if name in (p.initiator, p.responder)]:
            self._end(pair, now, failed=False)
            for a, b in ((pair.initiator, pair.responder), (pair.responder, pair.initiator)):
                out.append((a, end_message(b, pair.session_id, "disabled",
                                           f"the hub no longer offers {name} direct paths")))
        return out

    def handle_timer(self, now: float) -> list:
        """Offers whose handshake did not pass within HS_TIMEOUT end."""
        out = []
        for pair in [p for p in self._pairs.values() if not p.keyed and now >= p.offered + HS_TIMEOUT]:
            self._end(pair, now, failed=True)
            self.counters["direct_timeouts"] += 1
            for a, b in ((pair.initiator, pair.responder), (pair.responder, pair.initiator)):
                out.append((a, end_message(b, pair.session_id, "timeout",
                                           "the direct handshake did not finish in time")))
        return out

    def disable(self, now: float) -> list:
        """``base.direct`` turned off on the hub: every pair ends."""
        out = []
        for pair in list(self._pairs.values()):
            self._end(pair, now, failed=False)
            for a, b in ((pair.initiator, pair.responder), (pair.responder, pair.initiator)):
                out.append((a, end_message(b, pair.session_id, "disabled",
                                           "the hub no longer offers direct paths")))
        return out

    def _end(self, pair: Pair, now: float, failed: bool) -> None:
        key = _key(pair.initiator, pair.responder)
        self._pairs.pop(pair.session_id, None)
        if self._by_key.get(key) is pair:
            del self._by_key[key]
            self._forwarded.pop(key, None)
        if failed:
            prev = self._retry.get(key)
            wait = RETRY_MIN if prev is None else min(RETRY_MAX, prev[1])
            self._retry[key] = (now + wait, min(RETRY_MAX, wait * 2))
        else:
            self._retry[key] = (now + RETRY_MIN, RETRY_MIN)

    def status(self, now: float) -> list:
        """The live pairs.  ``path`` is an inference from what the hub sees
        (docs/status.md): ``direct`` for a keyed pair the hub forwarded
        nothing between for :data:`DIRECT_QUIET` s (their traffic goes over
        the direct session -- or they are silent), else ``via hub``;
        ``forwarded_age``: seconds since the round (one per OFFER_INTERVAL)
        that last saw the hub forward between them."""
        out = []
        for p in sorted(self._pairs.values(), key=lambda p: (p.initiator, p.responder)):
            seen = self._forwarded.get(_key(p.initiator, p.responder))
            age = None if seen is None else round(now - seen, 3)
            out.append({"sites": [p.initiator, p.responder], "session_id": p.session_id,
                        "state": "keyed" if p.keyed else "offered",
                        "path": ("direct" if p.keyed and (age is None or age >= DIRECT_QUIET)
                                 else "via hub"),
                        "forwarded_age": age})
        return out


# ------------------------------------------------------------------ a site


def prologue(session_id: int, initiator: str, responder: str) -> bytes:
    return (PROLOGUE + session_id.to_bytes(4, "big") + initiator.encode() + b"\0"
            + responder.encode())


@dataclass
class DirectPeer:
    """One direct peer of a site: the hub's offer, the handshake, and
    (once keyed) what the agent's data session reports."""

    name: str
    session_id: int
    initiator: bool
    key: bytes  # its direct key, as the hub vouched for it
    token: bytes  # the hub's psk for this pair's handshakes
    uplinks: tuple
    cipher: str
    mode: str
    pair_unmatched: bool
    offered: float
    hs: object = None  # noise.Handshake until keyed
    keys: object = None  # noise.SessionKeys once keyed
    keyed_at: float | None = None
    up: bool = False
    since: float = 0.0  # of the current up/down state (after keyed)
    ups: int = 0  # times it came up (traffic moved direct)
    downs: int = 0  # times it went down (traffic back to the hub)
    first_up: float | None = None  # when it first came up
    last_quiet: float | None = None  # (agent) at the last down: seconds since a datagram was heard
    epoch: int = 1  # the newest data-key epoch
    rekey_at: float | None = None  # initiator: when the next rekey starts
    rekey: object = None  # initiator: (epoch, noise.Handshake, started) of a rekey under way
    retire: tuple | None = None  # (previous epoch, when its receive key goes)


@dataclass(frozen=True)
class Keyed:
    """The handshake with ``peer`` is done: open its data session."""

    peer: DirectPeer


@dataclass(frozen=True)
class Rekeyed:
    """New data keys for ``epoch`` of the direct session with ``peer``
    (``keys``: noise.SessionKeys): install them; ``sending``: send with
    them at once (the initiator), else once the peer's first datagram under
    them arrives (the responder: mpvpn.core.seal.Sealer.rotate defer_send)."""

    peer: DirectPeer
    epoch: int
    keys: object
    sending: bool


@dataclass(frozen=True)
class Retire:
    """The previous key epoch of the direct session with ``peer`` is over."""

    peer: DirectPeer
    epoch: int


@dataclass(frozen=True)
class PinRefused:
    """The hub offered a direct path to ``name`` with ``key``, not the key
    this site pinned for it (``base.direct_peer_key``): refused
    (``key_mismatch``); the agent logs it loudly.  Its traffic stays
    through the hub."""

    name: str
    key: bytes
    pinned: bytes


@dataclass(frozen=True)
class Moved:
    """The other site's uplinks or candidates changed: re-plan and punch
    towards ``peer.uplinks``."""

    peer: DirectPeer


@dataclass(frozen=True)
class Ended:
    """The direct session with ``name`` ends (``reason``): drop its data
    session; its traffic goes through the hub."""

    name: str
    session_id: int
    reason: str
    text: str


class DirectPeers:
    """A site's side (see the module docstring).  ``static``: our direct
    private key (None: we take no direct paths); ``ciphers``: ours, best
    first."""

    def __init__(self, name: str, static: bytes | None, ciphers: tuple,
                 rekey_interval: float = 120.0, pins: dict | None = None,
                 pinned_only: bool = False):
        self.name = name
        self.rekey_interval = rekey_interval
        self.static = static
        self.public = noise.public_key(static) if static is not None else None
        self.ciphers = tuple(ciphers)
        self.peers: dict[str, DirectPeer] = {}
        self.counters: Counter = Counter()
        self.pins: dict[str, bytes] = dict(pins or {})  # site name -> its pinned direct key
        self.pinned_only = pinned_only  # only pinned sites go direct
        self._mismatch: dict[str, tuple] = {}  # name -> (refusals, last key offered, when)

    def set_pins(self, pins: dict, pinned_only: bool) -> list:
        """New pins (reload): the names of the peers whose key the new pins
        refuse, with the reason (``[(name, reason), ...]``; end them with
        :meth:`end`)."""
        self.pins, self.pinned_only = dict(pins), pinned_only
        for name in [n for n in self._mismatch if n not in self.pins]:
            del self._mismatch[name]
        return [(p.name, r) for p in self.peers.values() if (r := self._pin_verdict(p.name, p.key))]

    def _pin_verdict(self, name: str, key: bytes) -> str | None:
        pin = self.pins.get(name)
        if pin is not None and key != pin:
            return "key_mismatch"
        if pin is None and self.pinned_only:
            return "not_pinned"
        return None

    @property
    def enabled(self) -> bool:
        return self.static is not None

    def on_message(self, m: dict, via: set, used_ids: set, now: float) -> tuple[list, list]:
        """A PEER_* message from the hub.  ``via``: the names of the sites
        the hub forwards to that we route; ``used_ids``: our sessions' IDs.
        Returns (messages for the hub, events: Keyed / Ended)."""
        t = m["type"]
        if t == "PEER_OFFER":
            return self._on_offer(m, via, used_ids, now)
        p = self.peers.get(m["name"])
        if p is None or p.session_id != m["session_id"]:
            self.counters["direct_stale"] += 1  # (an end that crossed ours, say)
            return [], []
        if t == "PEER_END":
            del self.peers[p.name]
            self.counters["direct_ended_by_peer"] += 1
            return [], [Ended(p.name, p.session_id, m["reason"], m["text"])]
        return self._on_hs(p, m, now)

    def _refuse(self, m: dict, reason: str, text: str) -> tuple[list, list]:
        self.counters["direct_refused"] += 1
        self.counters[f"direct_refused_{reason}"] += 1
        return [end_message(m["name"], m["session_id"], reason, text)], []

    def _on_offer(self, m: dict, via: set, used_ids: set, now: float) -> tuple[list, list]:
        name = m["name"]
        if not self.enabled:
            return self._refuse(m, "disabled", "direct paths are off here")
        if name not in via or name == self.name:
            return self._refuse(m, "not_via", "not a site the hub forwards to for us")
        verdict = self._pin_verdict(name, m["key"])
        if verdict == "key_mismatch":
            n = self._mismatch.get(name, (0,))[0] + 1
            self._mismatch[name] = (n, m["key"], now)
            out, _ = self._refuse(m, verdict, "not the direct key pinned for that site here")
            return out, [PinRefused(name, m["key"], self.pins[name])]
        if verdict == "not_pinned":
            return self._refuse(m, verdict, "this site goes direct only with pinned sites")
        cur = self.peers.get(name)
        if cur is not None and cur.session_id == m["session_id"]:
            return self._on_update(cur, m)
        if m["session_id"] in used_ids:
            return self._refuse(m, "session_id", "session ID in use here")
        events = []
        old = self.peers.pop(name, None)
        if old is not None:  # the hub offers anew: the old session goes
            events.append(Ended(name, old.session_id, "replaced", "a new offer"))
        elif len(self.peers) >= MAX_DIRECT:
            return self._refuse(m, "too_many", f"at most {MAX_DIRECT} direct peers")
        theirs = tuple(m["ciphers"])
        mine = self.ciphers
        init_c, resp_c = (mine, theirs) if m["initiator"] else (theirs, mine)
        cipher = seal.choose_cipher(init_c, resp_c) or seal.CHACHA
        ini, resp = (self.name, name) if m["initiator"] else (name, self.name)
        try:
            hs = noise.Handshake("KKpsk0", m["initiator"], m["token"],
                                 prologue(m["session_id"], ini, resp), s=self.static, rs=m["key"])
        except ValueError as e:  # (a key the hub vouched for that X25519 refuses)
            return self._refuse(m, "invalid", str(e)[:120])
        p = DirectPeer(name, m["session_id"], m["initiator"], m["key"], m["token"],
                       tuple(m["uplinks"]), cipher, m["mode"], m["pair_unmatched"], now, hs=hs)
        self.peers[name] = p
        self.counters["direct_offers"] += 1
        out = []
        if p.initiator:
            out.append({"type": "PEER_HS", "name": name, "session_id": p.session_id, "step": 1,
                        "hs": b64(hs.write_message(b""))})
        return out, events

    def _on_update(self, p: DirectPeer, m: dict) -> tuple[list, list]:
        """The hub's offer again for a pair we have: the other site's uplinks
        or candidates changed (nothing else may: key, token and roles are
        the pair's)."""
        if m["key"] != p.key or m["token"] != p.token or m["initiator"] != p.initiator:
            return self._fail(p, "refused", "the hub changed the pair's key, token or roles")
        uplinks = tuple(m["uplinks"])
        if uplinks == p.uplinks:
            return [], []
        p.uplinks = uplinks
        self.counters["direct_updates"] += 1
        return [], [Moved(p)] if p.keys is not None else []

    def _handshake(self, p: DirectPeer, initiator: bool, epoch: int):
        ini, resp = (self.name, p.name) if p.initiator else (p.name, self.name)
        pro = prologue(p.session_id, ini, resp) + (bytes([epoch]) if epoch != 1 else b"")
        return noise.Handshake("KKpsk0", initiator, p.token, pro, s=self.static, rs=p.key)

    def _on_hs(self, p: DirectPeer, m: dict, now: float) -> tuple[list, list]:
        if p.keys is not None:
            return self._on_rekey(p, m, now)
        want = 2 if p.initiator else 1
        if p.hs is None or m["step"] != want:
            return self._fail(p, "refused", f"unexpected handshake step {m['step']}")
        try:
            p.hs.read_message(m["hs"])
            out = []
            if not p.initiator:
                out.append({"type": "PEER_HS", "name": p.name, "session_id": p.session_id,
                            "step": 2, "hs": b64(p.hs.write_message(b""))})
            p.keys = p.hs.split()
        except noise.NoiseError:
            return self._fail(p, "auth", "the direct handshake failed authentication "
                                         "(not the key the hub vouched for)")
        p.hs = None
        p.keyed_at = p.since = now
        if p.initiator:
            p.rekey_at = now + self.rekey_interval
        self.counters["direct_keyed"] += 1
        return out, [Keyed(p)]

    def _on_rekey(self, p: DirectPeer, m: dict, now: float) -> tuple[list, list]:
        """A rekey's handshake message (epoch > 1): the responder answers and
        installs the new keys (sending once confirmed), the initiator
        installs them and sends with them at once."""
        e = m["epoch"]
        try:
            if not p.initiator and m["step"] == 1 and e == next_epoch(p.epoch):
                hs = self._handshake(p, False, e)
                hs.read_message(m["hs"])
                reply = hs.write_message(b"")
                keys = hs.split()
                out = [{"type": "PEER_HS", "name": p.name, "session_id": p.session_id, "step": 2,
                        "epoch": e, "hs": b64(reply)}]
                sending = False
            elif p.initiator and m["step"] == 2 and p.rekey is not None and p.rekey[0] == e:
                hs = p.rekey[1]
                hs.read_message(m["hs"])
                keys = hs.split()
                p.rekey = None
                p.rekey_at = now + self.rekey_interval
                out, sending = [], True
            else:
                return self._fail(p, "refused", f"unexpected rekey step {m['step']} of epoch {e}")
        except noise.NoiseError:
            return self._fail(p, "auth", "the direct rekey failed authentication")
        prev, p.epoch = p.epoch, e
        p.retire = (prev, now + KEY_OVERLAP)
        self.counters["direct_rekeyed"] += 1
        return out, [Rekeyed(p, e, keys, sending)]

    def _fail(self, p: DirectPeer, reason: str, text: str) -> tuple[list, list]:
        del self.peers[p.name]
        self.counters[f"direct_{reason}"] += 1
        return ([end_message(p.name, p.session_id, reason, text)],
                [Ended(p.name, p.session_id, reason, text)])

    def set_up(self, name: str, up: bool, now: float, quiet: float | None = None) -> bool:
        """The data session with ``name`` came up / went down (``quiet``:
        seconds since it last heard a datagram); whether that changed anything."""
        p = self.peers.get(name)
        if p is None or p.keys is None or p.up == up:
            return False
        p.up, p.since = up, now
        if up:
            p.ups += 1
            if p.first_up is None:
                p.first_up = now
        else:
            p.downs += 1
            p.last_quiet = quiet
        return True

    def end(self, name: str, reason: str, text: str = "") -> list:
        """We end the direct session with ``name`` (hub session replaced,
        reload turned direct off): the messages for the hub."""
        p = self.peers.pop(name, None)
        if p is None:
            return []
        return [end_message(name, p.session_id, reason, text)]

    def next_deadline(self) -> float | None:
        t = [self._deadline(p) for p in self.peers.values()]
        t = [x for x in t if x is not None]
        return min(t) if t else None

    @staticmethod
    def _deadline(p: DirectPeer) -> float | None:
        if p.keys is None:
            return p.offered + HS_TIMEOUT
        t = [] if p.up else [p.since + (OPEN_TIMEOUT if p.ups == 0 else DOWN_TIMEOUT)]
        if p.rekey is not None:
            t.append(p.rekey[2] + HS_TIMEOUT)
        elif p.rekey_at is not None:
            t.append(p.rekey_at)
        if p.retire is not None:
            t.append(p.retire[1])
        return min(t) if t else None

    def handle_timer(self, now: float) -> tuple[list, list]:
        """Give up what did not come up (or stayed down) in time: messages
        for the hub, Ended events."""
        out, events = [], []
        for p in list(self.peers.values()):
            t = self._deadline(p)
            if t is None or now < t:
                continue
            if p.keys is None:
                text = "the direct handshake did not finish in time"
            elif not p.up and now >= p.since + (OPEN_TIMEOUT if p.ups == 0 else DOWN_TIMEOUT):
                text = (f"no direct subflow came up within {OPEN_TIMEOUT:g} s" if p.ups == 0
                        else f"down for {DOWN_TIMEOUT:g} s")
            elif p.rekey is not None and now >= p.rekey[2] + HS_TIMEOUT:
                text = "the direct rekey was not answered in time"
            else:
                if p.retire is not None and now >= p.retire[1]:
                    events.append(Retire(p, p.retire[0]))
                    p.retire = None
                if p.rekey is None and p.rekey_at is not None and now >= p.rekey_at:
                    e = next_epoch(p.epoch)
                    hs = self._handshake(p, True, e)
                    p.rekey = (e, hs, now)
                    p.rekey_at = None
                    self.counters["direct_rekey_started"] += 1
                    out.append({"type": "PEER_HS", "name": p.name, "session_id": p.session_id,
                                "step": 1, "epoch": e, "hs": b64(hs.write_message(b""))})
                continue
            o, e = self._fail(p, "timeout", text)
            out += o
            events += e
        return out, events

    def status(self, now: float) -> list:
        return [{"name": p.name, "session_id": p.session_id,
                 "state": "direct" if p.up else "via hub",
                 "phase": "handshake" if p.keys is None else ("up" if p.up else "down"),
                 "initiator": p.initiator, "cipher": p.cipher, "epoch": p.epoch,
                 "since": round(now - (p.since if p.keys is not None else p.offered), 3),
                 "ups": p.ups, "downs": p.downs,
                 # from the hub's offer to the keys, and to the first direct subflow up
                 "keyed_after": None if p.keyed_at is None else round(p.keyed_at - p.offered, 3),
                 "up_after": None if p.first_up is None else round(p.first_up - p.offered, 3),
                 # at the last switch back to the hub: how long nothing had been heard
                 "down_quiet": None if p.last_quiet is None else round(p.last_quiet, 3)}
                for p in sorted(self.peers.values(), key=lambda p: p.name)]

    def pin_status(self, now: float) -> list:
        """The pinned sites: their key, and the offers refused for carrying another."""
        out = []
        for name, key in sorted(self.pins.items()):
            n, last, when = self._mismatch.get(name, (0, None, None))
            p = self.peers.get(name)
            out.append({"name": name, "key": b64(key),
                        "state": ("mismatch" if n and (p is None or p.key != key)
                                  else "matched" if p is not None else "unused"),
                        "mismatches": n, "last_key": b64(last) if last is not None else None,
                        "last_age": None if when is None else round(now - when, 3)})
        return out
