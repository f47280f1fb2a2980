#!/usr/bin/env python3
"""Pictures of the benchmarks' JSON, written next to it (development only: matplotlib
is in the ``bench`` extra of pyproject.toml, never in the router package).

    python bench/plots.py FILE.json [...]     FILE.png beside each (benches loss, failover, aggregate)

:func:`loss_plot` draws ``bench/loss.py``'s p^N table: delivered loss against the loss
on every carrier, one series per number of carriers, each measured point with the
range chance allows for its sample size (exact binomial, 99 %: mpvpn.tools.demo's
``lost_range``) and the model p^N as a line.

:func:`failover_plot` draws ``bench/failover.py``'s runs: one timeline per mode,
packets the receiver got per 10 ms bin around the moment the busiest carrier was
set down, with that moment, the agent's detection and the longest stall marked.

:func:`aggregate_plot` draws ``bench/aggregate.py``'s TCP goodput: a panel per
congestion control, a group of bars per loss setting, a bar per mode (steady
state, iperf3) with the whole sha256-checked transfer as a dot, against the
carriers' sum, what TCP got from the carriers alone and the fastest carrier.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mpvpn.tools.demo import lost_range  # noqa: E402

COLOURS = {1: "#d62728", 2: "#ff7f0e", 3: "#1f77b4"}


def loss_series(rows: list[dict]) -> dict[int, list[dict]]:
    """carriers -> its rows by carrier loss, each with the model's 99 % range (fractions)."""
    out: dict[int, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["carriers"], r["loss_per_carrier"])):
        n, p, k = r["packets"], r["loss_per_carrier"], r["carriers"]
        lo, hi = lost_range([(n, p ** k)])
        out.setdefault(k, []).append({"p": p, "measured": r["delivered_loss"], "model": p ** k,
                                      "lo": lo / n, "hi": hi / n, "packets": n})
    return out


def loss_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the p^N picture of ``bench/loss.py``'s rows to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(rows)
    n = max((q["packets"] for pts in series.values() for q in pts), default=1)
    floor = 100 / n / 4  # a quarter of one packet: where "none lost" is drawn on the log scale
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for k, pts in series.items():
        xs = [100 * q["p"] for q in pts]
        colour = COLOURS.get(k, "black")
        fine = [x / 10 for x in range(1, 10 * int(max(xs) + 1) + 1)]
        model = [(x, 100 * (x / 100) ** k) for x in fine if 100 * (x / 100) ** k >= floor]
        ax.plot([x for x, _ in model], [y for _, y in model], color=colour, lw=1, alpha=0.7,
                label=f"model p^{k}")
        # shaded bar: where 99 % of runs of this many packets land if the model holds
        ax.vlines(xs, [max(floor, 100 * q["lo"]) for q in pts], [max(floor, 100 * q["hi"]) for q in pts],
                  color=colour, lw=7, alpha=0.25)
        seen = [(x, 100 * q["measured"]) for x, q in zip(xs, pts) if q["measured"] > 0]
        ax.plot([x for x, _ in seen], [y for _, y in seen], "o", color=colour, ms=5,
                label=f"{k} carrier{'s' if k > 1 else ''}: measured")
        none = [x for x, q in zip(xs, pts) if q["measured"] == 0]
        if none:
            ax.plot(none, [floor] * len(none), "v", color=colour, ms=6, mfc="none",
                    label=f"{k} carrier{'s' if k > 1 else ''}: none lost")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 1.5)
    ax.set_xlabel("loss on every carrier (%)")
    ax.set_ylabel("packets lost after SMPU (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"Duplicate mode, two agents in the lab ({n} packets per point; "
                 "shaded: 99 % range for that many)", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


MODE_COLOURS = {"duplicate": "#2ca02c", "aggregate": "#1f77b4", "adaptive": "#9467bd"}


def failover_window(row: dict, before: float = 0.5, after: float = 1.5) -> dict:
    """One failover row on an axis whose 0 is the failure: bin starts (s) and
    arrivals per bin from ``before`` s ahead of it to ``after`` s past it, the
    detection and the stall on that axis, and the rate one bin should see."""
    tl = row["timeline"]
    w, f = tl["bin_s"], tl["fail_at_s"]
    first, last = max(0, int((f - before) / w)), int((f + after) / w)
    counts = tl["counts"][first:last + 1]
    return {"t": [round(i * w - f, 6) for i in range(first, first + len(counts))], "counts": counts,
            "detected": row["detection_s"], "bin_s": w,
            "stall": None if tl["stall_at_s"] is None else (tl["stall_at_s"] - f, tl["stall_s"]),
            "expected": row["rate_pps"] * w}


def failover_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the timelines of ``bench/failover.py``'s rows to ``path`` (PNG), one panel a mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.6 + 1.5 * len(rows)), dpi=110, sharex=True,
                             squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        v = failover_window(row)
        colour = MODE_COLOURS.get(row["mode"], "black")
        ax.step(v["t"], v["counts"], where="post", color=colour, lw=1.2, label="packets received")
        ax.axhline(v["expected"], color="grey", lw=0.8, ls=":", label=f"sent ({v['expected']:g} a bin)")
        ax.axvline(0, color="#d62728", lw=1.5, label=f"{row['failed']} set down")
        if v["detected"] is not None:
            ax.axvline(v["detected"], color="#ff7f0e", lw=1.5, ls="--",
                       label=f"agent marks it down (+{1000 * v['detected']:.0f} ms)")
        if v["stall"] is not None and v["t"] and v["t"][0] <= v["stall"][0] <= v["t"][-1] + v["bin_s"]:
            ax.axvspan(v["stall"][0], v["stall"][0] + v["stall"][1], color=colour, alpha=0.15,
                       label=f"longest stall ({1000 * v['stall'][1]:.0f} ms)")
        ax.set_ylim(0, max([v["expected"] * 2] + v["counts"]) * 1.1)
        ax.set_ylabel(f"packets per {1000 * v['bin_s']:g} ms", fontsize=8)
        ax.set_title(f"{row['mode']}: {row['lost']} of {row['packets']} lost", fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("time from the carrier failure (s)")
    fig.suptitle(title or f"A carrier fails under a {rows[0]['rate_pps']:g} packets/s UDP stream, "
                 "two agents in the lab", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def aggregate_groups(rows: list[dict]) -> dict:
    """cc -> loss on the 30 Mbit/s carrier -> mode -> (steady, whole) Mbit/s, in run
    order; repeated runs of one setting are averaged."""
    acc: dict = {}
    for r in rows:
        acc.setdefault(r["cc"], {}).setdefault(r["loss_on_30"], {}).setdefault(r["mode"], []).append(
            (r["steady_mbit"], r["goodput_mbit"]))
    return {cc: {loss: {m: tuple(sum(v[i] for v in vs) / len(vs) for i in (0, 1)) for m, vs in by_mode.items()}
                 for loss, by_mode in by_loss.items()} for cc, by_loss in acc.items()}


def aggregate_plot(doc: dict, path: str | Path, title: str = "") -> Path:
    """Write the goodput picture of a ``bench/aggregate.py`` JSON document to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate_groups(doc["rows"])
    rates = doc["rates_mbit"]
    total, best = sum(rates.values()), max(rates.values())
    alone = sum(c["tcp_mbit"] for c in doc.get("carriers") or []) or None
    fig, axes = plt.subplots(1, len(groups), figsize=(3.5 + 3.5 * len(groups), 4.5), dpi=110, sharey=True,
                             squeeze=False)
    for ax, (cc, by_loss) in zip(axes[0], groups.items()):
        modes = list(dict.fromkeys(m for by_mode in by_loss.values() for m in by_mode))
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i, by_mode in enumerate(by_loss.values())
                  if mode in by_mode]
            vals = [by_mode[mode] for by_mode in by_loss.values() if mode in by_mode]
            colour = MODE_COLOURS.get(mode, "black")
            bars = ax.bar(xs, [v[0] for v in vals], width * 0.9, color=colour, alpha=0.8, label=f"{mode} (steady)")
            ax.bar_label(bars, labels=[f"{v[0]:.0f}" for v in vals], fontsize=8, label_type="center", color="white")
            ax.plot(xs, [v[1] for v in vals], "o", color="black", ms=4, mfc="white",
                    label="whole transfer" if j == 0 else None)
        ax.axhline(total, color="black", lw=1, label=f"carriers' sum ({total:g})")
        if alone:
            ax.axhline(alone, color="grey", lw=1, ls="--", label=f"TCP on the carriers alone ({alone:.0f})")
        ax.axhline(best, color="#d62728", lw=1, ls=":", label=f"fastest carrier ({best:g})")
        ax.set_xticks(range(len(by_loss)),
                      [f"{100 * loss:g} % loss on the 30 Mbit/s" if loss else "clean carriers"  # loss_on_30
                       for loss in by_loss])
        ax.set_title(f"TCP {cc}", fontsize=9)
        ax.set_ylim(0, total * 1.5)  # room for the legend above the sum
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("goodput (Mbit/s)")
    axes[0, -1].legend(fontsize=7, loc="upper right", ncol=2)
    d = doc.get("delays_ms")
    delays = f", {'/'.join(f'{v[0]:g}' for v in d.values())} ms one way" if d else ""
    fig.suptitle(title or f"One TCP download through two agents, carriers of "
                 f"{'/'.join(f'{v:g}' for v in rates.values())} Mbit/s{delays}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_file(json_path: str | Path) -> list[Path]:
    """The pictures for one benchmark JSON file, next to it."""
    doc = json.loads(Path(json_path).read_text())
    out = []
    if doc.get("bench") == "loss" and doc.get("rows"):
        out.append(loss_plot(doc["rows"], Path(json_path).with_suffix(".png")))
    if doc.get("bench") == "failover" and doc.get("rows"):
        out.append(failover_plot(doc["rows"], Path(json_path).with_suffix(".png")))
    if doc.get("bench") == "aggregate" and doc.get("rows"):
        out.append(aggregate_plot(doc, Path(json_path).with_suffix(".png")))
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for f in argv:
        for p in plot_file(f):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
