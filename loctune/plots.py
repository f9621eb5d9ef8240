"""The figures of a training or evaluation run: results against step, PR curves, confusion.

Each function takes plain numbers (metric rows, a :class:`~loctune.metrics.DetectionEvaluation`)
and writes one PNG, so a saved run can be re-plotted without its model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from loctune.metrics import DetectionEvaluation, nanmean


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: what a results plot shows when the rows have any of it (a column's name after its last
#: ``/``): training loss, lr and gradient norm, then the task's validation numbers
RESULTS_COLUMNS = ("loss", "lr", "grad_norm", "ap", "ap50", "ap75", "ar100", "precision@*",
                   "recall@*", "acc50", "miou", "unparseable_rate")


def plot_results(
    rows: Sequence[Mapping[str, object]], path: str | Path, columns: Sequence[str] | None = None
) -> list[str]:
    """One panel per column of ``rows`` against ``step``, e.g. training loss and validation
    AP50; rows lacking a column simply have no point there. ``columns`` None: those named by
    :data:`RESULTS_COLUMNS` in that order (``eval/ap`` is ``ap``), or every numeric column
    when none is. Returns the columns drawn."""
    from fnmatch import fnmatch

    plt = _pyplot()
    numeric = sorted({
        k for r in rows for k, v in r.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    })
    if columns is None:
        chosen = [k for pattern in RESULTS_COLUMNS for k in numeric
                  if fnmatch(k.rsplit("/", 1)[-1], pattern)]
        columns = list(dict.fromkeys(chosen)) or numeric
    columns = [c for c in columns if c in numeric]
    if not columns:
        raise ValueError("plot_results: no numeric columns besides 'step' to plot")
    n_cols = min(4, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        pts = [(r["step"], r[column]) for r in rows
               if isinstance(r.get(column), int | float) and math.isfinite(r[column])]
        if pts:
            x, y = zip(*sorted(pts), strict=True)
            ax.plot(x, y, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(column.rsplit("/", 1)[-1], fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return columns


def plot_pr_curves(evaluation: DetectionEvaluation, path: str | Path) -> None:
    """Precision against recall at IoU 0.5, a line per class (AP50 in the legend) and their mean."""
    plt = _pyplot()
    recall = [i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    curves = evaluation.pr_curves
    for name in evaluation.classes:
        ap50 = evaluation.per_class[name]["ap50"]
        ax.plot(recall, curves[name], linewidth=1, label=f"{name} {ap50:.3f}")
    if len(evaluation.classes) > 1:
        mean = [nanmean([curves[c][i] for c in evaluation.classes]) for i in range(101)]
        ax.plot(recall, mean, color="black", linewidth=2.5,
                label=f"all classes {evaluation.stats['ap50']:.3f} AP50")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion_matrix(evaluation: DetectionEvaluation, path: str | Path) -> None:
    """Counts of (true, predicted) class at IoU 0.5, background included; colour is the share
    of each true class, so rare classes read as clearly as common ones."""
    plt = _pyplot()
    names = [*evaluation.classes, "background"]
    counts = evaluation.confusion
    shares = [[c / s if (s := sum(row)) else 0.0 for c in row] for row in counts]
    side = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion at IoU 0.5, score >= {evaluation.conf:g}")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

