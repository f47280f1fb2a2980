"""The tun vNIC: a tiny interface and its Linux implementation.

The agent only needs ``fileno()``, ``read()``, ``write()`` and ``close()``.
:class:`LinuxTun` creates the device itself: ``/dev/net/tun`` and the
``TUNSETIFF`` ioctl (``IFF_TUN | IFF_NO_PI``), as ``ip tuntap`` does; it is
not persistent, so it disappears with the process (a ``kill -9`` leaves no
interface or route behind).  Addresses, MTU and routes are set by
:mod:`mpvpn.io.netcfg`.  Tests use :class:`MemoryTun`.

Offloads: where the kernel allows, the device is opened with
``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` so that one write can carry a TCP
super-segment of up to 64 KiB (GRO, see :func:`mpvpn.io.offload.coalesce`) and,
with TSO, one read can return one (:func:`mpvpn.io.offload.split`).  The
environment variable ``MPVPN_TUN_OFFLOAD`` picks the mode: ``tso``
(super-segments read and written; the default when the C loops of
:mod:`mpvpn.core.fastpath` are built, which split and checksum them), ``gro``
(coalesced writes; reads stay one packet each, segmented and checksummed by
the kernel: the default in pure Python, where splitting costs more than the
kernel doing it, see bench/agent.py) or ``off``.  A kernel that refuses
falls back to ``off``.  The agent uses :meth:`read_packets` and :meth:`write_packets`,
which do the right thing in every mode.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import deque

from mpvpn.core import fastpath
from mpvpn.io import offload as _ofl

IFNAMSIZ = 16
MAX_PACKET = 65535
READ_SIZE = MAX_PACKET + _ofl.VNET_HDR_LEN
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0001, 0x1000, 0x4000, 0x0100
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags (ifr_flags), padding to 40 bytes
TUN_PATH = "/dev/net/tun"
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
OFFLOAD_MODES = ("tso", "gro", "off")


class TunError(OSError):
    pass


def open_tun(name: str, flags: int) -> tuple[int, str]:
    """Open ``/dev/net/tun`` and attach it to a (new) tun device ``name`` with
    ``flags`` (TUNSETIFF); returns the fd and the device's name."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd, IFREQ.unpack(res)[0].split(b"\0", 1)[0].decode()


def valid_ifname(name: str) -> bool:
    return (0 < len(name) < IFNAMSIZ and name not in (".", "..") and name.isascii()
            and all(c.isalnum() or c in "-_." for c in name))


class LinuxTun:
    """A non-persistent, non-blocking tun device (layer 3, no packet info);
    packets move with os.read/os.write on its fd.  ``queues`` > 1: a
    multi-queue device (IFF_MULTI_QUEUE) whose other queues
    :meth:`take_queue` hands out (one per data-path worker: the kernel
    sends each flow to the queue that last wrote a packet of it)."""

    def __init__(self, name: str, offload: str | None = None, queues: int = 1):
        if not valid_ifname(name):
            raise TunError(errno.EINVAL, f"invalid interface name {name!r}")
        if offload is None:
            # tso (super-segments read and written) when the C loops split
            # them; in pure Python splitting costs more than it saves: gro
            offload = os.environ.get("MPVPN_TUN_OFFLOAD") or ("tso" if fastpath.LOOPS is not None else "gro")
        if offload not in OFFLOAD_MODES:
            raise TunError(errno.EINVAL, f"invalid offload mode {offload!r} (one of {OFFLOAD_MODES})")
        self.offload = "off"  # what is in effect
        self.offload_error = ""  # why the requested mode was refused
        self._pending: deque = deque()  # segments of a super-segment not yet returned by read()
        self.split_errors = 0
        self._fd = -1
        self._queues: list[int] = []  # the other queues' fds, not handed out yet
        mq = IFF_MULTI_QUEUE if queues > 1 else 0
        if offload != "off":
            fd = -1
            try:
                fd, self.name = open_tun(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | mq)
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload == "tso" else 0)
                self._fd, self.offload = fd, offload
            except OSError as e:
                self.offload_error = str(e)
                if fd >= 0:
                    os.close(fd)  # not persistent: the device goes with it
        if self._fd < 0:
            try:
                self._fd, self.name = open_tun(name, IFF_TUN | IFF_NO_PI | mq)
            except OSError as e:
                raise TunError(e.errno or errno.EPERM, f"cannot create tun {name!r}: {e} "
                                                       "(is kmod-tun loaded? running as root?)") from None
        self.vnet_hdr = self.offload != "off"
        os.set_blocking(self._fd, False)
        try:
            for _ in range(queues - 1):  # same flags: the kernel refuses a queue that differs
                fd, _name = open_tun(self.name, IFF_TUN | IFF_NO_PI | mq
                                     | (IFF_VNET_HDR if self.vnet_hdr else 0))
                self._queues.append(fd)
        except OSError as e:
            self.close()
            raise TunError(e.errno or errno.EPERM, f"cannot open {queues} queues of tun "
                                                   f"{self.name!r}: {e}") from None

    def take_queue(self) -> int:
        """Another queue's fd (a multi-queue tun), now the caller's to close."""
        return self._queues.pop()

    @classmethod
    def adopt(cls, fd: int, name: str, offload: str) -> "LinuxTun":
        """The tun of another process of this agent (a data-path worker's copy
        of its file descriptor, mpvpn.agent.workers), in the offload mode
        that process set up (``offload``: what is in effect there)."""
        if offload not in OFFLOAD_MODES:
            raise TunError(errno.EINVAL, f"invalid offload mode {offload!r} (one of {OFFLOAD_MODES})")
        tun = cls.__new__(cls)
        tun.offload, tun.offload_error, tun.name = offload, "", name
        tun._pending, tun.split_errors, tun._fd, tun._queues = deque(), 0, fd, []
        tun.vnet_hdr = offload != "off"
        os.set_blocking(fd, False)
        return tun

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes | None:
        """One packet, or None if none is waiting."""
        if not self.vnet_hdr:
            try:
                return os.read(self._fd, MAX_PACKET)
            except BlockingIOError:
                return None
        if not self._pending:
            pkts = self.read_packets()
            if pkts is None:
                return None
            self._pending.extend(pkts)
        return self._pending.popleft() if self._pending else None

    def read_packets(self) -> list | None:
        """The plain IP packets of one read (several when the kernel handed
        over a TCP super-segment; empty if it could not be split), or None
        if nothing is waiting."""
        if self._pending:
            pkts = list(self._pending)
            self._pending.clear()
            return pkts
        try:
            frame = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None
        if not self.vnet_hdr:
            return [frame]
        if frame[1] == 0 and not frame[0] & _ofl.F_NEEDS_CSUM:  # the common plain case, inline
            return [frame[_ofl.VNET_HDR_LEN:]]
        try:
            return _ofl.split(frame)
        except (_ofl.OffloadError, IndexError):
            self.split_errors += 1
            return []

    def write(self, packet: bytes) -> bool:
        """Write one packet; False if the kernel queue is full (counted by caller)."""
        try:
            if self.vnet_hdr:
                os.writev(self._fd, (_ofl.PLAIN_HDR, packet))
            else:
                os.write(self._fd, packet)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO):  # malformed inner packet, device down
                return False
            raise

    def write_packets(self, packets: list) -> int:
        """Write ``packets`` (in order; with offloads consecutive segments of
        a TCP flow go as one super-segment); returns how many were not written."""
        if not self.vnet_hdr:
            write = self.write
            return sum(1 for p in packets if not write(p))
        failed = 0
        fd = self._fd
        write = os.write
        for frame in _ofl.coalesce_frames(packets):
            try:
                write(fd, frame)
            except BlockingIOError:
                failed += _ofl.frame_packets(frame)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EIO):
                    failed += _ofl.frame_packets(frame)
                    continue
                raise
        return failed

    def close(self) -> None:
        for fd in self._queues:
            os.close(fd)
        self._queues = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemoryTun:
    """In-memory stand-in: ``inject()`` plays the kernel sending, ``written`` the kernel receiving."""

    # the offload record of :class:`Tun` (an in-memory vNIC has none)
    offload = "off"
    offload_error = ""
    split_errors = 0

    def __init__(self, name: str = "mem0"):
        self.name = name
        self._rx: deque = deque()
        self.written: list[bytes] = []
        self._r, self._w = os.pipe()  # readable while packets are waiting
        os.set_blocking(self._r, False)

    def inject(self, packet: bytes) -> None:
        self._rx.append(packet)
        os.write(self._w, b"x")

    def fileno(self) -> int:
        return self._r

    def read(self) -> bytes | None:
        if not self._rx:
            return None
        try:
            os.read(self._r, 1)
        except BlockingIOError:
            pass
        return self._rx.popleft()

    def read_packets(self) -> list | None:
        p = self.read()
        return None if p is None else [p]

    def write(self, packet: bytes) -> bool:
        self.written.append(bytes(packet))
        return True

    def write_packets(self, packets: list) -> int:
        for p in packets:
            self.written.append(bytes(p))
        return 0

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1
