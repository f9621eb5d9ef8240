"""Prediction on unlabelled images: files, folders and globs in; drawn boxes, JSON, YOLO txt
and COCO results out."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loctune.evaluate import NMS_IOU, ConfidenceMode, EvalResult, evaluate, json_safe
from loctune.models.base import VLMAdapter
from loctune.types import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def expand_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders' images (sorted, not
    recursive), and glob patterns (``"photos/*.jpg"``, ``"**/*.png"``). An input that
    matches nothing is an error naming it, so a typo never predicts on fewer images."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(
                    f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
        elif path.is_file():
            images = [path]
        elif glob.has_magic(str(item)):
            images = sorted(Path(p) for p in glob.glob(str(item), recursive=True)
                            if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"{item}: the pattern matches no images")
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        found.extend(images)
    return list(dict.fromkeys(found))  # an image named twice is predicted once


def infer_task(prompt: str) -> str:
    """``"detection"`` for a prompt that starts with the word "detect" (loctune's
    ``"detect a ; b"`` and the families' own), else ``"grounding"``."""
    return "detection" if prompt.strip().lower().split(" ")[0] == "detect" else "grounding"


@dataclass
class Prediction:
    """The samples predicted on and their result (no metrics: there is no truth)."""

    samples: list[Sample]
    result: EvalResult

    @property
    def records(self) -> list[dict]:
        return self.result.predictions

    def save(self, directory: str | Path, save_txt: bool = False, save_coco: bool = False,
             classes: Sequence[str] = ()) -> Path:
        """Write one drawn PNG per image and ``predictions.json``; ``save_txt`` adds YOLO
        ``labels/<stem>.txt`` and ``save_coco`` a COCO ``coco_results.json``. Class indices
        follow ``classes``, by default the labels found, in order of first appearance."""
        from loctune.exports import write_coco, write_yolo_txt
        from loctune.visualize import draw_detections

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for sample, record in zip(self.samples, self.records, strict=True):
            draw_detections(sample.load_image(), record["detections"],
                            out / f"{sample.image_id}.png")
        records = [{"image": str(s.image), **r} for s, r in zip(self.samples, self.records,
                                                                    strict=True)]
        (out / "predictions.json").write_text(json.dumps(json_safe(records), indent=1))
        classes = list(classes) or list(dict.fromkeys(
            d["label"] for r in self.records for d in r["detections"]
        ))
        if save_txt:
            write_yolo_txt(self.records, classes, out / "labels")
        if save_coco:
            write_coco(self.records, classes, out)
        return out


def predict(
    adapter: VLMAdapter,
    images: Sequence[str | Path],
    prompt: str,
    task: str | None = None,
    conf: float = 0.0,
    confidence: ConfidenceMode = "tokens",
    nms_iou: float | None = NMS_IOU,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> Prediction:
    """Run ``adapter`` on ``images`` (files, folders, globs) with one ``prompt``.

    ``task`` defaults to :func:`infer_task` of the prompt. Detections scoring under
    ``conf`` are dropped (their expected-value twins with them); ``confidence`` and
    ``nms_iou`` are as in :func:`loctune.evaluate.evaluate`.
    """
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf!r}")
    paths = expand_images(images)
    task = task or infer_task(prompt)
    stems = _unique_stems(paths)
    samples = [Sample(image=str(p), prompt=prompt, boxes=[], labels=[], task=task,
                      image_id=stem) for p, stem in zip(paths, stems, strict=True)]
    result = evaluate(adapter, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      score=False, confidence=confidence, nms_iou=nms_iou, progress=progress)
    for record in result.predictions:
        keep = [k for k, d in enumerate(record["detections"]) if d["score"] >= conf]
        record["detections"] = [record["detections"][k] for k in keep]
        record["ev_detections"] = [record["ev_detections"][k] for k in keep]
    return Prediction(samples, result)


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (``a``, ``a_2``) so outputs of ``x/a.jpg`` and ``y/a.png``
    do not overwrite each other."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        n = seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if n == 1 else f"{path.stem}_{n}")
    return stems


__all__ = ["IMAGE_SUFFIXES", "Prediction", "expand_images", "infer_task", "predict"]
