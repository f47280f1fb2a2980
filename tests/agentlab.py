"""Two real agents in the namespace lab: site A (client) in ``ra``, site B
(server) in ``rb``, with the configuration of issue 4 written as UCI files.
Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CARRIERS = ("telecom", "unicom", "mobile")
# Waits for a state end-to-end tests expect are limits for a hung agent, not
# speed goals (those are in bench/ and in the fake-clock unit tests).
WAIT_SCALE = float(os.environ.get("MPVPN_TEST_WAIT_SCALE", "4"))


def site_config(role: str, psk: str, idx: int, vnc: str, lan: str, carriers: int = 3,
                extra_base: str = "", v6_carriers=(), lan6: str | None = None) -> tuple[str, str]:
    """(orayboxvpn, network) UCI texts of one site, as in issue 4."""
    base = f"config base 'base'\n\toption role '{role}'\n"
    if role == "client":
        base += "\toption server_address '10.1.0.2:7000'\n"
    else:
        base += "\toption listen_address '0.0.0.0:7000'\n"
    base += f"\toption psk '{psk}'\n{extra_base}"
    text = base + f"\nconfig vnc 'vnc'\n\toption ipaddr '{vnc}'\n\toption netmask '255.255.255.252'\n"
    for i, name in enumerate(CARRIERS[:carriers], start=1):
        addr = f"fd00:{i:x}::{idx}" if i in v6_carriers else f"10.{i}.0.{idx}"
        text += f"\nconfig smpu '{name}'\n\toption type '{name}'\n\toption bind_ip '{addr}'\n"
    network = ("config interface 'lan'\n\toption device 'br-lan'\n\toption proto 'static'\n"
               f"\toption ipaddr '{lan}'\n\toption netmask '255.255.255.0'\n")
    if lan6:
        network += f"\toption ip6addr '{lan6}'\n"
    return text, network


class Site:
    """One agent process in a lab namespace."""

    def __init__(self, lab, ns: str, workdir: Path, name: str):
        self.lab, self.ns, self.name = lab, ns, name
        self.uci_dir = workdir / f"{name}-config"
        self.run_dir = workdir / f"{name}-run"
        self.log_path = workdir / f"{name}.log"
        self.uci_dir.mkdir(parents=True, exist_ok=True)
        self.proc = None

    def write(self, orayboxvpn: str, network: str) -> None:
        (self.uci_dir / "orayboxvpn").write_text(orayboxvpn)
        (self.uci_dir / "network").write_text(network)

    def start(self, env_extra: dict | None = None, args_extra: tuple = ()) -> None:
        self.logf = open(self.log_path, "a")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env_extra or {}))
        self.proc = self.lab.popen(self.ns, [PYTHON, "-m", "mpvpn", "run", "--uci-dir", str(self.uci_dir),
                                             "--run-dir", str(self.run_dir), *args_extra],
                                   stdout=self.logf, stderr=subprocess.STDOUT, env=env)

    def run_once(self, run_dir: Path | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run another ``mpvpn run`` with this site's config (and ``run_dir``,
        default this site's) to its end; for agents that must refuse to start."""
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        return self.lab.run(self.ns, [PYTHON, "-m", "mpvpn", "run", "--uci-dir", str(self.uci_dir),
                                      "--run-dir", str(run_dir or self.run_dir)],
                            timeout=timeout, check=False, env=env)

    def stop(self, sig: str = "TERM") -> int | None:
        if self.proc is None:
            return None
        if sig == "KILL":
            self.proc.kill()
            rc = self.proc.wait(5)
        else:
            self.proc.terminate()
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        self.proc = None
        self.logf.close()
        return rc

    def status(self) -> dict | None:
        from mpvpn.io import rpc

        try:
            return rpc.call(rpc.socket_path(str(self.run_dir)), "status", timeout=2.0)
        except (rpc.RpcError, OSError):  # OSError: the agent closed the socket mid-call (restart)
            return None

    def wait(self, pred, timeout: float = 15.0, what: str = "condition") -> dict:
        """Poll the status until ``pred`` holds.  The timeout is not a speed
        goal: it is stretched by WAIT_SCALE, so a busy machine only waits longer."""
        end = time.monotonic() + timeout * WAIT_SCALE
        st = None
        while time.monotonic() < end:
            st = self.status()
            if st is not None and pred(st):
                return st
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} agent exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: timed out waiting for {what}; last status {st}\n{self.log()}")

    def wait_connected(self, subflows: int = 3, timeout: float = 15.0) -> dict:
        def ok(st):
            return st["state"] == "connected" and sum(
                1 for ln in st["links"] if ln["state"] == "established") >= subflows
        return self.wait(ok, timeout, f"connected with {subflows} subflows")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""


class TwoSites:
    """Site A (client, ra) and site B (server, rb) with a shared PSK."""

    def __init__(self, lab, psk: str | None = None, psk_b: str | None = None, carriers: int = 3,
                 extra_base: str = "", v6_carriers=(), lan6: bool = False):
        from mpvpn.core.noise import genpsk

        self.lab = lab
        self._tmp = tempfile.TemporaryDirectory(prefix="mpvpn-e2e-")
        work = Path(self._tmp.name)
        psk = psk or genpsk()
        self.a = Site(lab, lab.ra, work, "a")
        self.b = Site(lab, lab.rb, work, "b")
        self.a.write(*site_config("client", psk, 1, "172.30.0.1", "192.168.10.1", carriers, extra_base,
                                  v6_carriers, "fd10::1/64" if lan6 else None))
        self.b.write(*site_config("server", psk_b or psk, 2, "172.30.0.2", "192.168.20.1", carriers,
                                  extra_base, v6_carriers, "fd20::1/64" if lan6 else None))

    def start(self, wait: bool = True, subflows: int = 3, env_extra: dict | None = None) -> None:
        self.b.start(env_extra)
        self.b.wait(lambda st: True, 10, "server up")
        self.a.start(env_extra)
        if wait:
            self.a.wait_connected(subflows)
            self.b.wait_connected(subflows)

    def close(self) -> None:
        for s in (self.a, self.b):
            if s.proc is not None:
                s.stop()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- traffic helpers run inside the lab hosts ------------------------------------------

RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

SENDER = r"""
import hashlib, random, socket, sys, time
dst, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42); h = hashlib.sha256(); s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if len(sys.argv) > 4:  # TCP congestion control (root may pick any the kernel has)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[4].encode())
s.settimeout(30); s.connect((dst, port))
t0 = time.monotonic(); sent = 0
while sent < total:
    b = rng.randbytes(min(1 << 16, total - sent)); s.sendall(b); h.update(b); sent += len(b)
s.shutdown(socket.SHUT_WR); s.recv(1); dt = time.monotonic() - t0
print(sent, h.hexdigest(), dt, flush=True)
"""

# The sinks ask for a big receive buffer (root may exceed rmem_max): on a busy
# machine a sink can be off the CPU for a while, and what the tunnel delivered
# meanwhile must wait in the socket, not be dropped there and counted as loss.
UDP_SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
except OSError: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(60); seen = set(); dups = 0
print("ready", flush=True)
try:
    while True:
        d, _ = s.recvfrom(2048); i = int.from_bytes(d[:4], "big"); s.settimeout(float(sys.argv[3]))
        dups += i in seen; seen.add(i)
except socket.timeout:
    pass
print(len(seen), dups, max(seen) if seen else -1, flush=True)
"""

# Per packet: its number, when UDP_SOURCE sent it and when it arrived here
# (CLOCK_MONOTONIC: one clock for every namespace of the machine), as JSON
# (bench/failover.py draws its timeline from it).
UDP_LATENCY_SINK = r"""
import json, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
except OSError: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(60); got = {}; dups = 0
print("ready", flush=True)
try:
    while True:
        d, _ = s.recvfrom(2048); now = time.monotonic(); s.settimeout(float(sys.argv[3]))
        i, sent = struct.unpack_from("!Id", d)
        if i in got: dups += 1
        else: got[i] = (sent, now)
except socket.timeout:
    pass
print(json.dumps({"dups": dups, "packets": sorted([i, *v] for i, v in got.items())}), flush=True)
"""

UDP_SOURCE = r"""
import socket, struct, sys, time
dst, port, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); t0 = time.monotonic()
for i in range(count):
    s.sendto(struct.pack("!Id", i, time.monotonic()) + bytes(188), (dst, port))
    delay = t0 + (i + 1) / rate - time.monotonic()
    if delay > 0: time.sleep(delay)
print(count, flush=True)
"""


UDP_STREAM = r"""
import socket, sys, threading, time
dst, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); t0 = time.monotonic(); i = 0
while not stop.is_set():
    s.sendto(i.to_bytes(4, "big") + bytes(96), (dst, port)); i += 1
    delay = t0 + i / rate - time.monotonic()
    if delay > 0: time.sleep(delay)
print(i, flush=True)
"""


class Stream:
    """A numbered UDP stream from ``src_ns`` to ``dst_ip:port`` in ``dst_ns`` at
    ``rate`` packets/s, from :meth:`start` until :meth:`stop`, which returns
    (sent, received, duplicates): every packet is counted, none is in flight
    when the count is taken (the receiver waits ``quiet`` s of silence)."""

    def __init__(self, lab, src_ns: str, dst_ns: str, dst_ip: str, port: int, rate: float = 200.0,
                 quiet: float = 5.0):
        self.lab, self.src_ns, self.dst_ns = lab, src_ns, dst_ns
        self.dst_ip, self.port, self.rate, self.quiet = dst_ip, port, rate, quiet

    def start(self) -> "Stream":
        self.sink = self.lab.python_popen(self.dst_ns, UDP_SINK, self.dst_ip, str(self.port), str(self.quiet),
                                          stdout=subprocess.PIPE, text=True)
        assert self.sink.stdout.readline().strip() == "ready"
        self.src = self.lab.python_popen(self.src_ns, UDP_STREAM, self.dst_ip, str(self.port), str(self.rate),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def stop(self) -> tuple[int, int, int]:
        out, _ = self.src.communicate("", timeout=30)
        sent = int(out.strip())
        out, _ = self.sink.communicate(timeout=30 + self.quiet)
        got, dups, _last = map(int, out.split())
        return sent, got, dups


def tcp_transfer(lab, nbytes: int, timeout: float = 120.0,
                 cc: str | None = None) -> tuple[int, str, int, str, float]:
    """Send ``nbytes`` from ha to hb over TCP (congestion control ``cc``, default
    the host's); returns (sent, sha_sent, received, sha_received, seconds)."""
    rx = lab.python_popen(lab.hb, RECEIVER, "192.168.20.2", "5001", stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    tx = lab.python(lab.ha, SENDER, "192.168.20.2", "5001", str(nbytes), *([cc] if cc else []),
                    timeout=timeout)
    sent, sha_tx, secs = tx.stdout.split()
    out, _ = rx.communicate(timeout=30)
    got, sha_rx = out.split()
    return int(sent), sha_tx, int(got), sha_rx, float(secs)
