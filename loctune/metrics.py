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

import torch

from loctune.boxes import iou
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


def coco_detection_metrics(
    preds: Sequence[Sequence[Detection]], gts: Sequence[Sequence[Detection]]
) -> dict[str, float]:
    """COCO AP (IoU .50:.95), AP50 and AP75 through pycocotools, plus ``unknown_label_rate``.

    ``preds[i]`` and ``gts[i]`` are the detections and the ground truth of image
    i (ground-truth scores are ignored). Categories are the normalised labels of
    the ground truth; as in COCO, detections of a class absent from the ground
    truth are not scored, and their share is returned as ``unknown_label_rate``
    so that a model writing "raccoons" for "raccoon" does not fail silently.
    Detection scores rank the detections, so they must be real confidences. No
    detections at all gives AP 0; no ground truth gives NaN.
    """
    if len(preds) != len(gts):
        raise ValueError(
            f"coco_detection_metrics: {len(preds)} prediction lists for {len(gts)} images"
        )
    categories = sorted({normalize_label(d.label) for image in gts for d in image})
    category_id = {name: k + 1 for k, name in enumerate(categories)}
    n_preds = sum(len(image) for image in preds)
    dt_anns = _coco_annotations(preds, category_id, with_score=True)
    unknown = {"unknown_label_rate": (n_preds - len(dt_anns)) / n_preds if n_preds else 0.0}
    if not categories:
        return {"ap": NAN, "ap50": NAN, "ap75": NAN, **unknown}
    if not dt_anns:  # pycocotools cannot evaluate an empty result set
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, **unknown}
    gt_anns = _coco_annotations(gts, category_id, with_score=False)

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
    ap, ap50, ap75 = (NAN if v < 0 else float(v) for v in evaluator.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75, **unknown}


def _coco_annotations(
    images: Sequence[Sequence[Detection]], category_id: dict[str, int], with_score: bool
) -> list[dict]:
    """COCO annotation dicts (ids from 1: pycocotools treats id 0 as unmatched)."""
    anns = []
    for image_index, detections in enumerate(images):
        for det in detections:
            category = category_id.get(normalize_label(det.label))
            if category is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in det.box)
            w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
            ann = {
                "id": len(anns) + 1,
                "image_id": image_index + 1,
                "category_id": category,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            if with_score:
                ann["score"] = float(det.score)
            anns.append(ann)
    return anns


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
