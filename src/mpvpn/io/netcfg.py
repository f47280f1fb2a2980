"""Addresses, MTU and routes of the vNIC, through rtnetlink (:mod:`mpvpn.io.rtnl`).

Every route the agent adds carries the routing protocol number
:data:`RTPROT_MPVPN`, so whatever a crashed agent left behind can be found
and removed on the next start (``flush_ours``), and nothing else is ever
touched.  Routes go into the main table, IPv4 and IPv6 alike.  The tun
device itself is not persistent: when the agent dies the kernel removes the
device together with its addresses and routes.
"""

from __future__ import annotations

import ipaddress
import socket

from mpvpn.io import rtnl
from mpvpn.io.rtnl import NetError  # noqa: F401  (re-exported: every failure here is one)

RTPROT_MPVPN = 167  # "proto 167" in `ip route`; unused by iproute2's rt_protos

_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class NetConfig:
    """Thin netlink edge; one instance per agent (owns one netlink socket)."""

    def __init__(self):
        try:
            self._nl = rtnl.Rtnl()
        except OSError as e:
            raise NetError(f"cannot open a netlink socket: {e}") from None

    def close(self) -> None:
        self._nl.close()

    def index(self, ifname: str) -> int | None:
        try:
            return socket.if_nametoindex(ifname)
        except (OSError, ValueError):
            return None

    def _need_index(self, ifname: str) -> int:
        idx = self.index(ifname)
        if idx is None:
            raise NetError(f"no such interface {ifname!r}")
        return idx

    def configure(self, ifname: str, address: str, mtu: int) -> None:
        """Give ``ifname`` exactly one address of that family (``'172.30.0.1/30'``;
        the others of the family are removed), an MTU, and bring it up."""
        idx = self._need_index(ifname)
        try:
            self._configure(idx, address, mtu)
        except Exception as e:  # the kernel's refusal, a bad address or MTU
            raise NetError(f"cannot configure {ifname} as {address} mtu {mtu}: {e}") from None

    def _configure(self, idx: int, address: str, mtu: int) -> None:
        iface = ipaddress.ip_interface(address)
        family = _family(iface.version)
        self._nl.request(rtnl.RTM_NEWLINK, rtnl.NLM_F_ACK, rtnl.link_msg(idx, mtu=mtu))
        for a in self._addrs(family):
            if a["index"] == idx:
                local = a["attrs"].get(rtnl.IFA_LOCAL)
                address_ = a["attrs"].get(rtnl.IFA_ADDRESS, local)
                if address_ is not None:
                    self._nl.request(rtnl.RTM_DELADDR, rtnl.NLM_F_ACK,
                                     rtnl.addr_msg(family, idx, a["prefixlen"], address_, local))
        packed = iface.ip.packed
        self._nl.request(rtnl.RTM_NEWADDR, rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                         rtnl.addr_msg(family, idx, iface.network.prefixlen, packed,
                                       packed if iface.version == 4 else None))
        self._nl.request(rtnl.RTM_NEWLINK, rtnl.NLM_F_ACK, rtnl.link_msg(idx, up=True))

    def add_route(self, dst: str, ifname: str, metric: int = 0) -> None:
        """Route ``dst`` (a CIDR) via ``ifname``; replaces an earlier route of ours."""
        net = ipaddress.ip_network(dst, strict=False)
        idx = self._need_index(ifname)
        self._nl.request(rtnl.RTM_NEWROUTE, rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                         rtnl.route_msg(_family(net.version), net.network_address.packed,
                                        net.prefixlen, idx, RTPROT_MPVPN, priority=metric))

    def del_route(self, dst: str, ifname: str) -> bool:
        """Remove our route to ``dst`` via ``ifname`` (any metric); False if there was none."""
        net = ipaddress.ip_network(dst, strict=False)
        idx = self.index(ifname)
        if idx is None:
            return False
        try:
            self._nl.request(rtnl.RTM_DELROUTE, rtnl.NLM_F_ACK,
                             rtnl.route_msg(_family(net.version), net.network_address.packed,
                                            net.prefixlen, idx, RTPROT_MPVPN, delete=True))
            return True
        except OSError:  # already gone (ESRCH)
            return False

    def _ours(self):
        """(family, parsed route) of every main-table route carrying our protocol
        number; the dump is filtered here, the kernel may not filter it."""
        for family in _FAMILIES:
            for payload in self._nl.dump(rtnl.RTM_GETROUTE, rtnl.dump_msg(family, rtnl.RTMSG)):
                r = rtnl.parse_route(payload)
                if r["family"] == family and r["protocol"] == RTPROT_MPVPN and r["table"] == rtnl.RT_TABLE_MAIN:
                    yield family, r

    def our_routes(self) -> list[tuple[str, int]]:
        """(CIDR, oif) of every route carrying our protocol number."""
        out = []
        for family, r in self._ours():
            dst = rtnl.get_ip(family, r["attrs"], rtnl.RTA_DST) or ("0.0.0.0" if family == socket.AF_INET else "::")
            out.append((f"{dst}/{r['dst_len']}", rtnl.get_u32(r["attrs"], rtnl.RTA_OIF)))
        return out

    def flush_ours(self, ifname: str | None = None) -> int:
        """Remove routes of ours (a dead agent's leftovers): those via
        ``ifname``, or every one when None; returns how many."""
        n = 0
        oif = None
        if ifname is not None:
            oif = self.index(ifname)
            if oif is None:
                return 0
        for family, r in list(self._ours()):
            a = r["attrs"]
            if oif is not None and rtnl.get_u32(a, rtnl.RTA_OIF) != oif:
                continue
            try:
                self._nl.request(rtnl.RTM_DELROUTE, rtnl.NLM_F_ACK,
                                 rtnl.route_msg(family, a.get(rtnl.RTA_DST, b""), r["dst_len"],
                                                rtnl.get_u32(a, rtnl.RTA_OIF), RTPROT_MPVPN,
                                                priority=rtnl.get_u32(a, rtnl.RTA_PRIORITY) or 0,
                                                delete=True))
                n += 1
            except OSError:
                pass
        return n

    def link_kind(self, ifname: str) -> str | None:
        """The driver kind of a link (``"tun"``, ``"veth"``, ...); None if it has
        none (a physical NIC, lo) or does not exist."""
        idx = self.index(ifname)
        if idx is None:
            return None
        try:
            replies = self._nl.request(rtnl.RTM_GETLINK, rtnl.NLM_F_ACK, rtnl.link_msg(idx))
        except OSError:  # vanished meanwhile
            return None
        for payload in replies:
            link = rtnl.parse_link(payload)
            if link["index"] == idx:
                return link["kind"]
        return None

    def delete_link(self, ifname: str) -> bool:
        idx = self.index(ifname)
        if idx is None:
            return False
        try:
            self._nl.request(rtnl.RTM_DELLINK, rtnl.NLM_F_ACK, rtnl.link_msg(idx))
        except OSError as e:
            raise NetError(f"cannot remove interface {ifname}: {e}") from None
        return True

    def _addrs(self, family: int = socket.AF_UNSPEC) -> list[dict]:
        """Parsed IPv4/IPv6 addresses (RTM_GETADDR dump), other families left out."""
        out = []
        for payload in self._nl.dump(rtnl.RTM_GETADDR, rtnl.dump_msg(family, rtnl.IFADDR)):
            a = rtnl.parse_addr(payload)
            if a["family"] in _FAMILIES and family in (socket.AF_UNSPEC, a["family"]):
                out.append(a)
        return out

    def addresses(self, ifname: str) -> list[str]:
        """Addresses on a Linux interface, as 'addr/prefix' (for uplinks named by device)."""
        idx = self.index(ifname)
        if idx is None:
            return []
        out = []
        for a in self._addrs():
            ip = rtnl.get_ip(a["family"], a["attrs"], rtnl.IFA_ADDRESS) or \
                rtnl.get_ip(a["family"], a["attrs"], rtnl.IFA_LOCAL)
            if a["index"] == idx and ip is not None:
                out.append(f"{ip}/{a['prefixlen']}")
        return out

    def device_of(self, address: str) -> str | None:
        """The interface holding ``address`` (for SO_BINDTODEVICE), or None."""
        packed = ipaddress.ip_address(address).packed
        for a in self._addrs():
            if packed in (a["attrs"].get(rtnl.IFA_ADDRESS), a["attrs"].get(rtnl.IFA_LOCAL)):
                try:
                    return socket.if_indextoname(a["index"])
                except OSError:
                    pass  # gone meanwhile
        return None
