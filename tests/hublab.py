"""A hub with several client sites in the namespace lab, as real agents:
router B (``rb``) is the hub (LAN 192.168.20.0/24, vNIC 172.30.0.2), site A
is router ``ra`` (LAN 192.168.10.0/24, vNIC .1), and every further site is a
:meth:`netlab.Lab.add_site` router (``r<letter>``, LAN 192.168.<30+k>.0/24,
vNIC 172.30.0.<3+k>), each with its own links to the hub on every carrier.
``crowd`` adds that many more client sites as agents sharing one namespace
(:meth:`netlab.Lab.add_crowd`; member k: name ``x<k>``, vNIC 172.30.0.<100+k>
on tun ``mpx<k>``, LAN 192.168.<100+k>.0/24 announced but not present):
they connect and keep their sessions like any site, but share one routing
table, so they are for idle and handshake measurements, not traffic.
All vNICs share 172.30.0.0/24.  Used by tests/test_hub_lab.py and bench/hub.py."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentlab import Site, site_config

from mpvpn.core.noise import genpsk

VNIC_MASK = ("option netmask '255.255.255.252'", "option netmask '255.255.255.0'")


@dataclass
class HubSite:
    """One client site: its agent, LAN host namespace and addresses."""

    name: str
    agent: Site
    host_ns: str
    host_ip: str  # the LAN host
    lan: str  # CIDR
    vnc: str


class HubLab:
    """``letters``: the add_site sites besides A (e.g. "cd"); ``forward``:
    base.hub_forward on the hub; ``extra_base``: more base options for all;
    ``direct``: base.direct (off here unless asked: what these labs measure
    and test is the hub's forwarding, so no pair may move off the hub);
    ``hub_sections``: more UCI sections of the hub (e.g. ``config site``);
    ``hub_base``: more base options of the hub alone."""

    def __init__(self, lab, letters="cd", forward: bool = True, extra_base: str = "",
                 with_a: bool = True, direct: bool = False, crowd: int = 0, hub_sections: str = "",
                 hub_base: str = ""):
        self.lab = lab
        self._tmp = tempfile.TemporaryDirectory(prefix="mpvpn-hub-")
        work = Path(self._tmp.name)
        psk = genpsk()
        n = lab.n
        if not direct:
            extra_base += "\toption direct '0'\n"
        hub_extra = extra_base + hub_base + ("\toption hub_forward '1'\n" if forward else "")
        self.hub = Site(lab, lab.rb, work, "b")
        self.hub.write(*self._masked(site_config("server", psk, 2, "172.30.0.2", "192.168.20.1", n,
                                                 hub_extra), hub_sections))
        self.sites: dict[str, HubSite] = {}
        if with_a:
            a = Site(lab, lab.ra, work, "a")
            a.write(*self._masked(site_config("client", psk, 1, "172.30.0.1", "192.168.10.1", n,
                                              extra_base)))
            self.sites["a"] = HubSite("a", a, lab.ha, lab.ha_ip, "192.168.10.0/24", "172.30.0.1")
        for letter in letters:
            k = ord(letter) - ord("c")
            ls = lab.add_site(letter)
            vnc = f"172.30.0.{3 + k}"
            text, network = site_config("client", psk, 1, vnc, ls.router_lan_ip, n, extra_base)
            for i, ip in ls.carrier_ips.items():
                text = text.replace(f"option bind_ip '10.{i}.0.1'", f"option bind_ip '{ip}'")
            agent = Site(lab, ls.router, work, letter)
            agent.write(*self._masked((text, network)))
            self.sites[letter] = HubSite(letter, agent, ls.host, ls.host_ip, ls.lan, vnc)
        if crowd:
            self._add_crowd(crowd, psk, work, extra_base)

    def _add_crowd(self, count: int, psk: str, work: Path, extra_base: str) -> None:
        if not 0 <= count <= 150:
            raise ValueError("a crowd of 0..150 sites (vNIC 172.30.0.100-249)")
        crowd = self.lab.add_crowd(count)
        for k, ips in enumerate(crowd.members):
            name, vnc = f"x{k}", f"172.30.0.{100 + k}"
            text, network = site_config("client", psk, 1, vnc, f"192.168.{100 + k}.1", self.lab.n,
                                        extra_base)
            for i, ip in ips.items():
                text = text.replace(f"option bind_ip '10.{i}.0.1'", f"option bind_ip '{ip}'")
            text = text.replace("config vnc 'vnc'\n", f"config vnc 'vnc'\n\toption ifname 'mpx{k}'\n")
            agent = Site(self.lab, crowd.ns, work, name)
            agent.write(*self._masked((text, network)))
            self.sites[name] = HubSite(name, agent, crowd.ns, "", f"192.168.{100 + k}.0/24", vnc)

    @staticmethod

    @staticmethod
    def _masked(pair, sections: str = ""):
        text, network = pair
        return text.replace(*VNIC_MASK) + sections, network

    def start(self, env_extra: dict | None = None) -> None:
        self.hub.start(env_extra)
        self.hub.wait(lambda st: True, 10, "hub up")
        for s in self.sites.values():
            s.agent.start(env_extra)
        self.wait_connected()

    def wait_connected(self, names=None) -> dict:
        names = list(self.sites) if names is None else list(names)
        n = self.lab.n
        for name in names:
            self.sites[name].agent.wait_connected(n, timeout=30)
        want = {f"{self.sites[x].vnc}" for x in names}

        def ok(st):
            got = {se["peer"]["vnc"]["ip"] for se in st["sessions"]
                   if sum(ln["state"] == "established" for ln in se["links"]) == n}
            return want <= got
        return self.hub.wait(ok, 30, f"{len(names)} sites connected to the hub")

    def expected_routes(self, name: str, present=None) -> list:
        """What site ``name`` routes into its tunnel with hub_forward on and
        the sites ``present`` (default: all) connected."""
        present = list(self.sites) if present is None else present
        out = {"192.168.20.0/24"}
        for other in present:
            if other != name:
                out |= {self.sites[other].lan, self.sites[other].vnc + "/32"}
        return sorted(out)

    def close(self) -> None:
        for s in [self.hub, *(x.agent for x in self.sites.values())]:
            if s.proc is not None:
                s.stop()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
