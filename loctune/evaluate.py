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
    coco_detection_metrics,
    grounding_metrics,
    location_entropy,
    nanmean,
)
from loctune.models.base import Generation, VLMAdapter
from loctune.types import BOX_TASKS, Box, Detection, ObjectSpan, Sample

ConfidenceMode = Literal["tokens", "loc_tokens", "loc_mass"]
CONFIDENCE_MODES: tuple[str, ...] = ("tokens", "loc_tokens", "loc_mass")
_EV_KEYS = ("acc50", "miou", "ap", "ap50", "ap75")  # metrics that depend on the boxes


@dataclass
class DecodedGeneration:
    """What one generation yields: both decodings and the diagnostics.

    ``ev_detections[i]`` is ``detections[i]`` with its expected-value box (same
    label and score). ``loc_entropies`` holds one entropy per generated location
    token, in nats.
    """

    detections: list[Detection]
    ev_detections: list[Detection]
    n_malformed: int
    loc_entropies: list[float]


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
    """

    def __init__(
        self,
        codec: Codec,
        loc_token_ids: Sequence[int],
        confidence: ConfidenceMode = "tokens",
        mass_radius: float = 1.0,
    ):
        if confidence not in CONFIDENCE_MODES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MODES}, got {confidence!r}")
        space = codec.space
        if space is not None and len(loc_token_ids) != space.size:
            raise ValueError(
                f"loc_token_ids has {len(loc_token_ids)} ids but codec {codec.name!r} has "
                f"{space.size} location tokens"
            )
        self.codec = codec
        self.confidence = confidence
        self.mass_radius = mass_radius
        self._loc_index = {int(t): k for k, t in enumerate(loc_token_ids)}
        self._coords = space.coords(dtype=torch.float64) if space is not None else None

    def __call__(self, generation: Generation, image_size: tuple[int, int]) -> DecodedGeneration:
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
        return DecodedGeneration(
            detections, ev_detections, decoded.n_malformed + n_unaligned, entropies
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
    """Flat ``metrics`` and one ``predictions`` record per sample."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]

    def save(self, directory: str | Path) -> Path:
        """Write ``predictions.jsonl`` and ``metrics.json`` (NaN written as null)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            for record in self.predictions:
                f.write(json.dumps(_json_safe(record)) + "\n")
        (out / "metrics.json").write_text(json.dumps(_json_safe(self.metrics), indent=2) + "\n")
        return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def summarize(samples: Sequence[Sample], decoded: Sequence[DecodedGeneration]) -> dict[str, float]:
    """Metrics of decoded generations against their samples.

    Grounding samples give ``acc50``/``miou`` (first predicted box vs the
    sample's box), detection samples ``ap``/``ap50``/``ap75``; each also with an
    ``ev_`` prefix for expected-value boxes. ``unparseable_rate`` is the share of
    samples with ground truth whose generation yields no valid object;
    ``n_malformed`` counts broken fragments; ``loc_entropy`` is the mean entropy
    (nats) over all generated location tokens.
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
    for prefix, field in (("", "detections"), ("ev_", "ev_detections")):
        if grounding:
            preds = [getattr(decoded[i], field) for i in grounding]
            scores = grounding_metrics(
                [p[0].box if p else None for p in preds], [samples[i].boxes[0] for i in grounding]
            )
            metrics.update({prefix + k: v for k, v in scores.items()})
        if detection:
            scores = coco_detection_metrics(
                [getattr(decoded[i], field) for i in detection],
                [_ground_truth(samples[i]) for i in detection],
            )
            metrics.update(
                {prefix + k: v for k, v in scores.items() if k in _EV_KEYS or not prefix}
            )
    expected = [d for s, d in zip(samples, decoded, strict=True) if s.boxes]
    metrics["unparseable_rate"] = (
        sum(not d.detections for d in expected) / len(expected) if expected else float("nan")
    )
    metrics["n_malformed"] = sum(d.n_malformed for d in decoded)
    metrics["loc_entropy"] = nanmean([h for d in decoded for h in d.loc_entropies])
    metrics["n_samples"] = len(samples)
    return metrics


def _ground_truth(sample: Sample) -> list[Detection]:
    if len(sample.labels) != len(sample.boxes):
        raise ValueError(
            f"sample {sample.image_id!r}: {len(sample.boxes)} boxes but {len(sample.labels)} labels"
        )
    return [Detection(label, box) for box, label in zip(sample.boxes, sample.labels, strict=True)]


def evaluate_generations(
    samples: Sequence[Sample],
    generations: Sequence[Generation],
    codec: Codec,
    loc_token_ids: Sequence[int],
    confidence: ConfidenceMode = "tokens",
) -> EvalResult:
    """Score generations made elsewhere (one per sample, in order) as :func:`evaluate` does."""
    if len(samples) != len(generations):
        raise ValueError(f"{len(samples)} samples but {len(generations)} generations")
    decoder = GenerationDecoder(codec, loc_token_ids, confidence=confidence)
    decoded = [decoder(g, s.image_size) for s, g in zip(samples, generations, strict=True)]
    return EvalResult(summarize(samples, decoded), _records(samples, generations, decoded))


def _records(
    samples: Sequence[Sample],
    generations: Sequence[Generation],
    decoded: Sequence[DecodedGeneration],
) -> list[dict[str, Any]]:
    return [
        {
            "image_id": s.image_id,
            "task": s.task,
            "prompt": s.prompt,
            "text": g.text,
            "detections": [asdict(det) for det in d.detections],
            "ev_detections": [asdict(det) for det in d.ev_detections],
            "n_malformed": d.n_malformed,
            "gt": {"boxes": [list(b) for b in s.boxes], "labels": list(s.labels)},
        }
        for s, g, d in zip(samples, generations, decoded, strict=True)
    ]


def evaluate(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    score: bool = True,
    confidence: ConfidenceMode = "tokens",
) -> EvalResult:
    """Generate for every sample with ``adapter``, decode both ways and score.

    ``max_new_tokens`` defaults to room for the largest ground truth (at least
    four objects). ``score=False`` skips the metrics, for unlabelled images
    (prediction). ``confidence`` is the detection score, see
    :class:`GenerationDecoder`. The model is in eval mode for the run and put
    back in its previous mode afterwards, so a training loop can call this.
    """
    if not samples:
        raise ValueError("evaluate: no samples")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is None:
        most = max(len(s.boxes) for s in samples)
        max_new_tokens = 16 + (adapter.codec.tokens_per_box + 8) * max(most, 4)
    decoder = GenerationDecoder(adapter.codec, adapter.loc_token_ids, confidence=confidence)
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
                decoded.extend(decoder(g, s.image_size) for s, g in zip(batch, out, strict=True))
                bar.update(len(batch))
    finally:
        adapter.model.train(was_training)
    metrics = summarize(samples, decoded) if score else {}
    return EvalResult(metrics, _records(samples, generations, decoded))


__all__ = [
    "CONFIDENCE_MODES",
    "DecodedGeneration",
    "EvalResult",
    "GenerationDecoder",
    "evaluate",
    "evaluate_generations",
    "expected_locations",
    "summarize",
]
