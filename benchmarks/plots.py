"""The figures of the overhead and save-stall benchmarks, drawn from their JSON results.

The benchmarks call these when they finish; to redraw the PNGs from the JSON
already in benchmarks/results/ (after a change to a figure, without running a
benchmark again), run:

    python -m benchmarks.plots              # every overhead*.json and save_stall*.json, subfolders included
    python -m benchmarks.plots FILE.json    # one result; the PNG is written next to it

Nothing here imports torch: a figure is redrawn in a second.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def plot_overhead(result: dict[str, Any], path: Path) -> None:
    """Per-round throughput ratios of each arm against ``disabled``, with the reported figure and its 95% interval.

    The interval is what tells a cost from noise on a shared machine: one that
    spans 1.0 means no measurable difference, whichever side of 1.0 the figure
    fell on, and the tick label says so.
    """
    plt = _pyplot()
    arms = [arm for arm in result["samples"] if arm != "disabled"]
    base = result["samples"]["disabled"]
    per_round = {arm: [b / a for b, a in zip(base, result["samples"][arm], strict=True)] for arm in arms}
    figures = result["throughput_ratio_vs_disabled"]
    recorded = result.get("throughput_ratio_95pct_interval", {})
    intervals = {arm: recorded.get(arm) or ratio_of_medians_interval(base, result["samples"][arm]) for arm in arms}
    fig, ax = plt.subplots(figsize=(max(8.0, 3.0 + 2.4 * len(arms)), 5.0))
    positions = range(1, len(arms) + 1)
    labels = [_overhead_label(arm, figures[arm], intervals[arm]) for arm in arms]
    ax.boxplot([per_round[arm] for arm in arms], tick_labels=labels)
    for i, arm in zip(positions, arms, strict=True):
        low, high = intervals[arm]
        ax.errorbar(i + 0.3, figures[arm], yerr=[[figures[arm] - low], [high - figures[arm]]], fmt="D",
                    color="black", capsize=4, markersize=5)  # fmt: skip
        if arm in result["targets"]:
            ax.hlines(result["targets"][arm], i - 0.35, i + 0.35, colors="red", linestyles="dashed")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_ylabel("throughput: disabled block time / arm block time")
    source = (
        "figure: median of the per-round ratios; interval: recorded by the run"
        if recorded
        else "figure: ratio of the median block times; interval: bootstrap over rounds, computed from the samples"
    )
    ax.set_title(
        f"ckptbus per-step throughput against disabled: {result['world_size']} ranks over gloo, "
        f"{result['rounds']} rounds of {result['steps_per_block']} steps\n"
        f"box: per-round ratios; black: the figure and its 95% interval; red dashed: target\n{source}",
        fontsize=9,
    )
    _save(plt, fig, path)


def _overhead_label(arm: str, figure: float, interval: list[float]) -> str:
    low, high = interval
    if low <= 1.0 <= high:
        verdict = "no measurable difference"
    elif high < 1.0:
        verdict = f"costs {(1 - figure) * 100:.1f}% of throughput"
    else:  # ckptbus cannot make a step faster: the machine drifted between blocks
        verdict = "above 1: drift, not a speed-up"
    return f"{arm}\n{figure:.4f} [{low:.3f}, {high:.3f}]\n{verdict}"


def ratio_of_medians_interval(base: list[float], arm: list[float], resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of ``median(base) / median(arm)``, resampling whole rounds (fixed seed).

    For results that did not record an interval: their figure is this ratio of
    medians (newer results record the interval of the median per-round ratio).
    """
    rng = random.Random(0)
    n = len(base)
    ratios = []
    for _ in range(resamples):
        rounds = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(base[i] for i in rounds) / statistics.median(arm[i] for i in rounds))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def plot_save_stall(result: dict[str, Any], path: Path) -> None:
    """How long each way of saving holds training (dd: the time to write the same bytes), round 0 left out."""
    plt = _pyplot()
    arms = list(result["samples_seconds"])
    samples = [result["samples_seconds"][a][1:] or result["samples_seconds"][a] for a in arms]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(arms), 4.2))
    # Two-line tick labels: "ckptbus sync crc32" and its neighbours do not fit side by side on one line.
    ax.boxplot(samples, tick_labels=[a.replace("ckptbus ", "ckptbus\n", 1) for a in arms])
    for i, values in enumerate(samples, start=1):  # the median, written beside its line
        ax.annotate(f"{statistics.median(values):.3f} s", (i + 0.27, statistics.median(values)), va="center",
                    fontsize=8)  # fmt: skip
    ax.set_ylabel("seconds training is held (dd: write time)")
    ax.set_ylim(bottom=0)
    ranks = result["world_size"]
    ax.set_title(
        f"full save of {result['parameters'] / 1e6:.0f}M params ({result['checkpoint_bytes'] / 1e6:.0f} MB), "
        f"{ranks} rank{'s' if ranks != 1 else ''}, {result['device']}; medians after round 0\n"
        f"async stall / save_state: {result['async_stall_over_save_state']:.3f} (target <= 0.10); "
        f"sync / dd: {result['sync_throughput_over_dd']:.2f} (target >= 0.80)",
        fontsize=9,
    )
    _save(plt, fig, path)


PLOTTERS = {"overhead": plot_overhead, "save_stall": plot_save_stall}


def replot(result_file: Path) -> Path:
    """Redraw the PNG of one JSON result (chosen by the file's name); returns the PNG's path."""
    kind = next((name for name in PLOTTERS if result_file.name.startswith(name)), None)
    if kind is None:
        raise ValueError(f"{result_file}: not a result of {' or '.join(PLOTTERS)}")
    image = result_file.with_suffix(".png")
    PLOTTERS[kind](json.loads(result_file.read_text(encoding="utf-8")), image)
    return image


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="JSON results (default: all under benchmarks/results)")
    args = parser.parse_args(argv)
    files = args.results or sorted(p for name in PLOTTERS for p in RESULTS.rglob(f"{name}*.json"))
    for result_file in files:
        print(replot(result_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
