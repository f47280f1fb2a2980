"""Keep bench/cost.py runnable and its JSON as docs/performance.md describes
it: the uncounted path on a tiny packet count, a tiny callgrind count where
valgrind is installed, and the cgroup CPU cap it puts agents in (root)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COST = ROOT / "bench" / "cost.py"

ROW_FIELDS = {"mode", "kind", "size", "c_loops", "subflows", "counter", "n1", "n2", "instructions_n1",
              "instructions_n2", "instructions_per_packet", "datagrams_per_packet", "wire_bytes_per_packet",
              "tun_reads_per_packet", "tun_writes_per_packet", "delivered_n2", "delivered_share",
              "extrapolated"}


def run_cost(tmp_path, *args, timeout=300):
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, str(COST), *args, "--json", str(out)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), r.stdout


def test_uncounted_path_carries_every_packet_and_writes_documented_json(tmp_path):
    data, stdout = run_cost(tmp_path, "--counter", "none", "--n1", "20", "--n2", "70", "--sizes", "64,1400",
                            "--modes", "duplicate,aggregate", "--fastpath", "on,off", "--jobs", "2")
    assert data["bench"] == "cost" and data["method"]["counter"] == "none"
    assert {t["name"] for t in data["targets"]} and all(t["ipc_assumed"] > 0 for t in data["targets"])
    rows = data["rows"]
    assert [(r["mode"], r["kind"], r["size"]) for r in rows][:4] == [
        ("duplicate", "tcp", 64), ("duplicate", "tcp", 1400), ("duplicate", "udp", 64), ("duplicate", "udp", 1400)]
    assert len(rows) == 2 * 2 * 2 * 2  # modes x kinds x sizes x C loops on/off
    assert {r["c_loops"] for r in rows[8:]} == {False}  # MPVPN_FASTPATH=0 reached the worker
    for r in rows:
        assert ROW_FIELDS <= r.keys(), ROW_FIELDS - r.keys()
        assert r["instructions_per_packet"] is None  # nothing counted
        assert r["delivered_share"] == 1.0, r  # clean in-memory path: every packet delivered
        assert r["wire_bytes_per_packet"] > r["size"]  # header + AEAD tag on every copy
        if r["mode"] == "duplicate":
            assert r["datagrams_per_packet"] == pytest.approx(3.0)  # one copy per subflow
    tcp_big = [r for r in rows if r["kind"] == "tcp" and r["size"] == 1400 and r["c_loops"]]
    from mpvpn.core import fastpath

    if fastpath.LOOPS is not None:  # TSO: one read carries many segments; GRO: one write many packets
        assert all(r["tun_reads_per_packet"] < 0.1 and r["tun_writes_per_packet"] < 0.1 for r in tcp_big)
    udp = [r for r in rows if r["kind"] == "udp"]
    assert all(r["tun_reads_per_packet"] == pytest.approx(1.0) for r in udp)  # plain packets: one read each
    assert "instr/pkt" in stdout


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind not on PATH (apt-get install valgrind)")
def test_callgrind_counts_instructions_per_packet(tmp_path):
    data, stdout = run_cost(tmp_path, "--counter", "callgrind", "--n1", "20", "--n2", "60", "--sizes", "512",
                            "--kinds", "udp", "--modes", "duplicate", "--fastpath", "on", timeout=600)
    (r,) = data["rows"]
    assert data["method"]["counter"] == "callgrind"
    assert r["instructions_n2"] > r["instructions_n1"] > 0
    assert r["instructions_per_packet"] == (r["instructions_n2"] - r["instructions_n1"]) / 40
    for name, ext in r["extrapolated"].items():  # clock x IPC / instructions per packet
        assert ext["pps"] == pytest.approx(ext["hz"] * ext["ipc"] / r["instructions_per_packet"])
        assert ext["mbit"] == pytest.approx(ext["pps"] * 512 * 8 / 1e6)


def _cap_unavailable():
    if os.geteuid() != 0:
        return "needs root (cgroup)"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if not (v2.exists() and "cpu" in v2.read_text().split()) and not Path(
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        return "no cgroup cpu controller"
    return None


@pytest.mark.skipif(_cap_unavailable() is not None, reason=str(_cap_unavailable()))
def test_cpu_cap_limits_a_process_and_cleans_up():
    sys.path.insert(0, str(ROOT / "bench"))
    from cost import CpuCap

    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    cap = CpuCap(f"mpvpn-test-{os.getpid()}", 10)
    try:
        cap.add(p.pid)
        assert str(p.pid) in (cap.path / "cgroup.procs").read_text().split()
        if (cap.path / "cpu.max").exists():
            assert (cap.path / "cpu.max").read_text().split() == ["10000", "100000"]
        else:
            assert (cap.path / "cpu.cfs_quota_us").read_text().strip() == "10000"
            assert (cap.path / "cpu.cfs_period_us").read_text().strip() == "100000"
    finally:
        p.kill()
        p.wait()
        cap.close()
    assert not cap.path.exists()
