"""bench/plots.py: the pictures of the benchmarks' JSON (matplotlib, development only)."""

import json
import struct
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import failover  # noqa: E402
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


@pytest.fixture
def matplotlib_module():
    """matplotlib (a dev-only extra), or the test skipped with the reason printed."""
    try:
        import matplotlib
    except ImportError:
        reason = "matplotlib is not installed (pip install -e '.[bench]')"
        sys.stderr.write(f"\nplot check skipped: {reason}\n")
        pytest.skip(reason)
    return matplotlib


@pytest.fixture
def saved_figures(matplotlib_module, monkeypatch) -> list:
    """Every matplotlib figure the test saves, in order (saved as before)."""
    import matplotlib.figure

    figs = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])
    return figs


def test_loss_json_gets_its_picture(tmp_path, matplotlib_module):
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


def _failover_run(mode: str, stall: float, lost: int = 0) -> dict:
    """A synthetic bench/failover.py row: 4000 packets at 1000/s from t=100 s, the
    carrier set down at 101.5 s; packets sent in the 40 ms before it and while
    the stall lasts reach the receiver only ``stall`` s after the failure (none,
    then a burst), ``lost`` of the others never; the rest 20.5 ms after they were
    sent (off the bins' edges)."""
    packets = []
    for i in range(4000 - lost):
        sent = 100.0 + i / 1000
        late = 101.46 <= sent < 101.5 + stall
        packets.append([i, sent, 101.5 + stall + 0.0015 if late else sent + 0.0205])
    tl = failover.timeline(packets, 101.5)
    return {"mode": mode, "failed": "telecom", "packets": 4000, "rate_pps": 1000.0,
            "delivered": len(packets), "lost": lost, "stall_s": tl["stall_s"], "detection_s": 0.21,
            "nack_seqs": 40, "nack_retransmits": 40, "skipped": 0, "timeline": tl}


def test_failover_timeline_bins_arrivals_around_the_failure():
    r = _failover_run("aggregate", 0.12, lost=3)
    tl = r["timeline"]
    assert tl["bin_s"] == 0.01 and sum(tl["counts"]) == 3997 and tl["fail_at_s"] == pytest.approx(1.5)
    # steady 10 a bin, nothing while the stall lasts, then the held-back burst
    assert tl["counts"][50:140] == [10] * 90
    assert tl["counts"][148:162] == [0] * 14 and tl["counts"][162] > 10
    # from the last on-time arrival (sent at 1.459 s) to the burst
    assert tl["stall_at_s"] == pytest.approx(1.4795) and tl["stall_s"] == pytest.approx(0.142)
    empty = failover.timeline([], 101.5)
    assert empty["counts"] == [] and empty["stall_at_s"] is None
    v = plots.failover_window(r)
    assert v["t"][0] == pytest.approx(-0.5) and v["t"][-1] == pytest.approx(1.5)
    assert len(v["t"]) == len(v["counts"]) == 201 and v["counts"][0] == 10 and v["expected"] == 10
    assert v["detected"] == 0.21 and v["stall"] == pytest.approx((-0.0205, 0.142))


def test_failover_json_gets_its_picture(tmp_path, saved_figures):
    figs = saved_figures
    rows = [_failover_run("duplicate", 0.0), _failover_run("aggregate", 0.12), _failover_run("adaptive", 0.08)]
    f = tmp_path / "failover.json"
    f.write_text(json.dumps({"bench": "failover", "rate_pps": 1000.0, "packets": 4000, "rows": rows}))
    assert plots.plot_file(f) == [tmp_path / "failover.png"]
    assert _png_size(tmp_path / "failover.png") == (770, 671)  # 7 x (1.6 + 3 x 1.5) in at 110 dpi
    axes = figs[0].axes
    assert [ax.get_title(loc="left") for ax in axes] == ["duplicate: 0 of 4000 lost", "aggregate: 0 of 4000 lost",
                                                          "adaptive: 0 of 4000 lost"]
    assert axes[-1].get_xlabel() == "time from the carrier failure (s)"
    assert all(ax.get_ylabel() == "packets per 10 ms" for ax in axes)
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert labels == ["packets received", "sent (10 a bin)", "telecom set down", "agent marks it down (+210 ms)",
                      "longest stall (142 ms)"]
    f.write_text(json.dumps({"bench": "failover", "rows": []}))
    (tmp_path / "failover.png").unlink()
    assert plots.plot_file(f) == [] and not (tmp_path / "failover.png").exists()


def _aggregate_doc() -> dict:
    """A synthetic bench/aggregate.py document (its keys, after a JSON round trip):
    two ccs x two losses x three modes, the clean cubic aggregate run twice."""
    rows = []
    for cc in ("cubic", "bbr"):
        for loss in (0, 5):
            for mode, steady in (("duplicate", 47.0), ("aggregate", 91.0), ("adaptive", 90.0)):
                s = steady - loss - (3 if cc == "bbr" else 0)
                rows.append({"mode": mode, "loss_on_30": loss / 100, "delays": True, "cc": cc,
                             "goodput_mbit": s - 6, "steady_mbit": s, "steady_vs_sum": s / 100, "streams": 1,
                             "vs_sum": (s - 6) / 100, "vs_best_single": (s - 6) / 50, "intact": True})
    rows.append(dict(rows[1], steady_mbit=89.0, goodput_mbit=83.0))
    carriers = [{"carrier": c, "tbf_mbit": m, "tcp_mbit": 0.956 * m} for c, m in ((1, 50), (2, 30), (3, 20))]
    return json.loads(json.dumps({"bench": "aggregate", "rates_mbit": {1: 50, 2: 30, 3: 20},
                                  "delays_ms": {1: (10, 2), 2: (25, 3), 3: (40, 4)},
                                  "carriers": carriers, "rows": rows}))


def test_aggregate_groups_by_cc_loss_and_mode():
    g = plots.aggregate_groups(_aggregate_doc()["rows"])
    assert list(g) == ["cubic", "bbr"] and list(g["bbr"]) == [0, 0.05]
    assert list(g["cubic"][0]) == ["duplicate", "aggregate", "adaptive"]
    assert g["cubic"][0]["aggregate"] == (90.0, 84.0)  # two runs averaged
    assert g["bbr"][0.05]["adaptive"] == (82.0, 76.0)


def test_aggregate_json_gets_its_picture(tmp_path, saved_figures):
    figs = saved_figures
    f = tmp_path / "aggregate.json"
    f.write_text(json.dumps(_aggregate_doc()))
    assert plots.plot_file(f) == [tmp_path / "aggregate.png"]
    assert _png_size(tmp_path / "aggregate.png") == (1155, 495)  # (3.5 + 2 x 3.5) x 4.5 in at 110 dpi
    axes = figs[0].axes
    assert [ax.get_title() for ax in axes] == ["TCP cubic", "TCP bbr"]
    assert axes[0].get_ylabel() == "goodput (Mbit/s)"
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["clean carriers", "5 % loss on the 30 Mbit/s"]
    bars = [round(p.get_height(), 3) for p in axes[0].patches]
    assert bars == [47.0, 42.0, 90.0, 86.0, 90.0, 85.0]  # per mode, clean then lossy
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert sorted(labels) == sorted(["duplicate (steady)", "whole transfer", "aggregate (steady)", "adaptive (steady)",
                                     "carriers' sum (100)", "TCP on the carriers alone (96)", "fastest carrier (50)"])
    assert "50/30/20 Mbit/s, 10/25/40 ms one way" in figs[0]._suptitle.get_text()
    f.write_text(json.dumps(dict(_aggregate_doc(), rows=[])))
    (tmp_path / "aggregate.png").unlink()
    assert plots.plot_file(f) == [] and not (tmp_path / "aggregate.png").exists()
