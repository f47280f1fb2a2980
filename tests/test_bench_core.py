"""Keep bench/core.py runnable: a tiny run writes well-formed JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_bench_small_run_writes_json(tmp_path):
    out = tmp_path / "core.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "core.py"), "--packets", "3000",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["mode"], r["subflows"], r["loss"], r["sealed"]) for r in rows] == [
        ("duplicate", 1, 0.0, False), ("duplicate", 2, 0.0, False), ("duplicate", 3, 0.0, False),
        ("duplicate", 1, 0.2, False), ("duplicate", 2, 0.2, False), ("duplicate", 3, 0.2, False),
        ("duplicate", 1, 0.0, True), ("duplicate", 3, 0.0, True), ("duplicate", 3, 0.2, True),
        ("aggregate", 3, 0.0, False), ("aggregate", 3, 0.2, False),
        ("adaptive", 3, 0.0, False), ("adaptive", 3, 0.2, False),
        (rows[13]["mode"], 3, 0.0, True), (rows[14]["mode"], 3, 0.2, True),
        (rows[15]["mode"], 3, 0.0, True), (rows[16]["mode"], 3, 0.2, True),
        (rows[17]["mode"], 3, 0.0, True), (rows[18]["mode"], 3, 0.2, True)]
    from mpvpn.core import fastpath  # the batch rows: the C loops where built

    c = " C" if fastpath.LOOPS is not None else " py"
    assert [r["mode"] for r in rows[13:]] == [m + ", batch" + c for m in ("dup", "dup", "agg", "agg",
                                                                           "adapt", "adapt")]
    assert rows[13]["delivered_loss"] == 0.0 and rows[14]["delivered_loss"] < 0.05
    assert rows[15]["delivered_loss"] == 0.0  # aggregate through send_many, clean
    assert all(r["pps"] > 0 for r in rows)
    assert rows[0]["delivered_loss"] == 0.0
    assert rows[9]["delivered_loss"] < 0.05  # aggregate, clean: packets leave, not dropped
    assert "user pkt/s" in r.stdout
