"""Userspace delay / jitter / reorder forwarder for the netlab (no netem needed).

Runs inside the lab's ``wan`` namespace and bridges two interfaces at layer 2
with AF_PACKET raw sockets: every frame received on interface A is sent out of
interface B after ``delay +- jitter`` ms, and vice versa.  The two directions
are configured independently:

* ``a2b``: frames received on the A interface (coming from router A) that go
  out of the B interface (towards router B); ``b2a`` the reverse.

Modes per direction:

* ``reorder=False`` (default): FIFO.  Each frame draws its own delay but is
  never released before the frame ahead of it, so jitter is absorbed into
  queueing and order is kept (like a real serial link).
* ``reorder=True``: each frame is scheduled independently, so frames whose
  delays differ by more than their spacing overtake each other.

Jitter distribution ``uniform`` (delay +- jitter) or ``normal`` (sigma =
jitter, clipped to +-2 sigma); the result is never below zero.

A frame's delay counts from its arrival in the kernel (SO_TIMESTAMPNS), not
from when the shim got round to reading it.

Frames are read with a virtio-net header (PACKET_VNET_HDR) and written back
with the same header, so the kernel's GSO super-frames and partial checksums
pass through untouched: a TCP stream costs one Python operation per 64 KiB
super-frame, not per 1500-byte segment.

Protocol (stdin/stdout, one JSON object per line):
    -> {"cmd": "set", "dir": "a2b"|"b2a"|"both", "delay": ms, "jitter": ms,
        "reorder": bool, "dist": "uniform"|"normal"}      <- {"ok": true}
    -> {"cmd": "stats"}          <- {"ok": true, "a2b": {...}, "b2a": {...}}
       (per direction: the configuration, frames forwarded/dropped, and
       ``late_max_ms`` / ``late_avg_ms``: how much later than due the shim
       sent frames, e.g. when a busy machine kept it off the CPU)
    -> {"cmd": "quit"}           (or EOF on stdin) -> exits
At start-up, once both sockets are bound, the shim prints {"ready": true}.

Usage: python shim.py IF_A IF_B [--delay MS] [--jitter MS] [--reorder]
       [--dist uniform|normal] [--seed N]
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import socket
import struct
import sys
import time

SOL_PACKET = 263
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
VNET_HDR_LEN = 10

# Bound on frames queued per direction (memory safety valve; at 50 Mbit/s and
# 200 ms that is ~900 full-size frames, so this never triggers in practice).
MAX_QUEUED_FRAMES = 50000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Frames drained from one socket per loop iteration before timers are served.
RX_BATCH = 256
BUF_SIZE = 256 * 1024


class Direction:
    __slots__ = ("name", "rx", "tx", "delay", "jitter", "reorder", "dist",
                 "last_due", "queued", "queued_bytes", "fwd", "dropped",
                 "send_errors", "bytes", "late_max", "late_sum", "late_n")

    def __init__(self, name: str, rx: socket.socket, tx: socket.socket):
        self.name = name
        self.rx = rx
        self.tx = tx
        self.delay = 0.0       # seconds
        self.jitter = 0.0      # seconds
        self.reorder = False
        self.dist = "uniform"
        self.last_due = 0.0
        self.queued = 0
        self.queued_bytes = 0
        self.fwd = 0
        self.dropped = 0
        self.send_errors = 0
        self.bytes = 0
        self.late_max = 0.0  # seconds a delayed frame left after its due time
        self.late_sum = 0.0
        self.late_n = 0

    def configure(self, delay_ms: float, jitter_ms: float, reorder: bool, dist: str) -> None:
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        if dist not in ("uniform", "normal"):
            raise ValueError(f"unknown dist {dist!r}")
        self.delay = delay_ms / 1000.0
        self.jitter = jitter_ms / 1000.0
        self.reorder = bool(reorder)
        self.dist = dist

    def sample(self, rng: random.Random) -> float:
        d = self.delay
        j = self.jitter
        if j > 0:
            if self.dist == "uniform":
                d += rng.uniform(-j, j)
            else:
                x = rng.gauss(0.0, j)
                lim = 2.0 * j
                d += lim if x > lim else (-lim if x < -lim else x)
        return d if d > 0 else 0.0

    def stats(self) -> dict:
        return {"delay_ms": self.delay * 1000, "jitter_ms": self.jitter * 1000,
                "reorder": self.reorder, "dist": self.dist, "forwarded": self.fwd,
                "bytes": self.bytes, "dropped": self.dropped,
                "send_errors": self.send_errors, "queued": self.queued,
                "late_max_ms": round(self.late_max * 1000, 3),
                "late_avg_ms": round(self.late_sum / self.late_n * 1000, 3) if self.late_n else 0.0}


def open_sock(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    # Do not see the frames we ourselves transmit on this interface.
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    try:
        s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    except OSError:
        pass
    for opt, size in ((socket.SO_RCVBUF, 8 << 20), (socket.SO_SNDBUF, 8 << 20)):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind((ifname, ETH_P_ALL))
    s.setblocking(False)
    return s


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("if_a")
    ap.add_argument("if_b")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay ms (both directions)")
    ap.add_argument("--jitter", type=float, default=0.0, help="jitter ms (both directions)")
    ap.add_argument("--reorder", action="store_true")
    ap.add_argument("--dist", default="uniform", choices=("uniform", "normal"))
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    sa = open_sock(args.if_a)
    sb = open_sock(args.if_b)
    a2b = Direction("a2b", sa, sb)
    b2a = Direction("b2a", sb, sa)
    dirs = {"a2b": a2b, "b2a": b2a}
    for d in dirs.values():
        d.configure(args.delay, args.jitter, args.reorder, args.dist)
    by_fd = {sa.fileno(): a2b, sb.fileno(): b2a}

    stdin_fd = sys.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    stdin_buf = b""

    heap: list = []          # (due, seq, Direction, frame)
    seq = 0
    buf = bytearray(BUF_SIZE)
    view = memoryview(buf)
    now = time.monotonic
    stamp = struct.Struct("@qq")

    def arrived(anc) -> float:
        """The kernel's receive time of a frame, on the monotonic clock."""
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= stamp.size:
                sec, nsec = stamp.unpack_from(data)
                t = now()
                return min(t, sec + nsec / 1e9 - (time.time() - t))
        return now()
    rfds = [sa.fileno(), sb.fileno(), stdin_fd]
    reply({"ready": True, "pid": os.getpid()})

    def send(d: Direction, frame: bytes) -> None:
        try:
            d.tx.send(frame)
            d.fwd += 1
            d.bytes += len(frame) - VNET_HDR_LEN
        except BlockingIOError:
            d.dropped += 1
        except OSError as e:  # peer down (ENETDOWN, ENXIO), buffer full ...
            if e.errno not in (errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS, errno.EAGAIN):
                raise
            d.send_errors += 1

    def handle_cmd(line: bytes) -> bool:
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "set":
                which = msg.get("dir", "both")
                targets = [a2b, b2a] if which == "both" else [dirs[which]]
                for d in targets:
                    d.configure(float(msg.get("delay", 0)), float(msg.get("jitter", 0)),
                                bool(msg.get("reorder", False)), msg.get("dist", "uniform"))
                    d.last_due = 0.0
                reply({"ok": True})
            elif cmd == "stats":
                reply({"ok": True, "a2b": a2b.stats(), "b2a": b2a.stats()})
            elif cmd == "quit":
                reply({"ok": True})
                return False
            else:
                reply({"ok": False, "error": f"unknown cmd {cmd!r}"})
        except Exception as e:  # noqa: BLE001 - report, keep forwarding
            reply({"ok": False, "error": repr(e)})
        return True

    running = True
    while running:
        if heap:
            timeout = heap[0][0] - now()
            if timeout < 0:
                timeout = 0
        else:
            timeout = None
        try:
            ready, _, _ = select.select(rfds, [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            if fd == stdin_fd:
                try:
                    chunk = os.read(stdin_fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    running = False
                    break
                stdin_buf += chunk
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    if line.strip() and not handle_cmd(line):
                        running = False
                continue
            d = by_fd[fd]
            rx = d.rx
            for _ in range(RX_BATCH):
                try:
                    n, anc, _flags, _addr = rx.recvmsg_into([buf], 256)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.ENETDOWN, errno.ENXIO):
                        break
                    raise
                frame = view[:n].tobytes()
                if d.delay == 0.0 and d.jitter == 0.0 and d.queued == 0:
                    send(d, frame)
                    continue
                if d.queued >= MAX_QUEUED_FRAMES or d.queued_bytes + n > MAX_QUEUED_BYTES:
                    d.dropped += 1
                    continue
                due = arrived(anc) + d.sample(rng)
                if not d.reorder:
                    if due < d.last_due:
                        due = d.last_due
                    d.last_due = due
                seq += 1
                d.queued += 1
                d.queued_bytes += n
                heapq.heappush(heap, (due, seq, d, frame))
        # Release everything that is due.
        if heap:
            t = now()
            while heap and heap[0][0] <= t:
                due, _, d, frame = heapq.heappop(heap)
                d.queued -= 1
                d.queued_bytes -= len(frame)
                send(d, frame)
                late = now() - due
                d.late_n += 1
                d.late_sum += late
                if late > d.late_max:
                    d.late_max = late
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
