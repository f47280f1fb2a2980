"""Control connection: does what a peer announces fit with our side?
(sans-I/O)

vNIC in our vNIC subnet and not ours, LANs that overlap nothing of ours,
no default route unless allowed, no LAN that would swallow an uplink
address; the same rules validate our own configuration
(:func:`build_local_info`).  Checks across several peers (a hub's sites) are the
registry's (:mod:`mpvpn.core.registry`).  Rules: ``docs/control.md``
("Validation of the peer").
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from mpvpn.core.controlmsg import Bad, PeerInfo, Vnc, parse_info

__all__ = ["check_peer", "peer_problem", "build_local_info", "overlap", "usable_via"]

def overlap(a, b) -> bool:
    return a.version == b.version and a.overlaps(b)


def _check_vnc(v: Vnc, who: str) -> None:
    iface = v.interface
    p, net = iface.network.prefixlen, iface.network
    if iface.version == 4:
        if p > 31:
            raise Bad("vnic", f"{who} vNIC {iface} leaves no room for a peer")
        if p <= 30 and iface.ip in (net.network_address, net.broadcast_address):
            raise Bad("vnic", f"{who} vNIC address {iface.ip} is the network or broadcast "
                               f"address of {net}")
    else:
        if p > 127:
            raise Bad("vnic", f"{who} vNIC {iface} leaves no room for a peer")
        if iface.ip == net.network_address:
            raise Bad("vnic", f"{who} vNIC address {iface.ip} is the subnet-router anycast "
                               f"address of {net}")


def _check_lan_list(info: PeerInfo, who: str) -> None:
    nets = info.networks
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if overlap(a, b):
                raise Bad("invalid", f"{who} LAN subnets {a} and {b} overlap each other")


def check_peer(local: PeerInfo, peer: PeerInfo, allow_default_route: bool = False) -> None:
    """Validate what the peer announced against our side; raises ``Bad``
    with code ``vnic``, ``overlap``, ``route`` or ``invalid``.  Use
    :func:`peer_problem` for a non-raising variant."""
    mine, theirs = local.vnc.interface, peer.vnc.interface
    if theirs.network != mine.network:
        raise Bad("vnic", f"peer vNIC {theirs} is not in our vNIC subnet {mine.network}")
    if theirs.ip == mine.ip:
        raise Bad("vnic", f"peer vNIC address {theirs.ip} equals ours")
    _check_vnc(peer.vnc, "peer")
    _check_lan_list(peer, "peer")
    ours = local.networks
    uplink_addrs = [ipaddress.ip_address(u.addr) for u in (*local.uplinks, *peer.uplinks)]
    for n in peer.networks:
        if n.prefixlen == 0:
            if not allow_default_route:
                raise Bad("route", f"peer LAN {n} is a default route (not allowed by our "
                                    "configuration)")
            continue
        for o in ours:
            if o.prefixlen and overlap(n, o):
                raise Bad("overlap", f"peer LAN {n} overlaps our LAN {o}")
        if overlap(n, mine.network):
            raise Bad("overlap", f"peer LAN {n} overlaps the vNIC subnet {mine.network}")
        for a in uplink_addrs:
            if a.version == n.version and a in n:
                raise Bad("overlap", f"peer LAN {n} contains uplink address {a} (the tunnel "
                                      "would route its own packets into itself)")


def usable_via(local: PeerInfo, hub: PeerInfo) -> tuple[tuple, list]:
    """The sites a hub forwards to (``hub.via``) that we can route to it:
    ``(kept ViaSites, [(name, reason), ...] left out)``.  A site is left out
    (never the connection closed: the other sites stay usable) when its vNIC
    address is not in our vNIC subnet or is ours or the hub's, or a LAN of
    it is a default route, overlaps our LANs, the hub's, the vNIC subnet, a
    site kept before it, or contains an uplink address (ours or the hub's)."""
    vnet, mine = local.vnc.interface.network, local.vnc.interface.ip
    taken = [n for n in (*local.networks, *hub.networks) if n.prefixlen]
    hosts = {mine, hub.vnc.interface.ip}
    uplink_addrs = [ipaddress.ip_address(u.addr) for u in (*local.uplinks, *hub.uplinks)]
    kept, refused = [], []
    for site in hub.via:
        ip = ipaddress.ip_address(site.vnc)
        why = None
        if ip.version != vnet.version or ip not in vnet:
            why = f"vNIC address {ip} is not in our vNIC subnet {vnet}"
        elif ip in hosts:
            why = f"vNIC address {ip} is ours, the hub's or another site's"
        nets = [ipaddress.ip_network(x) for x in site.lans]
        for n in nets:
            if why:
                break
            if not n.prefixlen:
                why = f"LAN {n} is a default route"
            elif overlap(n, vnet):
                why = f"LAN {n} overlaps the vNIC subnet {vnet}"
            elif any(overlap(n, o) for o in taken):
                why = f"LAN {n} overlaps our LANs, the hub's or another site's"
            elif any(a.version == n.version and a in n for a in uplink_addrs):
                why = f"LAN {n} contains an uplink address"
        if why is None and _check_list_overlap(nets):
            why = "its LANs overlap each other"
        if why:
            refused.append((site.name, why))
            continue
        kept.append(site)
        taken += nets
        hosts.add(ip)
    return tuple(kept), refused


def _check_list_overlap(nets) -> bool:
    return any(overlap(a, b) for i, a in enumerate(nets) for b in nets[i + 1:])


def peer_problem(local: PeerInfo, peer: PeerInfo, allow_default_route: bool = False):
    """``None`` or ``(code, text)``."""
    try:
        check_peer(local, peer, allow_default_route)
    except Bad as b:
        return b.code, b.text
    return None


def build_local_info(name, uplinks, vnc, lans, mode, pair_unmatched, control_port) -> PeerInfo:
    """Our own side, validated and normalized by the rules we apply to a
    peer; raises ValueError (local configuration, not peer input)."""
    d = {"name": name, "uplinks": [u.to_json() for u in uplinks], "vnc": vnc.to_json(),
         "lans": list(lans), "mode": mode}
    try:
        info = parse_info(d, "local")
        _check_vnc(info.vnc, "our")
        _check_lan_list(info, "our")
        nets = info.networks
        vnet = info.vnc.interface.network
        for n in nets:
            if n.prefixlen and overlap(n, vnet):
                raise Bad("overlap", f"our LAN {n} overlaps our vNIC subnet {vnet}")
    except Bad as b:
        raise ValueError(f"local configuration: {b.text}") from None
    if control_port is not None and (type(control_port) is not int or not 1 <= control_port <= 65535):
        raise ValueError("control_port must be 1..65535")
    return replace(info, pair_unmatched=bool(pair_unmatched), control_port=control_port)

