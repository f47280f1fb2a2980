"""Where the agent's log lines go: logd on OpenWrt, stderr elsewhere.

On OpenWrt, procd logs an instance's stderr line by line at ``LOG_ERR``
under the command's basename (procd ``service/instance.c``,
``instance_stdio`` -> ``ulog(LOG_ERR, ...)``), so a plain stderr log reads
``daemon.err mpvpn[pid]: INFO: ...`` and ``logread -e orayboxvpn`` misses it.
:class:`SyslogHandler` writes each line to logd's ``/dev/log`` itself, with
ident ``orayboxvpn`` and the line's own priority, in the format musl's
``syslog()`` uses and logd expects (ubox ``log/syslog.c``, ``log_add``):

    <PRI>Mmm dd hh:mm:ss orayboxvpn[pid]: message

logd strips ``<PRI>`` and then, if the 16th character is a space, 16
characters of timestamp; without the timestamp it would eat the first 16
characters of the line whenever the 16th happened to be a space.  It turns a
newline into a space, so a multi-line record (a traceback) is sent as one
datagram per line.

``--log auto`` (the default of ``mpvpn run``) picks syslog on OpenWrt (there
is ``/etc/openwrt_release`` and a ``/dev/log`` socket) and stderr anywhere
else.  If logd is away (restarting) a line goes to stderr instead, which
procd also hands to logd.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import time

IDENT = "orayboxvpn"
DEV_LOG = "/dev/log"
OPENWRT_RELEASE = "/etc/openwrt_release"
LOG_DAEMON = 3 << 3                    # syslog.h facility
NOTICE = 25                            # between INFO and WARNING, as LOG_NOTICE
logging.addLevelName(NOTICE, "NOTICE")
STDERR_FORMAT = "%(levelname)s: %(message)s"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def severity(levelno: int) -> int:
    """syslog severity of a Python log level (LOG_CRIT=2 ... LOG_DEBUG=7)."""
    for floor, sev in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                       (NOTICE, 5), (logging.INFO, 6)):
        if levelno >= floor:
            return sev
    return 7


def syslog_line(levelno: int, text: str, when: float, pid: int, ident: str = IDENT,
                facility: int = LOG_DAEMON) -> bytes:
    """One datagram as musl's ``syslog()`` builds it (``"<%d>%s %n%s[%d]: "``,
    the time as ``strftime("%b %e %T")`` in the C locale)."""
    t = time.localtime(when)
    stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"<{facility | severity(levelno)}>{stamp} {ident}[{pid}]: {text}".encode("utf-8", "replace")


class SyslogHandler(logging.Handler):
    """Log records to logd (``/dev/log``, a unix datagram socket)."""

    def __init__(self, path: str = DEV_LOG, ident: str = IDENT, fallback=None, clock=time.time):
        super().__init__()
        self.path = path
        self.ident = ident
        self._fallback = fallback
        self._clock = clock
        self._sock: socket.socket | None = None

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            self._sock = s
        self._sock.send(data)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            now, pid = self._clock(), os.getpid()
            for line in text.splitlines() or [""]:
                data = syslog_line(record.levelno, line, now, pid, self.ident)
                try:
                    self._send(data)
                except OSError:
                    self.close_socket()
                    try:  # logd restarted: a new socket at the same path
                        self._send(data)
                    except OSError:
                        self.close_socket()
                        stream = self._fallback or sys.stderr
                        stream.write(f"{record.levelname}: {line}\n")
                        stream.flush()
        except Exception:
            self.handleError(record)

    def close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self.close_socket()
        super().close()


def on_openwrt(release: str = OPENWRT_RELEASE, dev_log: str = DEV_LOG) -> bool:
    try:
        return os.path.exists(release) and stat.S_ISSOCK(os.stat(dev_log).st_mode)
    except OSError:
        return False


def setup(mode: str = "auto", level: int = logging.INFO, dev_log: str | None = None,
          release: str | None = None) -> str:
    """Send the root logger to syslog or stderr; returns which one ("syslog"/"stderr")."""
    dev_log = dev_log or DEV_LOG
    release = release or OPENWRT_RELEASE
    if mode not in ("auto", "syslog", "stderr"):
        raise ValueError(f"unknown log destination {mode!r}")
    if mode == "auto":
        mode = "syslog" if on_openwrt(release, dev_log) else "stderr"
    if mode == "syslog":
        handler: logging.Handler = SyslogHandler(dev_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    handler._mpvpn_sink = True  # replaced by the next setup(); other handlers stay
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mpvpn_sink", False):
            root.removeHandler(h)
            h.close()
    root.addHandler(handler)
    root.setLevel(level)
    return mode
