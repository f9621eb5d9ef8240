"""Predictions in the formats other tools read: COCO results, YOLO txt, `supervision`.

Each writer takes prediction records as :func:`loctune.evaluate.evaluate` makes them
(``image_id``, ``image_size``, ``detections`` of ``{"label", "box", "score"}`` in
pixel xyxy, and ``gt``), so a saved ``predictions.jsonl`` can be exported later
without the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loctune.metrics import normalize_label

Record = Mapping[str, Any]


def coco_image_ids(records: Sequence[Record]) -> list[int]:
    """COCO integer image ids: the records' own ids when all are distinct integers
    (a COCO source keeps its ids), else 1..N in order."""
    ids = [str(r["image_id"]) for r in records]
    if all(i.isdecimal() and i.isascii() for i in ids) and len(set(ids)) == len(ids):
        return [int(i) for i in ids]
    return list(range(1, len(records) + 1))


def coco_export(records: Sequence[Record], classes: Sequence[str]) -> tuple[dict, list[dict]]:
    """``(ground_truth, results)``: a COCO instances dict of the records' truth (their
    ``gt["crowd"]`` regions with ``iscrowd=1``) and the COCO results list (``image_id``,
    ``category_id``, xywh ``bbox``, ``score``).

    Category ``k + 1`` is ``classes[k]``; labels are matched after
    :func:`~loctune.metrics.normalize_label`, and a detection whose label is not a
    class is left out, as COCO evaluation would not score it. The pair loads into
    pycocotools as ``COCO(gt).loadRes(results)``.
    """
    category_id = {normalize_label(c): k + 1 for k, c in enumerate(classes)}
    images, annotations, results = [], [], []
    for image_id, record in zip(coco_image_ids(records), records, strict=True):
        width, height = record["image_size"]
        images.append({"id": image_id, "file_name": str(record["image_id"]), "width": width,
                       "height": height})
        gt = record.get("gt", {})
        objects = [(box, label, 0) for box, label in
                   zip(gt.get("boxes", ()), gt.get("labels", ()), strict=True)]
        objects += [(box, label, 1) for label, box in gt.get("crowd", ())]
        for box, label, crowd in objects:
            category = category_id.get(normalize_label(label))
            if category is not None:
                xywh = _xywh(box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": category, "bbox": xywh,
                                    "area": xywh[2] * xywh[3], "iscrowd": crowd})
        for det in record["detections"]:
            category = category_id.get(normalize_label(det["label"]))
            if category is not None:
                results.append({"image_id": image_id, "category_id": category,
                                "bbox": _xywh(det["box"]), "score": float(det["score"])})
    categories = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def write_coco(records: Sequence[Record], classes: Sequence[str], directory: str | Path) -> Path:
    """Write ``coco_results.json`` and the matching ``coco_gt.json`` into ``directory``."""
    out = Path(directory)
    gt, results = coco_export(records, classes)
    (out / "coco_gt.json").write_text(json.dumps(gt))
    (out / "coco_results.json").write_text(json.dumps(results))
    return out / "coco_results.json"


def yolo_lines(record: Record, classes: Sequence[str], with_score: bool = True) -> list[str]:
    """Ultralytics ``save_txt`` lines ``class cx cy w h [score]``, normalised to the image.

    A detection whose label is not one of ``classes`` has no class index: it is
    left out (the caller can count the difference).
    """
    index = {normalize_label(c): k for k, c in enumerate(classes)}
    width, height = record["image_size"]
    lines = []
    for det in record["detections"]:
        k = index.get(normalize_label(det["label"]))
        if k is None:
            continue
        x1, y1, x2, y2 = det["box"]
        values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width,
                  (y2 - y1) / height]
        line = f"{k} " + " ".join(f"{v:.6f}" for v in values)
        lines.append(line + (f" {det['score']:.6f}" if with_score else ""))
    return lines


def write_yolo_txt(records: Sequence[Record], classes: Sequence[str], directory: str | Path) -> int:
    """One ``<image_id>.txt`` per record under ``directory`` (empty when nothing was found)
    and a ``classes.txt``; returns the number of detections left out for an unknown label."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    left_out = 0
    for record in records:
        lines = yolo_lines(record, classes)
        left_out += len(record["detections"]) - len(lines)
        (out / f"{Path(str(record['image_id'])).name}.txt").write_text(
            "".join(line + "\n" for line in lines)
        )
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return left_out


def to_supervision(record: Record, classes: Sequence[str] = ()):
    """A ``supervision.Detections`` of one record (xyxy, confidence, class_id and the
    label as ``data["class_name"]``); labels outside ``classes`` get class_id -1.
    Needs the optional ``supervision`` package."""
    try:
        import supervision as sv
    except ImportError as err:  # optional integration
        raise ImportError("to_supervision needs the 'supervision' package: "
                          "pip install supervision") from err
    import numpy as np

    index = {normalize_label(c): k for k, c in enumerate(classes)}
    dets = record["detections"]
    return sv.Detections(
        xyxy=np.array([d["box"] for d in dets], dtype=np.float32).reshape(-1, 4),
        confidence=np.array([d["score"] for d in dets], dtype=np.float32),
        class_id=np.array([index.get(normalize_label(d["label"]), -1) for d in dets], dtype=int),
        data={"class_name": np.array([d["label"] for d in dets], dtype=str)},
    )


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]


__all__ = ["coco_export", "coco_image_ids", "to_supervision", "write_coco", "write_yolo_txt",
           "yolo_lines"]
