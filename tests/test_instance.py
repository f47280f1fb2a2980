"""One agent per run directory and vNIC name (mpvpn.io.instance): flock-based,
released by the kernel when the holder dies."""

import os
import signal
import subprocess
import sys

import pytest

from mpvpn.io.instance import AlreadyRunning, InstanceLock, holder

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

HOLD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from mpvpn.io.instance import InstanceLock
InstanceLock(sys.argv[2], sys.argv[3], sys.argv[4]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_second_holder_is_refused_naming_the_first_and_nothing_is_kept(tmp_path):
    run, locks = str(tmp_path / "run"), str(tmp_path / "locks")
    first = InstanceLock(run, "mpvpn0", locks)
    first.acquire()
    assert first.held and holder(os.path.join(run, "agent.lock")) == os.getpid()
    with pytest.raises(AlreadyRunning) as e:
        InstanceLock(run, "mpvpn1", locks).acquire()  # same run directory
    assert e.value.pid == os.getpid()
    assert f"another agent (pid {os.getpid()}) is running with run directory {run}" in e.value.strerror
    other = InstanceLock(str(tmp_path / "run2"), "mpvpn0", locks)  # same vNIC name
    with pytest.raises(AlreadyRunning, match=r"running with vNIC mpvpn0"):
        other.acquire()
    assert not other.held
    # the refused one let go of the run-directory lock it had taken
    third = InstanceLock(str(tmp_path / "run2"), "mpvpn1", locks)
    third.acquire()
    third.release()
    first.release()
    again = InstanceLock(run, "mpvpn0", locks)
    again.acquire()
    again.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run, locks = str(tmp_path / "run"), str(tmp_path / "locks")
    p = subprocess.Popen([sys.executable, "-c", HOLD, SRC, run, "mpvpn0", locks], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning) as e:
            InstanceLock(run, "mpvpn0", locks).acquire()
        assert e.value.pid == p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
    lock = InstanceLock(run, "mpvpn0", locks)
    lock.acquire()  # the file still names the dead pid; the flock died with it
    assert holder(os.path.join(run, "agent.lock")) == os.getpid()
    lock.release()


def test_switching_the_vnic_name_keeps_the_old_lock_when_the_new_is_taken(tmp_path):
    locks = str(tmp_path / "locks")
    a = InstanceLock(str(tmp_path / "a"), "mpvpn0", locks)
    b = InstanceLock(str(tmp_path / "b"), "mpvpn1", locks)
    a.acquire()
    b.acquire()
    with pytest.raises(AlreadyRunning, match="vNIC mpvpn1"):
        a.switch_vnic("mpvpn1")
    with pytest.raises(AlreadyRunning, match="vNIC mpvpn0"):  # a still holds mpvpn0
        InstanceLock(str(tmp_path / "c"), "mpvpn0", locks).acquire()
    a.switch_vnic("mpvpn2")
    c = InstanceLock(str(tmp_path / "c"), "mpvpn0", locks)  # mpvpn0 is free now
    c.acquire()
    for x in (a, b, c):
        x.release()
