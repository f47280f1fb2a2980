#!/usr/bin/env python3
"""Router CPU cost: CPU instructions per user packet through the whole
in-process data path, and what the tunnel carries when each agent gets only
a slice of one core (cgroup CPU bandwidth), next to peers measured the same
way.

Part 1, counted (``--counter callgrind``, or ``perf`` where the CPU exposes
an instructions counter): one process runs both ends of one traffic
direction, sealed (AEAD), 3 subflows, in memory:

  sender:   tun read (TSO split of a super-segment, as ``LinuxTun.read_packets``)
            -> ``Session.send_many`` (scheduler, seal, one datagram per copy)
            -> ``datagrams_by_member`` (the datagrams an agent sends)
  receiver: ``receive_many`` per member (open, replay, reorder, deliver)
            -> ``offload.coalesce_frames`` (the GRO merge, what the agent
            writes to the tun); the receiver's feedback goes back to the sender.

Each configuration runs twice with N1 and N2 user packets; instructions per
packet = (I(N2) - I(N1)) / (N2 - N1), so interpreter start-up, imports and
the handshake cancel out.  Instruction counts do not depend on the machine's
load.  System calls and kernel work (sockets, tun) are NOT in these counts.

Part 2, capped (``--capped``, root, iperf3): the namespace lab with two real
agents (tests/agentlab.py), each agent in its own cgroup limited to 10 % and
25 % of one core (``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us`` on a v1 cpu
hierarchy: the same CFS bandwidth control), iperf3 TCP LAN host -> LAN host;
the same for glorytun and engarde + wireguard-go when found (``--peers``;
PATH or the GLORYTUN, ENGARDE_CLIENT, ENGARDE_SERVER, WIREGUARD_GO variables).
This one includes the kernel's share charged to the agents' processes.

    python bench/cost.py [--counter callgrind|perf|none] [--sizes 64,512,1400]
                         [--kinds tcp,udp] [--modes duplicate,aggregate,adaptive]
                         [--fastpath on,off] [--n1 N] [--n2 N]
                         [--capped] [--caps 10,25] [--peers glorytun,engarde]
                         [--seconds S] [--json FILE]

``--counter none`` runs the same path without counting (a smoke run: the
path's own figures, datagrams and wire bytes per packet, are still reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

# Reference CPUs for the extrapolation: clock (Hz) and an assumed IPC for
# the interpreter's mix of branchy, memory-bound code (see docs/performance.md).
# MT7621: MIPS 1004Kc cores (the 24KEc's 9-stage in-order pipeline, no
# superscalar issue): at most 1 instruction per cycle; CPython sustains ~0.5
# on such cores.  MT7981: Cortex-A53, 2-wide in-order; CPython sustains ~0.7.
# Both are assumptions, not measurements (no such board here).
TARGETS = (("MT7621 (MIPS 1004Kc, 880 MHz)", 880e6, 0.5),
           ("MT7981 (Cortex-A53, 1.3 GHz)", 1.3e9, 0.7))

SIZES = (64, 512, 1400)
KINDS = ("tcp", "udp")
MODES = ("duplicate", "aggregate", "adaptive")
SUBFLOWS = 3
UDP_BATCH = 64  # plain packets taken per wake-up before one send_many (the agent takes up to 256)
MAX_SEGS = 64  # segments per TCP super-segment (64 KiB at most)


# -- the path (runs in a worker process: MPVPN_FASTPATH is read at import) -----------

def udp_packet(size: int, seq: int = 0) -> bytes:
    """An IPv4 UDP datagram of ``size`` bytes (header checksum unset, UDP checksum 0)."""
    size = max(size, 28)
    ip = bytes([0x45, 0, *size.to_bytes(2, "big"), *(seq & 0xFFFF).to_bytes(2, "big"), 0x40, 0, 64, 17,
                0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    udp = bytes([0x13, 0x88, 0x13, 0x89, *(size - 20).to_bytes(2, "big"), 0, 0])
    return ip + udp + bytes(size - 28)


def tso_frame(size: int, segs: int) -> bytes:
    """What a tun with IFF_VNET_HDR and TSO hands over for ``segs`` TCP
    segments of ``size`` bytes: a virtio_net_hdr (GSO_TCPV4, NEEDS_CSUM) and
    one IPv4 super-segment."""
    from core import tcp_packet
    from mpvpn.io import offload

    mss = size - 40
    pkt = bytearray(tcp_packet(40 + mss * segs))
    pkt[20 + 13] = offload.TCP_ACK | offload.TCP_PSH
    hdr = offload.build_hdr(offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, mss, 20, 16)
    return hdr + bytes(pkt)


def segments_per_read(size: int) -> int:
    return max(1, min(MAX_SEGS, 65535 // (size - 40) - 1 if size > 40 else 1))


def run_path(mode: str, kind: str, size: int, packets: int, seed: int = 1) -> dict:
    """Carry ``packets`` user packets a -> b through the in-process data path
    (see the module docstring); returns the path's own counts."""
    from core import SCHED_RATE
    from mpvpn.core import fastpath
    from mpvpn.io import offload
    from mpvpn.core.scheduler import make_scheduler
    from mpvpn.tools.simnet import SimPair

    c_loops = fastpath.LOOPS is not None
    pair = SimPair(SUBFLOWS, delay=0.001, seed=seed, sealed=True)
    if mode != "duplicate":
        pair.a.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
        pair.b.scheduler = make_scheduler(mode, initial_rate=SCHED_RATE)
    if not pair.handshake():
        raise RuntimeError("handshake failed")
    a, b = pair.a, pair.b
    now = pair.now
    # What one tun read returns.  The agent's tun mode is tso with the C
    # loops and gro without (mpvpn.io.tun.LinuxTun): with gro the kernel has
    # already segmented, so each read is one plain packet.
    if kind == "tcp":
        segs = segments_per_read(size)
        frame = tso_frame(size, segs)
        if c_loops:
            reads = [frame]
        else:
            reads = [offload.PLAIN_HDR + p for p in offload.split_py(frame)]  # the kernel's segments
    else:
        reads = [offload.PLAIN_HDR + udp_packet(size, i) for i in range(UDP_BATCH)]
    hlen = offload.VNET_HDR_LEN
    split = offload.split
    coalesce = offload.coalesce_frames
    sched = a.scheduler
    queueing = mode != "duplicate"  # the scheduler may hold packets (core.py does the same)
    stats = {"delivered": 0, "datagrams": 0, "wire_bytes": 0, "tun_writes": 0, "tun_reads": 0}

    def read_tun(fr: bytes) -> list:
        # mirrors LinuxTun.read_packets (src/mpvpn/io/tun.py): plain frames inline, else offload.split
        if fr[1] == 0 and not fr[0] & offload.F_NEEDS_CSUM:
            return [fr[hlen:]]
        return split(fr)

    def carry(now: float) -> None:
        got = []
        for m, dgrams in a.datagrams_by_member().items():
            stats["datagrams"] += len(dgrams)
            stats["wire_bytes"] += sum(map(len, dgrams))
            got += b.receive_many(dgrams, m, now)
        for m, dgrams in b.datagrams_by_member().items():
            a.receive_many(dgrams, m, now)
        deliver(got)

    def deliver(got: list) -> None:
        if got:
            stats["delivered"] += len(got)
            stats["tun_writes"] += len(coalesce(got))

    sent = 0
    while sent < packets:
        batch = []
        for fr in reads:  # one wake-up's reads, no more than the run still needs
            batch += read_tun(fr)
            stats["tun_reads"] += 1
            if len(batch) >= packets - sent:
                break
        batch = batch[:packets - sent]
        sent += len(batch)
        a.send_many(batch, now)
        carry(now)
        now += 1e-5 * len(batch)
        deliver(_timers_collect(a, b, now))
    for _ in range(100_000):  # what the scheduler still holds leaves at its pace
        carry(now)
        if not (queueing and sched.pending):
            break
        now += 1e-5
        deliver(_timers_collect(a, b, now))
    deliver(b.handle_timer(now + 10.0))
    return {"mode": mode, "kind": kind, "size": size, "packets": packets, "c_loops": c_loops, **stats}


def _timers_collect(a, b, now: float) -> list:
    """Both sessions' due timers; the packets b's hold released."""
    out = []
    for s in (a, b):
        t = s.get_timer()
        if t is not None and t <= now:
            r = s.handle_timer(now)
            if s is b:
                out += r
    return out


# -- counting: one worker process per run ---------------------------------------------

def _worker_argv(mode: str, kind: str, size: int, packets: int) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", mode, kind, str(size), str(packets)]


def _worker_env(c_loops: bool) -> dict:
    env = dict(os.environ, MPVPN_FASTPATH="1" if c_loops else "0", PYTHONHASHSEED="0")
    env.pop("PYTHONMALLOC", None)
    return env


def counter_unavailable(counter: str) -> str | None:
    """Why ``counter`` cannot count here (None: it can)."""
    if counter == "none":
        return None
    if counter == "callgrind":
        return None if shutil.which("valgrind") else "valgrind not on PATH (apt-get install valgrind)"
    if counter == "perf":
        if not shutil.which("perf"):
            return "perf not on PATH (Debian: apt-get install linux-perf)"
        r = subprocess.run(["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True,
                           text=True)
        if r.returncode or "<not supported>" in r.stderr or "<not counted>" in r.stderr:
            return "perf stat -e instructions: not supported on this CPU/VM"
        return None
    return f"unknown counter {counter!r}"


def count(counter: str, mode: str, kind: str, size: int, packets: int, c_loops: bool) -> tuple:
    """(instructions or None, the worker's own result) for one run."""
    argv = _worker_argv(mode, kind, size, packets)
    env = _worker_env(c_loops)
    with tempfile.TemporaryDirectory(prefix="mpvpn-cost-") as tmp:
        if counter == "callgrind":
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out"] + argv
        elif counter == "perf":
            argv = ["perf", "stat", "-x,", "-e", "instructions:u", "-o", f"{tmp}/perf.out"] + argv
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr[-2000:]}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        if counter == "callgrind":
            m = re.search(r"Collected\s*:\s*(\d+)", r.stderr)
            if not m:
                raise RuntimeError(f"no instruction count in valgrind's output:\n{r.stderr[-2000:]}")
            return int(m.group(1)), result
        if counter == "perf":
            for line in Path(f"{tmp}/perf.out").read_text().splitlines():
                f = line.split(",")
                if len(f) > 2 and f[2].startswith("instructions") and f[0].isdigit():
                    return int(f[0]), result
            raise RuntimeError("no instruction count in perf's output")
        return None, result


def cost_row(counter: str, mode: str, kind: str, size: int, c_loops: bool, n1: int, n2: int) -> dict:
    t0 = time.monotonic()
    i1, r1 = count(counter, mode, kind, size, n1, c_loops)
    i2, r2 = count(counter, mode, kind, size, n2, c_loops)
    dn = r2["packets"] - r1["packets"]
    per = (lambda k: (r2[k] - r1[k]) / dn)
    row = {"mode": mode, "kind": kind, "size": size, "c_loops": r2["c_loops"], "subflows": SUBFLOWS,
           "counter": counter, "n1": n1, "n2": n2, "instructions_n1": i1, "instructions_n2": i2,
           "instructions_per_packet": (i2 - i1) / dn if i1 is not None else None,
           "datagrams_per_packet": per("datagrams"), "wire_bytes_per_packet": per("wire_bytes"),
           "tun_reads_per_packet": per("tun_reads"), "tun_writes_per_packet": per("tun_writes"),
           "delivered_n2": r2["delivered"], "delivered_share": r2["delivered"] / r2["packets"],
           "wall_s": time.monotonic() - t0}
    if c_loops and not r2["c_loops"]:
        row["note"] = "C loops asked for but not built (make fastpath)"
    ipp = row["instructions_per_packet"]
    row["extrapolated"] = {}
    if ipp:
        # one router does the sender's and the receiver's work for each
        # packet here (both ends are in this count): a conservative figure
        # for one direction of bulk traffic, where a router does one of them
        row["mbit_per_ginstr"] = size * 8 / ipp * 1e9 / 1e6
        for name, hz, ipc in TARGETS:
            pps = hz * ipc / ipp
            row["extrapolated"][name] = {"ipc": ipc, "hz": hz, "pps": pps, "mbit": pps * size * 8 / 1e6}
    return row


# -- CPU-capped lab run ----------------------------------------------------------------

class CpuCap:
    """A child cgroup whose processes share ``percent`` % of one core (CFS
    bandwidth: quota per 100 ms period).  cgroup v2 where the unified
    hierarchy has the cpu controller (``cpu.max``), else the v1 cpu
    hierarchy (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).  Removed on close
    (its processes moved back to the root group first)."""

    PERIOD = 100_000

    def __init__(self, name: str, percent: float):
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/cpu")
        quota = int(self.PERIOD * percent / 100)
        controllers = v2 / "cgroup.controllers"  # present when /sys/fs/cgroup is the unified hierarchy
        if controllers.exists() and "cpu" in controllers.read_text().split():
            ctl = (v2 / "cgroup.subtree_control")
            if "cpu" not in ctl.read_text().split():
                ctl.write_text("+cpu")
            self.root, self.path = v2, v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD}")
            self.how = f"cgroup v2 cpu.max \"{quota} {self.PERIOD}\""
        elif (v1 / "cpu.cfs_quota_us").exists():
            self.root, self.path = v1, v1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            self.how = f"cgroup v1 cpu.cfs_quota_us {quota} / cpu.cfs_period_us {self.PERIOD}"
        else:
            raise OSError("no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us)")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled(self) -> int:
        m = re.search(r"nr_throttled (\d+)", (self.path / "cpu.stat").read_text())
        return int(m.group(1)) if m else 0

    def close(self) -> None:
        if not self.path.exists():
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self.root / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # exited meanwhile
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def capped_iperf(lab, pids_a: list, pids_b: list, percent: float, seconds: float) -> dict:
    """iperf3 TCP ha -> hb with site A's and site B's tunnel processes each
    in their own cgroup capped at ``percent`` % of one core."""
    from agent import iperf

    tag = f"mpvpn-cost-{os.getpid()}"
    caps = [CpuCap(f"{tag}-a", percent), CpuCap(f"{tag}-b", percent)]
    try:
        for cap, pids in zip(caps, (pids_a, pids_b)):
            for p in pids:
                cap.add(p)
        t0 = [c.throttled() for c in caps]
        bps, nbytes = iperf(lab, lab.ha, lab.hb, "192.168.20.2", seconds, omit=1)
        return {"cap_percent": percent, "mbit": bps / 1e6, "bytes": nbytes, "cgroup": caps[0].how,
                "throttled_periods": [c.throttled() - t for c, t in zip(caps, t0)]}
    finally:
        for c in caps:
            c.close()


# -- peers in the lab ------------------------------------------------------------------

def find_peer(name: str) -> str | None:
    """A peer's program: the environment variable (GLORYTUN=/path ...) or PATH."""
    exe = os.environ.get(name.upper().replace("-", "_"))
    if exe:
        return exe if os.access(exe, os.X_OK) else None
    return shutil.which(name)


PEER_PROGRAMS = {"glorytun": ("glorytun",),
                 "engarde": ("engarde-client", "engarde-server", "wireguard-go")}


def peer_missing(peer: str) -> str | None:
    missing = [p for p in PEER_PROGRAMS[peer] if find_peer(p) is None]
    if missing:
        return (f"{peer}: not found ({', '.join(missing)}: put on PATH or set "
                f"{', '.join(p.upper().replace('-', '_') for p in missing)}=/path)")
    return None


def _wait_dev(lab, ns: str, dev: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if lab.run(ns, ["ip", "link", "show", dev], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{dev} did not appear in {ns}")


def _tunnel_routes(lab, dev_a: str, dev_b: str, net: str) -> None:
    """Addresses on both tunnel devices and the routes between the LANs."""
    for ns, dev, me, lan in ((lab.ra, dev_a, f"{net}.1", "192.168.20.0/24"),
                             (lab.rb, dev_b, f"{net}.2", "192.168.10.0/24")):
        lab.run(ns, ["ip", "addr", "add", f"{me}/30", "dev", dev])
        lab.run(ns, ["ip", "link", "set", dev, "up"])
        lab.run(ns, ["ip", "route", "add", lan, "dev", dev])


class Glorytun:
    """glorytun 0.3.x between ra (client, one path per carrier address) and
    rb (server), one shared key, as its systemd/glorytun-setup does."""

    def __init__(self, lab, carriers: int, work: Path):
        exe = find_peer("glorytun")
        key = work / "gt.key"
        key.write_text(subprocess.run([exe, "keygen"], capture_output=True, text=True,
                                      check=True).stdout)
        self.procs = []
        self.b = lab.popen(lab.rb, [exe, "bind", "0.0.0.0", "5000", "dev", "gtb", "keyfile", str(key)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.a = lab.popen(lab.ra, [exe, "bind", "0.0.0.0", "5000", "to", "10.1.0.2", "5000", "dev", "gta",
                                    "keyfile", str(key)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = [self.a, self.b]
        _wait_dev(lab, lab.ra, "gta")
        _wait_dev(lab, lab.rb, "gtb")
        for i in range(1, carriers + 1):
            lab.run(lab.ra, [exe, "path", "up", f"10.{i}.0.1", "dev", "gta",
                             "rate", "fixed", "tx", "125000000", "rx", "125000000"])
        _tunnel_routes(lab, "gta", "gtb", "172.31.0")
        self.pids_a, self.pids_b = [self.a.pid], [self.b.pid]

    def close(self, lab) -> None:
        for p in self.procs:
            lab.stop(p)


class Engarde:
    """engarde (duplicates every WireGuard datagram over every carrier) in
    front of wireguard-go on each router: ra runs engarde-client, rb
    engarde-server, each next to a wireguard-go configured over its UAPI
    socket (what wg(8) does)."""

    def __init__(self, lab, carriers: int, work: Path):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def keypair():
            k = X25519PrivateKey.generate()
            return k.private_bytes_raw().hex(), k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

        tag = os.getpid() % 100000
        self.dev_a, self.dev_b = f"wga{tag}", f"wgb{tag}"
        wg = find_peer("wireguard-go")
        self.wa = lab.popen(lab.ra, [wg, "-f", self.dev_a], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wb = lab.popen(lab.rb, [wg, "-f", self.dev_b], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = [self.wa, self.wb]
        _wait_dev(lab, lab.ra, self.dev_a)
        _wait_dev(lab, lab.rb, self.dev_b)
        (ska, pka), (skb, pkb) = keypair(), keypair()
        self._uapi(self.dev_a, f"private_key={ska}\nlisten_port=51820\nreplace_peers=true\n"
                               f"public_key={pkb}\nendpoint=127.0.0.1:59401\npersistent_keepalive_interval=1\n"
                               "allowed_ip=192.168.20.0/24\nallowed_ip=172.31.1.0/30\n")
        self._uapi(self.dev_b, f"private_key={skb}\nlisten_port=59301\nreplace_peers=true\n"
                               f"public_key={pka}\nallowed_ip=192.168.10.0/24\nallowed_ip=172.31.1.0/30\n")
        overrides = "".join(f"    - ifName: c{i}\n      dstAddr: \"10.{i}.0.2:59501\"\n"
                            for i in range(2, carriers + 1))
        cfg = work / "engarde.yml"
        cfg.write_text("client:\n  description: bench\n  listenAddr: \"127.0.0.1:59401\"\n"
                       "  dstAddr: \"10.1.0.2:59501\"\n  writeTimeout: 10\n"
                       f"  excludedInterfaces: [lo, lan, {self.dev_a}]\n"
                       f"  dstOverrides:\n{overrides}"
                       "server:\n  description: bench\n  listenAddr: \"0.0.0.0:59501\"\n"
                       "  dstAddr: \"127.0.0.1:59301\"\n  clientTimeout: 30\n  writeTimeout: 10\n")
        self.eb = lab.popen(lab.rb, [find_peer("engarde-server"), str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        self.ea = lab.popen(lab.ra, [find_peer("engarde-client"), str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        self.procs += [self.ea, self.eb]
        _tunnel_routes(lab, self.dev_a, self.dev_b, "172.31.1")
        self.pids_a, self.pids_b = [self.ea.pid, self.wa.pid], [self.eb.pid, self.wb.pid]

    @staticmethod
    def _uapi(dev: str, conf: str) -> None:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            for _ in range(50):
                try:
                    s.connect(f"/var/run/wireguard/{dev}.sock")
                    break
                except OSError:
                    time.sleep(0.1)
            s.sendall(b"set=1\n" + conf.encode() + b"\n")
            reply = s.recv(4096).decode()
        if "errno=0" not in reply:
            raise RuntimeError(f"wireguard-go {dev}: {reply.strip()}")

    def close(self, lab) -> None:
        for p in self.procs:
            lab.stop(p)


def capped_runs(caps: list, peers: list, seconds: float, carriers: int = 3) -> tuple:
    """Rows of the CPU-capped lab run, and the reasons for anything skipped."""
    from agentlab import TwoSites
    from netlab import Lab

    rows, skipped = [], []
    with Lab(carriers) as lab, tempfile.TemporaryDirectory(prefix="mpvpn-cost-") as tmp:
        for fast in ("on", "off"):
            os.environ["MPVPN_FASTPATH"] = "1" if fast == "on" else "0"
            with TwoSites(lab, carriers=carriers, extra_base="\toption mode 'duplicate'\n") as ts:
                ts.start(subflows=carriers)
                for pct in caps:
                    r = capped_iperf(lab, [ts.a.proc.pid], [ts.b.proc.pid], pct, seconds)
                    rows.append({"tunnel": f"mpvpn (duplicate x{carriers}, AEAD, C loops {fast})", **r})
        os.environ.pop("MPVPN_FASTPATH", None)
        for peer in peers:
            why = peer_missing(peer)
            if why:
                skipped.append(why)
                continue
            try:
                t = (Glorytun if peer == "glorytun" else Engarde)(lab, carriers, Path(tmp))
            except Exception as e:  # a peer that does not come up is reported, not fatal
                skipped.append(f"{peer}: did not start ({e})")
                continue
            try:
                if not any(lab.reachable(lab.ha, "192.168.20.2", timeout=1.0) for _ in range(15)):
                    skipped.append(f"{peer}: started but 192.168.20.2 not reachable through it")
                    continue
                label = ("glorytun 0.3.4 (AEGIS-256/ChaCha20, mud multipath)" if peer == "glorytun"
                         else f"engarde + wireguard-go (duplicate x{carriers})")
                for pct in caps:
                    rows.append({"tunnel": label, **capped_iperf(lab, t.pids_a, t.pids_b, pct, seconds)})
            finally:
                t.close(lab)
    return rows, skipped


# -- main ------------------------------------------------------------------------------

def _csv(s: str) -> list:
    return [x for x in s.split(",") if x]


def print_cost_header() -> None:
    names = [t[0].split(" (")[0] for t in TARGETS]
    print(f"{'mode':>9} {'kind':>4} {'size':>5} {'C':>3} {'instr/pkt':>10} {'dgrams':>6} {'wire B':>7} "
          f"{'Mbit/Ginstr':>11} " + " ".join(f"{n + ' Mbit/s':>14}" for n in names))


def print_cost(rows: list) -> None:
    for r in rows:
        ipp = r["instructions_per_packet"]
        ext = [r["extrapolated"].get(t[0], {}).get("mbit") for t in TARGETS]
        print(f"{r['mode']:>9} {r['kind']:>4} {r['size']:>5} {'on' if r['c_loops'] else 'off':>3} "
              f"{'-' if ipp is None else f'{ipp:,.0f}':>10} {r['datagrams_per_packet']:>6.2f} "
              f"{r['wire_bytes_per_packet']:>7.0f} "
              f"{'-' if ipp is None else format(r['mbit_per_ginstr'], '.1f'):>11} "
              + " ".join(f"{'-' if m is None else format(m, '.1f'):>14}" for m in ext))


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        mode, kind, size, packets = sys.argv[2:6]
        print(json.dumps(run_path(mode, kind, int(size), int(packets))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counter", default="callgrind", choices=("callgrind", "perf", "none"),
                    help="what counts instructions; none: run the path uncounted (default callgrind)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--kinds", default=",".join(KINDS), help="tcp (super-segments), udp (plain packets)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--fastpath", default="on,off", help="the C loops (MPVPN_FASTPATH): on, off")
    ap.add_argument("--n1", type=int, default=100, help="user packets of the short run")
    ap.add_argument("--n2", type=int, default=400, help="user packets of the long run")
    ap.add_argument("--jobs", type=int, default=2, help="counting runs side by side (default 2)")
    ap.add_argument("--capped", action="store_true", help="also the CPU-capped lab run (root, iperf3)")
    ap.add_argument("--caps", default="10,25", help="percent of one core per agent, comma-separated")
    ap.add_argument("--peers", default="glorytun,engarde", help="peers for the capped run ('' for none)")
    ap.add_argument("--seconds", type=float, default=8.0, help="iperf3 seconds per capped row")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.n2 <= args.n1:
        ap.error("--n2 must be larger than --n1")
    out = {"bench": "cost", "python": platform.python_version(), "machine": platform.machine(),
           "subflows": SUBFLOWS, "method": {}, "targets": [
               {"name": n, "hz": hz, "ipc_assumed": ipc} for n, hz, ipc in TARGETS],
           "rows": [], "capped": [], "skipped": []}
    counter = args.counter
    why = counter_unavailable(counter)
    if why:
        print(f"{counter}: {why}; counting with callgrind instead" if counter == "perf" else why,
              file=sys.stderr)
        out["skipped"].append(f"counter {counter}: {why}")
        counter = "callgrind" if counter == "perf" and not counter_unavailable("callgrind") else "none"
    out["method"]["counter"] = counter
    out["method"]["instructions_per_packet"] = "(I(n2) - I(n1)) / (n2 - n1), one process, both ends"
    if counter == "perf":
        out["method"]["perf"] = "perf stat -e instructions:u (user space only)"
    print(f"router CPU cost: {SUBFLOWS} subflows, AEAD, in-process sender + receiver, counter {counter}, "
          f"n1={args.n1} n2={args.n2}, Python {platform.python_version()} {platform.machine()}")
    print_cost_header()
    configs = [(mode, kind, size, fast == "on") for fast in _csv(args.fastpath) for mode in _csv(args.modes)
               for kind in _csv(args.kinds) for size in map(int, _csv(args.sizes))]
    # counts do not depend on what else runs, so configurations run side by side
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(lambda c: cost_row(counter, *c, args.n1, args.n2), configs):
            out["rows"].append(row)
            print_cost([row])
            sys.stdout.flush()
    print("extrapolated Mbit/s = clock x assumed IPC / (instr/pkt) x packet bits; assumed IPC "
          + ", ".join(f"{n.split(' (')[0]} {ipc}" for n, _hz, ipc in TARGETS))
    if args.capped:
        if os.geteuid() != 0 or not shutil.which("iperf3"):
            why = "capped run needs root and iperf3 (apt-get install iperf3)"
            print(why, file=sys.stderr)
            out["skipped"].append(why)
        else:
            caps = [float(c) for c in _csv(args.caps)]
            rows, skipped = capped_runs(caps, _csv(args.peers), args.seconds)
            out["capped"], out["skipped"] = rows, out["skipped"] + skipped
            print(f"\nCPU-capped lab run: iperf3 TCP {args.seconds:.0f} s, each site's tunnel processes "
                  f"in one cgroup ({rows[0]['cgroup'] if rows else '-'})")
            print(f"{'tunnel':<56}{'cap':>6}{'Mbit/s':>9}{'Mbit/s per GHz-eq':>19}")
            for r in rows:
                # one core at p % is p/100 of this machine's clock: scale to 1 GHz
                r["mbit_per_ghz_equiv"] = r["mbit"] / (r["cap_percent"] / 100 * host_ghz())
                print(f"{r['tunnel']:<56}{r['cap_percent']:>5.0f}%{r['mbit']:>9.1f}"
                      f"{r['mbit_per_ghz_equiv']:>19.1f}")
            out["host_ghz"] = host_ghz()
    for s in out["skipped"]:
        print(f"skipped: {s}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def host_ghz() -> float:
    """This machine's CPU clock in GHz (/proc/cpuinfo's "cpu MHz", first core)."""
    m = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
    return float(m.group(1)) / 1000 if m else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
