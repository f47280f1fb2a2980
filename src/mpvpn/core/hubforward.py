"""Site-to-site through the hub (``base.hub_forward``), sans-I/O.

Two decisions of a hub with several client sites:

* **who is told about whom** (:func:`views`): with ``hub_forward`` on, every
  site learns every other site's name, vNIC address and LANs (``via`` in the
  hub's UPDATE, docs/control.md) and routes them into its tunnel, except the
  sites kept *apart* (``config site`` ``forward 0``), which learn nothing and
  of which nobody learns; with it off, nobody learns anything.  The hub's registry has already made sure
  that no two sites claim the same address or overlapping LANs.
* **where a packet from a site goes** (:meth:`HubForward.split`): a packet
  that arrived on site S's session and is destined to another site T's
  vNIC address or LAN goes straight to T's session (no trip through the
  hub's kernel) if forwarding is on and its source lies within S's own
  vNIC address and LANs; otherwise it is dropped and counted (``refused``:
  forwarding is off, or S or T is kept apart; ``spoofed``: a source S may
  not use).  Everything else
  (the hub's own LAN and vNIC, S's own claims, unknown destinations) goes
  to the hub's tun as before.

Keys are opaque (the agent uses its DataSessions); nothing here touches a
socket or a clock.  Rules: docs/control.md ("Site-to-site through the hub").
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from functools import lru_cache

from mpvpn.core.controlmsg import MAX_MESSAGE, MAX_VIA

#: Room for the rest of the UPDATE that carries ``via`` (plan, uplinks, LANs).
VIA_BUDGET = MAX_MESSAGE - 4096

_REFUSED, _SPOOFED = object(), object()  # HubForward._verdict's drops

# per-site counters (status: sessions[].forwarded)
SITE_COUNTERS = ("from_packets", "from_bytes", "to_packets", "to_bytes", "refused", "spoofed")


def views(sites, budget: int = VIA_BUDGET, limit: int = MAX_VIA, apart=frozenset()) -> tuple[dict, int]:
    """``sites``: ``[(key, ViaSite), ...]``, every site on the hub; ``apart``:
    the keys kept out of forwarding.  Returns ``({key: tuple of the other
    sites' ViaSite, by name}, sites left out)``: each site sees all others
    but those apart (which see nobody), at most ``limit`` of them and as many
    as fit in ``budget`` bytes of JSON (the rest are left out, counted)."""
    out = {k: () for k, _v in sites if k in apart}
    ordered = sorted(((k, v) for k, v in sites if k not in apart), key=lambda kv: kv[1].name)
    sizes = {id(v): len(json.dumps(v.to_json(), separators=(",", ":"))) + 1 for _k, v in ordered}
    cut = 0
    for key, me in ordered:
        view, used = [], 0
        for _k, v in ordered:
            if v is me:
                continue
            if len(view) >= limit or used + sizes[id(v)] > budget:
                cut += 1
                continue
            view.append(v)
            used += sizes[id(v)]
        out[key] = tuple(view)
    return out, cut


@lru_cache(maxsize=4096)
def network(text: str):
    """``ipaddress.ip_network(text)``, remembered: the hub rebuilds its
    tables from every session's CIDR strings on each join and leave, and
    parsing them again made a join cost O(sites) ``ipaddress`` work (half
    the hub's CPU in a 50-site handshake storm, bench/hub.py --handshakes)."""
    return ipaddress.ip_network(text)


def _address(pkt, src: bool) -> tuple[int, int] | None:
    """(IP version, source or destination address as an int) of an IP packet."""
    if not pkt:
        return None
    v = pkt[0] >> 4
    if v == 4 and len(pkt) >= 20:
        off = 12 if src else 16
        return 4, int.from_bytes(pkt[off:off + 4], "big")
    if v == 6 and len(pkt) >= 40:
        off = 8 if src else 24
        return 6, int.from_bytes(pkt[off:off + 16], "big")
    return None


packet_address = _address  # (public name: agent.directpeers checks sources with it)


class Prefixes:
    """Longest-prefix match of addresses to owners: one dict per
    (version, prefix length), looked up longest first."""

    __slots__ = ("_levels",)

    def __init__(self):
        self._levels: list = []  # [(version, mask, {network int: owner})], longest prefix first

    def rebuild(self, entries) -> None:
        """``entries``: ``[(network (ipaddress), owner), ...]``."""
        levels: dict = {}
        for net, owner in entries:
            key = (net.prefixlen, net.version)
            levels.setdefault(key, {})[int(net.network_address)] = owner
        self._levels = [(v, int(network(f"{'0.0.0.0' if v == 4 else '::'}/{p}").netmask),
                         table)
                        for (p, v), table in sorted(levels.items(), key=lambda kv: -kv[0][0])]

    def owner(self, version: int, addr: int):
        for v, mask, table in self._levels:
            if v == version:
                o = table.get(addr & mask)
                if o is not None:
                    return o
        return None


class HubForward:
    """The hub's per-packet decision for packets that arrive from a site
    (see the module docstring).  ``enabled``: base.hub_forward."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._claims = Prefixes()
        self._keys: set = set()
        self._apart: frozenset = frozenset()
        self.counters: Counter = Counter()
        self._sites: dict = {}  # key -> Counter of SITE_COUNTERS
        self._talking: set = set()  # (from key, to key) forwarded since take_pairs()

    def rebuild(self, sites, apart=()) -> None:
        """``sites``: ``[(key, vNIC address, LAN CIDRs), ...]``: what each
        site on the hub claims (checked by the registry: no overlaps);
        ``apart``: the keys kept out of forwarding."""
        self._apart = frozenset(apart)
        entries, keys = [], set()
        for key, vnc, lans in sites:
            keys.add(key)
            entries.append((network(f"{vnc}/{128 if ':' in vnc else 32}"), key))
            entries += [(network(c), key) for c in lans]
        self._claims.rebuild(entries)
        self._keys = keys
        self._sites = {k: c for k, c in self._sites.items() if k in keys}

    def site(self, key) -> dict:
        """The per-site counters (``SITE_COUNTERS``) of ``key``."""
        c = self._sites.get(key)
        return {k: (c[k] if c else 0) for k in SITE_COUNTERS}

    def _count(self, key, name: str, n: int = 1) -> None:
        c = self._sites.get(key)
        if c is None:
            c = self._sites[key] = Counter()
        c[name] += n

    def split(self, src, packets) -> tuple[list, dict]:
        """Packets that arrived on ``src``'s session: ``(for the hub's tun,
        {other site's key: its packets, in order})``; refused and spoofed
        packets are in neither, only counted."""
        local: list = []
        out: dict = {}
        owner = self._claims.owner
        enabled = self.enabled
        last = verdict = None  # consecutive packets of one flow share addresses: one lookup
        refused = spoofed = 0
        for pkt in packets:
            v = pkt[0] >> 4 if pkt else 0
            if v == 4 and len(pkt) >= 20:
                key = pkt[12:20]
            elif v == 6 and len(pkt) >= 40:
                key = pkt[8:40]
            else:
                local.append(pkt)
                continue
            if key != last:
                last, verdict = key, self._verdict(src, pkt, owner, enabled, self._apart)
            if verdict is None:
                local.append(pkt)
            elif verdict is _REFUSED:
                refused += 1
            elif verdict is _SPOOFED:
                spoofed += 1
            else:
                batch = out.get(verdict)
                if batch is None:
                    out[verdict] = [pkt]
                else:
                    batch.append(pkt)
        if refused:
            self.counters["refused"] += refused
            self._count(src, "refused", refused)
        if spoofed:
            self.counters["spoofed"] += spoofed
            self._count(src, "spoofed", spoofed)
        for dst, batch in out.items():
            self._talking.add((src, dst))
            n, size = len(batch), sum(map(len, batch))
            self.counters["forwarded"] += n
            self.counters["forwarded_bytes"] += size
            self._count(src, "from_packets", n)
            self._count(src, "from_bytes", size)
            self._count(dst, "to_packets", n)
            self._count(dst, "to_bytes", size)
        return local, out

    def take_pairs(self) -> set:
        """The (from, to) pairs of keys forwarded between since the last
        call (mpvpn.core.peerdirect offers them a direct path)."""
        out, self._talking = self._talking, set()
        return out

    @staticmethod
    def _verdict(src, pkt, owner, enabled, apart):
        """None (to the tun), _REFUSED, _SPOOFED or the destination's key."""
        dst = owner(*_address(pkt, False))
        if dst is None or dst is src:
            return None
        if not enabled or src in apart or dst in apart:
            return _REFUSED
        if owner(*_address(pkt, True)) is not src:
            return _SPOOFED
        return dst
