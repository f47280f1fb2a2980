"""The leak-hunting aid (MPVPN_TRACEMALLOC): off by default, periodic snapshots when set."""

import tracemalloc

from mpvpn.agent.memtrace import MemTrace


def test_off_unless_the_variable_names_a_directory():
    assert MemTrace.from_env({}) is None
    assert MemTrace.from_env({"MPVPN_TRACEMALLOC": ""}) is None


def test_snapshots_every_interval_and_they_diff(tmp_path):
    t = MemTrace.from_env({"MPVPN_TRACEMALLOC": str(tmp_path / "snaps"), "MPVPN_TRACEMALLOC_EVERY": "10",
                           "MPVPN_TRACEMALLOC_FRAMES": "4"})
    assert (t.every, t.frames) == (10.0, 4)
    try:
        t.poll(100.0)  # starts tracing, no snapshot yet
        assert tracemalloc.is_tracing() and t.count == 0
        t.poll(105.0)
        assert t.count == 0
        t.poll(110.0)
        kept = [bytearray(1000) for _ in range(50)]  # grows between the two snapshots
        t.poll(115.0)
        t.poll(120.0)
    finally:
        t.stop()
    assert not tracemalloc.is_tracing()
    snaps = sorted((tmp_path / "snaps").glob("snap-*.tm"))
    assert [p.name for p in snaps] == ["snap-0000.tm", "snap-0001.tm"]
    a, b = (tracemalloc.Snapshot.load(str(p)) for p in snaps)
    grown = sum(st.size_diff for st in b.compare_to(a, "filename") if st.traceback[0].filename == __file__)
    assert grown >= 50 * 1000 and len(kept) == 50
