"""Direct site-to-site paths, the agent's side: the I/O edge of
:mod:`mpvpn.core.peerdirect` (docs/control.md "Direct paths between sites").

* the **hub** (:meth:`DirectPaths.hub_round`): every OFFER_INTERVAL, the
  pairs of sites it forwarded between (HubForward.take_pairs) go to the
  broker, whose PEER_OFFERs go out on the two sites' control connections;
  what sites send (PEER_HS, PEER_END) is relayed or refused by the broker;
* a **site** (:meth:`DirectPaths.on_message`): the hub's offers and the
  relayed handshake go to :class:`~mpvpn.core.peerdirect.DirectPeers`;
  once keyed, a data session with the other site opens (its own session
  ID, subflows by the pairing rules with the initiator as client, hole
  punching as with the hub).  While it has an established subflow its
  routes come first in the agent's RouteTable (the same CIDRs the hub
  session routes for that site, so the kernel's routes do not change);
  when its last subflow is declared dead, they go and the hub session
  carries the traffic again -- the hub never stopped forwarding.  Packets
  that arrive on it with a source outside the other site's vNIC address
  and LANs are dropped and counted (``direct_spoofed``).

The agent hands its services in explicitly (:class:`AgentPort`); nothing
here reaches into its fields.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable

from mpvpn.core import noise, pairing, peerdirect
from mpvpn.core.controlevents import DataKeys
from mpvpn.core.controlmsg import PeerInfo, Vnc, b64
from mpvpn.core.hubforward import Prefixes, packet_address

log = logging.getLogger("mpvpn")


@dataclass
class AgentPort:
    """What :class:`DirectPaths` may ask of the agent."""

    sessions: Callable[[], dict]  # session id -> DataSession
    controls: Callable[[], list]  # ControlIO of live control connections
    session_of: Callable  # control machine -> DataSession or None
    new_session: Callable  # (session id, PeerInfo, plan, DataKeys, cipher, initiator, now) -> ds
    replan: Callable  # (ds, PeerInfo, plan, now): a direct session's peer or own uplinks changed
    drop_session: Callable  # (session id, reason)
    routes_changed: Callable[[], None]  # the route table must be rebuilt (a direct session's state)
    flush_control: Callable  # (ControlIO): write what its machine queued
    talking: Callable[[], set]  # (hub) (from ds, to ds) forwarded since the last call
    may_go_direct: Callable  # (hub) ds -> whether its site may be offered direct paths (config site)


class DirectPaths:
    """One agent's direct paths: the broker on a hub, the peers on a site."""

    def __init__(self, port: AgentPort, role: str, name: str, enabled: bool,
                 static: bytes | None, ciphers: tuple, hub_forward: bool = False,
                 rekey_interval: float = 120.0, pins: dict | None = None,
                 pinned_only: bool = False):
        """``static``: the site's direct key (base.direct_private_key, else
        base.private_key; None: one made here for this run, which nobody can
        pin); ``pins``: site name -> pinned direct key (base.direct_peer_key)."""
        self.port = port
        self.role = role
        self.broker = peerdirect.DirectBroker(enabled and hub_forward) if role == "server" else None
        self.key_static = static is not None
        if role == "client":
            if enabled and static is None:
                static, _pub = noise.generate_keypair()  # this run's direct key (never stored)
            self.peers = peerdirect.DirectPeers(name, static if enabled else None, ciphers,
                                                rekey_interval, pins, pinned_only)
        else:
            self.peers = None
        self._sources: dict = {}  # direct DataSession -> Prefixes of what its peer may send from
        self.counters = {"direct_spoofed": 0}
        self._talking: set = set()  # (hub) (from ds, to ds) forwarded since the last round

    # ------------------------------------------------------------------ shared

    @property
    def public_key(self) -> bytes | None:
        """(site) What HELLO announces: our direct key, None when off."""
        return self.peers.public if self.peers is not None else None

    def next_deadline(self) -> float | None:
        if self.broker is not None:
            return self.broker.next_deadline()
        return self.peers.next_deadline() if self.peers is not None else None

    def on_message(self, c, m: dict, now: float) -> None:
        """A PEER_* message on control connection ``c``."""
        if self.broker is not None:
            ds = self.port.session_of(c.conn)
            if ds is None:
                return
            self._send_sites(self.broker.on_message(ds.peer.name, m, now), now)
            return
        hub = self.port.session_of(c.conn)
        via = {v.name: v for v in hub.via} if hub is not None else {}
        used = set(self.port.sessions())
        out, events = self.peers.on_message(m, set(via), used, now)
        self._send_hub(c, out, now)
        self._act(events, via, hub, now)

    # ------------------------------------------------------------------ hub

    def hub_round(self, now: float) -> None:
        """(hub) Offer direct paths to the pairs that talk through us; end
        offers whose handshake stalled."""
        b = self.broker
        self._talking |= self.port.talking()
        if b is None:
            return
        out = b.handle_timer(now)
        if not b.enabled:
            self._talking.clear()
        elif b.round_due(now):
            talking, self._talking = self._talking, set()
            sites = {}
            for ds in self.port.sessions().values():
                p = ds.peer
                key = p.direct_key if self.port.may_go_direct(ds) else None  # (None: no offers)
                sites[p.name] = peerdirect.SiteView(p.name, key, p.uplinks, p.ciphers,
                                                    p.mode, p.pair_unmatched)
            names = {(a.peer.name, b2.peer.name) for a, b2 in talking}
            out += b.offers(sites, names, set(self.port.sessions()), now)
        self._send_sites(out, now)

    def reserved_ids(self) -> set:
        """(hub) Session IDs of the direct pairs offered (no site session gets one)."""
        return self.broker.session_ids() if self.broker is not None else set()

    def site_gone(self, name: str, now: float) -> None:
        if self.broker is not None:
            self._send_sites(self.broker.site_gone(name, now), now)

    def set_enabled(self, enabled: bool, now: float) -> None:
        """(hub) base.direct / hub_forward changed on reload."""
        if self.broker is not None:
            self._send_sites(self.broker.set_enabled(enabled, now), now)

    def sites_changed(self, now: float) -> None:
        """(hub) `config site` changed on reload: the pairs of sites that may
        no longer go direct end."""
        if self.broker is None:
            return
        for ds in list(self.port.sessions().values()):
            if not self.port.may_go_direct(ds):
                self._send_sites(self.broker.disallow(ds.peer.name, now), now)

    def _send_sites(self, out: list, now: float) -> None:
        if not out:
            return
        by_name = {}
        for c in self.port.controls():
            ds = self.port.session_of(c.conn) if c.conn is not None else None
            if ds is not None:
                by_name[ds.peer.name] = c
        for name, msg in out:
            c = by_name.get(name)
            if c is None:
                continue
            try:
                c.conn.send_peer(msg, now)
            except ValueError:
                continue
            self.port.flush_control(c)

    # ------------------------------------------------------------------ site

    def _send_hub(self, c, out: list, now: float) -> None:
        if c is None:
            return
        for msg in out:
            try:
                c.conn.send_peer(msg, now)
            except ValueError:
                return
        if out:
            self.port.flush_control(c)

    def _hub_control(self):
        for c in self.port.controls():
            if c.conn is not None and not c.closing:
                return c
        return None

    def _act(self, events, via: dict, hub, now: float) -> None:
        for ev in events:
            if isinstance(ev, peerdirect.Keyed):
                self._open(ev.peer, via.get(ev.peer.name), hub, now)
            elif isinstance(ev, peerdirect.Moved):
                ds = self.port.sessions().get(ev.peer.session_id)
                if ds is not None and ds.direct and hub is not None:
                    self._replan(ds, hub, ev.peer.uplinks, now)
                    log.info("direct: %s's uplinks or candidates changed; re-planned", ev.peer.name)
            elif isinstance(ev, peerdirect.Rekeyed):
                ds = self.port.sessions().get(ev.peer.session_id)
                if ds is not None and ds.direct:
                    ds.sess.sealer.rotate(ev.keys.data_send_key, ev.keys.data_recv_key, ev.epoch,
                                          defer_send=not ev.sending)
                    log.info("direct: session with %s rekeyed (epoch %d)", ev.peer.name, ev.epoch)
            elif isinstance(ev, peerdirect.PinRefused):
                log.error("direct: REFUSED the hub's offer of a direct path to %s: it carries the "
                          "key %s, but %s is pinned here (base.direct_peer_key). Either %s's direct "
                          "key changed, or the hub is trying to sit in the middle; its traffic "
                          "stays through the hub", ev.name, b64(ev.key), b64(ev.pinned), ev.name)
            elif isinstance(ev, peerdirect.Retire):
                ds = self.port.sessions().get(ev.peer.session_id)
                if ds is not None and ds.direct and ds.sess.sealer.prev_epoch == ev.epoch:
                    ds.sess.sealer.drop_previous()
            else:
                self._close(ev.session_id, f"{ev.reason}: {ev.text}" if ev.text else ev.reason)

    def _open(self, p, site, hub, now: float) -> None:
        if site is None or hub is None:  # (the hub's via changed meanwhile)
            self._send_hub(self._hub_control(), self.peers.end(p.name, "not_via"), now)
            return
        host = 32 if ":" not in site.vnc else 128
        peer = PeerInfo(p.name, p.uplinks, Vnc(site.vnc, str(host)), tuple(site.lans), p.mode,
                        p.pair_unmatched)
        plan = pairing.plan(hub.conn.local.uplinks, p.uplinks, p.pair_unmatched, None,
                            local_is_client=p.initiator)
        keys = DataKeys(1, p.keys.data_send_key, p.keys.data_recv_key)
        ds = self.port.new_session(p.session_id, peer, plan, keys, p.cipher, p.initiator, now)
        self._claims(ds, site)
        log.info("direct: keyed with %s (session %#x, %s, %d subflow(s) planned); its traffic "
                 "stays with the hub until a direct subflow is up", p.name, p.session_id,
                 "initiator" if p.initiator else "responder", len(plan))

    def _claims(self, ds, site) -> None:
        """What the other site may send from on ``ds``: its ``via`` entry's
        vNIC address and LANs (as the hub announces them now)."""
        pf = Prefixes()
        pf.rebuild([(ipaddress.ip_network(c), ds) for c in site.routes])
        self._sources[ds] = pf

    def _replan(self, ds, hub, uplinks, now: float, only_if_changed: bool = False) -> None:
        """New peer uplinks (``uplinks``) or own ones (the hub session's
        ``local``): the plan, member IDs kept (pairing.plan ``previous``)."""
        p = self.peers.peers.get(ds.peer.name)
        if p is None:
            return
        old = sorted(ds.plan.values(), key=lambda x: x.member)
        plan = pairing.plan(hub.conn.local.uplinks, uplinks, p.pair_unmatched, old,
                            local_is_client=p.initiator)
        if only_if_changed and plan == old:
            return
        peer = PeerInfo(ds.peer.name, tuple(uplinks), ds.peer.vnc, ds.peer.lans, ds.peer.mode,
                        ds.peer.pair_unmatched)
        self.port.replan(ds, peer, plan, now)

    def _close(self, session_id: int, reason: str) -> None:
        ds = self.port.sessions().get(session_id)
        if ds is not None and ds.direct:
            self._sources.pop(ds, None)
            self.port.drop_session(session_id, f"direct path ended ({reason})")
            self.port.routes_changed()

    def session_state(self, ds, up: bool, now: float) -> None:
        """(site) A direct session came up / lost its last subflow."""
        heard = [sub.last_rx for sub in ds.sess.subflows.values() if sub.last_rx is not None]
        quiet = now - max(heard) if heard else None
        if self.peers is None or not self.peers.set_up(ds.peer.name, up, now, quiet):
            return
        if up:
            log.info("direct: traffic with %s now goes direct (session %#x)", ds.peer.name,
                     ds.session_id)
        else:
            log.warning("direct: path to %s down (nothing heard for %s s); its traffic goes "
                        "through the hub again", ds.peer.name,
                        "?" if quiet is None else f"{quiet:.2f}")
        self.port.routes_changed()

    def site_moved(self, ds) -> None:
        """(hub) A site's UPDATE changed its uplinks or candidates."""
        if self.broker is not None:
            self.broker.site_moved(ds.peer.name)

    def via_changed(self, hub, now: float) -> None:
        """(site) The hub's UPDATE: direct peers it no longer forwards to for
        us end; the others are re-planned if our own uplinks changed."""
        if self.peers is None:
            return
        via = {v.name: v for v in hub.via}
        for ds in list(self.port.sessions().values()):
            p = self.peers.peers.get(ds.peer.name) if ds.direct else None
            site = via.get(ds.peer.name)
            if p is None or site is None or hub.conn is None:
                continue
            self._replan(ds, hub, p.uplinks, now, only_if_changed=True)
            if (site.vnc, tuple(site.lans)) != (ds.peer.vnc.ip, tuple(ds.peer.lans)):
                # the other site's LANs changed: the direct session routes and
                # accepts what the hub announces now, no more
                host = 32 if ":" not in site.vnc else 128
                peer = PeerInfo(ds.peer.name, ds.peer.uplinks, Vnc(site.vnc, str(host)),
                                tuple(site.lans), ds.peer.mode, ds.peer.pair_unmatched)
                self.port.replan(ds, peer, sorted(ds.plan.values(), key=lambda x: x.member), now)
                self._claims(ds, site)
        names = set(via)
        c = self._hub_control()
        for name in [n for n in self.peers.peers if n not in names]:
            p = self.peers.peers[name]
            sid = p.session_id
            out = self.peers.end(name, "not_via", "the hub no longer forwards to it for us")
            if c is not None:
                self._send_hub(c, out, now)
            self._close(sid, "the hub no longer forwards to it")

    def hub_replaced(self) -> None:
        """(site) A new hub session: the hub forgot our pairs; so do we."""
        if self.peers is None:
            return
        for name in list(self.peers.peers):
            p = self.peers.peers[name]
            self.peers.end(name, "closed")
            self._close(p.session_id, "new hub session")

    def set_pins(self, pins: dict, pinned_only: bool, now: float) -> None:
        """(site) base.direct_peer_key / direct_pinned_only changed on reload:
        direct sessions the new pins refuse end (their traffic goes back
        through the hub)."""
        if self.peers is None:
            return
        c = self._hub_control()
        for name, reason in self.peers.set_pins(pins, pinned_only):
            sid = self.peers.peers[name].session_id
            log.warning("direct: ending the direct session with %s: %s under the new pins",
                        name, reason)
            self._send_hub(c, self.peers.end(name, reason, "refused by this site's new pins"), now)
            self._close(sid, reason)

    def site_timers(self, now: float) -> None:
        if self.peers is None:
            return
        t = self.peers.next_deadline()
        if t is None or now < t:
            return
        out, events = self.peers.handle_timer(now)
        c = self._hub_control()
        if c is not None:
            self._send_hub(c, out, now)
        self._act(events, {}, None, now)

    def route_order(self, sessions) -> list:
        """The sessions for the RouteTable, in priority order: direct
        sessions with an established subflow first (they win over the hub
        session's routes to the same site), direct ones without none at all."""
        direct = [ds for ds in sessions if ds.direct and ds.sess.connected]
        return direct + [ds for ds in sessions if not ds.direct]

    def filter(self, ds, packets: list) -> list:
        """(site) Packets from direct session ``ds`` whose source its peer may use."""
        pf = self._sources.get(ds)
        if pf is None:
            return packets
        out = []
        last = ok = None
        for pkt in packets:
            a = packet_address(pkt, True)
            if a != last:
                last, ok = a, a is not None and pf.owner(*a) is ds
            if ok:
                out.append(pkt)
            else:
                self.counters["direct_spoofed"] += 1
        return out

    def status(self, now: float) -> dict:
        if self.broker is not None:
            return {"enabled": self.broker.enabled, "peers": None, "pairs": self.broker.status(now),
                    "key": None, "key_static": None, "pins": None, "pinned_only": None,
                    "counters": dict(self.broker.counters)}
        p = self.peers
        return {"enabled": p.enabled, "peers": p.status(now), "pairs": None,
                "key": b64(p.public) if p.public is not None else None,
                "key_static": self.key_static, "pins": p.pin_status(now),
                "pinned_only": p.pinned_only,
                "counters": {**dict(p.counters), **self.counters}}

    def path_of(self, name: str) -> str:
        """(site) ``via[].path``: ``direct`` while the direct session with
        ``name`` carries its traffic, else ``hub``."""
        p = self.peers.peers.get(name) if self.peers is not None else None
        return "direct" if p is not None and p.up else "hub"
