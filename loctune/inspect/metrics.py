"""Image-level and localisation metrics for inspection; defective is the positive class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from loctune.boxes import iou_matrix
from loctune.inspect.records import by_product, is_defective
from loctune.metrics import grounding_metrics
from loctune.types import Box, Sample

if TYPE_CHECKING:
    from loctune.inspect.run import ICLPrediction


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


def _first_box(prediction: ICLPrediction) -> Box | None:
    return prediction.detections[0].box if prediction.detections else None


def _pointed(prediction: ICLPrediction, truth: Sample) -> bool:
    """Pointing hit: the centre of the first predicted box lies in some true box."""
    box = _first_box(prediction)
    if box is None:
        return False
    x1, y1, x2, y2 = box
    return point_in_boxes(((x1 + x2) / 2, (y1 + y2) / 2), truth.boxes)


def _judged_against(prediction: ICLPrediction, truth: Sample) -> Box:
    """The true box a prediction is scored on: the one its first box overlaps most."""
    box = _first_box(prediction)
    if box is None or len(truth.boxes) == 1:
        return truth.boxes[0]
    return truth.boxes[int(iou_matrix([box], truth.boxes)[0].argmax())]


def inspection_metrics(
    predictions: Sequence[ICLPrediction], queries: Sequence[Sample]
) -> dict[str, Any]:
    """Image-level accuracy, F1, AUROC (per product and mean) and defect localisation.

    Localisation is over defective queries with true boxes, a query without a
    predicted box counting as a miss: ``loc_acc50`` (Acc@0.5 of
    :func:`loctune.metrics.grounding_metrics`: the first box has IoU >= 0.5
    with a true box) and ``loc_pointing`` (the first box's centre lies in a
    true box, which stays meaningful for defects a few pixels wide, where one
    location bin already costs most of the IoU). ``type_accuracy`` is over
    defective queries, the predicted type compared with ``meta["defect_type"]``.
    """
    truth = [is_defective(q) for q in queries]
    decided = [p.defective for p in predictions]
    per_product = {}
    for product in by_product(queries):
        rows = [i for i, q in enumerate(queries) if q.meta["product"] == product]
        per_product[product] = auroc([predictions[i].score for i in rows], [truth[i] for i in rows])
    defective = [(p, q) for p, q in zip(predictions, queries, strict=True) if is_defective(q)]
    boxed = [(p, q) for p, q in defective if q.boxes]
    aurocs = [v for v in per_product.values() if not np.isnan(v)]
    nan = float("nan")
    grounding = grounding_metrics(
        [_first_box(p) for p, _ in boxed], [_judged_against(p, q) for p, q in boxed]
    )
    return {
        "accuracy": accuracy(decided, truth),
        "f1": f1(decided, truth),
        "auroc": float(np.mean(aurocs)) if aurocs else nan,
        "auroc_per_product": per_product,
        "loc_acc50": grounding["acc50"],
        "loc_pointing": float(np.mean([_pointed(p, q) for p, q in boxed])) if boxed else nan,
        "type_accuracy": (
            float(np.mean([p.defect_type == q.meta["defect_type"] for p, q in defective]))
            if defective
            else nan
        ),
        "malformed_rate": float(np.mean([p.malformed for p in predictions]))
        if predictions
        else 0.0,
        "malformed_boxes": int(sum(p.n_malformed_boxes for p in predictions)),
        "n_queries": len(predictions),
    }
