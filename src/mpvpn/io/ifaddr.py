"""Addresses of OpenWrt logical interfaces (``option interface 'wan2'``).

On a router, netifd knows each logical interface's current address and
Linux device: ``ubus call network.interface.<name> status`` prints JSON with
``up``, ``l3_device`` and ``ipv4-address`` / ``ipv6-address`` lists of
``{"address": ..., "mask": ...}``.  The agent asks when it starts and again
on every reload (the hotplug script sends SIGHUP on ifup/ifdown/ifupdate), so
a DHCP or PPPoE uplink that gets a new address is followed and the peer is
told with an UPDATE.  The ubus command line tool is used (not python-ubus,
whose single connection belongs to the thread serving our own object).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT = 3.0


@dataclass(frozen=True)
class IfaceAddr:
    address: str | None  # None: interface down or without an address
    device: str | None
    error: str | None = None


def _status(name: str, ubus_cmd: str | None) -> tuple[dict | None, str | None]:
    cmd = ubus_cmd or shutil.which("ubus")
    if cmd is None:
        return None, "no ubus here"
    try:
        r = subprocess.run([cmd, "call", f"network.interface.{name}", "status"], capture_output=True,
                           text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"ubus call network.interface.{name} failed: {e}"
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip() or f"exit {r.returncode}"
        return None, f"no OpenWrt interface {name!r} ({why})"
    try:
        st = json.loads(r.stdout)
    except ValueError:
        st = None
    if not isinstance(st, dict):
        return None, f"unexpected answer from ubus for {name!r}"
    return st, None


def subnets(name: str = "lan", ubus_cmd: str | None = None) -> list[str] | None:
    """The subnets netifd has on logical interface ``name`` (IPv4 addresses and
    IPv6 addresses/prefix assignments, as CIDR networks), or None when ubus
    cannot tell (not a router, no such interface)."""
    st, _why = _status(name, ubus_cmd)
    if st is None:
        return None
    out = []
    for key in ("ipv4-address", "ipv6-address", "ipv6-prefix-assignment"):
        for entry in st.get(key) or []:
            try:
                net = ipaddress.ip_network(f"{entry['address']}/{int(entry['mask'])}", strict=False)
            except (KeyError, TypeError, ValueError):
                continue
            if net.is_link_local or str(net) in out:
                continue
            out.append(str(net))
    return out


def lookup(name: str, want_ipv6: bool = False, ubus_cmd: str | None = None) -> IfaceAddr:
    """The first address (IPv4 unless ``want_ipv6``) of logical interface ``name``."""
    st, why = _status(name, ubus_cmd)
    if st is None:
        if why == "no ubus here":
            why = "no ubus here: use bind_ip or device for this uplink"
        return IfaceAddr(None, None, why)
    device = st.get("l3_device") or st.get("device")
    device = device if isinstance(device, str) else None
    if not st.get("up"):
        return IfaceAddr(None, device, f"interface {name!r} is down")
    key = "ipv6-address" if want_ipv6 else "ipv4-address"
    for entry in st.get(key) or []:
        try:
            ip = ipaddress.ip_address(entry["address"])
        except (KeyError, TypeError, ValueError):
            continue
        return IfaceAddr(str(ip), device)
    return IfaceAddr(None, device, f"interface {name!r} has no {'IPv6' if want_ipv6 else 'IPv4'} address yet")
