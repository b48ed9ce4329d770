"""The charts of ``scripts/bench.py``: one run's bars with their values, and how time and memory grow with the input.

    .venvs/main/bin/python scripts/bench.py --plot-from bench-narrow/results.json bench-real/results.json \\
        --out docs                                    # redraws docs/benchmarks.png and docs/benchmarks-growth.png

The growth chart takes every run of every results.json given whose input size is known: the preset's input
(``input.bytes``) for "MaxText chain" and "rayconv, default settings", the 2x model's (``scaled_input_bytes``) for
their "2x layers" runs, so one narrow ``--maxtext-2x`` run gives two points per contender and a real-width run a
third.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Runs of one contender across inputs: (label in the chart, run names at the preset's size, at the 2x size).
CONTENDERS = (
    ("MaxText 0.2.4 chain", "MaxText chain", "MaxText chain, 2x layers", "#cc6677"),
    ("rayconv (default settings)", "rayconv, default settings", "rayconv, 2x layers", "#4477aa"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(results: dict, path: Path) -> None:
    """One run's wall time and peak memory per contender, as labelled horizontal bars."""
    plt = _pyplot()
    runs = [r for r in results["runs"] if not r.get("failed")]
    names = [r["name"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 2))
    bars = a.barh(names, [r["seconds"] for r in runs], color="#4477aa")
    a.bar_label(bars, fmt="%.1f s", padding=3, fontsize=8)
    a.set_xlabel("wall time (s)")
    bars = b.barh(names, [r["peak_rss"] / 1e9 for r in runs], color="#cc6677")
    b.bar_label(bars, fmt="%.2f GB", padding=3, fontsize=8)
    b.set_xlabel("peak RSS of the process tree (GB)")
    for ax in (a, b):
        ax.invert_yaxis()
        ax.set_xlim(0, ax.get_xlim()[1] * 1.15)  # room for the labels
    fig.suptitle(f"{results['input']['description']}: {results['input']['bytes'] / 1e9:.2f} GB in")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def growth_points(all_results: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """{contender: [(input GB, seconds, peak RSS GB), ...]} sorted by input, from finished runs only."""
    points: dict[str, list[tuple[float, float, float]]] = {label: [] for label, *_ in CONTENDERS}
    for results in all_results:
        runs = {r["name"]: r for r in results["runs"] if not r.get("failed")}
        sizes = (results["input"]["bytes"], results.get("scaled_input_bytes"))
        for label, base, scaled, _ in CONTENDERS:
            for name, size in zip((base, scaled), sizes):
                if name in runs and size:
                    points[label].append((size / 1e9, runs[name]["seconds"], runs[name]["peak_rss"] / 1e9))
    return {label: sorted(p) for label, p in points.items()}


def growth_chart(all_results: list[dict], path: Path) -> None:
    """Wall time and peak memory against the input size, one line per contender, each point labelled."""
    plt = _pyplot()
    points = growth_points(all_results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, *_, color in CONTENDERS:
        p = points[label]
        if not p:
            continue
        gb, seconds, rss = zip(*p)
        for ax, ys, fmt in ((a, seconds, "{:.0f} s"), (b, rss, "{:.1f} GB")):
            ax.plot(gb, ys, marker="o", color=color, label=label)
            for x, y in zip(gb, ys):
                ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=8, color=color)
    a.set_ylabel("wall time (s)")
    b.set_ylabel("peak RSS of the process tree (GB)")
    for ax in (a, b):
        ax.set_xlabel("input (GB)")
        ax.set_xlim(left=0, right=ax.get_xlim()[1] * 1.05)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("How time and peak memory grow with the input (synthetic 405B MP16 layouts; one machine, "
                 "each point one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_from(paths: list[str], out: Path) -> None:
    """Redraw the charts from saved results.json files: the first file's bars, and the growth of all."""
    all_results = [json.loads(Path(p).read_text()) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    chart(all_results[0], out / "benchmarks.png")
    growth_chart(all_results, out / "benchmarks-growth.png")
    for label, p in growth_points(all_results).items():
        print(f"{label}: " + ", ".join(f"{gb:.2f} GB in {s:.1f} s, {rss:.2f} GB peak" for gb, s, rss in p))
