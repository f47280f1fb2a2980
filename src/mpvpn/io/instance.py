"""One agent per run directory and per vNIC: advisory locks.

A second ``mpvpn run`` must not touch what a running agent owns (its tun
device, routes and status socket).  Before it changes anything the agent
takes two ``flock`` locks, each on a small file holding the owner's pid:

* ``<run_dir>/agent.lock``: one agent per run directory (status socket);
* ``<lock_dir>/vnic-<ifname>-net<inode>.lock``: one agent per vNIC name in
  this network namespace (``<inode>`` identifies the namespace, from
  ``/proc/self/ns/net``: the same name in another namespace is another
  device).  ``lock_dir`` defaults to ``/var/lock/orayboxvpn`` (``/tmp/lock``
  on OpenWrt, ``/run/lock`` on Debian), shared by every run directory.

The kernel drops a flock when its holder's last descriptor closes, so a
``kill -9`` leaves no stale lock: the lock file stays, holding the dead pid,
and the next agent simply takes it.  Whoever holds both locks owns the vNIC
name, so anything left under that name (a device, routes of ours on it) is a
dead owner's and may be cleaned.
"""

from __future__ import annotations

import errno
import fcntl
import os

LOCK_DIR = "/var/lock/orayboxvpn"
RUN_LOCK = "agent.lock"


class AlreadyRunning(OSError):
    """Another live agent holds a lock; ``pid`` is its process (None if unknown)."""

    def __init__(self, what: str, pid: int | None, path: str):
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(errno.EBUSY, f"another agent ({who}) is running with {what}; "
                                      f"not touching it (lock {path})")
        self.pid = pid
        self.path = path


def netns_id() -> str:
    """This process's network namespace, as the inode of /proc/self/ns/net."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "0"


def holder(path: str) -> int | None:
    """The pid written in a lock file, or None."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class _FileLock:
    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(self.what, holder(self.path), self.path) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            # the file stays: unlinking it would race with a new agent that
            # opened it and waits for the lock on the old inode
            os.close(self.fd)
            self.fd = -1


class InstanceLock:
    """The run-directory lock and the vNIC lock, taken and dropped together."""

    def __init__(self, run_dir: str, ifname: str, lock_dir: str = LOCK_DIR):
        self.run_dir = run_dir
        self.lock_dir = lock_dir
        self._run = _FileLock(os.path.join(run_dir, RUN_LOCK), f"run directory {run_dir}")
        self._vnic = self._vnic_lock(ifname)

    def _vnic_lock(self, ifname: str) -> _FileLock:
        return _FileLock(os.path.join(self.lock_dir, f"vnic-{ifname}-net{netns_id()}.lock"),
                         f"vNIC {ifname}")

    @property
    def held(self) -> bool:
        return self._run.fd >= 0 and self._vnic.fd >= 0

    def acquire(self) -> None:
        """Take both locks or neither; raises :class:`AlreadyRunning`."""
        self._run.acquire()
        try:
            self._vnic.acquire()
        except BaseException:
            self._run.release()
            raise

    def switch_vnic(self, ifname: str) -> None:
        """Hold the lock of another vNIC name instead (a reload renamed it);
        raises :class:`AlreadyRunning` and keeps the old one if it is taken."""
        new = self._vnic_lock(ifname)
        if new.path == self._vnic.path:
            return
        new.acquire()
        self._vnic.release()
        self._vnic = new

    def release(self) -> None:
        self._vnic.release()
        self._run.release()
