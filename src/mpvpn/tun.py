"""The tun vNIC: a tiny interface and its Linux implementation.

The agent only needs ``fileno()``, ``read()``, ``write()`` and ``close()``.
:class:`LinuxTun` creates the device with python-pytun (``IFF_TUN |
IFF_NO_PI``); it is not persistent, so it disappears with the process (a ``kill -9``
leaves no interface or route behind).  Addresses, MTU and routes are set by
:mod:`mpvpn.netcfg`.  Tests use :class:`MemoryTun`.
"""

from __future__ import annotations

import errno
import os
from collections import deque

IFNAMSIZ = 16
MAX_PACKET = 65535


class TunError(OSError):
    pass


def valid_ifname(name: str) -> bool:
    return (0 < len(name) < IFNAMSIZ and name not in (".", "..") and name.isascii()
            and all(c.isalnum() or c in "-_." for c in name))


class LinuxTun:
    """A non-persistent, non-blocking tun device (layer 3, no packet info),
    created with python-pytun; packets move with os.read/os.write on its fd."""

    def __init__(self, name: str):
        if not valid_ifname(name):
            raise TunError(errno.EINVAL, f"invalid interface name {name!r}")
        try:
            import pytun
        except ImportError:
            raise TunError(errno.ENOSYS, "python-pytun is not installed "
                                         "(opkg install python3-pytun / pip install python-pytun)") from None
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except (pytun.Error, OSError) as e:
            raise TunError(errno.EPERM, f"cannot create tun {name!r}: {e} "
                                        "(is kmod-tun loaded? running as root?)") from None
        self.name = self._dev.name
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> bytes | None:
        """One packet, or None if none is waiting."""
        try:
            return os.read(self._fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """Write one packet; False if the kernel queue is full (counted by caller)."""
        try:
            os.write(self._fd, packet)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EIO):  # malformed inner packet, device down
                return False
            raise

    def close(self) -> None:
        if self._fd >= 0:
            self._dev.close()
            self._fd = -1


class MemoryTun:
    """In-memory stand-in: ``inject()`` plays the kernel sending, ``written`` the kernel receiving."""

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

    def write(self, packet: bytes) -> bool:
        self.written.append(bytes(packet))
        return True

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1
