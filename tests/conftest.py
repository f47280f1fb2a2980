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
