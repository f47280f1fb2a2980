"""Log lines to logd the way OpenWrt's programs send them, checked on a
unix datagram socket the test binds (the receiving side of logd's /dev/log)."""

import io
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from mpvpn.io import logsink


def logd_log_add(datagram: bytes) -> tuple[int, str]:
    """What logd keeps of a datagram (ubox log/syslog.c, log_add for
    SOURCE_SYSLOG): the priority from "<PRI>", then 16 characters of
    timestamp dropped if the 16th is a space; newlines become spaces."""
    buf = datagram.decode().rstrip("\0").replace("\n", " ").rstrip()
    prio = 0
    m = re.match(r"^<([0-9]*)>(.*)", buf, re.S)
    if m:
        prio, buf = int(m.group(1) or 0), m.group(2)
    if len(buf) + 1 > 16 and buf[15:16] == " ":
        buf = buf[16:]
    return prio, buf


@pytest.fixture
def devlog(tmp_path):
    path = str(tmp_path / "log")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def test_every_level_reaches_logd_with_its_priority_and_the_ident(devlog):
    path, s = devlog
    log = logging.getLogger("test.logsink")
    log.propagate = False
    h = logsink.SyslogHandler(path)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    try:
        for level, pri in ((logging.DEBUG, 31), (logging.INFO, 30), (logsink.NOTICE, 29),
                           (logging.WARNING, 28), (logging.ERROR, 27), (logging.CRITICAL, 26)):
            log.log(level, "x %s", logging.getLevelName(level))
            raw = s.recv(2048)
            # musl syslog(): "<PRI>Mmm dd hh:mm:ss ident[pid]: msg", daemon facility (3 << 3)
            assert re.fullmatch(rb"<%d>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d orayboxvpn\[%d\]: x %s"
                                % (pri, os.getpid(), logging.getLevelName(level).encode()), raw), raw
            assert logd_log_add(raw) == (pri, f"orayboxvpn[{os.getpid()}]: x {logging.getLevelName(level)}")
        # a traceback: one datagram per line, each with the ident (logd would join lines with spaces)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        lines = []
        s.settimeout(0.5)
        try:
            while True:
                lines.append(logd_log_add(s.recv(2048)))
        except socket.timeout:
            pass
        assert lines[0] == (27, f"orayboxvpn[{os.getpid()}]: failed") and len(lines) >= 4
        assert all(p == 27 and t.startswith("orayboxvpn[") for p, t in lines)
        assert lines[-1][1].endswith("ValueError: boom")
    finally:
        log.removeHandler(h)
        h.close()


def test_a_short_pid_does_not_let_logd_eat_the_line(devlog):
    # without a timestamp "orayboxvpn[123]: x" has a space at index 15 and logd would drop 16 chars
    path, s = devlog
    raw = logsink.syslog_line(logging.INFO, "x", 0.0, 123)
    assert logd_log_add(raw) == (30, "orayboxvpn[123]: x")


def test_without_logd_a_line_goes_to_stderr_and_logging_resumes_when_logd_is_back(tmp_path):
    path = str(tmp_path / "log")
    err = io.StringIO()
    rec = logging.LogRecord("t", logging.WARNING, __file__, 1, "lost %s", ("it",), None)
    h = logsink.SyslogHandler(path, fallback=err)
    h.setFormatter(logging.Formatter("%(message)s"))
    h.handle(rec)
    assert err.getvalue() == "WARNING: lost it\n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # logd (re)started
    s.bind(path)
    s.settimeout(5)
    try:
        h.handle(rec)
        assert logd_log_add(s.recv(2048))[1].endswith(": lost it")
        s.close()  # logd restarts again: a new socket at the same path
        os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        s.settimeout(5)
        h.handle(rec)
        assert logd_log_add(s.recv(2048))[1].endswith(": lost it")
        assert err.getvalue() == "WARNING: lost it\n"
    finally:
        s.close()
        h.close()


def test_auto_is_syslog_only_on_openwrt(tmp_path, devlog):
    path, _s = devlog
    release = tmp_path / "openwrt_release"
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        assert logsink.setup("auto", dev_log=path, release=str(release)) == "stderr"
        release.write_text("DISTRIB_ID='OpenWrt'\n")
        assert logsink.setup("auto", dev_log=path, release=str(release)) == "syslog"
        assert logsink.setup("auto", dev_log=str(tmp_path / "nope"), release=str(release)) == "stderr"
        assert logsink.setup("syslog", dev_log=path) == "syslog"
        ours = [h for h in root.handlers if h not in before]
        assert len(ours) == 1 and isinstance(ours[0], logsink.SyslogHandler)  # replaced, not stacked
        with pytest.raises(ValueError):
            logsink.setup("journal")
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()


def test_mpvpn_run_logs_to_syslog_with_log_syslog(tmp_path, devlog):
    """The agent's own lines (here: refusing a broken config) reach the socket."""
    path, s = devlog
    (tmp_path / "orayboxvpn").write_text("config base 'base'\n\toption role 'nonsense'\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    code = ("import sys; from mpvpn import cli; from mpvpn.io import logsink; logsink.DEV_LOG = sys.argv[1]; "
            "sys.exit(cli.main(['run', '--log', 'syslog', '--uci-dir', sys.argv[2]]))")
    r = subprocess.run([sys.executable, "-c", code, path, str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and r.stderr == ""
    got = []
    s.settimeout(1)
    try:
        while True:
            got.append(logd_log_add(s.recv(2048)))
    except socket.timeout:
        pass
    assert got and all(p in (27, 28) and re.match(r"orayboxvpn\[\d+\]: ", t) for p, t in got), got
    assert got[-1][0] == 27 and "not starting" in got[-1][1]  # log.error -> daemon.err
