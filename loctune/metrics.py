"""Scores for predicted boxes that need no model: grounding accuracy, COCO AP, entropy.

Everything here takes plain boxes/detections so that predictions made anywhere
(another toolkit, a saved ``predictions.jsonl``) can be scored the same way as
:func:`loctune.evaluate.evaluate` scores a model.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loctune.boxes import iou, iou_matrix
from loctune.types import Box, Detection

NAN = float("nan")


def grounding_metrics(
    pred_boxes: Sequence[Box | None], gt_boxes: Sequence[Box]
) -> dict[str, float]:
    """Acc@0.5 and mean IoU of one predicted box per referring expression.

    ``pred_boxes[i]`` is the (first) box predicted for expression i, or None when
    the model gave none: a miss, counted with IoU 0 rather than left out, so a
    model cannot raise its score by declining to answer.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(
            f"grounding_metrics: {len(pred_boxes)} predictions for {len(gt_boxes)} ground truths"
        )
    if not gt_boxes:
        return {"acc50": NAN, "miou": NAN}
    answered = [i for i, box in enumerate(pred_boxes) if box is not None]
    ious = torch.zeros(len(gt_boxes), dtype=torch.float64)
    if answered:
        ious[answered] = iou([pred_boxes[i] for i in answered], [gt_boxes[i] for i in answered])
    return {"acc50": float((ious >= 0.5).double().mean()), "miou": float(ious.mean())}


def normalize_label(label: str) -> str:
    """Case- and whitespace-insensitive class name, so ``" Dog"`` matches ``"dog"``."""
    return " ".join(label.lower().split())


COCO_STATS = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # the names of pycocotools' twelve ``COCOeval.stats``, in its order


@dataclass
class DetectionEvaluation:
    """Everything a detection evaluation gives, for tables and plots.

    ``stats`` has pycocotools' twelve numbers (:data:`COCO_STATS`); ``per_class``
    maps each class to its AP and AP50; ``pr_curves`` maps a class to its
    precision at the 101 COCO recall points at IoU 0.5 (NaN beyond the largest
    recall reached). ``confusion`` counts matches at IoU 0.5 among detections
    scoring at least ``conf``: rows are the true class, columns the predicted one,
    and the last row/column is background (a missed object / a false detection).
    ``precision`` / ``recall`` are at that same confidence.
    """

    classes: list[str]
    stats: dict[str, float]
    per_class: dict[str, dict[str, float]]
    pr_curves: dict[str, list[float]]
    confusion: list[list[int]]
    conf: float
    precision: float
    recall: float
    unknown_label_rate: float

    def metrics(self) -> dict[str, float]:
        """The flat numbers, as :func:`coco_detection_metrics` returns them."""
        return {
            **self.stats,
            f"precision@{self.conf:g}": self.precision,
            f"recall@{self.conf:g}": self.recall,
            "unknown_label_rate": self.unknown_label_rate,
        }


def coco_detection_metrics(
    preds: Sequence[Sequence[Detection]],
    gts: Sequence[Sequence[Detection]],
    crowd: Sequence[Sequence[Detection]] = (),
    conf: float = 0.25,
) -> dict[str, float]:
    """pycocotools' twelve numbers (AP .50:.95, AP50, AP75, by size, AR@1/10/100...),
    precision and recall at ``conf``, and ``unknown_label_rate``: see
    :func:`evaluate_detections`."""
    return evaluate_detections(preds, gts, crowd=crowd, conf=conf).metrics()


def evaluate_detections(
    preds: Sequence[Sequence[Detection]],
    gts: Sequence[Sequence[Detection]],
    crowd: Sequence[Sequence[Detection]] = (),
    conf: float = 0.25,
) -> DetectionEvaluation:
    """Score detections through pycocotools, plus per-class AP, PR curves and a confusion matrix.

    ``preds[i]`` and ``gts[i]`` are the detections and the ground truth of image
    i (ground-truth scores are ignored); ``crowd[i]``, when given, are image i's
    crowd regions (COCO ``iscrowd=1``): detections on them are ignored, neither
    true nor false positives, as pycocotools does. Categories are the normalised
    labels of the ground truth; as in COCO, detections of a class absent from the
    ground truth are not scored, and their share is returned as
    ``unknown_label_rate`` so that a model writing "raccoons" for "raccoon" does
    not fail silently. Detection scores rank the detections, so they must be real
    confidences. No detections at all gives AP 0; no ground truth gives NaN.
    """
    if len(preds) != len(gts) or (crowd and len(crowd) != len(gts)):
        raise ValueError(
            f"evaluate_detections: {len(preds)} prediction lists and {len(crowd)} crowd lists "
            f"for {len(gts)} images"
        )
    crowd = crowd or [[] for _ in gts]
    categories = sorted({normalize_label(d.label) for image in gts for d in image})
    category_id = {name: k + 1 for k, name in enumerate(categories)}
    n_preds = sum(len(image) for image in preds)
    dt_anns = _coco_annotations(preds, category_id, kind="detection")
    unknown = (n_preds - len(dt_anns)) / n_preds if n_preds else 0.0
    gt_anns = _coco_annotations(gts, category_id, kind="truth")
    gt_anns += _coco_annotations(crowd, category_id, kind="crowd", first_id=len(gt_anns) + 1)
    curve_none = [NAN] * 101
    result = DetectionEvaluation(
        classes=categories,
        stats=dict.fromkeys(COCO_STATS, NAN if not categories else 0.0),
        per_class={c: {"ap": 0.0, "ap50": 0.0} for c in categories},
        pr_curves={c: list(curve_none) for c in categories},
        confusion=_confusion(preds, gts, crowd, categories, conf),
        conf=conf,
        precision=NAN,
        recall=NAN,
        unknown_label_rate=unknown,
    )
    result.precision, result.recall = _precision_recall(result.confusion)
    if not categories or not dt_anns:  # pycocotools cannot evaluate an empty result set
        return result

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    base = {
        "images": [{"id": i + 1} for i in range(len(gts))],
        "categories": [{"id": k, "name": name} for name, k in category_id.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {**base, "annotations": gt_anns}
        coco_dt.dataset = {**base, "annotations": dt_anns}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools writes -1 where a value is undefined.
    stats = zip(COCO_STATS, evaluator.stats, strict=True)
    result.stats = {k: NAN if v < 0 else float(v) for k, v in stats}
    precision = evaluator.eval["precision"]  # [IoU 10, recall 101, class, area 4, maxDets 3]
    for k, name in enumerate(categories):
        all_iou = precision[:, :, k, 0, -1]
        at_50 = precision[0, :, k, 0, -1]
        result.per_class[name] = {
            "ap": _defined_mean(all_iou),
            "ap50": _defined_mean(at_50),
        }
        result.pr_curves[name] = [NAN if v < 0 else float(v) for v in at_50]
    return result


def _defined_mean(values) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else NAN


def _confusion(preds, gts, crowd, categories, conf) -> list[list[int]]:
    """Class-agnostic greedy matching at IoU 0.5 by score, counted by (true, predicted) class."""
    index = {name: k for k, name in enumerate(categories)}
    background = len(categories)
    matrix = [[0] * (background + 1) for _ in range(background + 1)]
    for detections, truth, regions in zip(preds, gts, crowd, strict=True):
        dets = sorted(
            (d for d in detections if d.score >= conf and normalize_label(d.label) in index),
            key=lambda d: -d.score,
        )
        ious = iou_matrix([d.box for d in dets], [t.box for t in truth])
        taken: set[int] = set()
        for i, det in enumerate(dets):
            free = [j for j in range(len(truth)) if j not in taken and ious[i, j] >= 0.5]
            predicted = index[normalize_label(det.label)]
            if free:
                j = max(free, key=lambda j: float(ious[i, j]))
                taken.add(j)
                matrix[index[normalize_label(truth[j].label)]][predicted] += 1
            elif not _on_crowd(det, regions):
                matrix[background][predicted] += 1
        for j, t in enumerate(truth):
            if j not in taken:
                matrix[index[normalize_label(t.label)]][background] += 1
    return matrix


def _on_crowd(det: Detection, regions: Sequence[Detection]) -> bool:
    """COCO's crowd rule: at least half of the detection lies inside a crowd region."""
    if not regions:
        return False
    x1, y1, x2, y2 = det.box
    own = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    for r in regions:
        w = min(x2, r.box[2]) - max(x1, r.box[0])
        h = min(y2, r.box[3]) - max(y1, r.box[1])
        if own > 0 and w > 0 and h > 0 and w * h / own >= 0.5:
            return True
    return False


def _precision_recall(confusion: list[list[int]]) -> tuple[float, float]:
    """Micro precision and recall: a match counts only when the predicted class is right."""
    background = len(confusion) - 1
    tp = sum(confusion[k][k] for k in range(background))
    n_pred = sum(confusion[r][c] for r in range(background + 1) for c in range(background))
    n_true = sum(confusion[r][c] for r in range(background) for c in range(background + 1))
    return (tp / n_pred if n_pred else NAN), (tp / n_true if n_true else NAN)


def _coco_annotations(
    images: Sequence[Sequence[Detection]],
    category_id: dict[str, int],
    kind: str,
    first_id: int = 1,
) -> list[dict]:
    """COCO annotation dicts (ids from 1: pycocotools treats id 0 as unmatched).

    ``kind`` is ``"detection"`` (with a score), ``"truth"`` or ``"crowd"``
    (ground truth with ``iscrowd=1``).
    """
    anns = []
    for image_index, detections in enumerate(images):
        for det in detections:
            category = category_id.get(normalize_label(det.label))
            if category is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in det.box)
            w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
            ann = {
                "id": first_id + len(anns),
                "image_id": image_index + 1,
                "category_id": category,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": int(kind == "crowd"),
            }
            if kind == "detection":
                ann["score"] = float(det.score)
            anns.append(ann)
    return anns


def duplicate_box_rate(preds: Sequence[Sequence[Detection]], iou_threshold: float = 0.95) -> float:
    """Share of predicted boxes that repeat an earlier box of the same answer.

    Emitting one object twice is a known failure of fine-tuned VLMs; AP hides it
    behind a false positive. A box repeats another when their IoU reaches
    ``iou_threshold`` (0.95 catches token-identical boxes and one-bin jitter),
    whatever the labels say. No boxes at all gives 0.
    """
    n_boxes = sum(len(p) for p in preds)
    repeats = 0
    for detections in preds:
        if len(detections) < 2:
            continue
        ious = iou_matrix([d.box for d in detections], [d.box for d in detections])
        repeats += int((ious.tril(-1) >= iou_threshold).any(1).sum())
    return repeats / n_boxes if n_boxes else 0.0


def location_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``probs [..., n_loc]`` renormalised to sum to 1.

    Renormalising over the location slice measures how spread the model's
    guess of *where* is, independently of how sure it is that a location comes
    next. A row with no mass has no distribution and gives NaN.
    """
    p = probs.double()
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.special.entr(p).sum(dim=-1)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else NAN
