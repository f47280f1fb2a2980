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
    assert [(r["subflows"], r["loss"], r["sealed"]) for r in rows] == [
        (1, 0.0, False), (2, 0.0, False), (3, 0.0, False),
        (1, 0.2, False), (2, 0.2, False), (3, 0.2, False),
        (1, 0.0, True), (3, 0.0, True), (3, 0.2, True)]
    assert all(r["pps"] > 0 for r in rows)
    assert rows[0]["delivered_loss"] == 0.0
    assert "user pkt/s" in r.stdout
