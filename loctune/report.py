"""Turn per-run results of a comparison into the tables and figures of a paper.

Pure functions over rows ``{"method", "size", "seed", <metric>: float, ...}``:
nothing here trains or evaluates, so a report can be rebuilt from
``results.csv`` alone.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str | Path) -> list[dict]:
    """Rows with numbers parsed back (ints for size/seed, floats for metrics)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if k in ("size", "seed"):
                    row[k] = int(v)
                else:
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        row[k] = v
            out.append(row)
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (a run's ``metrics.jsonl``); ``[]`` when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def aggregate(
    rows: Sequence[dict], metric: str, by: str = "size"
) -> dict[tuple[str, int], tuple[float, float, int]]:
    """``(method, rows' by-value) -> (mean, sample std, n seeds)`` of ``metric``; NaNs skipped.

    ``by`` is the swept quantity: ``size`` (labelled examples) for a comparison,
    ``k`` (in-context examples) for the inspection study.
    """
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        v = _number(r.get(metric))
        if v is not None:
            groups[(r["method"], int(r[by]))].append(v)
    return {k: (*mean_std(v), len(v)) for k, v in groups.items()}


def _number(value) -> float | None:
    """A metric cell as a float; None when it is missing, not a number, or NaN."""
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary_table(
    rows: Sequence[dict],
    metrics: Mapping[str, str],
    methods: Mapping[str, str],
    by: str = "k",
) -> str:
    """One line per (value of ``by``, method) with ``mean ± std`` of every metric, "–" where
    a method has none; ``metrics`` and ``methods`` map row keys to column and row names."""
    aggs = {metric: aggregate(rows, metric, by) for metric in metrics}
    values = sorted({int(r[by]) for r in rows})
    lines = [
        f"| {by} | method | " + " | ".join(metrics.values()) + " |",
        "|---:|---|" + "---:|" * len(metrics),
    ]
    for value in values:
        for method, name in methods.items():
            cells = []
            for metric in metrics:
                if (method, value) in aggs[metric]:
                    mean, std, _ = aggs[metric][(method, value)]
                    cells.append(f"{mean:.3f} ± {std:.3f}")
                else:
                    cells.append("–")
            if any(c != "–" for c in cells):
                lines.append(f"| {value} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labels_to_reach(sizes: Sequence[int], means: Sequence[float], target: float) -> float | None:
    """Smallest training-set size at which a method's mean curve reaches ``target``.

    Linear interpolation in log(size) between the measured sizes, the way
    data-efficiency is usually read off a learning curve. ``None`` when the
    curve never gets there within the measured range (no extrapolation).
    """
    pts = sorted(zip(sizes, means, strict=True))
    if not pts:
        return None
    if pts[0][1] >= target:
        return float(pts[0][0])
    for (s0, m0), (s1, m1) in zip(pts, pts[1:], strict=False):
        if m1 >= target > m0:
            t = (target - m0) / (m1 - m0)
            return float(math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0))))
    return None


def markdown_table(
    rows: Sequence[dict], metric: str, methods: Sequence[str], bold: bool = True
) -> str:
    """Methods x sizes, ``mean ± std`` per cell, the highest mean per size in bold (``bold``)."""
    agg = aggregate(rows, metric)
    sizes = sorted({s for _, s in agg})
    lines = [
        "| method | " + " | ".join(f"n={s}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    best = {s: max((agg[(m, s)][0] for m in methods if (m, s) in agg), default=None) for s in sizes}
    for m in methods:
        cells = []
        for s in sizes:
            if (m, s) not in agg:
                cells.append("–")
                continue
            mean, std, n = agg[(m, s)]
            cell = f"{mean:.3f} ± {std:.3f}"
            is_best = bold and best[s] is not None and mean == best[s]
            cells.append(f"**{cell}**" if is_best else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how often a fair coin splits ``wins + losses`` seeds at
    least this unevenly (ties dropped). Needs no normality of the differences."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_table(rows: Sequence[dict], metric: str, methods: Sequence[str], baseline: str) -> str:
    """Methods x sizes: ``metric`` minus the baseline's on the same seed (same initialisation
    and labelled subset), as ``mean Δ ± std Δ (wins/seeds, sign-test p)``.

    Seeds move every method together (a bad initialisation or subset is bad for all), so the
    spread of the paired difference is what says whether a method is better, not the
    overlap of the per-method spreads.
    """
    values = {(r["method"], int(r["size"]), int(r["seed"])): _number(r.get(metric)) for r in rows}
    sizes = sorted({s for _, s, _ in values})
    lines = [
        "| method | " + " | ".join(f"n={s}" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for m in methods:
        if m == baseline:
            continue
        cells = []
        for size in sizes:
            diffs = []
            for (method, n, seed), v in values.items():
                base = values.get((baseline, n, seed))
                if method == m and n == size and v is not None and base is not None:
                    diffs.append(v - base)
            if not diffs:
                cells.append("–")
                continue
            wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            mean, std = mean_std(diffs)
            cells.append(
                f"{mean:+.3f} ± {std:.3f} ({wins}/{len(diffs)}, p={sign_test_p(wins, losses):.2f})"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_efficiency(
    rows: Sequence[dict], metric: str, methods: Sequence[str], baseline: str
) -> list[dict]:
    """Per method: labels needed to match the baseline's accuracy at its largest size."""
    agg = aggregate(rows, metric)
    base_sizes = sorted(s for m, s in agg if m == baseline)
    if not base_sizes:
        return []
    largest = base_sizes[-1]
    target = agg[(baseline, largest)][0]
    out = []
    for m in methods:
        sizes = sorted(s for mm, s in agg if mm == m)
        need = labels_to_reach(sizes, [agg[(m, s)][0] for s in sizes], target)
        out.append({
            "method": m,
            "target": target,
            "baseline_size": largest,
            "labels_needed": need,
            "ratio": None if need is None else need / largest,
        })
    return out


def plot_accuracy_vs_labels(
    rows: Sequence[dict],
    metric: str,
    methods: Sequence[str],
    path: str | Path,
    by: str = "size",
    xlabel: str = "labelled training examples",
    log_x: bool = True,
    labels: Mapping[str, str] | None = None,
    ylabel: str | None = None,
) -> None:
    """Mean ± std of ``metric`` against ``by`` (log axis unless ``log_x`` is False), a line
    per method, named by ``labels`` where given; the y axis is ``ylabel`` (default: the
    metric's key). Methods are nudged sideways (on a log axis) so that error bars at one
    size stay apart; the ticks are the measured sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, metric, by)
    drawn = [m for m in methods if any(mm == m for mm, _ in agg)]
    many = len(drawn) > 5  # then the legend goes beside the axes, off the error bars
    fig, ax = plt.subplots(figsize=(7.5 if many else 5.5, 4))
    for i, m in enumerate(drawn):
        sizes = sorted(s for mm, s in agg if mm == m)
        mean = [agg[(m, s)][0] for s in sizes]
        std = [agg[(m, s)][1] for s in sizes]
        nudge = 1.0 + 0.025 * (i - (len(drawn) - 1) / 2) if log_x else 1.0
        label = labels.get(m, m) if labels else m
        ax.errorbar([s * nudge for s in sizes], mean, yerr=std, marker="o", capsize=3,
                    label=label)
    if log_x:
        ax.set_xscale("log")
    ticks = sorted({s for _, s in agg})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_learning_curves(
    curves: dict[str, list[tuple[int, float]]], ylabel: str, path: str | Path
) -> None:
    """One line per run label, e.g. ``{"ce n=300 s0": [(step, loss), ...]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, label=label, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
