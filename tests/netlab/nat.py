"""NAT boxes for the lab: routers behind nftables NATs on a shared "internet".

Topology (``NatLab(kinds=("eim", "edm"))``)::

    r<x> --wan-- r<n> (NAT) --ext--+
    10.20k.0.2   10.20k.0.1       |
                 203.0.113.(10+k) |-- ri ("internet", 203.0.113.1 and .2,
    ...                           |       where coturn / STUN servers run)

For NAT ``k`` (0, 1, ...) the router behind it is ``<prefix>-r<x>`` with
x = "v", "w", ... and the NAT box ``<prefix>-r<n>`` with n = "m", "n", ...;
the internet is ``<prefix>-ri``.  These names match netlab's namespace
pattern (``r[c-z]``), so :func:`netlab.cleanup_stale` also removes them
when their owner died; the prefix (``mpv<pid%10000><counter>``) and the
marker file in ``/run/mpvpn-netlab`` follow the same convention as
:class:`netlab.Lab`, and :meth:`NatLab.close` (context manager, atexit)
always tears everything down.

NAT kinds, made with nftables in the NAT box (table ``ip mpvnat``):

* ``"eim"``: ``masquerade`` -- Linux keeps the source port when it is free,
  so every destination sees the same public address and port:
  endpoint-independent mapping (most home routers, many CGNATs).
* ``"edm"``: ``masquerade random`` -- a random source port per conntrack
  entry, i.e. per destination: endpoint-dependent ("symmetric") mapping.

Both drop unsolicited traffic from the internet like a home router's
firewall (see :func:`nat_rules` for why that matters to hole punching);
filtering is therefore address- and port-dependent, as Linux conntrack is.

Mapping lifetime is the NAT box's conntrack: :meth:`NatLab.set_udp_timeout`
writes ``net.netfilter.nf_conntrack_udp_timeout`` (and ``_stream``) inside
the NAT namespace (these sysctls are per network namespace);
:meth:`NatLab.flush_conntrack` empties the table (``conntrack -F``, Debian
package ``conntrack``), which is what a NAT reboot looks like to the hosts
behind it.

Safety: nothing here links to the host; all traffic stays between lab
addresses (203.0.113.0/24 is TEST-NET-3).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

import netlab
from netlab import LabError, MARKER_DIR, _sh, _which, list_lab_namespaces

__all__ = ["NatLab", "NatCarriers", "NatCarrier", "NatSite", "NAT_KINDS", "nat_rules", "INET_IPS"]

NAT_KINDS = ("eim", "edm")
NFT_NAT_TABLE = "mpvnat"
INET_IPS = ("203.0.113.1", "203.0.113.2")     # the internet namespace (servers)
_ROUTER_LETTERS = "vwxyz"
_NAT_LETTERS = "mnopq"
_BOX_LETTERS = "mnopqrstuvwxyz"   # NatCarriers' boxes (own prefix, so no clash)

_live: "set[NatLab]" = set()


def nat_rules(kind: str, out_if: str, port: int | None = None) -> str:
    """The nftables ruleset (``nft -f`` input) for one NAT kind.

    Besides the NAT, the box drops new connections arriving from the outside
    (input and forward), as OpenWrt's fw4 does for its wan zone.  This
    matters for hole punching: without it, a peer's early punch packet is
    accepted by the box itself, its conntrack entry is confirmed, and that
    entry then occupies the tuple our own outgoing mapping would use, so
    masquerade picks another port and even an "eim" box looks
    endpoint-dependent to that peer.  A packet dropped in the filter hook
    leaves no conntrack entry."""
    if kind not in NAT_KINDS:
        raise ValueError(f"NAT kind must be one of {NAT_KINDS}")
    if port is not None and (kind != "eim" or not 1 <= port <= 65535):
        raise ValueError("a fixed public port only for an eim box, 1..65535")
    action = "masquerade" if kind == "eim" else "masquerade random"
    fixed = ""
    if port is not None:
        # one public port for every UDP mapping: still endpoint-independent
        # (each destination is another tuple), but not the socket's own port
        fixed = f'    oifname "{out_if}" meta l4proto udp masquerade to :{port}\n'

    guard = (f'    iifname "{out_if}" ct state established,related accept\n'
             f'    iifname "{out_if}" drop\n')
    return (f"table ip {NFT_NAT_TABLE} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"{fixed}"
            f'    oifname "{out_if}" {action}\n'
            f"  }}\n"
            f"  chain input {{\n"
            f"    type filter hook input priority filter; policy accept;\n"
            f"{guard}"
            f"  }}\n"
            f"  chain forward {{\n"
            f"    type filter hook forward priority filter; policy accept;\n"
            f"{guard}"
            f"  }}\n"
            f"}}\n")


@dataclass(frozen=True)
class NatSite:
    """One router behind one NAT box."""

    index: int
    kind: str
    router: str          # namespace of the router behind the NAT
    nat: str             # namespace of the NAT box
    router_ip: str       # the router's (private) address
    public_ip: str       # the NAT box's address on the internet side


class _Boxes:
    """What NatLab and NatCarriers share: running things in their own
    namespaces, the NAT boxes' conntrack state, teardown.  Subclasses set
    ``prefix``, ``inet``, ``namespaces`` and ``sites`` (NatSite)."""

    prefix: str
    inet: str
    namespaces: list
    sites: list
    _closed: bool
    _procs: list

    def _build(self) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        """Own the namespaces (netlab.mark_owner: a crashed run's are swept),
        build them, and tear down what was made when building fails."""
        netlab.mark_owner(self.prefix, self.namespaces)
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _setup_ns(ns: str, forward: bool) -> None:
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "netns", "exec", ns, "sh", "-ec",
             "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; "
             "echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter; "
             "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
             f"echo {1 if forward else 0} > /proc/sys/net/ipv4/ip_forward"])

    # ---- running things --------------------------------------------------

    def _runnable(self) -> list:
        return self.namespaces

    def _argv(self, ns: str, cmd) -> list[str]:
        if ns not in self._runnable():
            raise LabError(f"{ns} is not a namespace of {self.prefix}")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, cmd, *, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        return netlab.run_in_ns(self._argv(ns, cmd), ns, timeout=timeout, check=check, input=input)

    def popen(self, ns: str, cmd, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self._argv(ns, cmd), **kw)
        self._procs.append(p)
        return p

    def python(self, ns: str, code: str, *args: str, timeout: float = 60,
               check: bool = True) -> subprocess.CompletedProcess:
        return self.run(ns, [sys.executable, "-c", code, *args], timeout=timeout, check=check)

    def socket(self, ns: str, family: int = socket.AF_INET,
               type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket that lives in namespace ``ns``, usable from this process.

        A socket belongs to the network namespace it was created in; a
        short-lived thread enters ``ns`` (setns(2) on /run/netns/<ns>, which
        changes only that thread), creates it and exits, so the test's own
        threads never leave the host namespace."""
        self._argv(ns, [])                       # only this lab's namespaces
        result: dict = {}

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, 0x40000000) != 0:     # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"setns({ns})")
                finally:
                    os.close(fd)
                result["sock"] = socket.socket(family, type)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                result["error"] = e

        t = threading.Thread(target=make, name=f"setns-{ns}")
        t.start()
        t.join()
        if "error" in result:
            raise LabError(f"cannot create a socket in {ns}: {result['error']}")
        return result["sock"]

    def prefix_argv(self, ns: str) -> list[str]:
        """argv prefix that runs a program inside ``ns`` (for tests/coturn.py)."""
        return self._argv(ns, [])

    # ---- NAT state -----------------------------------------------------

    def set_udp_timeout(self, site: NatSite, seconds: int, stream_seconds: int | None = None) -> None:
        """Conntrack UDP timeouts in the NAT box (mapping lifetime)."""
        stream = seconds if stream_seconds is None else stream_seconds
        self.run(site.nat, ["sh", "-ec",
                            f"echo {int(seconds)} > /proc/sys/net/netfilter/nf_conntrack_udp_timeout; "
                            f"echo {int(stream)} > /proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"])

    def udp_timeout(self, site: NatSite) -> tuple[int, int]:
        out = self.run(site.nat, ["cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout",
                                  "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"]).stdout
        a, b = out.split()
        return int(a), int(b)

    def conntrack_udp(self, site: NatSite) -> list[str]:
        """The NAT box's UDP conntrack entries (``conntrack -L -p udp``)."""
        if not _which("conntrack"):
            raise LabError("`conntrack` missing: install Debian package conntrack")
        cp = self.run(site.nat, ["conntrack", "-L", "-p", "udp"], check=False)
        return [ln for ln in cp.stdout.splitlines() if ln.startswith("udp")]

    def flush_conntrack(self, site: NatSite) -> None:
        """Forget every mapping of this NAT box (what a NAT reboot does)."""
        if not _which("conntrack"):
            raise LabError("`conntrack` missing: install Debian package conntrack")
        self.run(site.nat, ["conntrack", "-F"])

    def reboot(self, site: NatSite, port: int | None = None) -> None:
        """What a NAT reboot looks like to the hosts behind it: every
        mapping forgotten (conntrack flushed); with ``port`` (an "eim" box
        only) new mappings get that public port instead of the source's own,
        as a CGNAT hands out new ports after a reboot.  ``None`` restores
        the port-preserving rule."""
        self.run(site.nat, ["nft", "delete", "table", "ip", NFT_NAT_TABLE])
        self.run(site.nat, ["nft", "-f", "-"], input=nat_rules(site.kind, "ext", port))
        self.flush_conntrack(site)

    def change_kind(self, site: NatSite, kind: str) -> None:
        """Replace the box's NAT rule by another kind's, keeping conntrack:
        flows that exist keep their mappings, new flows get the new kind's
        (an operator reconfiguring a CGNAT; a test that a relayed pair moves
        to the direct path once one exists)."""
        rules = nat_rules(kind, "ext")          # (checks the kind)
        self.run(site.nat, ["nft", "delete", "table", "ip", NFT_NAT_TABLE])
        self.run(site.nat, ["nft", "-f", "-"], input=rules)

    def nat_ruleset(self, site: NatSite) -> str:
        return self.run(site.nat, ["nft", "list", "table", "ip", NFT_NAT_TABLE]).stdout

    # ---- teardown --------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in reversed(self._procs):
            netlab.Lab.stop(p, timeout=2)
        for ns in self.namespaces:
            netlab._delete_ns(ns)
        left = [ns for ns in list_lab_namespaces() if ns.startswith(self.prefix + "-")]
        if not left:
            (MARKER_DIR / f"{self.prefix}.json").unlink(missing_ok=True)
        _live.discard(self)
        if left:
            raise LabError(f"left over after teardown: {left}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NatLab(_Boxes):
    """Routers behind NAT boxes on a shared internet namespace.

    ``NatLab(kinds=("eim",))`` builds one NAT of each given kind.  Use
    :meth:`run` / :meth:`popen` / :meth:`python` to run things inside a
    namespace (same signatures as :class:`netlab.Lab`)."""

    def __init__(self, kinds: Sequence[str] = ("eim", "edm")):
        if not 1 <= len(kinds) <= len(_ROUTER_LETTERS):
            raise ValueError(f"1..{len(_ROUTER_LETTERS)} NATs")
        for k in kinds:
            if k not in NAT_KINDS:
                raise ValueError(f"NAT kind must be one of {NAT_KINDS}")
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self.prefix = prefix = netlab.claim_prefix()  # netlab.Lab's names and counter
        self.inet = f"{prefix}-ri"
        self.sites = [NatSite(k, kind, f"{prefix}-r{_ROUTER_LETTERS[k]}",
                              f"{prefix}-r{_NAT_LETTERS[k]}", f"10.{200 + k}.0.2",
                              f"203.0.113.{10 + k}") for k, kind in enumerate(kinds)]
        self.namespaces = [self.inet] + [ns for s in self.sites for ns in (s.nat, s.router)]
        self._start()

    def _build(self) -> None:
        for ns in self.namespaces:
            self._setup_ns(ns, forward=any(ns == s.nat for s in self.sites))
        batch: dict[str, list[str]] = {ns: ["link set lo up"] for ns in self.namespaces}
        # internet: a bridge that every NAT box's "ext" link joins
        batch[self.inet] += ["link add inet type bridge", "link set inet up"]
        batch[self.inet] += [f"addr add {ip}/24 dev inet" for ip in INET_IPS]
        for s in self.sites:
            k = s.index
            _sh(["ip", "link", "add", "wan", "netns", s.router, "type", "veth",
                 "peer", "name", "lan", "netns", s.nat])
            _sh(["ip", "link", "add", "ext", "netns", s.nat, "type", "veth",
                 "peer", "name", f"n{k}", "netns", self.inet])
            batch[s.router] += [f"addr add {s.router_ip}/24 dev wan", "link set wan up",
                                f"route add default via 10.{200 + k}.0.1"]
            batch[s.nat] += [f"addr add 10.{200 + k}.0.1/24 dev lan", "link set lan up",
                             f"addr add {s.public_ip}/24 dev ext", "link set ext up"]
            batch[self.inet] += [f"link set n{k} master inet", f"link set n{k} up"]
        for ns, cmds in batch.items():
            _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
        for s in self.sites:
            self.run(s.nat, ["nft", "-f", "-"], input=nat_rules(s.kind, "ext"))



@dataclass(frozen=True)
class NatCarrier:
    """One carrier of a :class:`netlab.Lab` rebuilt through the internet.

    ``a_ip``/``b_ip``: the addresses the routers have on ``c<i>`` (what an
    agent binds to); ``a_public``/``b_public``: what the other side and the
    servers in the internet see (the NAT box's address, or ``a_ip`` itself
    when that side has no NAT).  ``a_site``/``b_site``: the NAT boxes (for
    :meth:`NatCarriers.flush_conntrack` and friends), None without NAT."""

    index: int
    ifname: str
    a_kind: str | None
    b_kind: str | None
    a_ip: str
    b_ip: str
    a_public: str
    b_public: str
    a_site: NatSite | None
    b_site: NatSite | None


class NatCarriers(_Boxes):
    """Put carriers of a :class:`netlab.Lab` behind NAT boxes.

    ``NatCarriers(lab, {3: ("edm", "edm"), 2: ("eim", None)})`` replaces
    carrier 3's veth pair (``ra:c3 -- rb:c3``) by::

        ra:c3 10.3.1.2 -- lan [NAT box, ext 203.0.113.103] --+
                                                             |-- internet (bridge;
        rb:c3 10.3.2.2 -- lan [NAT box, ext 203.0.113.203] --+   203.0.113.1, .2)

    and a side without NAT (kind None) puts the router's ``c<i>`` on the
    internet itself (203.0.113.1xx / .2xx).  The routers keep the interface
    name ``c<i>``, so the lab's ``set_loss``/``link_down`` (nftables on the
    routers' ingress, ``ip link set c<i> down``) act on the new path as
    before.  Each rebuilt side gets a routing table of its own, selected by
    source address (``ip rule from <c<i> address> lookup 100+i``), as
    OpenWrt's mwan3 does for several uplinks; an agent binding its socket
    to the address (and device) leaves through that carrier.

    Namespaces (NAT boxes ``<prefix>-r<m..>``, internet ``<prefix>-ri``)
    have a prefix and marker of their own, so :meth:`netlab.Lab.leftovers`
    never sees them and :func:`netlab.cleanup_stale` removes them when the
    owner died; :meth:`close` (context manager, atexit) tears them down
    (the rebuilt ``c<i>`` links go with them).  Only unshimmed carriers
    (no ``delays``) can be rebuilt."""

    def __init__(self, lab: "netlab.Lab", sides: dict):
        if not sides:
            raise ValueError("no carrier to put behind a NAT")
        for i, pair in sides.items():
            c = lab.carrier(i)
            if c.shimmed:
                raise ValueError(f"carrier {i} goes through the delay shim; build it without delay")
            if len(pair) != 2 or any(k is not None and k not in NAT_KINDS for k in pair):
                raise ValueError(f"carrier {i}: a pair of NAT kinds {NAT_KINDS} or None")
            if pair == (None, None):
                raise ValueError(f"carrier {i}: no NAT on either side; leave it as it is")
            if not 1 <= i <= 99:
                raise ValueError("carriers 1..99 only")
        if sum(k is not None for pair in sides.values() for k in pair) > len(_BOX_LETTERS):
            raise ValueError(f"at most {len(_BOX_LETTERS)} NAT boxes")
        self._closed = False
        self._procs = []
        self.lab = lab
        self.prefix = prefix = netlab.claim_prefix()
        self.inet = f"{prefix}-ri"
        self.sites = []
        self.carriers: dict[int, NatCarrier] = {}
        letters = iter(_BOX_LETTERS)
        for i in sorted(sides):
            per_side = {}
            for side, kind in zip("ab", sides[i]):
                private = f"10.{i}.{1 if side == 'a' else 2}.2"
                public = f"203.0.113.{(100 if side == 'a' else 200) + i}"
                if kind is None:
                    per_side[side] = (None, public, public, None)
                    continue
                site = NatSite(len(self.sites), kind, lab.ra if side == "a" else lab.rb,
                               f"{prefix}-r{next(letters)}", private, public)
                self.sites.append(site)
                per_side[side] = (kind, private, public, site)
            (ak, aip, apub, asite), (bk, bip, bpub, bsite) = per_side["a"], per_side["b"]
            self.carriers[i] = NatCarrier(i, lab.carrier(i).ifname, ak, bk, aip, bip,
                                          apub, bpub, asite, bsite)
        self.namespaces = [self.inet] + [s.nat for s in self.sites]
        self._start()

    def _runnable(self) -> list:
        return self.namespaces + [self.lab.ra, self.lab.rb]

    def carrier(self, i: int) -> NatCarrier:
        return self.carriers[i]

    def _build(self) -> None:
        lab = self.lab
        for ns in self.namespaces:
            self._setup_ns(ns, forward=ns != self.inet)
        batch: dict[str, list[str]] = {ns: ["link set lo up"] for ns in self.namespaces}
        batch[lab.ra], batch[lab.rb] = [], []
        batch[self.inet] += ["link add inet type bridge", "link set inet up"]
        batch[self.inet] += [f"addr add {ip}/24 dev inet" for ip in INET_IPS]
        k = 0
        for c in self.carriers.values():
            i, name = c.index, c.ifname
            _sh(["ip", "-n", lab.ra, "link", "del", name])     # the veth pair, both ends
            for side, router, kind, ip, public, site in (
                    ("a", lab.ra, c.a_kind, c.a_ip, c.a_public, c.a_site),
                    ("b", lab.rb, c.b_kind, c.b_ip, c.b_public, c.b_site)):
                table = 100 + i
                idx = (1000 if side == "a" else 2000) + i    # what netlab.Lab gave c<i>
                k += 1
                if site is None:
                    # the router itself is on the internet
                    _sh(["ip", "link", "add", name, "netns", router, "index", str(idx),
                         "type", "veth", "peer", "name", f"p{k}", "netns", self.inet,
                         "index", str(8000 + k)])
                    batch[self.inet] += [f"link set p{k} master inet", f"link set p{k} up"]
                    batch[router] += [f"addr add {ip}/24 dev {name} noprefixroute",
                                      f"link set {name} up",
                                      f"route add 203.0.113.0/24 dev {name} src {ip} table {table}"]
                else:
                    gw = ip.rsplit(".", 1)[0] + ".1"
                    _sh(["ip", "link", "add", name, "netns", router, "index", str(idx),
                         "type", "veth", "peer", "name", "lan", "netns", site.nat,
                         "index", str(8100 + k)])
                    _sh(["ip", "link", "add", "ext", "netns", site.nat, "index", str(8200 + k),
                         "type", "veth", "peer", "name", f"p{k}", "netns", self.inet,
                         "index", str(8000 + k)])
                    batch[self.inet] += [f"link set p{k} master inet", f"link set p{k} up"]
                    batch[site.nat] += [f"addr add {gw}/24 dev lan", "link set lan up",
                                        f"addr add {public}/24 dev ext", "link set ext up"]
                    batch[router] += [f"addr add {ip}/24 dev {name}", f"link set {name} up",
                                      f"route add default via {gw} dev {name} table {table}"]
                batch[router] += [f"rule add from {ip} lookup {table} pref {1000 + i}"]
        for ns, cmds in batch.items():
            if cmds:
                _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
        for s in self.sites:
            self.run(s.nat, ["nft", "-f", "-"], input=nat_rules(s.kind, "ext"))
        lab._wait_oper_up([lab.ra, lab.rb], [c.ifname for c in self.carriers.values()])
        lab._wait_oper_up(self.namespaces)


@atexit.register
def _close_all() -> None:
    for lab in list(_live):
        try:
            lab.close()
        except Exception:  # noqa: BLE001
            pass
