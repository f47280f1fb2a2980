"""Addresses, MTU and routes of the vNIC, through netlink (pyroute2).

Every route the agent adds carries the routing protocol number
:data:`RTPROT_MPVPN`, so whatever a crashed agent left behind can be found
and removed on the next start (``flush_ours``), and nothing else is ever
touched.  The tun device itself is not persistent: when the agent dies the
kernel removes the device together with its addresses and routes.
"""

from __future__ import annotations

import ipaddress
import socket

RTPROT_MPVPN = 167  # "proto 167" in `ip route`; unused by iproute2's rt_protos


class NetError(OSError):
    pass


def _ipr():
    try:
        from pyroute2 import IPRoute
    except ImportError:
        raise NetError("pyroute2 is not installed (opkg install python3-pyroute2 / pip install pyroute2)") from None
    return IPRoute()


class NetConfig:
    """Thin netlink edge; one instance per agent (owns one netlink socket)."""

    def __init__(self):
        self._ipr = _ipr()

    def close(self) -> None:
        self._ipr.close()

    def index(self, ifname: str) -> int | None:
        found = self._ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def _need_index(self, ifname: str) -> int:
        idx = self.index(ifname)
        if idx is None:
            raise NetError(f"no such interface {ifname!r}")
        return idx

    def configure(self, ifname: str, address: str, mtu: int) -> None:
        """Give ``ifname`` exactly one address (``'172.30.0.1/30'``), an MTU, and bring it up."""
        try:
            self._configure(ifname, address, mtu)
        except NetError:
            raise
        except Exception as e:  # pyroute2's NetlinkError is not an OSError
            raise NetError(f"cannot configure {ifname} as {address} mtu {mtu}: {e}") from None

    def _configure(self, ifname: str, address: str, mtu: int) -> None:
        iface = ipaddress.ip_interface(address)
        idx = self._need_index(ifname)
        ipr = self._ipr
        ipr.link("set", index=idx, mtu=mtu)
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        for a in ipr.get_addr(index=idx, family=family):
            ipr.addr("del", index=idx, address=a.get_attr("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ipr.link("set", index=idx, state="up")

    def add_route(self, dst: str, ifname: str, metric: int = 0) -> None:
        """Route ``dst`` (a CIDR) via ``ifname``; replaces an earlier route of ours."""
        net = ipaddress.ip_network(dst, strict=False)
        idx = self._need_index(ifname)
        kw = dict(dst=str(net.network_address), dst_len=net.prefixlen, oif=idx, proto=RTPROT_MPVPN)
        if net.version == 6:
            kw["family"] = socket.AF_INET6
        if metric:
            kw["priority"] = metric
        self._ipr.route("replace", **kw)

    def del_route(self, dst: str, ifname: str) -> bool:
        net = ipaddress.ip_network(dst, strict=False)
        idx = self.index(ifname)
        if idx is None:
            return False
        kw = dict(dst=str(net.network_address), dst_len=net.prefixlen, oif=idx, proto=RTPROT_MPVPN)
        if net.version == 6:
            kw["family"] = socket.AF_INET6
        try:
            self._ipr.route("del", **kw)
            return True
        except Exception:  # pyroute2 NetlinkError: already gone
            return False

    def our_routes(self) -> list[tuple[str, int]]:
        """(CIDR, oif) of every route carrying our protocol number."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self._ipr.get_routes(family=family, proto=RTPROT_MPVPN):
                if r.get("proto") != RTPROT_MPVPN:
                    continue
                dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                out.append((f"{dst}/{r['dst_len']}", r.get_attr("RTA_OIF")))
        return out

    def flush_ours(self) -> int:
        """Remove every route of ours (leftovers of a crashed agent); returns how many."""
        n = 0
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in self._ipr.get_routes(family=family, proto=RTPROT_MPVPN):
                if r.get("proto") != RTPROT_MPVPN:
                    continue
                try:
                    self._ipr.route("del", family=family, dst=r.get_attr("RTA_DST"),
                                    dst_len=r["dst_len"], oif=r.get_attr("RTA_OIF"),
                                    proto=RTPROT_MPVPN)
                    n += 1
                except Exception:
                    pass
        return n

    def delete_link(self, ifname: str) -> bool:
        idx = self.index(ifname)
        if idx is None:
            return False
        try:
            self._ipr.link("del", index=idx)
        except Exception as e:
            raise NetError(f"cannot remove interface {ifname}: {e}") from None
        return True

    def addresses(self, ifname: str) -> list[str]:
        """Addresses on a Linux interface, as 'addr/prefix' (for uplinks named by device)."""
        idx = self.index(ifname)
        if idx is None:
            return []
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in self._ipr.get_addr(index=idx)]

    def device_of(self, address: str) -> str | None:
        """The interface holding ``address`` (for SO_BINDTODEVICE), or None."""
        ip = str(ipaddress.ip_address(address))
        for a in self._ipr.get_addr():
            if a.get_attr("IFA_ADDRESS") == ip or a.get_attr("IFA_LOCAL") == ip:
                found = self._ipr.get_links(a["index"])
                if found:
                    return found[0].get_attr("IFLA_IFNAME")
        return None
