"""Network-namespace lab for mpvpn integration tests and benchmarks.

Topology (``Lab(carriers=3)``)::

    ha ---lan--- ra ===c1..cN=== rb ---lan--- hb
    192.168.10.2  .10.1     .20.1        192.168.20.2

* ``ra`` / ``rb``: routers A and B.  Carrier ``i`` (1..N) is interface ``c<i>``
  in both routers; ``ra`` has 10.i.0.1/24, ``rb`` 10.i.0.2/24 (and with
  ``ipv6=True`` also fd00:i::1/64 and fd00:i::2/64).  ip_forward is on.
* ``ha`` / ``hb``: LAN hosts, interface ``lan`` (also ``lan`` in the router),
  default route via their router.  There is NO route between the two LANs:
  the VPN under test has to add it.
* A carrier with a delay (``Lab(delays={1: (10, 2)})``) is built as
  ``ra:c1 -- wan:a1 [shim] wan:b1 -- rb:c1``: the ``wan`` namespace holds the
  userspace forwarder from :mod:`shim` (AF_PACKET, no netem).  Carriers without
  a delay are direct veth pairs.  Delay must be requested at construction (the
  topology differs), but can then be changed at run time with ``set_delay``;
  ask for ``delays={i: 0}`` to get a shimmed carrier that starts with no delay.

Impairments (``direction`` is ``"a2b"`` = frames from ra towards rb,
``"b2a"`` or ``"both"``):

* ``set_loss``: nftables ``numgen random`` drop on the *receiving* router's
  ingress (``prerouting`` hook of table ``inet mpvlab``, matching the carrier
  interface).  Dropping on ingress rather than in the sender's output hook
  matters: an output-hook drop makes ``sendto()`` fail with EPERM, which a real
  lossy carrier never does.  Covers packets for the router itself and packets
  it forwards; ARP is not affected.
* ``set_rate``: tc ``tbf`` on the *sending* router's carrier interface.
* ``link_down``: see :meth:`Lab.link_down` (default: silent blackhole, the
  interface and its addresses stay, like a dead upstream behind a modem;
  ``mode="carrier"`` sets both veth ends administratively down instead).
* ``set_delay``: the shim (per direction delay, jitter, reorder).

Every lab has its own name prefix ``mpv<pid%10000:04d><counter>`` (namespaces
``<prefix>-ra`` etc.), a marker file in ``/run/mpvpn-netlab`` and is torn
down by ``close()`` (also via the context manager and at interpreter exit).
:func:`cleanup_stale` removes leftovers of labs whose process died.

Safety: the lab namespaces have no link to the host or any other namespace;
all traffic stays between lab addresses.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "Lab", "Carrier", "Site", "PingResult", "LabError", "unavailable_reason",
    "cleanup_stale", "list_lab_namespaces", "SHIM_PATH",
]

SHIM_PATH = Path(__file__).with_name("shim.py")
MARKER_DIR = Path(os.environ.get("MPVPN_NETLAB_RUNDIR", "/run/mpvpn-netlab"))
NAME_RE = re.compile(r"^(mpv\d{4}\d+)-(ra|rb|ha|hb|wan|r[c-z]|h[c-z])$")
ROLES = ("ra", "rb", "ha", "hb")
DIRECTIONS = ("a2b", "b2a", "both")
NFT_TABLE = "mpvlab"

LAN_A = ("192.168.10.1", "192.168.10.2")   # (router, host)
LAN_B = ("192.168.20.1", "192.168.20.2")
LAN_PREFIX = 24
# ifindex bases of the lab's veth ends (carrier i adds i); all distinct.
_IDX = {"lan_r": 10, "lan_h": 20, "ra": 1000, "rb": 2000, "wan_a": 3000, "wan_b": 4000,
        "site_r": 5000, "site_b": 6000, "site_lan": 7000, "crowd_r": 8000, "crowd_b": 8500}

_counter_lock = threading.Lock()
_counter = 0


def claim_prefix() -> str:
    """A lab name prefix ``mpv<pid%10000:04d><n>`` no namespace or marker uses yet
    (every lab module of this process draws from the one counter)."""
    global _counter
    with _counter_lock:
        while True:
            _counter += 1
            prefix = f"mpv{os.getpid() % 10000:04d}{_counter}"
            if not any(ns.startswith(prefix + "-") for ns in list_lab_namespaces()) \
                    and not (MARKER_DIR / f"{prefix}.json").exists():
                return prefix


def mark_owner(prefix: str, namespaces: list[str]) -> None:
    """Record this process as the owner of ``prefix``'s namespaces, so that
    ``cleanup_stale`` removes them once the process is gone."""
    MARKER_DIR.mkdir(parents=True, exist_ok=True)
    (MARKER_DIR / f"{prefix}.json").write_text(json.dumps(
        {"pid": os.getpid(), "starttime": _proc_starttime(os.getpid()), "namespaces": namespaces}))
_live_labs: "set[Lab]" = set()


class LabError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# helpers


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or next(
        (p for p in (f"/usr/sbin/{cmd}", f"/sbin/{cmd}") if os.access(p, os.X_OK)), None)


def _sh(args: Sequence[str], timeout: float = 60, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(list(args), capture_output=True, text=True,
                            timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timeout after {timeout}s: {shlex.join(args)}") from e
    if check and cp.returncode != 0:
        raise LabError(f"command failed ({cp.returncode}): {shlex.join(args)}\n"
                       f"{cp.stdout}{cp.stderr}".rstrip())
    return cp


def run_in_ns(argv: list[str], ns: str, *, timeout: float, check: bool = True,
              input: str | bytes | None = None, text: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ip netns exec <ns> ...`` (``argv``) in its own session, output
    captured; LabError on timeout, or on a non-zero exit when ``check``."""
    if isinstance(input, str) and not text:
        input = input.encode()
    try:
        cp = subprocess.run(argv, capture_output=True, text=text, input=input,
                            timeout=timeout, env=env, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timeout after {timeout}s in {ns}: {shlex.join(argv[4:])}") from e
    if check and cp.returncode != 0:
        raise LabError(f"command failed in {ns} ({cp.returncode}): "
                       f"{shlex.join(argv[4:])}\n{cp.stdout}{cp.stderr}".rstrip())
    return cp


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces/parens: fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def list_lab_namespaces() -> list[str]:
    """All namespaces whose name matches the netlab pattern (any lab)."""
    cp = _sh(["ip", "netns", "list"], check=False)
    names = []
    for line in cp.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if NAME_RE.match(name):
            names.append(name)
    return names


def _kill_ns_pids(ns: str) -> None:
    cp = _sh(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in cp.stdout.split() if p.isdigit()]
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces (and their processes) of labs whose owner process is
    gone.  Labs of live processes are left alone.  Returns removed names."""
    owners: dict[str, bool] = {}   # prefix -> owner alive
    if MARKER_DIR.is_dir():
        for marker in MARKER_DIR.glob("mpv*.json"):
            prefix = marker.stem
            try:
                info = json.loads(marker.read_text())
                alive = _proc_starttime(int(info["pid"])) == info.get("starttime")
            except (OSError, ValueError, KeyError, TypeError):
                alive = False
            owners[prefix] = alive
            if not alive:
                marker.unlink(missing_ok=True)
    removed = []
    for ns in list_lab_namespaces():
        prefix = NAME_RE.match(ns).group(1)
        if owners.get(prefix):
            continue
        # No marker or dead owner: a lab writes its marker before creating
        # any namespace and removes it only after deleting all of them.
        _delete_ns(ns)
        removed.append(ns)
    return removed


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (None if it can)."""
    if sys.platform != "linux":
        return "netlab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "netlab needs root (network namespaces, veth, nftables)"
    for cmd, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if not _which(cmd):
            return f"netlab needs `{cmd}` (Debian package {pkg})"
    probe = f"mpvprobe{os.getpid()}"
    cp = _sh(["ip", "netns", "add", probe], check=False)
    if cp.returncode != 0:
        return f"`ip netns add` does not work here: {cp.stderr.strip()}"
    try:
        cp = _sh(["ip", "-n", probe, "link", "add", "p0", "type", "veth",
                  "peer", "name", "p1"], check=False)
        if cp.returncode != 0:
            return f"cannot create veth pairs: {cp.stderr.strip()}"
        cp = _sh(["ip", "netns", "exec", probe, "nft", "list", "tables"], check=False)
        if cp.returncode != 0:
            return f"nftables does not work here: {cp.stderr.strip()}"
    finally:
        _sh(["ip", "netns", "del", probe], check=False)
    return None


# --------------------------------------------------------------------------
# results


@dataclass
class PingResult:
    sent: int
    received: int
    loss: float                 # fraction 0..1 (received vs sent)
    rtt_min: float | None       # ms
    rtt_avg: float | None
    rtt_max: float | None
    rtt_mdev: float | None
    returncode: int
    output: str = field(repr=False, default="")

    @property
    def loss_percent(self) -> float:
        return 100.0 * self.loss


_PING_TX_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(output: str, returncode: int = 0) -> PingResult:
    m = _PING_TX_RE.search(output)
    if not m:
        raise LabError(f"cannot parse ping output:\n{output}")
    sent, recv = int(m.group(1)), int(m.group(2))
    r = _PING_RTT_RE.search(output)
    rtt = [float(x) for x in r.groups()] if r else [None] * 4
    return PingResult(sent, recv, (1 - recv / sent) if sent else 1.0, *rtt,
                      returncode=returncode, output=output)


@dataclass
class Carrier:
    index: int
    ifname: str          # same name in ra and rb
    a_ip: str            # ra side
    b_ip: str            # rb side
    prefix: int
    a_ip6: str | None
    b_ip6: str | None
    shimmed: bool        # built through the wan namespace + delay shim


@dataclass(frozen=True)
class Site:
    """A site added with :meth:`Lab.add_site` (hub tests)."""

    letter: str
    router: str          # namespace
    host: str            # namespace of the LAN host
    router_lan_ip: str
    host_ip: str
    lan: str             # CIDR
    carrier_ips: dict    # carrier index -> the router's address on that carrier


@dataclass
class Crowd:
    """Client sites sharing one namespace (:meth:`Lab.add_crowd`)."""

    ns: str
    members: list        # per member: carrier index -> its address on that carrier


# --------------------------------------------------------------------------
# the lab


class Lab:
    """A four-namespace multipath test network.  See the module docstring.

    ``Lab(carriers=3, ipv6=False, delays=None, seed=None)``

    ``delays`` maps carrier index to ``ms`` or ``(ms, jitter_ms)`` or a dict
    of :meth:`set_delay` keyword arguments; those carriers are built through
    the delay shim.
    """

    def __init__(self, carriers: int = 3, *, ipv6: bool = False,
                 delays: dict | None = None, seed: int | None = None):
        if not 1 <= carriers <= 250:
            raise ValueError("carriers must be 1..250")
        self.n = carriers
        self.ipv6 = ipv6
        self.seed = seed
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self._shims: dict[int, subprocess.Popen] = {}
        self._loss: dict[tuple[int, str], float] = {}     # (carrier, dir) -> %
        self._down: dict[int, str] = {}                    # carrier -> mode
        self._lock = threading.RLock()
        delays = dict(delays or {})
        for c in delays:
            if not 1 <= c <= carriers:
                raise ValueError(f"delay for unknown carrier {c}")

        self.prefix = prefix = claim_prefix()
        self.ra, self.rb, self.ha, self.hb = (f"{prefix}-{r}" for r in ROLES)
        self.wan = f"{prefix}-wan" if delays else None
        self._ns_map = {"ra": self.ra, "rb": self.rb, "ha": self.ha, "hb": self.hb}
        if self.wan:
            self._ns_map["wan"] = self.wan
        self.namespaces = list(self._ns_map.values())

        self.carriers: dict[int, Carrier] = {}
        for i in range(1, carriers + 1):
            self.carriers[i] = Carrier(
                i, f"c{i}", f"10.{i}.0.1", f"10.{i}.0.2", 24,
                f"fd00:{i:x}::1" if ipv6 else None, f"fd00:{i:x}::2" if ipv6 else None,
                i in delays)
        self.ha_ip, self.hb_ip = LAN_A[1], LAN_B[1]
        self.ra_lan_ip, self.rb_lan_ip = LAN_A[0], LAN_B[0]

        mark_owner(prefix, self.namespaces)
        _live_labs.add(self)
        try:
            self._build()
            for c, spec in delays.items():
                if isinstance(spec, dict):
                    kw = spec
                elif isinstance(spec, (tuple, list)):
                    kw = dict(zip(("ms", "jitter_ms", "reorder"), spec))
                else:
                    kw = {"ms": spec}
                self._start_shim(c)
                self.set_delay(c, **kw)
        except BaseException:
            self.close()
            raise

    # ---- construction -------------------------------------------------

    def _build(self) -> None:
        for ns in self.namespaces:
            _sh(["ip", "netns", "add", ns])
        # sysctls first, so that interfaces created afterwards inherit
        # the "default" settings of their namespace.
        for role, ns in self._ns_map.items():
            s = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if role in ("ra", "rb"):
                s.append("net.ipv4.ip_forward=1")
            if role == "wan" or not self.ipv6:
                # Keep lo's ::1 (loopback tests) but no v6 on lab links.
                s.append("net.ipv6.conf.default.disable_ipv6=1")
            else:
                s += ["net.ipv6.conf.default.keep_addr_on_down=1",
                      "net.ipv6.conf.all.keep_addr_on_down=1",
                      "net.ipv6.conf.default.accept_dad=0",
                      "net.ipv6.conf.default.accept_ra=0"]
                if role in ("ra", "rb"):
                    s.append("net.ipv6.conf.all.forwarding=1")
            script = "; ".join(
                "echo {v} > /proc/sys/{k}".format(k=k.replace(".", "/"), v=v)
                for k, v in (x.split("=") for x in s))
            self.run(ns, ["sh", "-ec", script])

        batch: dict[str, list[str]] = {ns: ["link set lo up"] for ns in self.namespaces}
        # LANs
        # Every veth end gets its own ifindex (see _IDX): if both ends of a
        # pair had the same ifindex (easy, as each namespace counts from 1),
        # the kernel's linkwatch treats their carrier events as non-urgent
        # and the second end stays operstate DOWN for up to a second (IPv6
        # ignores it meanwhile).
        for k, (router, host, (rip, hip)) in enumerate(
                ((self.ra, self.ha, LAN_A), (self.rb, self.hb, LAN_B))):
            _sh(["ip", "link", "add", "lan", "netns", router, "index", str(_IDX["lan_r"] + k),
                 "type", "veth", "peer", "name", "lan", "netns", host,
                 "index", str(_IDX["lan_h"] + k)])
            batch[router] += [f"addr add {rip}/{LAN_PREFIX} dev lan", "link set lan up"]
            batch[host] += [f"addr add {hip}/{LAN_PREFIX} dev lan", "link set lan up",
                            f"route add default via {rip}"]
        # carriers
        for c in self.carriers.values():
            i = c.index
            if c.shimmed:
                _sh(["ip", "link", "add", c.ifname, "netns", self.ra, "index",
                     str(_IDX["ra"] + i), "type", "veth", "peer", "name", f"a{i}",
                     "netns", self.wan, "index", str(_IDX["wan_a"] + i)])
                _sh(["ip", "link", "add", c.ifname, "netns", self.rb, "index",
                     str(_IDX["rb"] + i), "type", "veth", "peer", "name", f"b{i}",
                     "netns", self.wan, "index", str(_IDX["wan_b"] + i)])
                batch[self.wan] += [f"link set a{i} up", f"link set b{i} up"]
            else:
                _sh(["ip", "link", "add", c.ifname, "netns", self.ra, "index",
                     str(_IDX["ra"] + i), "type", "veth", "peer", "name", c.ifname,
                     "netns", self.rb, "index", str(_IDX["rb"] + i)])
            for ns, ip, ip6 in ((self.ra, c.a_ip, c.a_ip6), (self.rb, c.b_ip, c.b_ip6)):
                batch[ns].append(f"addr add {ip}/{c.prefix} dev {c.ifname}")
                if ip6:
                    batch[ns].append(f"addr add {ip6}/64 dev {c.ifname} nodad")
                batch[ns].append(f"link set {c.ifname} up")
        for ns, cmds in batch.items():
            _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
        self._wait_oper_up(self.namespaces)
        # nftables impairment table in both routers
        for ns in (self.ra, self.rb):
            rules = [f"table inet {NFT_TABLE} {{",
                     "  chain ingress {",
                     "    type filter hook prerouting priority raw; policy accept;"]
            rules += [f'    iifname "{c.ifname}" jump {c.ifname}' for c in self.carriers.values()]
            rules += ["  }"]
            rules += [f"  chain {c.ifname} {{ }}" for c in self.carriers.values()]
            rules += ["}"]
            self.run(ns, ["nft", "-f", "-"], input="\n".join(rules) + "\n")

    def add_site(self, letter: str = "c") -> "Site":
        """A third (fourth...) site for hub tests: router ``r<letter>`` with a
        LAN host ``h<letter>`` on 192.168.<30+k>.0/24 (k = 0 for "c") and one
        link per carrier to router B, the hub: ``x<i>`` with 10.<20+10k+i>.0.1
        (the new router) and .2 (rb, interface ``s<letter><i>``). The new router reaches B's carrier
        addresses 10.<i>.0.2 over its own carrier links, as a site elsewhere
        on the internet would. No impairments on these links."""
        if not (len(letter) == 1 and "c" <= letter <= "z"):
            raise ValueError("a site letter is c..z")
        k = ord(letter) - ord("c")
        r, h = f"{self.prefix}-r{letter}", f"{self.prefix}-h{letter}"
        if r in self.namespaces:
            raise ValueError(f"site {letter} exists")
        with self._lock:
            self.namespaces += [r, h]
            self._ns_map.update({f"r{letter}": r, f"h{letter}": h})
            (MARKER_DIR / f"{self.prefix}.json").write_text(json.dumps(
                {"pid": os.getpid(), "starttime": _proc_starttime(os.getpid()),
                 "namespaces": self.namespaces}))
        for ns in (r, h):
            _sh(["ip", "netns", "add", ns])
            self.run(ns, ["sh", "-ec", "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; "
                                       "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"
                          + ("; echo 1 > /proc/sys/net/ipv4/ip_forward" if ns == r else "")])
        lan = f"192.168.{30 + k}"
        batch = {r: ["link set lo up"], h: ["link set lo up"], self.rb: []}
        _sh(["ip", "link", "add", "lan", "netns", r, "index", str(_IDX["site_lan"] + 2 * k),
             "type", "veth", "peer", "name", "lan", "netns", h, "index", str(_IDX["site_lan"] + 2 * k + 1)])
        batch[r] += [f"addr add {lan}.1/{LAN_PREFIX} dev lan", "link set lan up"]
        batch[h] += [f"addr add {lan}.2/{LAN_PREFIX} dev lan", "link set lan up",
                     f"route add default via {lan}.1"]
        links = {}
        for i in self.carriers:
            net = f"10.{20 + 10 * k + i}.0"
            _sh(["ip", "link", "add", f"x{i}", "netns", r, "index", str(_IDX["site_r"] + 100 * k + i),
                 "type", "veth", "peer", "name", f"s{letter}{i}", "netns", self.rb,
                 "index", str(_IDX["site_b"] + 100 * k + i)])
            batch[r] += [f"addr add {net}.1/24 dev x{i}", f"link set x{i} up",
                         f"route add {self.carriers[i].b_ip}/32 via {net}.2 dev x{i}"]
            batch[self.rb] += [f"addr add {net}.2/24 dev s{letter}{i}", f"link set s{letter}{i} up"]
            links[i] = f"{net}.1"
        for ns, cmds in batch.items():
            _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")
        self._wait_oper_up([r, h])
        return Site(letter, r, h, f"{lan}.1", f"{lan}.2", f"{lan}.0/{LAN_PREFIX}", links)

    def add_crowd(self, count: int) -> "Crowd":
        """Room for ``count`` client sites in ONE namespace (``rx``), for hub
        tests and benches with more sites than :meth:`add_site`'s letters (and
        than one namespace per site is worth): one veth per carrier to router
        B (``y<i>`` in rx, ``x<i>`` in rb: 10.<200+i>.0.0/16, B is
        10.<200+i>.255.254), and member k's own address on each, 10.<200+i>.<k
        // 250>.<k % 250 + 1>, reaching B's carrier address 10.<i>.0.2 through
        it.  The members are separate processes bound to their own addresses
        (real sockets, real routing to the hub); they share one routing table,
        so their routes into their tunnels overlap (the first one wins)."""
        if not 1 <= count <= 250 * 250:
            raise ValueError("a crowd has 1..62500 members")
        if 200 + self.n > 255:
            raise ValueError("a crowd needs carriers <= 55")
        ns = f"{self.prefix}-rx"
        if ns in self.namespaces:
            raise ValueError("the lab has a crowd already")
        with self._lock:
            self.namespaces.append(ns)
            self._ns_map["rx"] = ns
            (MARKER_DIR / f"{self.prefix}.json").write_text(json.dumps(
                {"pid": os.getpid(), "starttime": _proc_starttime(os.getpid()),
                 "namespaces": self.namespaces}))
        _sh(["ip", "netns", "add", ns])
        self.run(ns, ["sh", "-ec", "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; "
                                   "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"])
        batch = {ns: ["link set lo up"], self.rb: []}
        members: list[dict] = [{} for _ in range(count)]
        for i in self.carriers:
            net = f"10.{200 + i}"
            _sh(["ip", "link", "add", f"y{i}", "netns", ns, "index", str(_IDX["crowd_r"] + i),
                 "type", "veth", "peer", "name", f"x{i}", "netns", self.rb,
                 "index", str(_IDX["crowd_b"] + i)])
            batch[self.rb] += [f"addr add {net}.255.254/16 dev x{i}", f"link set x{i} up"]
            batch[ns] += [f"link set y{i} up"]
            for k in range(count):
                ip = f"{net}.{k // 250}.{k % 250 + 1}"
                batch[ns].append(f"addr add {ip}/16 dev y{i}")
                members[k][i] = ip
            batch[ns].append(f"route add {self.carriers[i].b_ip}/32 via {net}.255.254 dev y{i}")
        for n, cmds in batch.items():
            _sh(["ip", "-n", n, "-batch", "-"], input="\n".join(cmds) + "\n")
        self._wait_oper_up([ns])
        return Crowd(ns, members)

    def _wait_oper_up(self, namespaces: Iterable[str], ifnames: Iterable[str] | None = None,
                      timeout: float = 3.0) -> None:
        """Wait until the (given, else all non-lo) interfaces are operstate UP."""
        want = set(ifnames) if ifnames is not None else None
        deadline = time.monotonic() + timeout
        pending = list(namespaces)
        while pending:
            not_up = []
            for ns in pending:
                out = _sh(["ip", "-n", ns, "-o", "link", "show"]).stdout
                for line in out.splitlines():
                    name = line.split(":")[1].strip().split("@")[0]
                    if name == "lo" or (want is not None and name not in want):
                        continue
                    if " state UP " not in line:
                        not_up.append(f"{ns}:{name}")
            if not not_up:
                return
            if time.monotonic() > deadline:
                raise LabError(f"interfaces not operationally up after {timeout}s: {not_up}")
            pending = sorted({x.split(":")[0] for x in not_up})
            time.sleep(0.02)

    def _start_shim(self, c: int) -> None:
        cmd = ["ip", "netns", "exec", self.wan, sys.executable, "-u", str(SHIM_PATH),
               f"a{c}", f"b{c}"]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed * 1000 + c)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        self._shims[c] = p
        self._procs.append(p)
        msg = self._shim_read(c, timeout=60)
        if not msg.get("ready"):
            raise LabError(f"shim for carrier {c} failed to start: {msg}")

    def _shim_read(self, c: int, timeout: float = 30) -> dict:
        p = self._shims[c]
        fd = p.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        line = p.stdout.readline() if r else b""
        if not line:
            err = b""
            if p.poll() is not None:
                err = p.stderr.read() or b""
            raise LabError(f"shim for carrier {c} not answering "
                           f"(rc={p.poll()}): {err.decode(errors='replace')}")
        return json.loads(line)

    def _shim_cmd(self, c: int, msg: dict) -> dict:
        if c not in self._shims:
            raise LabError(f"carrier {c} has no delay shim; build the lab with "
                           f"delays={{{c}: 0}} to be able to delay it")
        with self._lock:
            p = self._shims[c]
            p.stdin.write((json.dumps(msg) + "\n").encode())
            p.stdin.flush()
            reply = self._shim_read(c)
        if not reply.get("ok"):
            raise LabError(f"shim for carrier {c}: {reply}")
        return reply

    # ---- names / processes -------------------------------------------

    def ns(self, name: str) -> str:
        """Full namespace name for a role (ra, rb, ha, hb, wan) or a full name."""
        if name in self._ns_map:
            return self._ns_map[name]
        if name in self.namespaces:
            return name
        raise LabError(f"unknown namespace {name!r} (roles: {sorted(self._ns_map)})")

    def carrier(self, i: int) -> Carrier:
        try:
            return self.carriers[i]
        except KeyError:
            raise LabError(f"no carrier {i} (have 1..{self.n})") from None

    def _argv(self, ns: str, cmd: str | Sequence[str]) -> list[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.ns(ns), *argv]

    def run(self, ns: str, cmd: str | Sequence[str], *, timeout: float = 60,
            check: bool = True, input: str | bytes | None = None,
            text: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (argv list, or a string for ``sh -c``) in namespace ``ns``
        and return the CompletedProcess (stdout/stderr captured).  Raises
        LabError on timeout, or on non-zero exit when ``check``."""
        return run_in_ns(self._argv(ns, cmd), ns, timeout=timeout, check=check, input=input,
                         text=text, env=env)

    def popen(self, ns: str, cmd: str | Sequence[str], **kw) -> subprocess.Popen:
        """Start a background process in ``ns`` (own process group); the lab
        kills it (and its group) on close.  Extra kwargs go to Popen."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self._argv(ns, cmd), **kw)
        self._procs.append(p)
        return p

    def python(self, ns: str, code: str, *args: str, timeout: float = 60,
               check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a Python snippet (this interpreter) in ``ns``; args in sys.argv[1:]."""
        return self.run(ns, [sys.executable, "-c", code, *args], timeout=timeout,
                        check=check, input=input)

    def python_popen(self, ns: str, code: str, *args: str, **kw) -> subprocess.Popen:
        return self.popen(ns, [sys.executable, "-c", code, *args], **kw)

    @staticmethod
    def stop(p: subprocess.Popen, timeout: float = 3) -> int | None:
        """Terminate a process (group) started with popen: SIGTERM, then SIGKILL."""
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass
                try:
                    p.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        return p.poll()

    # ---- measurements -------------------------------------------------

    def ping(self, src_ns: str, dst: str, count: int = 3, interval: float = 0.2,
             timeout: float = 1.0, size: int | None = None,
             extra: Iterable[str] = ()) -> PingResult:
        """ping ``dst`` from ``src_ns``; ``timeout`` is -W (per-reply wait, also
        the linger after the last probe).  Never raises on loss."""
        if not _which("ping"):
            raise LabError("`ping` missing: install Debian package iputils-ping")
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}",
                "-W", f"{timeout:g}"]
        if ":" in dst:
            argv.insert(1, "-6")
        if size is not None:
            argv += ["-s", str(size)]
        argv += [*extra, dst]
        budget = 3 * count * interval + timeout + 30  # a hang limit: a busy machine pings slower
        cp = self.run(src_ns, argv, timeout=budget, check=False)
        out = cp.stdout + cp.stderr
        if _PING_TX_RE.search(out) is None:
            # e.g. "connect: Network is unreachable": nothing was sent.
            return PingResult(0, 0, 1.0, None, None, None, None, cp.returncode, out)
        return parse_ping(out, cp.returncode)

    def reachable(self, src_ns: str, dst: str, timeout: float = 1.0) -> bool:
        r = self.ping(src_ns, dst, count=1, interval=0.2, timeout=timeout)
        return r.received > 0

    def tcp_throughput(self, src_ns: str, dst_ns: str, dst_ip: str, *,
                       seconds: float = 2.0, port: int = 5201,
                       src_ip: str | None = None) -> float:
        """Bulk TCP transfer from src_ns to dst_ip (a listener in dst_ns) for
        ``seconds``; returns goodput in Mbit/s measured at the receiver over
        the transfer after its first 0.25 s (skips slow start/the tbf burst)."""
        recv_code = r"""
import socket, sys, time, json
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
ls = socket.socket(fam, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(1)
print('listening', flush=True)
ls.settimeout(15)
c, _ = ls.accept()
buf = bytearray(1 << 20); total = 0; t0 = None; marks = []
while True:
    n = c.recv_into(buf)
    if not n: break
    now = time.monotonic()
    if t0 is None: t0 = now
    total += n; marks.append((now - t0, total))
skip = 0.25
base = next(((t, b) for t, b in marks if t >= skip), marks[0] if marks else (0, 0))
end = marks[-1] if marks else (0, 0)
dt = end[0] - base[0]
print(json.dumps({'bytes': total, 'mbit': (end[1] - base[1]) * 8 / dt / 1e6 if dt > 0 else 0.0}))
"""
        send_code = r"""
import socket, sys, time
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if sys.argv[4]: s.bind((sys.argv[4], 0))
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
end = time.monotonic() + float(sys.argv[3]); chunk = b'x' * 65536
while time.monotonic() < end:
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""
        rx = self.python_popen(dst_ns, recv_code, dst_ip, str(port),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            r, _, _ = select.select([rx.stdout], [], [], 10)
            if not r or "listening" not in rx.stdout.readline():
                raise LabError(f"tcp receiver did not start: {rx.stderr.read() if rx.poll() is not None else ''}")
            self.python(src_ns, send_code, dst_ip, str(port), str(seconds), src_ip or "",
                        timeout=seconds + 30)
            out, err = rx.communicate(timeout=30)
            if rx.returncode != 0:
                raise LabError(f"tcp receiver failed: {err}")
            return json.loads(out.strip().splitlines()[-1])["mbit"]
        finally:
            self.stop(rx)

    # ---- impairments --------------------------------------------------

    @staticmethod
    def _dirs(direction: str) -> list[str]:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        return ["a2b", "b2a"] if direction == "both" else [direction]

    def _rx_ns(self, d: str) -> str:
        """Namespace that receives traffic of direction d (where loss applies)."""
        return self.rb if d == "a2b" else self.ra

    def _tx_ns(self, d: str) -> str:
        return self.ra if d == "a2b" else self.rb

    def _sync_nft(self, carrier: int) -> None:
        """Rewrite carrier's chain in both routers from the python-side state."""
        c = self.carrier(carrier)
        for d in ("a2b", "b2a"):
            rules = [f"flush chain inet {NFT_TABLE} {c.ifname}"]
            if carrier in self._down and self._down[carrier] == "blackhole":
                rules.append(f"add rule inet {NFT_TABLE} {c.ifname} counter drop")
            pct = self._loss.get((carrier, d), 0.0)
            if pct >= 100:      # numgen's "mod 10000 < 10000" is out of nft's range
                rules.append(f"add rule inet {NFT_TABLE} {c.ifname} counter drop")
            elif pct > 0:
                rules.append(f"add rule inet {NFT_TABLE} {c.ifname} "
                             f"numgen random mod 10000 < {int(round(pct * 100))} counter drop")
            self.run(self._rx_ns(d), ["nft", "-f", "-"], input="\n".join(rules) + "\n")

    def set_loss(self, carrier: int, percent: float, direction: str = "both") -> None:
        """Random independent loss (0..100 %, 0.01 % steps) on a carrier, applied
        on ingress of the receiving router; 0 removes it."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be within 0..100")
        with self._lock:
            for d in self._dirs(direction):
                self._loss[(carrier, d)] = float(percent)
            self._sync_nft(carrier)

    def set_rate(self, carrier: int, mbit: float | None, direction: str = "both", *,
                 latency_ms: float = 50.0, burst_bytes: int | None = None) -> None:
        """Rate limit a carrier with tc tbf on the sending router's interface;
        ``mbit`` None/0 removes it.  Queue holds ``latency_ms`` worth of data;
        burst defaults to max(8 MTU frames, 4 ms at the rate)."""
        c = self.carrier(carrier)
        for d in self._dirs(direction):
            ns = self._tx_ns(d)
            if not mbit:
                self.run(ns, ["tc", "qdisc", "del", "dev", c.ifname, "root"], check=False)
                continue
            rate_bps = mbit * 1e6
            burst = burst_bytes or max(8 * 1514, int(rate_bps / 8 * 0.004))
            self.run(ns, ["tc", "qdisc", "replace", "dev", c.ifname, "root", "tbf",
                          "rate", f"{int(rate_bps / 1000)}kbit", "burst", str(burst),
                          "latency", f"{latency_ms:g}ms"])

    def link_down(self, carrier: int, mode: str = "blackhole") -> None:
        """Take a carrier out of service.

        ``mode="blackhole"`` (default): every IP packet arriving over the
        carrier is silently dropped in both routers (nftables, on ingress).
        The interfaces stay up with their addresses and routes, so the
        agent's sockets stay bound and ``sendto()`` keeps succeeding; the
        agent only notices through missing replies -- what a dead upstream
        behind a modem/ONT looks like.

        ``mode="carrier"``: both veth ends are set administratively down.
        IPv4 addresses stay (and IPv6 ones, keep_addr_on_down=1) so bind()
        still works, but the connected route disappears: ``sendto()`` fails
        at once with ENETUNREACH, as when the WAN port loses link.
        """
        if mode not in ("blackhole", "carrier"):
            raise ValueError("mode must be 'blackhole' or 'carrier'")
        c = self.carrier(carrier)
        with self._lock:
            if carrier in self._down:
                self.link_up(carrier)
            self._down[carrier] = mode
            if mode == "blackhole":
                self._sync_nft(carrier)
            else:
                for ns in (self.ra, self.rb):
                    self.run(ns, ["ip", "link", "set", c.ifname, "down"])

    def link_up(self, carrier: int) -> None:
        """Undo link_down (either mode)."""
        c = self.carrier(carrier)
        with self._lock:
            mode = self._down.pop(carrier, None)
            if mode == "blackhole":
                self._sync_nft(carrier)
            elif mode == "carrier":
                for ns in (self.ra, self.rb):
                    self.run(ns, ["ip", "link", "set", c.ifname, "up"])
                self._wait_oper_up((self.ra, self.rb), [c.ifname])

    def is_down(self, carrier: int) -> bool:
        return carrier in self._down

    def set_delay(self, carrier: int, ms: float, jitter_ms: float = 0.0,
                  reorder: bool = False, direction: str = "both",
                  dist: str = "uniform") -> None:
        """One-way delay per direction on a shimmed carrier (see module doc).
        RTT over the carrier with the same setting both ways = 2*ms +- 2*jitter.
        ``reorder=False`` keeps frame order (jitter absorbed by FIFO);
        ``reorder=True`` lets frames overtake.  ``dist``: uniform or normal
        (sigma = jitter, clipped at 2 sigma)."""
        self.carrier(carrier)
        for d in self._dirs(direction):
            self._shim_cmd(carrier, {"cmd": "set", "dir": d, "delay": ms,
                                     "jitter": jitter_ms, "reorder": reorder, "dist": dist})

    def shim_stats(self, carrier: int) -> dict:
        return self._shim_cmd(carrier, {"cmd": "stats"})

    def nft_ruleset(self, ns: str) -> str:
        return self.run(ns, ["nft", "list", "table", "inet", NFT_TABLE]).stdout

    # ---- teardown -----------------------------------------------------

    def leftovers(self) -> list[str]:
        """Namespaces or host links of this lab that still exist."""
        left = [ns for ns in list_lab_namespaces() if ns.startswith(self.prefix + "-")]
        cp = _sh(["ip", "-o", "link", "show"], check=False)
        left += [ln.split(":")[1].strip() for ln in cp.stdout.splitlines()
                 if self.prefix in ln]
        return left

    def close(self) -> None:
        """Kill lab processes, delete nft tables and namespaces, remove the
        marker; raises LabError if anything with the prefix is left."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for c, p in list(self._shims.items()):
            try:
                if p.poll() is None and p.stdin:
                    p.stdin.close()     # EOF -> shim exits cleanly
            except OSError:
                pass
        for p in reversed(self._procs):
            try:
                self.stop(p, timeout=2)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                errors.append(repr(e))
        for ns in (self.ra, self.rb):
            if ns in list_lab_namespaces():
                _sh(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE],
                    check=False)
        for ns in self.namespaces:
            _delete_ns(ns)
        left = self.leftovers()
        if not left:
            (MARKER_DIR / f"{self.prefix}.json").unlink(missing_ok=True)
        _live_labs.discard(self)
        if left:
            errors.append(f"left over after teardown: {left}")
        if errors:
            raise LabError("; ".join(errors))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} carriers={self.n}{' closed' if self._closed else ''}>"


@atexit.register
def _close_all_labs() -> None:
    for lab in list(_live_labs):
        try:
            lab.close()
        except Exception:  # noqa: BLE001
            pass
