"""Shared pytest fixtures for the network-namespace lab (tests/netlab).

Fixtures:
  netlab_ready  session: skips (with the reason) when the lab cannot run here
                (not root, no `ip netns`/veth, nft missing); otherwise removes
                leftovers of dead earlier runs once per session.
  lab           a fresh default Lab() (3 carriers), torn down after the test.
  make_lab      factory: make_lab(carriers=2, delays={1: (10, 2)}, ipv6=True);
                every lab it made is torn down after the test, pass or fail.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netlab  # noqa: E402


def pytest_sessionstart(session):
    """MPVPN_REQUIRE_FASTPATH=1 (.ci/run, where a compiler exists): the C
    loops must be importable, so the C-vs-Python differential tests run
    instead of skipping."""
    if os.environ.get("MPVPN_REQUIRE_FASTPATH") == "1":
        from mpvpn.core import fastpath

        if fastpath.LOOPS is None:
            raise pytest.UsageError(f"MPVPN_REQUIRE_FASTPATH=1 but the C loops are {fastpath.WHY}: "
                                    "run `make fastpath` and fix the build")


@pytest.fixture(scope="session")
def netlab_ready():
    reason = netlab.unavailable_reason()
    if reason:
        sys.stderr.write(f"\nnetlab tests skipped: {reason}\n")
        pytest.skip(reason)
    removed = netlab.cleanup_stale()
    if removed:
        sys.stderr.write(f"\nnetlab: removed stale namespaces {removed}\n")
    return True


@pytest.fixture
def make_lab(netlab_ready):
    labs: list[netlab.Lab] = []

    def factory(*args, **kwargs) -> netlab.Lab:
        lab = netlab.Lab(*args, **kwargs)
        labs.append(lab)
        return lab

    yield factory
    errors = []
    for lab in labs:
        try:
            lab.close()
        except Exception as e:  # noqa: BLE001 - tear down every lab first
            errors.append(f"{lab.prefix}: {e}")
    assert not errors, f"netlab teardown failed: {errors}"


@pytest.fixture
def lab(make_lab) -> netlab.Lab:
    return make_lab()


@pytest.fixture
def throwaway_netns():
    """A fresh, empty network namespace; yields run(code) -> (CompletedProcess, run_cmd)
    where run(code) executes Python ``code`` inside it with ``sys.argv[1]`` = src/.
    Deleted afterwards whatever happens."""
    import subprocess
    import uuid

    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    ns = f"mpvtmp{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

    def run(code: str, timeout: float = 30):
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, src],
                              capture_output=True, text=True, timeout=timeout)

    def cmd(*argv: str):
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)

    try:
        yield run, cmd
    finally:
        subprocess.run(["ip", "netns", "del", ns])
