"""Generation -> codec.decode -> boxes -> metrics, for any adapter.

Scores per task: referring expressions (``grounding``) by Acc@0.5 and mean
IoU; detection by COCO AP/AP50/AP75 through pycocotools, ranked by each box's
confidence taken from the model's own token probabilities (a constant score
would make AP meaningless). Both argmax decoding (the generated tokens) and
expected-value decoding (the mean location under the model's distribution at
each location step) are scored side by side, ``ev_`` prefixing the latter.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from loctune.boxes import iou
from loctune.codecs.base import Codec
from loctune.models.base import Generation, VLMAdapter
from loctune.types import Detection, Sample


@dataclass
class Scored:
    """One generation read back: argmax and expected-value detections, and diagnostics."""

    detections: list[Detection]
    ev_detections: list[Detection]
    n_malformed: int = 0
    loc_entropies: list[float] = field(default_factory=list)


def _location_groups(gen: Generation, loc_index: dict[int, int], per_box: int) -> list[list[int]]:
    """Positions of complete runs of ``per_box`` consecutive location tokens, in order."""
    groups, run = [], []
    for i, tok in enumerate(gen.token_ids):
        if tok in loc_index:
            run.append(i)
            if len(run) == per_box:
                groups.append(run)
                run = []
        else:
            run = []
    return groups


def _coords(codec: Codec, k: float | torch.Tensor) -> tuple[float, ...]:
    if codec.space.kind == "bins":
        return (float(k),)
    return (float(k // codec.space.n), float(k % codec.space.n))


def score_generation(gen: Generation, codec: Codec, loc_ids: Sequence[int], image_size: tuple[int, int]) -> Scored:
    """Decode ``gen`` and attach to every box a confidence and an expected-value twin.

    Confidence: the geometric mean probability of the box's location tokens,
    ``exp(mean log p)``: it falls when the model hesitates about where the box
    is, which is what detection AP should rank by. Boxes the token walk cannot
    align with the text decode (malformed output) get the whole generation's
    geometric mean probability and keep their argmax box as the EV box.
    """
    decoded = codec.decode(gen.text, image_size)
    loc_index = {t: k for k, t in enumerate(loc_ids)}
    groups = _location_groups(gen, loc_index, codec.tokens_per_box) if codec.space else []
    lp = gen.token_logprobs
    fallback = math.exp(sum(lp) / len(lp)) if lp else 0.0
    dets, ev, entropies = [], [], []
    used = 0
    for det in decoded.detections:
        match = None
        for j in range(used, len(groups)):
            locs = [_coords(codec, loc_index[gen.token_ids[i]]) for i in groups[j]]
            if np.allclose(codec.locations_to_box(locs, image_size), det.box, atol=1e-6):
                match, used = j, j + 1
                break
        if match is None:
            dets.append(Detection(det.label, det.box, fallback))
            ev.append(Detection(det.label, det.box, fallback))
            continue
        pos = groups[match]
        conf = math.exp(sum(lp[i] for i in pos) / len(pos))
        dets.append(Detection(det.label, det.box, conf))
        ev_box = det.box
        if gen.loc_probs is not None:
            means = []
            for i in pos:
                p = gen.loc_probs[i].double()
                p = p / p.sum().clamp(min=1e-30)
                entropies.append(float(-(p * p.clamp(min=1e-30).log()).sum()))
                k = torch.arange(len(p), dtype=torch.float64)
                if codec.space.kind == "bins":
                    means.append((float((p * k).sum()),))
                else:
                    n = codec.space.n
                    means.append((float((p * (k // n)).sum()), float((p * (k % n)).sum())))
            ev_box = codec.locations_to_box(means, image_size)
        ev.append(Detection(det.label, tuple(float(v) for v in ev_box), conf))
    return Scored(dets, ev, decoded.n_malformed, entropies)


# ---------------------------------------------------------------------------------------
# pure metrics


def grounding_metrics(pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]]) -> dict:
    """Acc@0.5 and mean IoU; a missing prediction (None) is a miss with IoU 0."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        return {"acc50": float("nan"), "miou": float("nan")}
    ious = [float(iou([p], [g])[0]) if p is not None else 0.0 for p, g in zip(pred_boxes, gt_boxes, strict=True)]
    return {"acc50": float(np.mean([v >= 0.5 for v in ious])), "miou": float(np.mean(ious))}


def coco_detection_metrics(
    predictions: Sequence[Sequence[Detection]], truths: Sequence[tuple[Sequence, Sequence[str]]]
) -> dict:
    """COCO AP, AP50, AP75 with pycocotools over images given as parallel lists.

    ``truths[i] = (boxes, labels)``. Categories are the ground-truth label
    names; predicted labels outside them are not scorable and are reported as
    ``unknown_label_rate`` instead of being silently renamed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = sorted({lab for _, labels in truths for lab in labels})
    cat = {n: i + 1 for i, n in enumerate(names)}
    images, anns, dets = [], [], []
    n_pred = n_unknown = 0
    for img_id, ((boxes, labels), preds) in enumerate(zip(truths, predictions, strict=True), 1):
        images.append({"id": img_id, "width": 1, "height": 1})
        for b, lab in zip(boxes, labels, strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat[lab],
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for d in preds:
            n_pred += 1
            if d.label not in cat:
                n_unknown += 1
                continue
            b = d.box
            dets.append({"image_id": img_id, "category_id": cat[d.label],
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(d.score)})
    out = {"unknown_label_rate": n_unknown / n_pred if n_pred else 0.0}
    if not anns:
        return {**out, "ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    if not dets:
        return {**out, "ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat.items()]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {**out, "ap": max(float(s[0]), 0.0), "ap50": max(float(s[1]), 0.0), "ap75": max(float(s[2]), 0.0)}


# ---------------------------------------------------------------------------------------
# the evaluator


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict]

    def save(self, out_dir: str | Path) -> None:
        """``predictions.jsonl`` (one line per sample) and ``metrics.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for p in self.predictions:
                f.write(json.dumps(p) + "\n")
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2))


def _det_dict(d: Detection) -> dict:
    return {"label": d.label, "box": [round(float(v), 3) for v in d.box], "score": round(float(d.score), 5)}


def evaluate(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    score: bool = True,
) -> EvalResult:
    """Generate for every sample, decode, and (with ``score``) compute the metrics.

    ``max_new_tokens`` defaults to room for every ground-truth object plus
    slack; with ``score=False`` (prediction on unlabelled images) only the
    predictions are returned.
    """
    if max_new_tokens is None:
        most = max((len(s.boxes) for s in samples), default=1)
        max_new_tokens = 16 + (adapter.codec.tokens_per_box + 8) * max(most, 1)
    scored: list[Scored] = []
    records: list[dict] = []
    bar = tqdm(total=len(samples), desc="eval", disable=not progress, leave=False)
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i : i + batch_size])
        for s, gen in zip(chunk, adapter.generate(chunk, max_new_tokens=max_new_tokens), strict=True):
            sc = score_generation(gen, adapter.codec, adapter.loc_token_ids, s.image_size)
            scored.append(sc)
            records.append({
                "image_id": s.image_id, "prompt": s.prompt, "text": gen.text, "n_malformed": sc.n_malformed,
                "detections": [_det_dict(d) for d in sc.detections],
                "ev_detections": [_det_dict(d) for d in sc.ev_detections],
                "gt": {"boxes": [list(b) for b in s.boxes], "labels": list(s.labels)},
            })
        bar.update(len(chunk))
    bar.close()
    return EvalResult(metrics_of(samples, scored) if score else {}, records)


def metrics_of(samples: Sequence[Sample], scored: Sequence[Scored]) -> dict[str, float]:
    """All metrics of a scored evaluation, split by task where the samples mix tasks.

    ``unparseable_rate``: share of generations with a malformed fragment, or with
    no readable box although the image has objects.
    """
    m: dict[str, float] = {}
    ground = [(s, sc) for s, sc in zip(samples, scored, strict=True) if s.task == "grounding"]
    detect = [(s, sc) for s, sc in zip(samples, scored, strict=True) if s.task != "grounding"]
    for prefix, attr in (("", "detections"), ("ev_", "ev_detections")):
        if ground:
            preds = [getattr(sc, attr)[0].box if getattr(sc, attr) else None for _, sc in ground]
            m.update({prefix + k: v for k, v in grounding_metrics(preds, [s.boxes[0] for s, _ in ground]).items()})
        if detect:
            coco = coco_detection_metrics([getattr(sc, attr) for _, sc in detect],
                                          [(s.boxes, s.labels) for s, _ in detect])
            m.update({prefix + k: v for k, v in coco.items() if prefix == "" or k != "unknown_label_rate"})
    m["unparseable_rate"] = float(np.mean([
        sc.n_malformed > 0 or (not sc.detections and len(s.boxes) > 0) for s, sc in zip(samples, scored, strict=True)
    ]))
    ent = [e for sc in scored for e in sc.loc_entropies]
    m["loc_entropy"] = float(np.mean(ent)) if ent else float("nan")
    m["n"] = float(len(samples))
    return m


__all__ = ["EvalResult", "Scored", "coco_detection_metrics", "evaluate", "grounding_metrics", "metrics_of",
           "score_generation"]
