"""Generations -> boxes (argmax and expected-value decoding) -> scores.

Two decodings are scored side by side:

* **argmax**: the boxes the codec reads from the generated text, i.e. the
  tokens the model chose;
* **expected value (EV)**: every location token of an object is replaced by the
  expectation of its coordinate(s) under the model's location distribution at
  that step (renormalised over the location tokens; the expected (row, col) on
  a grid), mapped to pixels with ``codec.locations_to_box``. Soft-label training
  spreads mass over neighbouring bins on purpose; EV decoding shows whether that
  spread is centred on the truth.

Objects are tied to their tokens through the codec: ``decode`` says which of
the text's location tokens each object was read from (``ObjectSpan.tokens``),
and the k-th location token of the text is the k-th location id of
``token_ids`` when the text is what the tokens spell. When it is not (text and
tokens disagree), an object keeps its argmax box for EV decoding, gets the
whole generation's mean token probability as score, and is counted malformed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from loctune.codecs import Codec
from loctune.metrics import (
    DetectionEvaluation,
    evaluate_detections,
    grounding_metrics,
    location_entropy,
    nanmean,
)
from loctune.models.base import Generation, VLMAdapter
from loctune.types import BOX_TASKS, Box, Detection, ObjectSpan, Sample

ConfidenceMode = Literal["tokens", "loc_tokens", "loc_mass"]
CONFIDENCE_MODES: tuple[str, ...] = ("tokens", "loc_tokens", "loc_mass")
_EV_KEYS = ("acc50", "miou", "ap", "ap50", "ap75")  # metrics that depend on the boxes
CONF = 0.25  # score from which a detection counts for precision, recall and confusion
NMS_IOU = 0.7  # default duplicate suppression of detection answers (torchvision-style NMS)


@dataclass
class DecodedGeneration:
    """What one generation yields: both decodings and the diagnostics.

    ``ev_detections[i]`` is ``detections[i]`` with its expected-value box (same
    label and score). ``loc_entropies`` holds one entropy per generated location
    token, in nats. ``n_suppressed`` objects were dropped as duplicates (``nms_iou``).
    """

    detections: list[Detection]
    ev_detections: list[Detection]
    n_malformed: int
    loc_entropies: list[float]
    n_suppressed: int = 0


def expected_locations(probs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``[k, dim]`` expected coordinates under each renormalised row of ``probs [k, n_loc]``.

    ``coords`` is ``LocationSpace.coords()``: the bin index, or (row, col) on a
    grid, so a grid gives the expected cell position, not the expected index.
    Rows without mass give NaN.
    """
    p = probs.double()
    p = p / p.sum(dim=-1, keepdim=True)
    return p @ coords.double()


@dataclass
class _TokenWalk:
    """One generation's tokens as the decoder sees them (all on the CPU, float64).

    ``location[i]`` is the location index generated at step i (location steps
    only); ``steps[k]`` is the step of the k-th location token, or empty when
    the text does not spell the generated location tokens (then nothing aligns).
    """

    location: dict[int, int]
    steps: list[int]
    logprobs: torch.Tensor
    loc_probs: torch.Tensor | None


class GenerationDecoder:
    """Decodes generations of one codec/vocabulary into scored detections.

    ``confidence`` picks how each detection is scored (all in [0, 1]):

    * ``"tokens"`` (default): geometric mean probability, exp(mean log p), of the
      object's location tokens and label tokens. It is the model's own
      likelihood of the object as written, length-normalised so that long
      labels are not penalised; it covers both *where* and *what*, the two ways
      a detection can be a false positive in COCO AP.
    * ``"loc_tokens"``: the same over the location tokens only (class-agnostic
      tasks, or labels that are not generated).
    * ``"loc_mass"``: geometric mean over the object's location steps of the
      probability mass within ``mass_radius`` (location units, grid distance
      for a grid) of the chosen location. Unlike the chosen token's probability
      it does not drop when a model spreads mass over neighbouring bins, as
      soft-label training teaches it to. Needs ``Generation.loc_probs``.

    An object's label tokens are all steps between its location tokens and the
    neighbouring location token on the side where its span puts the label
    (separators included, as the model chose them too).

    ``nms_iou`` drops an object that overlaps a higher-scoring object of the same
    label by more than that IoU (a box repeated in one generation has IoU 1), the
    usual post-processing of a detector and a known need after fine-tuning VLMs
    for detection; ``None`` keeps every object. EV boxes follow their argmax box.
    Only detection answers are suppressed.
    """

    def __init__(
        self,
        codec: Codec,
        loc_token_ids: Sequence[int],
        confidence: ConfidenceMode = "tokens",
        mass_radius: float = 1.0,
        nms_iou: float | None = None,
    ):
        if confidence not in CONFIDENCE_MODES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MODES}, got {confidence!r}")
        if nms_iou is not None and not 0.0 < nms_iou < 1.0:
            raise ValueError(f"nms_iou must be in (0, 1) or None, got {nms_iou!r}")
        space = codec.space
        if space is not None and len(loc_token_ids) != space.size:
            raise ValueError(
                f"loc_token_ids has {len(loc_token_ids)} ids but codec {codec.name!r} has "
                f"{space.size} location tokens"
            )
        self.codec = codec
        self.confidence = confidence
        self.mass_radius = mass_radius
        self.nms_iou = nms_iou
        self._loc_index = {int(t): k for k, t in enumerate(loc_token_ids)}
        self._coords = space.coords(dtype=torch.float64) if space is not None else None

    def __call__(
        self, generation: Generation, image_size: tuple[int, int], task: str = "detection"
    ) -> DecodedGeneration:
        """Decode one generation; duplicates are suppressed for detection only (a grounding
        answer is its first box, whatever follows)."""
        _check_generation(generation)
        decoded = self.codec.decode(generation.text, image_size)
        walk = self._walk(generation)
        entropies = []
        if walk.loc_probs is not None and walk.location:
            entropies = location_entropy(walk.loc_probs[list(walk.location)]).tolist()
        fallback_score = float(walk.logprobs.mean().exp()) if len(walk.logprobs) else 0.0
        detections, ev_detections = [], []
        n_unaligned = 0
        for det, span in zip(decoded.detections, decoded.spans, strict=True):
            box = tuple(float(v) for v in det.box)
            if not walk.steps or not span.tokens:
                n_unaligned += 1
                score, ev_box = fallback_score, box
            else:
                score = self._confidence(walk, span)
                ev_box = self._expected_box(walk, span, image_size) or box
            detections.append(Detection(det.label, box, score))
            ev_detections.append(Detection(det.label, ev_box, score))
        n_raw = len(detections)
        if self.nms_iou is not None and task == "detection" and len(detections) > 1:
            keep = suppress_duplicates(detections, self.nms_iou)
            detections = [detections[k] for k in keep]
            ev_detections = [ev_detections[k] for k in keep]
        return DecodedGeneration(
            detections,
            ev_detections,
            decoded.n_malformed + n_unaligned,
            entropies,
            n_raw - len(detections),
        )

    def _walk(self, generation: Generation) -> _TokenWalk:
        location = {
            i: self._loc_index[int(t)]
            for i, t in enumerate(generation.token_ids)
            if int(t) in self._loc_index
        }
        spelt = self._coords is not None and list(location.values()) == (
            self.codec.location_indices(generation.text)
        )
        loc_probs = generation.loc_probs
        return _TokenWalk(
            location,
            list(location) if spelt else [],
            torch.as_tensor(generation.token_logprobs, dtype=torch.float64),
            None if loc_probs is None else loc_probs.detach().to("cpu", torch.float64),
        )

    def _confidence(self, walk: _TokenWalk, span: ObjectSpan) -> float:
        steps = [walk.steps[k] for k in span.tokens]
        if self.confidence == "loc_mass":
            if walk.loc_probs is None:
                raise ValueError(
                    "confidence='loc_mass' needs Generation.loc_probs; the adapter gave none"
                )
            assert self.codec.space is not None  # steps exist only for token codecs
            chosen = torch.tensor([walk.location[i] for i in steps])
            near = self.codec.space.distance(chosen) <= self.mass_radius + 1e-9
            mass = (walk.loc_probs[steps] * near).sum(dim=-1)
            return float(mass.clamp(min=1e-300).log().mean().exp().clamp(max=1.0))
        if self.confidence == "tokens":
            steps += self._label_steps(walk, span)
        return float(walk.logprobs[steps].mean().exp())

    def _label_steps(self, walk: _TokenWalk, span: ObjectSpan) -> list[int]:
        first, stop = span.tokens.start, span.tokens.stop
        if span.label_first:
            start = walk.steps[first - 1] + 1 if first > 0 else 0
            return list(range(start, walk.steps[first]))
        end = walk.steps[stop] if stop < len(walk.steps) else len(walk.logprobs)
        return list(range(walk.steps[stop - 1] + 1, end))

    def _expected_box(
        self, walk: _TokenWalk, span: ObjectSpan, image_size: tuple[int, int]
    ) -> Box | None:
        """EV box, or None when there is no distribution to take the expectation over."""
        if walk.loc_probs is None:
            return None
        steps = [walk.steps[k] for k in span.tokens]
        values = expected_locations(walk.loc_probs[steps], self._coords)
        if not torch.isfinite(values).all():
            return None
        return tuple(float(v) for v in self.codec.locations_to_box(values.tolist(), image_size))


def suppress_duplicates(detections: Sequence[Detection], iou_threshold: float) -> list[int]:
    """Indices of the detections non-maximum suppression keeps, per label, best score first.

    Ties in score keep the earlier object, so a repeated box drops its repeat.
    """
    from torchvision.ops import batched_nms

    boxes = torch.tensor([d.box for d in detections], dtype=torch.float64)
    # a tiny rank term breaks score ties in generation order
    order = torch.arange(len(detections), dtype=torch.float64) * 1e-9
    scores = torch.tensor([d.score for d in detections], dtype=torch.float64) - order
    labels = {name: k for k, name in enumerate(dict.fromkeys(d.label for d in detections))}
    groups = torch.tensor([labels[d.label] for d in detections])
    keep = batched_nms(boxes, scores, groups, iou_threshold)
    return sorted(keep.tolist())


def _check_generation(generation: Generation) -> None:
    n = len(generation.token_ids)
    if len(generation.token_logprobs) != n:
        raise ValueError(
            f"Generation.token_logprobs has {len(generation.token_logprobs)} entries "
            f"for {n} token_ids"
        )
    if generation.loc_probs is not None and generation.loc_probs.shape[0] != n:
        raise ValueError(
            f"Generation.loc_probs has {generation.loc_probs.shape[0]} rows for {n} token_ids"
        )


@dataclass
class EvalResult:
    """Flat ``metrics``, one ``predictions`` record per sample and, when there were
    detection samples, their full ``detection`` evaluation (per class, PR, confusion)."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    detection: DetectionEvaluation | None = None

    def save(
        self, directory: str | Path, samples: Sequence[Sample] = (), n_images: int = 8
    ) -> Path:
        """Write ``predictions.jsonl`` and ``metrics.json`` (NaN written as null) and, for
        detection, ``per_class.csv``, ``coco_results.json`` with its ``coco_gt.json``,
        ``pr_curves.png`` and ``confusion_matrix.png``. Given the ``samples``, the first
        ``n_images`` are drawn with truth and predictions side by side in ``examples.png``.
        """
        from loctune.exports import write_coco
        from loctune.plots import plot_confusion_matrix, plot_pr_curves

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for record in self.predictions:
                f.write(json.dumps(json_safe(record)) + "\n")
        (out / "metrics.json").write_text(json.dumps(json_safe(self.metrics), indent=2) + "\n")
        if self.detection is not None and self.detection.classes:
            ev = self.detection
            rows = ["class,ap,ap50"] + [
                f"{c},{v['ap']:.6g},{v['ap50']:.6g}" for c, v in ev.per_class.items()
            ]
            (out / "per_class.csv").write_text("\n".join(rows) + "\n")
            detected = [r for r in self.predictions if r["task"] == "detection"]
            write_coco(detected, ev.classes, out)
            plot_pr_curves(ev, out / "pr_curves.png")
            plot_confusion_matrix(ev, out / "confusion_matrix.png")
        if samples and n_images > 0:
            save_examples(samples, self.predictions, out / "examples.png", n_images)
        return out


def save_examples(
    samples: Sequence[Sample], records: Sequence[dict[str, Any]], path: str | Path, n: int = 8
) -> None:
    """The first ``n`` samples with truth and predictions side by side, two pairs a row."""
    from loctune.visualize import draw_truth_and_predictions, tile

    pairs = [
        draw_truth_and_predictions(s.load_image(), r["detections"], s.boxes, s.labels)
        for s, r in list(zip(samples, records, strict=True))[:n]
    ]
    tile(pairs, columns=2).save(path)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, so ``json.dumps`` writes valid JSON (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def summarize(
    samples: Sequence[Sample], decoded: Sequence[DecodedGeneration], conf: float = CONF
) -> dict[str, float]:
    """Metrics of decoded generations against their samples (see :func:`_summarize`)."""
    return _summarize(samples, decoded, conf)[0]


def _summarize(
    samples: Sequence[Sample], decoded: Sequence[DecodedGeneration], conf: float = CONF
) -> tuple[dict[str, float], DetectionEvaluation | None]:
    """Flat metrics, and the full evaluation of the detection samples' argmax boxes.

    Grounding samples give ``acc50``/``miou`` (first predicted box vs the
    sample's box), detection samples ``ap``/``ap50``/``ap75``; each also with an
    ``ev_`` prefix for expected-value boxes. ``unparseable_rate`` is the share of
    samples with ground truth whose generation yields no valid object;
    ``n_malformed`` counts broken fragments; ``suppressed_rate`` is the share of
    decoded objects dropped as duplicates; ``loc_entropy`` is the mean entropy
    (nats) over all generated location tokens. Crowd regions a reader keeps in
    ``Sample.meta["crowd"]`` (``[label, box]`` pairs) are passed to COCOeval as
    crowd, so detections on them are neither true nor false positives. ``conf`` is the
    score from which a detection counts for precision, recall and the confusion matrix
    (AP uses every score).
    """
    if len(samples) != len(decoded):
        raise ValueError(f"{len(samples)} samples but {len(decoded)} decoded generations")
    for i, s in enumerate(samples):
        if s.task not in BOX_TASKS:
            raise ValueError(
                f"sample {i} ({s.image_id!r}): task must be one of {BOX_TASKS}, got {s.task!r}"
            )
        if s.task == "grounding" and not s.boxes:
            raise ValueError(f"sample {i} ({s.image_id!r}): a grounding sample needs a box")
    grounding = [i for i, s in enumerate(samples) if s.task == "grounding"]
    detection = [i for i, s in enumerate(samples) if s.task == "detection"]

    metrics: dict[str, float] = {}
    evaluation = None
    split = [_truth_and_crowd(samples[i]) for i in detection]
    truth, crowd = [t for t, _ in split], [c for _, c in split]
    for prefix, field in (("", "detections"), ("ev_", "ev_detections")):
        if grounding:
            preds = [getattr(decoded[i], field) for i in grounding]
            scores = grounding_metrics(
                [p[0].box if p else None for p in preds], [samples[i].boxes[0] for i in grounding]
            )
            metrics.update({prefix + k: v for k, v in scores.items()})
        if detection:
            found = evaluate_detections(
                [getattr(decoded[i], field) for i in detection], truth, crowd=crowd, conf=conf
            )
            evaluation = evaluation or found
            metrics.update(
                {prefix + k: v for k, v in found.metrics().items() if k in _EV_KEYS or not prefix}
            )
    expected = [d for s, d in zip(samples, decoded, strict=True) if s.boxes]
    metrics["unparseable_rate"] = (
        sum(not d.detections for d in expected) / len(expected) if expected else float("nan")
    )
    metrics["n_malformed"] = sum(d.n_malformed for d in decoded)
    n_objects = sum(len(d.detections) + d.n_suppressed for d in decoded)
    metrics["suppressed_rate"] = (
        sum(d.n_suppressed for d in decoded) / n_objects if n_objects else 0.0
    )
    metrics["loc_entropy"] = nanmean([h for d in decoded for h in d.loc_entropies])
    metrics["n_samples"] = len(samples)
    return metrics, evaluation


def _truth_and_crowd(sample: Sample) -> tuple[list[Detection], list[Detection]]:
    """The objects to find and the crowd regions, where COCOeval ignores detections:
    ``meta["crowd"]`` (``[label, box]`` pairs, kept out of training) and the boxes
    ``meta["iscrowd"]`` flags (trained on, as ``read_coco(include_crowd=True)`` reads them)."""
    if len(sample.labels) != len(sample.boxes):
        raise ValueError(
            f"sample {sample.image_id!r}: {len(sample.boxes)} boxes but {len(sample.labels)} labels"
        )
    flags = sample.meta.get("iscrowd") or [False] * len(sample.boxes)
    if len(flags) != len(sample.boxes):
        raise ValueError(
            f"sample {sample.image_id!r}: {len(sample.boxes)} boxes but {len(flags)} iscrowd flags"
        )
    truth = []
    crowd = [Detection(label, tuple(box)) for label, box in sample.meta.get("crowd", ())]
    for box, label, flag in zip(sample.boxes, sample.labels, flags, strict=True):
        (crowd if flag else truth).append(Detection(label, tuple(box)))
    return truth, crowd


def evaluate_generations(
    samples: Sequence[Sample],
    generations: Sequence[Generation],
    codec: Codec,
    loc_token_ids: Sequence[int],
    confidence: ConfidenceMode = "tokens",
    nms_iou: float | None = NMS_IOU,
    conf: float = CONF,
) -> EvalResult:
    """Score generations made elsewhere (one per sample, in order) as :func:`evaluate` does."""
    if len(samples) != len(generations):
        raise ValueError(f"{len(samples)} samples but {len(generations)} generations")
    decoder = GenerationDecoder(codec, loc_token_ids, confidence=confidence, nms_iou=nms_iou)
    decoded = [decoder(g, s.image_size, s.task) for s, g in zip(samples, generations, strict=True)]
    metrics, detection = _summarize(samples, decoded, conf)
    return EvalResult(metrics, _records(samples, generations, decoded), detection)


def _records(
    samples: Sequence[Sample],
    generations: Sequence[Generation],
    decoded: Sequence[DecodedGeneration],
) -> list[dict[str, Any]]:
    return [_record(s, g, d) for s, g, d in zip(samples, generations, decoded, strict=True)]


def _record(s: Sample, g: Generation, d: DecodedGeneration) -> dict[str, Any]:
    """One sample's prediction record; its ``gt`` holds the crowd regions apart, as
    ``[label, box]`` pairs, so that the saved COCO files score as the metrics do."""
    truth, crowd = _truth_and_crowd(s)
    return {
        "image_id": s.image_id,
        "task": s.task,
        "prompt": s.prompt,
        "text": g.text,
        "detections": [asdict(det) for det in d.detections],
        "ev_detections": [asdict(det) for det in d.ev_detections],
        "n_malformed": d.n_malformed,
        "n_suppressed": d.n_suppressed,
        "image_size": list(s.image_size),
        "gt": {
            "boxes": [list(t.box) for t in truth],
            "labels": [t.label for t in truth],
            "crowd": [[c.label, list(c.box)] for c in crowd],
        },
    }


def evaluate(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    score: bool = True,
    confidence: ConfidenceMode = "tokens",
    nms_iou: float | None = NMS_IOU,
    conf: float = CONF,
) -> EvalResult:
    """Generate for every sample with ``adapter``, decode both ways and score.

    ``max_new_tokens`` defaults to room for the largest ground truth (at least
    four objects). ``score=False`` skips the metrics, for unlabelled images
    (prediction). ``confidence`` is the detection score, see
    :class:`GenerationDecoder`, as is ``nms_iou`` (duplicate suppression for
    detection answers; ``None`` turns it off); ``conf`` the score from which a detection
    counts for precision, recall and the confusion matrix (``precision@<conf>``). The
    model is in eval mode for the run and put back in its previous mode afterwards, so a
    training loop can call this.
    """
    if not samples:
        raise ValueError("evaluate: no samples")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is None:
        most = max(len(s.boxes) for s in samples)
        max_new_tokens = 16 + (adapter.codec.tokens_per_box + 8) * max(most, 4)
    decoder = GenerationDecoder(
        adapter.codec, adapter.loc_token_ids, confidence=confidence, nms_iou=nms_iou
    )
    generations: list[Generation] = []
    decoded: list[DecodedGeneration] = []
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with (
            torch.no_grad(),
            tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress) as bar,
        ):
            for start in range(0, len(samples), batch_size):
                batch = list(samples[start : start + batch_size])
                out = adapter.generate(batch, max_new_tokens=max_new_tokens)
                if len(out) != len(batch):
                    raise ValueError(
                        f"adapter.generate returned {len(out)} generations for {len(batch)} samples"
                    )
                generations.extend(out)
                decoded.extend(
                    decoder(g, s.image_size, s.task) for s, g in zip(batch, out, strict=True)
                )
                bar.update(len(batch))
    finally:
        adapter.model.train(was_training)
    metrics, detection = _summarize(samples, decoded, conf) if score else ({}, None)
    return EvalResult(metrics, _records(samples, generations, decoded), detection)


__all__ = [
    "CONFIDENCE_MODES",
    "DecodedGeneration",
    "EvalResult",
    "GenerationDecoder",
    "evaluate",
    "evaluate_generations",
    "expected_locations",
    "json_safe",
    "save_examples",
    "summarize",
    "suppress_duplicates",
]
