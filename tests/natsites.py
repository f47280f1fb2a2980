"""Two real agents (tests/agentlab.py) whose ``mobile`` carrier runs
through NAT boxes (tests/netlab/nat.py NatCarriers) with coturn answering
STUN on the lab internet's two addresses, the agents configured with
``base.stun``.  Used by tests/test_nat_e2e.py and bench/nat.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import coturn  # noqa: E402
import netlab  # noqa: E402
from agentlab import TwoSites, site_config  # noqa: E402
from netlab import nat  # noqa: E402

from mpvpn.core.noise import genpsk  # noqa: E402

STUN_PORT = 3478
MOBILE = 3  # carrier index of `mobile` in agentlab.site_config

# A Binding request to the server from inside the lab internet (the
# readiness probe of coturn.Coturn.start); argv: src dir, server ip, port.
PROBE = r"""
import socket, sys, os
sys.path[:0] = [sys.argv[1]]
from mpvpn.core import stun
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
t = os.urandom(12)
s.sendto(stun.encode(stun.BINDING, stun.REQUEST, t), (sys.argv[2], int(sys.argv[3])))
sys.exit(0 if stun.decode(s.recvfrom(2048)[0]).txid == t else 1)
"""
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def unavailable_reason() -> str | None:
    """Why the NAT sites cannot be built here (besides netlab's own reasons)."""
    return coturn.unavailable_reason() or (None if netlab._which("conntrack") else
                                           "`conntrack` missing: install Debian package conntrack")


def lab_stun(boxes) -> coturn.Coturn:
    """coturn answering STUN and TURN on the lab internet's two addresses of
    ``boxes`` (a nat.NatCarriers or nat.NatLab); not started: :func:`start_stun`."""
    return coturn.Coturn(listen=nat.INET_IPS, port=STUN_PORT, relay_ip=nat.INET_IPS[0],
                         relay_ports=(50000, 50099), loopback_peers=False,
                         prefix=boxes.prefix_argv(boxes.inet))


def start_stun(server: coturn.Coturn, boxes) -> None:
    """Start ``server`` (:func:`lab_stun`) and wait until it answers a Binding
    request from inside the lab internet."""
    def probe():
        return boxes.python(boxes.inet, PROBE, SRC, nat.INET_IPS[0], str(STUN_PORT),
                            check=False, timeout=10).returncode == 0
    server.start(timeout=15, probe=probe)


def write_configs(sites, nc, extra_base: str = "", sections: str = "") -> None:
    """Both sites' configs (one fresh PSK): STUN on the lab internet's two
    addresses, ``mobile`` bound to its address behind the NAT box,
    ``extra_base`` in `config base`, ``sections`` appended (e.g. relays)."""
    stun = "".join(f"\tlist stun '{ip}:{STUN_PORT}'\n" for ip in nat.INET_IPS)
    psk = genpsk()
    mc = nc.carrier(MOBILE)
    for site, role, idx, vnc, lan, ip in ((sites.a, "client", 1, "172.30.0.1", "192.168.10.1", mc.a_ip),
                                          (sites.b, "server", 2, "172.30.0.2", "192.168.20.1", mc.b_ip)):
        text, net = site_config(role, psk, idx, vnc, lan, 3, stun + extra_base)
        text = text.replace(f"option bind_ip '10.{MOBILE}.0.{idx}'", f"option bind_ip '{ip}'")
        site.write(text + sections, net)


class NatSites:
    """``lab`` (a netlab.Lab with 3 carriers), ``nc`` (NatCarriers: mobile
    behind NATs of ``kinds`` (client, server); None = no NAT on that side),
    ``server`` (coturn), ``sites`` (TwoSites, not started); ``close()``
    tears down all of it in reverse order."""

    def __init__(self, lab, kinds=("eim", "eim"), extra_base: str = ""):
        self._made = []
        try:
            self.lab = lab
            self.nc = nat.NatCarriers(lab, {MOBILE: tuple(kinds)})
            self._made.append(self.nc)
            self.server = lab_stun(self.nc)
            self._made.append(self.server)
            start_stun(self.server, self.nc)
            self.sites = TwoSites(lab)
            self._made.append(self.sites)
            write_configs(self.sites, self.nc, extra_base)
        except BaseException:
            self.close()
            raise

    @property
    def mobile(self):
        return self.nc.carrier(MOBILE)

    def close(self) -> None:
        made, self._made = self._made, []
        for thing in reversed(made):
            thing.close()

    def __enter__(self) -> "NatSites":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def link(st: dict, carrier: str) -> dict:
    (ln,) = [ln for ln in st["links"] if ln["type"] == carrier]
    return ln


def uplink(st: dict, name: str) -> dict:
    (up,) = [u for u in st["uplinks"] if u["name"] == name]
    return up


def punched_up(st: dict) -> bool:
    """Connected over 3 of 3 subflows, mobile punched."""
    return (st["state"] == "connected"
            and sum(ln["state"] == "established" for ln in st["links"]) == 3
            and link(st, "mobile")["path"] == "punched")
