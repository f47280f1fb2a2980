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

__all__ = ["NatLab", "NatSite", "NAT_KINDS", "nat_rules", "INET_IPS"]

NAT_KINDS = ("eim", "edm")
NFT_NAT_TABLE = "mpvnat"
INET_IPS = ("203.0.113.1", "203.0.113.2")     # the internet namespace (servers)
_ROUTER_LETTERS = "vwxyz"
_NAT_LETTERS = "mnopq"

_live: "set[NatLab]" = set()


def nat_rules(kind: str, out_if: str) -> str:
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
    action = "masquerade" if kind == "eim" else "masquerade random"
    guard = (f'    iifname "{out_if}" ct state established,related accept\n'
             f'    iifname "{out_if}" drop\n')
    return (f"table ip {NFT_NAT_TABLE} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
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


class NatLab:
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
        netlab.mark_owner(prefix, self.namespaces)
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            _sh(["ip", "netns", "add", ns])
            forward = "1" if ns != self.inet and any(ns == s.nat for s in self.sites) else "0"
            self.run(ns, ["sh", "-ec",
                          "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; "
                          "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
                          f"echo {forward} > /proc/sys/net/ipv4/ip_forward"])
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

    # ---- running things --------------------------------------------------

    def _argv(self, ns: str, cmd) -> list[str]:
        if ns not in self.namespaces:
            raise LabError(f"{ns} is not a namespace of {self.prefix}")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, cmd, *, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        argv = self._argv(ns, cmd)
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, input=input,
                                timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"timeout after {timeout}s in {ns}: {argv[4:]}") from e
        if check and cp.returncode != 0:
            raise LabError(f"command failed in {ns} ({cp.returncode}): {argv[4:]}\n"
                           f"{cp.stdout}{cp.stderr}".rstrip())
        return cp

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

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for lab in list(_live):
        try:
            lab.close()
        except Exception:  # noqa: BLE001
            pass
