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

Objects are tied to their tokens by walking ``token_ids``: runs of location
token ids are cut into groups of ``codec.tokens_per_box``, and each decoded
object is matched, in order, with the next group whose argmax box equals the
object's box (the codec contract makes them identical). An object without a
group (text and tokens disagree) keeps its argmax box for EV decoding, gets the
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
from loctune.types import Box, Detection, Sample

ConfidenceMode = Literal["tokens", "loc_tokens", "loc_mass"]
CONFIDENCE_MODES: tuple[str, ...] = ("tokens", "loc_tokens", "loc_mass")
TASKS = ("grounding", "detection")
_EV_KEYS = ("acc50", "miou", "ap", "ap50", "ap75")  # metrics that depend on the boxes
_BOX_MATCH_ATOL = 1e-3  # pixels; argmax group box vs decoded box, equal by contract


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
    only); ``groups`` are the steps of each box, in order.
    """

    location: dict[int, int]
    groups: list[list[int]]
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

    A codec's label tokens are those between an object's location group and the
    neighbouring group, on the side where ``codec.encode`` writes the label.
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
        self._label_side = _label_side(codec)

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
        for det, j in zip(
            decoded.detections, self._align(decoded.detections, walk, image_size), strict=True
        ):
            box = tuple(float(v) for v in det.box)
            if j is None:
                n_unaligned += 1
                score, ev_box = fallback_score, box
            else:
                score = self._confidence(walk, j)
                ev_box = self._expected_box(walk, j, image_size) or box
            detections.append(Detection(det.label, box, score))
            ev_detections.append(Detection(det.label, ev_box, score))
        return DecodedGeneration(
            detections, ev_detections, decoded.n_malformed + n_unaligned, entropies
        )

    def _walk(self, generation: Generation) -> _TokenWalk:
        """Location steps, cut into boxes: runs of consecutive location tokens split
        into ``tokens_per_box``; a run's leftover is dropped (the codec reads the same
        broken run in the text and counts it)."""
        location = {
            i: self._loc_index[int(t)]
            for i, t in enumerate(generation.token_ids)
            if int(t) in self._loc_index
        }
        runs: list[list[int]] = []
        for i in location:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        n = self.codec.tokens_per_box
        groups = [run[k : k + n] for run in runs for k in range(0, len(run) - n + 1, n)]
        loc_probs = generation.loc_probs
        return _TokenWalk(
            location,
            groups,
            torch.as_tensor(generation.token_logprobs, dtype=torch.float64),
            None if loc_probs is None else loc_probs.detach().to("cpu", torch.float64),
        )

    def _group_locations(self, walk: _TokenWalk, j: int) -> list[int]:
        return [walk.location[i] for i in walk.groups[j]]

    def _align(
        self, detections: list[Detection], walk: _TokenWalk, image_size: tuple[int, int]
    ) -> list[int | None]:
        """Group index for each detection, matched in order by identical argmax box."""
        if self._coords is None:
            return [None] * len(detections)
        group_boxes = [
            torch.tensor(
                self.codec.locations_to_box(
                    self._coords[self._group_locations(walk, j)].tolist(), image_size
                ),
                dtype=torch.float64,
            )
            for j in range(len(walk.groups))
        ]
        matches: list[int | None] = []
        next_group = 0
        for det in detections:
            box = torch.tensor(det.box, dtype=torch.float64)
            found = next(
                (
                    j
                    for j in range(next_group, len(group_boxes))
                    if torch.allclose(group_boxes[j], box, rtol=0, atol=_BOX_MATCH_ATOL)
                ),
                None,
            )
            matches.append(found)
            if found is not None:
                next_group = found + 1
        return matches

    def _confidence(self, walk: _TokenWalk, j: int) -> float:
        group = walk.groups[j]
        if self.confidence == "loc_mass":
            if walk.loc_probs is None:
                raise ValueError(
                    "confidence='loc_mass' needs Generation.loc_probs; the adapter gave none"
                )
            assert self.codec.space is not None  # groups exist only for token codecs
            chosen = torch.tensor(self._group_locations(walk, j))
            near = self.codec.space.distance(chosen) <= self.mass_radius + 1e-9
            mass = (walk.loc_probs[group] * near).sum(dim=-1)
            return float(mass.clamp(min=1e-300).log().mean().exp().clamp(max=1.0))
        steps = list(group)
        if self.confidence == "tokens":
            steps += self._label_steps(walk, j)
        return float(walk.logprobs[steps].mean().exp())

    def _label_steps(self, walk: _TokenWalk, j: int) -> list[int]:
        groups = walk.groups
        if self._label_side == "after":
            end = groups[j + 1][0] if j + 1 < len(groups) else len(walk.logprobs)
            return list(range(groups[j][-1] + 1, end))
        if self._label_side == "before":
            start = groups[j - 1][-1] + 1 if j > 0 else 0
            return list(range(start, groups[j][0]))
        return []

    def _expected_box(self, walk: _TokenWalk, j: int, image_size: tuple[int, int]) -> Box | None:
        """EV box, or None when there is no distribution to take the expectation over."""
        if walk.loc_probs is None:
            return None
        values = expected_locations(walk.loc_probs[walk.groups[j]], self._coords)
        if not torch.isfinite(values).all():
            return None
        return tuple(float(v) for v in self.codec.locations_to_box(values.tolist(), image_size))


def _label_side(codec: Codec) -> str | None:
    """Whether ``codec`` writes a label before or after an object's location tokens.

    Read off one encoded example; None when the codec writes no label or has no
    location tokens (then labels play no part in the score).
    """
    if codec.space is None:
        return None
    marker = "thing"
    text = codec.encode([(16.0, 16.0, 48.0, 48.0)], [marker], (64, 64))
    label_at = text.find(marker)
    loc_at = [text.find(tok) for tok in codec.location_tokens if tok in text]
    if label_at < 0 or not loc_at:
        return None
    return "before" if label_at < min(loc_at) else "after"


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
        if s.task not in TASKS:
            raise ValueError(
                f"sample {i} ({s.image_id!r}): task must be one of {TASKS}, got {s.task!r}"
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
