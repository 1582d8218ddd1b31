"""Plot po_ray ÷ TRL (tokens/s and peak memory) from one or more `bench/vs_trl.py --json` results.

    .venv/bin/python bench/plot_vs_trl.py before=old.json after=new.json long=long.json --out docs/benchmarks_vs_trl.png

Each LABEL=PATH is one run; its bars are that run's own ratios (TRL measured in the same run), so
runs on a noisy machine stay comparable. Dashed lines mark the targets (1.5x throughput, 0.7x memory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (ratio key, axis label, target): what the issue asks of each figure.
FIGURES = (
    ("tokens_per_s_ratio", "completion tokens/s\n(higher is better)", 1.5),
    ("peak_pss_ratio", "peak memory, process tree PSS\n(lower is better)", 0.7),
    ("peak_rss_ratio", "peak memory, process tree RSS\n(lower is better)", 0.7),
)


def load_runs(specs: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"plot_vs_trl: {spec!r}: expected LABEL=PATH, e.g. after=vs_trl.json")
        ratios = json.loads(Path(path).read_text()).get("ratios") or {}
        missing = [key for key, _, _ in FIGURES if key not in ratios]
        if missing:
            raise SystemExit(f"plot_vs_trl: {path}: no {', '.join(missing)} (the run needs both trl and po_ray_1w)")
        runs.append((label, ratios))
    return runs


def plot(runs: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(3.3 * len(FIGURES), 3.8))
    labels = [label for label, _ in runs]
    for ax, (key, title, target) in zip(axes, FIGURES):
        values = [ratios[key] for _, ratios in runs]
        bars = ax.bar(labels, values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target}x")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("po_ray ÷ TRL")
        ax.set_ylim(0, max([*values, target]) * 1.25)
        ax.tick_params(axis="x", labelsize=8, labelrotation=25)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="a bench/vs_trl.py --json result, labelled")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    plot(load_runs(args.runs), args.out)
    print(f"[plot] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
