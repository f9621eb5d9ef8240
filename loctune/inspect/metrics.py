"""Image-level and localisation metrics for inspection; defective is the positive class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loctune.types import Box


def _binary(values: Sequence[bool | int], name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name}: expected a 1-D sequence of 0/1 or bools")
    return arr.astype(bool)


def auroc(scores: Sequence[float], defective: Sequence[bool | int]) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula.

    The probability that a random defective image scores higher than a random
    good one, ties counting one half (tied scores get their average rank).
    NaN when either class is missing.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _binary(defective, "defective")
    if s.shape != y.shape:
        raise ValueError(f"scores and defective differ in length: {len(s)} vs {len(y)}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average 1-based rank over each run of equal scores
    starts = np.flatnonzero(np.concatenate(([True], sorted_s[1:] != sorted_s[:-1])))
    ends = np.concatenate((starts[1:], [len(s)]))
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(predicted: Sequence[bool | int], defective: Sequence[bool | int]) -> float:
    p, y = _binary(predicted, "predicted"), _binary(defective, "defective")
    return float((p == y).mean()) if len(y) else float("nan")


def f1(predicted: Sequence[bool | int], defective: Sequence[bool | int]) -> float:
    """F1 of the defective class; 0 when nothing is predicted or present."""
    p, y = _binary(predicted, "predicted"), _binary(defective, "defective")
    tp = int((p & y).sum())
    denom = int(p.sum()) + int(y.sum())
    return 2 * tp / denom if denom else 0.0


def point_in_boxes(point: tuple[float, float], boxes: Sequence[Box]) -> bool:
    """Pointing-game hit: the predicted peak lies inside (or on the edge of) a true box."""
    x, y = point
    return any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes)
