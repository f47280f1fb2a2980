"""bench/plots.py: the pictures of the benchmarks' JSON (matplotlib, development only)."""

import json
import struct
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import plots  # noqa: E402

from mpvpn.tools.demo import lost_range  # noqa: E402


def rows():
    out = []
    for k in (1, 2, 3):
        for p in (0.05, 0.2):
            lost = round(5000 * p ** k * 1.05)
            out.append({"carriers": k, "loss_per_carrier": p, "packets": 5000, "delivered": 5000 - lost,
                        "delivered_loss": lost / 5000, "model": p ** k, "model_sd": 0.0})
    return out


def test_loss_series_carries_the_model_and_its_range():
    s = plots.loss_series(list(reversed(rows())))
    assert sorted(s) == [1, 2, 3] and [q["p"] for q in s[3]] == [0.05, 0.2]
    q = s[3][1]
    lo, hi = lost_range([(5000, 0.008)])
    assert q["model"] == pytest.approx(0.008) and (q["lo"], q["hi"]) == (lo / 5000, hi / 5000)
    assert q["lo"] < q["model"] < q["hi"] and q["measured"] == round(5000 * 0.008 * 1.05) / 5000


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_loss_json_gets_its_picture(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = "matplotlib is not installed (pip install -e '.[bench]')"
        sys.stderr.write(f"\nplot check skipped: {reason}\n")
        pytest.skip(reason)
    f = tmp_path / "loss.json"
    f.write_text(json.dumps({"bench": "loss", "rows": rows(), "modes": []}))
    assert plots.plot_file(f) == [tmp_path / "loss.png"]
    assert _png_size(tmp_path / "loss.png") == (770, 495)  # 7 x 4.5 in at 110 dpi
    f.write_text(json.dumps({"bench": "loss", "rows": [], "modes": [{"mode": "duplicate"}]}))
    (tmp_path / "loss.png").unlink()
    assert plots.plot_file(f) == [] and not (tmp_path / "loss.png").exists()


def test_plotting_stays_off_the_router():
    """matplotlib is a development extra: not a dependency of the package, not in the recipe."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("matplotlib" in d for d in meta["dependencies"])
    assert meta["optional-dependencies"]["bench"] == ["matplotlib>=3"]
    assert "matplotlib" not in (ROOT / "package" / "orayboxvpn" / "Makefile").read_text()
    assert not any("matplotlib" in p.read_text() for p in (ROOT / "src" / "mpvpn").rglob("*.py"))
